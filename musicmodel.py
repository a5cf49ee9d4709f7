"""The next-song model: `MusicModel`, its loss, and `build_model` from the `Config`.

`MusicModel` is song embedding -> `num_layers` x LSTM or GRU (`recurrent.py`, the stack the audio
task's models share) -> dense logits over the catalog.
Training feeds `num_steps` windows of a batch one after the other; the final recurrent state of a
window is kept in non-trainable variables and used as the initial state of the next window, except
in rows whose `reset` flag is set (a new playlist starts there), which start from zeros.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

import config as config_lib
import kernels
import metrics
import recurrent
import repeats
import songrows
import transitions
from errors import ConfigError
from recurrent import compile_model, recurrent_stack, run_stack, saved_config


def weighted_mean(per_event, weights, total_weight=None):
    """sum(weights * per_event) / total_weight (default `sum(weights)`; at least 1)."""
    total_weight = ops.sum(weights) if total_weight is None else total_weight
    return ops.sum(per_event * weights) / ops.maximum(total_weight, 1.0)


PAD_LOGIT = -1e9  # the padding row's bias in the tied training softmax: exp underflows to 0
EVAL_CHUNK = 256  # events scored at once in evaluation: 256 x 9,775 logits = 10 MB


def real_events(weights, *tensors):
    """`tensors` [batch, time, ...] at the real events (`weights` [batch, time] > 0), in order,
    without the padding: each [events, ...]."""
    return tuple(tf.boolean_mask(t, weights > 0) for t in tensors)


def carried_variable(shape: tuple, name: str, dtype: str = "float32") -> keras.Variable:
    """A zero variable carried from window to window, never trained; one copy per replica."""
    return keras.Variable(
        initializer="zeros", shape=shape, dtype=dtype, trainable=False,
        synchronization="on_read", aggregation="only_first_replica", name=name,
    )  # fmt: skip


@keras.saving.register_keras_serializable(package="deepcf")
class MusicModel(keras.Model):
    """Next-song model with per-row carried state.

    Call inputs: `(tokens, reset)` with tokens int32 [batch, time] (0 = padding) and reset bool
    [batch]; output: logits float32 [batch, time, num_songs] (column s is song id s).

    `tie_embeddings` scores song s with its own input embedding (projected state . E[s + 1] + b_s).
    `loss_weighting="window"` trains on the mean cross-entropy of each window's real events;
    `"event"` on their sum / (batch x time), so every event of an epoch weighs the same (a window
    of few real events, e.g. the tail of a batch, no longer counts as much as a full one).
    `softmax="sampled"` trains on the target against `num_sampled` negatives per window, drawn in
    the graph with probability Q ∝ `song_counts` + 1 and corrected by -log Q; evaluation and
    serving always score the full catalog, so neither setting is saved with the model.
    `side_features` ("artist", "artist_tags"; needs tied embeddings and the full softmax) builds
    each song's vector and bias from its own row (initially 0) plus its artist's and tags' rows
    (`songrows.SideRows`, from `song_artists`, `song_tags`); songs with no training events
    (`song_counts` 0) are left out of the training softmax and score through those rows alone.
    `transition="markov"` mixes in transitions by a learned per-event gate (`transitions.
    TransitionMixture`, `transition_tables`); logits are then the mixture's log-probabilities,
    plus with `repeat_window` > 0 a learned per-gap bias for the last plays' songs (`repeats`).
    """

    SAVED = ("num_songs", "cell", "num_layers", "embedding_size", "hidden_size", "dropout")
    SAVED += ("batch_size", "tie_embeddings", "loss_weighting", "repeat_window", "repeat_step")
    SAVED += ("side_features", "num_artists", "num_tags", "transition", "transition_width")

    def __init__(
        self,
        *,
        num_songs: int,
        cell: str = "lstm",
        num_layers: int = 2,
        embedding_size: int = 100,
        hidden_size: int = 100,
        dropout: float = 0.0,
        batch_size: int = 100,
        tie_embeddings: bool = False,
        loss_weighting: str = "window",
        softmax: str = "full",
        num_sampled: int = 1024,
        song_counts: np.ndarray | None = None,
        side_features: str = "none",
        num_artists: int = 0,
        num_tags: int = 0,
        song_artists: np.ndarray | None = None,
        song_tags: np.ndarray | None = None,
        transition: str = "none",
        transition_width: int = 128,
        transition_tables: dict | None = None,
        repeat_window: int = 0,
        repeat_step: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_songs, self.cell, self.num_layers = num_songs, cell, num_layers
        self.embedding_size, self.hidden_size = embedding_size, hidden_size
        self.dropout, self.batch_size = dropout, batch_size
        self.tie_embeddings, self.loss_weighting = tie_embeddings, loss_weighting
        self.softmax, self.num_sampled, self.sampler = softmax, num_sampled, None
        if softmax == "sampled":
            check_num_sampled(num_sampled, num_songs)
            self.sampler = kernels.SongSampler(num_songs if song_counts is None else song_counts)
        elif softmax != "full":
            raise ConfigError(f"--softmax={softmax!r}: must be full or sampled")
        self.side_features, self.num_artists, self.num_tags = side_features, num_artists, num_tags
        side = side_features != "none"
        songrows.check_side_features(side_features, softmax, tie_embeddings)
        self.embedding = layers.Embedding(
            num_songs + 1, embedding_size, "zeros" if side else "uniform", name="song_embedding"
        )
        self.drop = layers.Dropout(dropout)
        self.rnns = recurrent_stack(cell, num_layers, hidden_size, dropout)
        if tie_embeddings:  # logits = h W (W: hidden -> embedding) E[1:]^T + b
            self.head = layers.Dense(embedding_size, use_bias=False, name="to_embedding")
            self.output_bias = self.add_weight(shape=(num_songs,), initializer="zeros", name="bias")
        else:
            self.head = layers.Dense(num_songs, name="next_song_logits", dtype="float32")
        self.side = None
        if side:
            self.embedding.build()  # its rows are read directly, never through a call
            self.side = songrows.SideRows(
                num_songs, num_artists, num_tags, embedding_size, song_artists, song_tags,
                song_counts, name="side_rows",
            )  # fmt: skip
        per_layer = 2 if cell == "lstm" else 1
        # One copy per replica (ON_READ), each holding the state of the whole global batch, so
        # checkpoints have the same layout under every strategy (see `call`, docs/scaling.md).
        with keras.name_scope(self.name):
            shape = (batch_size, hidden_size)
            self.carried = [
                [carried_variable(shape, f"carried_{i}_{j}") for j in range(per_layer)]
                for i in range(num_layers)
            ]
        transitions.check_transition(transition)
        self.transition, self.transition_width, self.mixture = transition, transition_width, None
        if transition != "none":
            dims = embedding_size if tie_embeddings else hidden_size
            self.mixture = transitions.TransitionMixture(
                num_songs, transition_width, dims, transition_tables,
                artists=transition == "markov_artist", name="transition",
            )  # fmt: skip
        repeats.check_repeat_window(repeat_window, softmax, repeat_step)
        self.repeat_window, self.repeat_step, self.repeat = repeat_window, repeat_step, None
        if repeat_window:
            self.repeat = repeats.RepeatBias(repeat_window, name="repeat")
            with keras.name_scope(self.name):
                self.recent = carried_variable((batch_size, repeat_window), "recent_songs", "int32")
        self.ranking = metrics.RankingMetrics()
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def song_table(self, training: bool = False) -> tuple:
        """(vectors float32 [num_songs, dims], bias float32 [songs]) of the tied song rows."""
        vectors, bias = self.embedding.embeddings[1:], self.output_bias
        if self.side is None:
            return vectors, bias
        return self.side.combine(vectors, bias, training)

    def get_config(self) -> dict:
        return saved_config(self, super().get_config())

    def build(self, input_shape=None) -> None:
        tokens = ops.zeros((self.batch_size, 1), "int32")
        self.forward(tokens, self.zero_state(self.batch_size))
        self.built = True

    def zero_state(self, batch: int) -> list:
        """All-zero initial state for `batch` rows."""
        return [[ops.zeros((batch, self.hidden_size)) for _ in layer] for layer in self.carried]

    def features(self, tokens, states: list, training: bool = False):
        """(queries [batch, time, dims], final states); logits = queries @ kernel + bias."""
        if self.side is None:
            x = self.embedding(tokens)
        else:  # row 0 of the input table is padding
            vectors = self.song_table(training)[0]
            x = ops.take(ops.pad(vectors, [[1, 0], [0, 0]]), tokens, axis=0)
        x = self.drop(x, training=training)
        x, finals = run_stack(self.rnns, x, states, training=training)
        x = self.drop(x, training=training)
        return (self.head(x) if self.tie_embeddings else x), finals

    def output_layer(self) -> tuple:
        """(kernel float32 [dims, songs], bias float32 [songs]) that score the queries."""
        if self.tie_embeddings:  # row s + 1 embeds song s; row 0 is padding
            vectors, bias = self.song_table()
            return ops.transpose(vectors), bias
        return self.head.kernel, self.head.bias

    def scores(self, queries, tokens, repeat: tuple | None = None):
        """Logits float32 [..., songs] of queries [..., dims] after `tokens` [...], float32 under
        any dtype policy (bfloat16 would tie many songs); `repeat` (`repeat_inputs`) added last."""
        if self.tie_embeddings:
            kernel, bias = self.output_layer()
            logits = ops.matmul(ops.cast(queries, "float32"), kernel) + bias
        else:
            logits = self.head(queries)
        if self.mixture is not None:
            logits = self.mixture.log_mixture(logits, queries, tokens)
        return logits if repeat is None else repeats.add_bias(logits, *repeat)

    def forward(self, tokens, states: list, training: bool = False, history=None):
        """Pure forward pass: (logits [batch, time, songs], final states); `history` [batch,
        length] the tokens whose last `time` are `tokens` (for the repeat bias)."""
        queries, finals = self.features(tokens, states, training=training)
        return self.scores(
            queries, tokens, self.repeat_inputs(history, ops.shape(tokens)[1])
        ), finals

    def repeat_inputs(self, history, steps: int) -> tuple | None:
        """(songs [batch, steps, length], bias) of `scores` for the last `steps` of `history`."""
        if self.repeat is None or history is None:
            return None
        bias = self.repeat.window_bias(history, steps)
        return ops.broadcast_to(history[:, None, :], ops.shape(bias)), bias

    def replica_rows(self, variable):
        """The rows of a carried `variable` that this replica's part of the batch uses."""
        replica = tf.distribute.get_replica_context()  # None in a cross-replica context
        if not replica or replica.num_replicas_in_sync == 1:
            return variable
        rows = self.batch_size // replica.num_replicas_in_sync
        first = replica.replica_id_in_sync_group * rows
        return variable[first : first + rows]

    def recent_history(self, tokens, reset):
        """int32 [batch, repeat_window + time]: the carried recent songs (none after a reset),
        then `tokens`."""
        keep = ops.expand_dims(ops.logical_not(ops.cast(reset, "bool")), -1)
        recent = ops.where(keep, self.replica_rows(self.recent), 0)
        return ops.concatenate([recent, ops.cast(tokens, "int32")], 1)

    def call(self, inputs, training: bool = False, queries: bool = False):
        """Runs a window from the carried state and carries its final state to the next window.

        Under a `tf.distribute` strategy with R replicas, replica r gets rows
        `[r * batch_size / R, (r + 1) * batch_size / R)` of every window (see
        `yes_reader.to_dataset`): it starts from those rows of the carried state, then the
        replicas gather their final states, so that every copy again holds the whole batch.
        """
        tokens, reset = inputs
        replica = tf.distribute.get_replica_context()  # None in a cross-replica context
        replicas = replica.num_replicas_in_sync if replica else 1
        keep = ops.expand_dims(ops.logical_not(ops.cast(reset, "bool")), -1)
        states = [
            [ops.where(keep, self.replica_rows(v), 0.0) for v in layer] for layer in self.carried
        ]
        variables = [v for layer in self.carried for v in layer]
        history = None if self.repeat is None else self.recent_history(tokens, reset)
        if queries:
            logits, finals = self.features(tokens, states, training)
        else:
            logits, finals = self.forward(tokens, states, training, history)
        finals = [value for layer in finals for value in layer]
        if history is not None:
            variables.append(self.recent)
            finals.append(history[:, -self.repeat_window :])
        for var, value in zip(variables, finals, strict=True):
            var.assign(value if replicas == 1 else replica.all_gather(value, axis=0))
        return logits

    @property
    def metrics(self) -> list:
        return [self.loss_tracker, self.ranking]

    def train_step(self, data):
        (tokens, reset), targets, weights = data
        # Keras sums the replicas' gradients: each replica divides by the global batch's count.
        replica = tf.distribute.get_replica_context()
        if self.loss_weighting == "event":  # same weight for every event of the epoch
            count = ops.cast(ops.size(weights) * replica.num_replicas_in_sync, "float32")
        else:  # the mean over the real events of the window
            count = replica.all_reduce("sum", ops.sum(weights))
        history = None if self.repeat is None else self.recent_history(tokens, reset)
        with tf.GradientTape() as tape:
            if self.sampler is not None:  # column 0: the target, then the negatives
                queries, logits = self.sampled_logits(tokens, reset, targets)
                per_event = ops.sparse_categorical_crossentropy(
                    ops.zeros_like(targets), logits, from_logits=True
                )
            else:
                queries = self((tokens, reset), training=True, queries=True)
                rows, bias, first = self.softmax_rows()
                events = (queries, targets, weights, tokens)
                if history is not None:
                    queries = ops.cast(queries, "float32")
                    events += self.repeat.loss_terms(queries, rows, bias, first, history, targets)
                if self.jit_compile:  # XLA needs static shapes: every position gets logits
                    events = [ops.reshape(t, (-1, *t.shape[2:])) for t in events]
                else:  # only the real events get logits: padding is ~half of a training window
                    events = real_events(weights, *events)
                queries, targets, weights, tokens = events[:4]
                per_event = kernels.softmax_cross_entropy(queries, targets + first, rows, bias)
            log_p, songs = -per_event[..., None], ops.cast(targets, "int32")[..., None]
            if history is not None:  # then at the history's plays
                log_p, songs, repeat = repeats.with_plays(log_p, songs, *events[4:])
            if self.mixture is not None:  # each event left out of the transition counts
                log_p = self.mixture.log_prob(log_p, queries, tokens, songs, targets)
            per_event = -log_p[..., 0]
            if history is not None:  # the repeat bias on the mixture's distribution
                per_event = repeats.biased_cross_entropy(per_event, log_p[..., 1:], *repeat)
            loss = weighted_mean(per_event, weights, count)
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        self.loss_tracker.update_state(per_event, sample_weight=weights)
        return {"loss": self.loss_tracker.result()}

    def softmax_rows(self) -> tuple:
        """(rows float32 [columns, dims], bias float32 [columns], column of song 0) of the
        training softmax. A tied table is read whole, as stored: its padding row 0 gets bias
        `PAD_LOGIT`, so probability 0 and no gradient, and song s is column s + 1."""
        if self.side is not None:
            vectors, bias = self.song_table(training=True)
            return vectors, bias + songrows.UNSEEN_LOGIT * self.side.unseen, 0
        if self.tie_embeddings:
            bias = tf.concat([tf.fill([1], PAD_LOGIT), self.output_bias], 0)
            return tf.convert_to_tensor(self.embedding.embeddings), bias, 1
        return tf.transpose(self.head.kernel), tf.convert_to_tensor(self.head.bias), 0

    def sampled_logits(self, tokens, reset, targets):
        """Queries and corrected logits of the target and of `num_sampled` negatives shared by
        the window.

        Returns:
          (queries float32 [batch, time, dims], logits float32 [batch, time, 1 + num_sampled]
          with the target in column 0). Negatives change every step (seed = step).
        """
        queries = ops.cast(self((tokens, reset), training=True, queries=True), "float32")
        step = ops.cast(self.optimizer.iterations, "int32")
        sampled = self.sampler.draw(self.num_sampled, ops.stack([step, 0]))
        kernel, bias = self.output_layer()
        logits = kernels.sampled_softmax_logits(
            queries, targets, kernel, bias, sampled, self.sampler.log_q
        )
        return queries, logits

    def make_test_function(self, force: bool = False):
        """The evaluation loop over real events (a dynamic trip count) is never XLA-compiled;
        each chunk of it is (`rank_chunk`)."""
        jit_compile, self.jit_compile = self.jit_compile, False
        try:
            return super().make_test_function(force)
        finally:
            self.jit_compile = jit_compile

    def test_step(self, data):
        """Full-catalog metrics of the real events only (padding, often most of a test window,
        costs no logits), `EVAL_CHUNK` at a time; weight-0 events fill the last chunk."""
        (tokens, reset), targets, weights = data
        history = None if self.repeat is None else self.recent_history(tokens, reset)
        queries = self((tokens, reset), training=False, queries=True)
        repeat = self.repeat_inputs(history, ops.shape(tokens)[1]) or ()
        events = real_events(weights, queries, targets, weights, tokens, *repeat)
        real = tf.size(events[2])
        fill = (-real) % EVAL_CHUNK
        queries, targets, weights, tokens, *repeat = (
            tf.pad(t, [[0, fill]] + [[0, 0]] * (len(t.shape) - 1)) for t in events
        )

        def score_chunk(start):
            chunk = slice(start, start + EVAL_CHUNK)
            chunk_repeat = tuple(t[chunk] for t in repeat) or None
            ranks, log_probs = self.rank_chunk(
                queries[chunk], tokens[chunk], targets[chunk], chunk_repeat
            )
            self.ranking.update_state(ranks, log_probs, sample_weight=weights[chunk])
            return start + EVAL_CHUNK

        tf.while_loop(lambda start: start < real, score_chunk, [tf.constant(0)])
        return self.ranking.result()

    @tf.function(jit_compile=True)
    def rank_chunk(self, queries, tokens, targets, repeat=None):
        """(pessimistic ranks, log-probabilities) of `targets` [EVAL_CHUNK], in one XLA program:
        the passes over the [EVAL_CHUNK, songs] scores fuse instead of each writing a matrix."""
        scores = self.scores(queries, tokens, repeat)
        log_probs = -ops.sparse_categorical_crossentropy(targets, scores, from_logits=True)
        return metrics.pessimistic_ranks(scores, targets), log_probs


