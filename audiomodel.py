"""The audio task's two heads on the shared recurrent stack (`recurrent.recurrent_stack`).

`AudioFeatureModel` is the GRU report's regression: the next `pred_steps` audio-feature vectors
after `seq_len` plays. `AudioRankingModel` ranks candidate songs: a learned weighting of each
candidate's listening priors (`priors.py`) and of its audio similarity to the plays just heard,
plus, with `--ranking_query=gru`, a learned similarity between a GRU query over those plays and
the candidate; trained with a softmax over the candidate set (`candidate_softmax_loss`).
"""

from __future__ import annotations

import keras
from keras import layers, ops

import config as config_lib
import priors
import recurrent

NEG = -1e9  # the logit of a padding candidate
PRIOR_HIDDEN = 8  # units of the priors' residual MLP (chosen on harry2687's validation split)
QUERY_SIZES = dict(hidden_size=16, embedding_size=8, dim=8)  # --ranking_query=gru (validation)


AUDIO_LOSSES = {  # --loss; Huber with delta 1 is PyTorch's SmoothL1Loss (beta 1)
    "mse": keras.losses.MeanSquaredError,
    "smooth_l1": lambda: keras.losses.Huber(delta=1.0),
}


@keras.saving.register_keras_serializable(package="deepcf")
class AudioFeatureModel(keras.Model):
    """Audio-feature regression: the next `pred_steps` feature vectors after `seq_len` plays.

    Call input: float32 [batch, seq_len, num_features] (scaled features, oldest first); output:
    float32 [batch, pred_steps, num_features]. Every window starts from a zero state: windows
    overlap, so there is no state to carry between them. Trained by Keras' own `train_step` with
    the loss given to `compile_model`. GRU layers are `FixedLengthGRU`s (LSTM layers unrolled) and
    the train step is XLA-compiled (docs/results.md has the step times).
    """

    SAVED = ("num_features", "seq_len", "pred_steps", "cell", "num_layers", "hidden_size")
    SAVED += ("dropout",)

    def __init__(
        self,
        *,
        num_features: int,
        seq_len: int = 10,
        pred_steps: int = 5,
        cell: str = "gru",
        num_layers: int = 2,
        hidden_size: int = 512,
        dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_features, self.seq_len, self.pred_steps = num_features, seq_len, pred_steps
        self.cell, self.num_layers, self.hidden_size = cell, num_layers, hidden_size
        self.dropout = dropout
        self.rnns = recurrent.recurrent_stack(
            cell, num_layers, hidden_size, dropout, fixed_length=True
        )
        self.head = layers.Dense(pred_steps * num_features, name="next_features")

    def get_config(self) -> dict:
        return recurrent.saved_config(self, super().get_config())

    def build(self, input_shape=None) -> None:
        self.call(ops.zeros((1, self.seq_len, self.num_features)))
        self.built = True

    def call(self, features, training: bool = False):
        x, _ = recurrent.run_stack(self.rnns, features, [None] * self.num_layers, training=training)
        y = self.head(x[:, -1])
        return ops.reshape(y, (-1, self.pred_steps, self.num_features))


def build_audio_model(config: config_lib.Config, num_features: int) -> AudioFeatureModel:
    """A built `AudioFeatureModel` of the `--task=audio_features` flags, compiled with Adam
    (`--learning_rate`, `--max_grad_norm`), the `--loss` of `AUDIO_LOSSES` and XLA."""
    model = AudioFeatureModel(
        num_features=num_features,
        seq_len=config.seq_len,
        pred_steps=config.pred_steps,
        **recurrent.stack_args(config),
    )
    model.build()
    loss = AUDIO_LOSSES[config.loss]()
    recurrent.compile_model(
        model, config.learning_rate, config.max_grad_norm, loss, jit_compile=True
    )
    return model


def candidate_softmax_loss(positives, logits):
    """-log of the summed softmax probability of the positive candidates, per sample.

    Args:
      positives: float [batch, C], 1 where the candidate is among the true next songs.
      logits: float [batch, C], padding at `NEG`.

    Returns:
      float [batch]: logsumexp(logits) - logsumexp(logits of the positives); 0 for a sample
      without a positive (its weight in training is 0 too).
    """
    has_positive = ops.max(positives, axis=-1) > 0
    all_ = ops.logsumexp(logits, axis=-1)
    positive = ops.logsumexp(ops.where(positives > 0, logits, NEG), axis=-1)
    return ops.where(has_positive, all_ - positive, 0.0)


@keras.saving.register_keras_serializable(package="deepcf")
class CandidateSoftmax(keras.losses.Loss):
    """`candidate_softmax_loss`, averaged over the samples that have a positive (their weight)."""

    def __init__(self, name: str = "candidate_softmax", **kwargs):
        super().__init__(name=name, reduction="mean_with_sample_weight", **kwargs)

    def call(self, y_true, y_pred):
        return candidate_softmax_loss(y_true, y_pred)


INPUTS = ("x_ids", "w_ids", "w_pri", "o_ids", "o_pri", "o_logq")


@keras.saving.register_keras_serializable(package="deepcf")
class AudioRankingModel(keras.Model):
    """Scores the window and open-catalog candidates of each sample (see `priors.build_samples`).

    Call input: a dict of `INPUTS` (ids are song id + 1, 0 = padding); output: (window logits
    float32 [batch, Cw], open logits float32 [batch, Co] minus `o_logq`), padding at `NEG`.
    score(c) = linear(f_c) + mlp(f_c) [+ <query(plays), W [z_c, e_c]>], where f_c = the
    candidate's priors and 3 audio similarities to the `seq_len` plays read (cosine to their
    mean and to the last one, minus the RMS distance to their mean), z_c the candidate's
    z-scored features (`song_z`, set per month) and e_c its identity embedding. The weightings
    start at zero: the untrained model ranks like `recent`.
    """

    SAVED = ("num_songs", "num_features", "query", "identity")

    def __init__(
        self, *, num_songs: int, num_features: int, query: str = "none", identity: bool = False,
        **kwargs,
    ):  # fmt: skip
        super().__init__(**kwargs)
        self.num_songs, self.num_features = num_songs, num_features
        self.query, self.identity = query, identity
        self.song_z = self.add_weight(
            shape=(num_songs + 1, num_features), initializer="zeros", trainable=False, name="song_z"
        )
        self.linear = layers.Dense(1, kernel_initializer="zeros", name="prior_weights")
        self.hidden = layers.Dense(PRIOR_HIDDEN, activation="relu", name="prior_hidden")
        self.residual = layers.Dense(1, kernel_initializer="zeros", name="prior_residual")
        if query == "gru":
            sizes = QUERY_SIZES
            if identity:
                self.embedding = layers.Embedding(
                    num_songs + 1, sizes["embedding_size"], name="song_embedding"
                )
            (self.gru,) = recurrent.recurrent_stack("gru", 1, sizes["hidden_size"], 0.0, True)
            self.to_query = layers.Dense(sizes["dim"], name="query")
            self.to_key = layers.Dense(sizes["dim"], kernel_initializer="zeros", name="key")

    def get_config(self) -> dict:
        return recurrent.saved_config(self, super().get_config())

    def build(self, input_shape=None) -> None:
        shapes = {"x_ids": (1, 2), "w_ids": (1, 2), "o_ids": (1, 2), "o_logq": (1, 2)}
        dummy = {
            k: ops.ones(s, "int32" if k.endswith("ids") else "float32") for k, s in shapes.items()
        }
        dummy.update({k: ops.zeros((1, 2, priors.NUM_PRIORS)) for k in ("w_pri", "o_pri")})
        self.call(dummy)
        self.built = True

    def songs(self, ids):
        """[..., F (+ embedding)]: the songs' z-scored features (and identity embeddings)."""
        parts = [ops.take(self.song_z, ids, axis=0)]
        if self.identity:
            parts.append(self.embedding(ids))
        return ops.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]

    def audio_similarities(self, x_ids, ids):
        """float [batch, C, 3]: each candidate's audio similarity to the plays read."""
        heard, cands = ops.take(self.song_z, x_ids, axis=0), ops.take(self.song_z, ids, axis=0)
        mean, last = ops.mean(heard, axis=1), heard[:, -1]

        def cosine(a, b):
            norms = ops.norm(a, axis=-1)[:, None] * ops.norm(b, axis=-1) + 1e-6
            return ops.einsum("bf,bcf->bc", a, b) / norms

        distance = ops.sqrt(ops.mean(ops.square(cands - mean[:, None]), axis=-1) + 1e-9)
        return ops.stack([cosine(mean, cands), cosine(last, cands), -distance], axis=-1)

    def score(self, query, x_ids, ids, prior):
        features = ops.concatenate([prior, self.audio_similarities(x_ids, ids)], axis=-1)
        score = self.linear(features) + self.residual(self.hidden(features))
        score = ops.squeeze(score, -1)
        if query is not None:
            score = score + ops.einsum("bd,bcd->bc", query, self.to_key(self.songs(ids)))
        return ops.where(ids > 0, score, NEG)

    def call(self, inputs, training: bool = False):
        x_ids, query = inputs["x_ids"], None
        if self.query == "gru":
            _, state = self.gru(self.songs(x_ids), training=training)
            query = self.to_query(state)
        window = self.score(query, x_ids, inputs["w_ids"], inputs["w_pri"])
        open_ = self.score(query, x_ids, inputs["o_ids"], inputs["o_pri"])
        return window, ops.where(inputs["o_ids"] > 0, open_ - inputs["o_logq"], NEG)


def build_ranking_model(
    config: config_lib.Config, num_songs: int, num_features: int
) -> AudioRankingModel:
    """A built `AudioRankingModel` of the `--ranking_*` flags, compiled with Adam
    (`--ranking_learning_rate`, `--max_grad_norm`) and `CandidateSoftmax` on both outputs."""
    model = AudioRankingModel(
        num_songs=num_songs,
        num_features=num_features,
        query=config.ranking_query,
        identity=config.identity_embedding,
    )
    model.build()
    loss = [CandidateSoftmax(), CandidateSoftmax()]
    recurrent.compile_model(model, config.ranking_learning_rate, config.max_grad_norm, loss)
    return model