def check_num_sampled(num_sampled: int, num_songs: int) -> None:
    """Raises `ConfigError` naming --num_sampled unless 0 < num_sampled < num_songs."""
    if not 0 < num_sampled < num_songs:
        raise ConfigError(
            f"--num_sampled={num_sampled}: must be in 1..{num_songs - 1} "
            f"(the catalog has {num_songs} songs)"
        )


def build_model(
    config: config_lib.Config,
    num_songs: int,
    song_counts: np.ndarray | None = None,
    side: dict | None = None,
    transition_tables: dict | None = None,
    train_steps: int = 0,
) -> MusicModel:
    """A built `MusicModel` of the `--task=next_song` flags, compiled with Adam (clipping by
    global norm; XLA if `--jit_compile`, except under a `tf.distribute` strategy); its layers
    in Keras' "mixed_bfloat16" dtype policy with `--precision=bfloat16`.

    Args:
      num_songs: the catalog size.
      song_counts: int [num_songs], training targets per song: the sampling distribution of
        `--softmax=sampled` (default: uniform).
      side: with --side_features, the `MusicModel` arguments `num_artists`, `num_tags`,
        `song_artists`, `song_tags` (`coldstart.SideFeatures.model_args`).
      transition_tables: with --transition, `transitions.successor_table` of the training data.
      train_steps: the run's optimizer steps (epochs x windows), which --lr_decay=linear spans.
    """
    with kernels.precision_policy(config.precision):  # for the layers created here
        model = MusicModel(
            num_songs=num_songs,
            embedding_size=config.embedding_size,
            batch_size=config.batch_size,
            tie_embeddings=config.tie_embeddings,
            loss_weighting=config.loss_weighting,
            softmax=config.softmax,
            num_sampled=config.num_sampled,
            song_counts=song_counts,
            side_features=config.side_features,
            transition=config.transition,
            transition_width=config.transition_width,
            transition_tables=transition_tables,
            repeat_window=config.repeat_window,
            repeat_step=repeats.BIAS_STEP,
            **(side or {}),
            **recurrent.stack_args(config),
        )
        model.build()
    # Keras also leaves XLA off under tf.distribute: collectives are not compiled on CPU.
    jit_compile = config.jit_compile and not tf.distribute.has_strategy()
    rate = recurrent.learning_rate(config, train_steps)
    compile_model(model, rate, config.max_grad_norm, jit_compile=jit_compile)
    if model.sampler is not None and config.sampled_steps == "scaled":
        kernels.scale_sampled_steps(model)
    return model
