"""Recurrent music models: a shared LSTM|GRU trunk, the next-song head and the audio-feature head.

`MusicModel` is song embedding -> `num_layers` x LSTM or GRU -> dense logits over the catalog.
`AudioFeatureModel` (the GRU report) reads `seq_len` audio-feature vectors through the same trunk
and regresses the next `pred_steps` vectors from its last output.
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
import metrics
import yes_reader


def recurrent_stack(
    cell: str, num_layers: int, hidden_size: int, dropout: float, fixed_length: bool = False
) -> list:
    """`num_layers` LSTM or GRU layers that return sequences and their final states.

    `fixed_length` is for short inputs of a length known when the model is built: GRU layers are
    then `FixedLengthGRU`s and LSTM layers unrolled Keras LSTMs.
    """
    if fixed_length and cell == "gru":
        return [FixedLengthGRU(hidden_size, dropout, name=f"gru_{i}") for i in range(num_layers)]
    layer_class = {"lstm": layers.LSTM, "gru": layers.GRU}[cell]
    return [
        layer_class(
            hidden_size,
            return_sequences=True,
            return_state=True,
            dropout=dropout,
            unroll=fixed_length,
            name=f"{cell}_{i}",
        )
        for i in range(num_layers)
    ]


@tf.custom_gradient
def gru_sequence(x, h0, kernel, recurrent_kernel, bias):
    """A GRU run over every step of `x`, with back-propagation through time written out.

    Keras' GRU (`reset_after=True`, gates in the order z, r, n) computes the input projection and
    the weight gradients step by step; here the input projection of all steps is one matmul, and
    so is each weight gradient (the sum over steps of the per-step outer products), which at small
    batches is most of the work: the weights are read once instead of once per step.

    Args:
      x: float32 [batch, time, inputs] with a static `time`; h0: float32 [batch, units].
      kernel: [inputs, 3 units]; recurrent_kernel: [units, 3 units]; bias: [2, 3 units] (input and
        recurrent biases), the layout of `keras.layers.GRU`'s weights.

    Returns:
      (outputs float32 [batch, time, units], final state float32 [batch, units]).
    """
    projected = tf.einsum("bti,ij->btj", x, kernel) + bias[0]
    h, saved, outputs = h0, [], []
    for t in range(x.shape[1]):
        xz, xr, xn = tf.split(projected[:, t], 3, axis=-1)
        hz, hr, hn = tf.split(tf.matmul(h, recurrent_kernel) + bias[1], 3, axis=-1)
        z, r = tf.sigmoid(xz + hz), tf.sigmoid(xr + hr)
        n = tf.tanh(xn + r * hn)
        saved.append((h, z, r, n, hn))
        h = z * h + (1.0 - z) * n
        outputs.append(h)

    def grad(d_outputs, d_final):
        dh = tf.zeros_like(h0) if d_final is None else d_final
        d_projected, d_inner = [], []
        for t in reversed(range(len(saved))):
            h_prev, z, r, n, hn = saved[t]
            dh = dh + d_outputs[:, t]
            dn = dh * (1.0 - z) * (1.0 - n * n)  # through tanh
            dz = dh * (h_prev - n) * z * (1.0 - z)
            dr = dn * hn * r * (1.0 - r)
            d_projected.append(tf.concat([dz, dr, dn], -1))
            d_inner.append(tf.concat([dz, dr, dn * r], -1))
            dh = dh * z + tf.matmul(d_inner[-1], recurrent_kernel, transpose_b=True)
        d_projected = tf.stack(d_projected[::-1], axis=1)  # [batch, time, 3 units]
        d_inner = tf.stack(d_inner[::-1], axis=1)
        h_prev = tf.stack([step[0] for step in saved], axis=1)
        return (
            tf.einsum("btj,ij->bti", d_projected, kernel),
            dh,
            tf.einsum("bti,btj->ij", x, d_projected),
            tf.einsum("bth,btj->hj", h_prev, d_inner),
            tf.stack([tf.reduce_sum(d_projected, [0, 1]), tf.reduce_sum(d_inner, [0, 1])]),
        )

    return (tf.stack(outputs, axis=1), h), grad


@keras.saving.register_keras_serializable(package="deepcf")
class FixedLengthGRU(layers.Layer):
    """The GRU of `keras.layers.GRU(units, dropout=..., return_sequences=True,
    return_state=True)` (same weights, layout and results) for inputs of a fixed length, computed
    by `gru_sequence`. Call: `(x [batch, time, inputs], initial_state=[h0] or None)` ->
    `(outputs [batch, time, units], final state [batch, units])`. `dropout` drops input features
    with one mask per sequence, as Keras does.
    """

    def __init__(self, units: int, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.units, self.dropout = units, dropout
        self.seed_generator = keras.random.SeedGenerator()

    def build(self, input_shape) -> None:
        three = 3 * self.units
        self.kernel = self.add_weight((input_shape[-1], three), "glorot_uniform", name="kernel")
        self.recurrent_kernel = self.add_weight(
            (self.units, three), "orthogonal", name="recurrent_kernel"
        )
        self.bias = self.add_weight((2, three), "zeros", name="bias")

    def call(self, x, initial_state=None, training: bool = False):
        if training and self.dropout > 0:
            keep = ops.ones_like(x[:, 0])
            x = x * keras.random.dropout(keep, self.dropout, seed=self.seed_generator)[:, None]
        h0 = ops.zeros((ops.shape(x)[0], self.units)) if initial_state is None else initial_state[0]
        weights = (self.kernel, self.recurrent_kernel, self.bias)
        return gru_sequence(x, h0, *map(tf.convert_to_tensor, weights))  # reads, not variables

    def get_config(self) -> dict:
        return {**super().get_config(), "units": self.units, "dropout": self.dropout}


def run_stack(rnns: list, x, states: list, training: bool = False):
    """Runs the stacked layers. `states` has one list of state tensors per layer."""
    finals = []
    for rnn, initial in zip(rnns, states, strict=True):
        x, *final = rnn(x, initial_state=initial, training=training)
        finals.append(final)
    return x, finals


def masked_cross_entropy(targets, logits, weights, total_weight=None):
    """Per-event cross-entropy (nats) and its mean over the real events of the batch.

    Args:
      targets: int32 [batch, time] song ids; logits: float [batch, time, songs];
      weights: float32 [batch, time], 0 at padding.
      total_weight: float32 [], what to divide by (default `sum(weights)`); under a strategy, the
        count of the global batch, so that the replicas' losses add up to its mean.

    Returns:
      (per_event [batch, time], mean over events: sum(weights * ce) / sum(weights)).
    """
    per_event = ops.sparse_categorical_crossentropy(targets, logits, from_logits=True)
    return per_event, weighted_mean(per_event, weights, total_weight)


def weighted_mean(per_event, weights, total_weight=None):
    """sum(weights * per_event) / total_weight (default `sum(weights)`; at least 1)."""
    total_weight = ops.sum(weights) if total_weight is None else total_weight
    return ops.sum(per_event * weights) / ops.maximum(total_weight, 1.0)


@tf.custom_gradient
def softmax_cross_entropy(queries, targets, kernel, bias):
    """Full-softmax cross-entropy of `queries @ kernel + bias`, with the gradient written out.

    Same loss and gradient as `sparse_categorical_crossentropy` of the logits, in fewer passes
    over the [events, songs] matrix, which at 9,775 songs is most of a training step: the
    probabilities come from one oneDNN softmax (TF's fused sparse cross-entropy kernel takes
    ~8x as long on CPU), the loss of event i is log(sum exp) - logit = -log p[i, target] (its
    rows recomputed with logsumexp where p underflows), the bias is a row of the matmul (no
    pass of its own), and the backward pass never forms p - onehot: the one-hot part is a
    scatter of the queries, so the two gradient matmuls read the probabilities as they are.

    Args:
      queries: float32 [events, dims]; targets: int32 [events] song ids.
      kernel: float32 [dims, songs]; bias: float32 [songs].

    Returns:
      float32 [events], the cross-entropy (nats) of each event.
    """
    augmented = tf.concat([queries, tf.ones_like(queries[:, :1])], 1)  # the bias rides along
    logits = tf.matmul(augmented, tf.concat([kernel, bias[None]], 0))
    probs = tf.nn.softmax(logits)
    target_logit = tf.gather(logits, targets, batch_dims=1)
    per_event = -tf.math.log(tf.gather(probs, targets, batch_dims=1))
    far = tf.where(~(per_event < 80.0))  # p < e^-80 or 0: exact rows instead of log(0)
    exact = tf.reduce_logsumexp(tf.gather_nd(logits, far), -1) - tf.gather_nd(target_logit, far)
    per_event = tf.tensor_scatter_nd_update(per_event, far, exact)

    def grad(d_event):
        # d logits = d_event * (p - onehot(target)): both matmuls read p, the one-hot terms
        # are a gather (d queries) and a scatter (d kernel, d bias) of one row per event.
        scaled = augmented * d_event[:, None]
        d_kernel_bias = tf.matmul(tf.transpose(scaled), probs) - tf.transpose(
            tf.math.unsorted_segment_sum(scaled, targets, tf.shape(kernel)[1])
        )
        kernel_t = tf.transpose(kernel)
        d_queries = d_event[:, None] * (tf.matmul(probs, kernel_t) - tf.gather(kernel_t, targets))
        return d_queries, None, d_kernel_bias[:-1], d_kernel_bias[-1]

    return per_event, grad


EVAL_CHUNK = 256  # events scored at once in evaluation: 256 x 9,775 logits = 10 MB


def real_events(queries, targets, weights):
    """The real events (weight > 0) of a window, in order, without the padding.

    Args:
      queries: float32 [batch, time, dims]; targets: int32 [batch, time]; weights: float32
        [batch, time], 0 at padding.

    Returns:
      (queries float32 [events, dims], targets int32 [events], weights float32 [events]).
    """
    real = weights > 0
    return tuple(tf.boolean_mask(t, real) for t in (queries, targets, weights))


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
    """

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
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_songs, self.cell, self.num_layers = num_songs, cell, num_layers
        self.embedding_size, self.hidden_size = embedding_size, hidden_size
        self.dropout_rate, self.batch_size = dropout, batch_size
        self.tie_embeddings, self.loss_weighting = tie_embeddings, loss_weighting
        self.softmax, self.num_sampled, self.sampler = softmax, num_sampled, None
        if softmax == "sampled":
            check_num_sampled(num_sampled, num_songs)
            self.sampler = SongSampler(num_songs if song_counts is None else song_counts)
        elif softmax != "full":
            raise config_lib.ConfigError(f"--softmax={softmax!r}: must be full or sampled")
        self.embedding = layers.Embedding(num_songs + 1, embedding_size, name="song_embedding")
        self.drop = layers.Dropout(dropout)
        self.rnns = recurrent_stack(cell, num_layers, hidden_size, dropout)
        if tie_embeddings:  # logits = h W (W: hidden -> embedding) E[1:]^T + b
            self.head = layers.Dense(embedding_size, use_bias=False, name="to_embedding")
            self.output_bias = self.add_weight(shape=(num_songs,), initializer="zeros", name="bias")
        else:
            self.head = layers.Dense(num_songs, name="next_song_logits")
        per_layer = 2 if cell == "lstm" else 1
        # One copy per replica (ON_READ), each holding the state of the whole global batch, so
        # checkpoints have the same layout under every strategy (see `call`, docs/scaling.md).
        with keras.name_scope(self.name):
            self.carried = [
                [
                    keras.Variable(
                        initializer="zeros",
                        shape=(batch_size, hidden_size),
                        trainable=False,
                        synchronization="on_read",
                        aggregation="only_first_replica",
                        name=f"carried_{i}_{j}",
                    )
                    for j in range(per_layer)
                ]
                for i in range(num_layers)
            ]
        self.ranking = metrics.RankingMetrics()
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "num_songs": self.num_songs,
            "cell": self.cell,
            "num_layers": self.num_layers,
            "embedding_size": self.embedding_size,
            "hidden_size": self.hidden_size,
            "dropout": self.dropout_rate,
            "batch_size": self.batch_size,
            "tie_embeddings": self.tie_embeddings,
            "loss_weighting": self.loss_weighting,
        }

    def build(self, input_shape=None) -> None:
        tokens = ops.zeros((self.batch_size, 1), "int32")
        self.forward(tokens, self.zero_state(self.batch_size))
        self.built = True

    def zero_state(self, batch: int) -> list:
        """All-zero initial state for `batch` rows."""
        return [[ops.zeros((batch, self.hidden_size)) for _ in layer] for layer in self.carried]

    def features(self, tokens, states: list, training: bool = False):
        """(queries [batch, time, dims], final states); logits = queries @ kernel + bias."""
        x = self.drop(self.embedding(tokens), training=training)
        x, finals = run_stack(self.rnns, x, states, training=training)
        x = self.drop(x, training=training)
        return (self.head(x) if self.tie_embeddings else x), finals

    def output_layer(self) -> tuple:
        """(kernel float32 [dims, songs], bias float32 [songs]) that score the queries."""
        if self.tie_embeddings:  # row s + 1 embeds song s; row 0 is padding
            return ops.transpose(self.embedding.embeddings[1:]), self.output_bias
        return self.head.kernel, self.head.bias

    def scores(self, queries):
        """Logits float32 [..., songs] of `features` queries [..., dims]."""
        if self.tie_embeddings:
            kernel, bias = self.output_layer()
            return ops.matmul(queries, kernel) + bias
        return self.head(queries)

    def forward(self, tokens, states: list, training: bool = False):
        """Pure forward pass: (logits [batch, time, songs], final states)."""
        queries, finals = self.features(tokens, states, training=training)
        return self.scores(queries), finals

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
        carried = self.carried
        if replicas > 1:
            rows = self.batch_size // replicas
            first = replica.replica_id_in_sync_group * rows
            carried = [[v[first : first + rows] for v in layer] for layer in self.carried]
        states = [[ops.where(keep, v, 0.0) for v in layer] for layer in carried]
        logits, finals = (self.features if queries else self.forward)(tokens, states, training)
        for layer_vars, layer_finals in zip(self.carried, finals, strict=True):
            for var, value in zip(layer_vars, layer_finals, strict=True):
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
        with tf.GradientTape() as tape:
            if self.sampler is not None:  # column 0: the target, then the negatives
                logits, targets = self.sampled_logits(tokens, reset, targets)
                per_event, loss = masked_cross_entropy(targets, logits, weights, count)
            else:
                queries = self((tokens, reset), training=True, queries=True)
                if self.jit_compile:  # XLA needs static shapes: every position gets logits
                    queries, targets, weights = (
                        ops.reshape(t, (-1, *t.shape[2:])) for t in (queries, targets, weights)
                    )
                else:  # only the real events get logits: padding is ~half of a training window
                    queries, targets, weights = real_events(queries, targets, weights)
                kernel, bias = map(tf.convert_to_tensor, self.output_layer())  # reads
                per_event = softmax_cross_entropy(queries, targets, kernel, bias)
                loss = weighted_mean(per_event, weights, count)
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        self.loss_tracker.update_state(per_event, sample_weight=weights)
        return {"loss": self.loss_tracker.result()}

    def sampled_logits(self, tokens, reset, targets):
        """Corrected logits of the target and of `num_sampled` negatives shared by the window.

        Returns:
          (float32 [batch, time, 1 + num_sampled] with the target in column 0, int32 zeros
          [batch, time]: the target's column). Negatives change every step (seed = step).
        """
        queries = self((tokens, reset), training=True, queries=True)
        step = ops.cast(self.optimizer.iterations, "int32")
        sampled = self.sampler.draw(self.num_sampled, ops.stack([step, 0]))
        kernel, bias = self.output_layer()
        logits = sampled_softmax_logits(queries, targets, kernel, bias, sampled, self.sampler.log_q)
        return logits, ops.zeros_like(targets)

    def make_test_function(self, force: bool = False):
        """Evaluation is never XLA-compiled: its loop over real events has a dynamic trip count."""
        jit_compile, self.jit_compile = self.jit_compile, False
        try:
            return super().make_test_function(force)
        finally:
            self.jit_compile = jit_compile

    def test_step(self, data):
        """Full-catalog metrics of the real events only, `EVAL_CHUNK` events at a time.

        Padding (often most of a test window) is dropped first, so it costs no logits.
        """
        (tokens, reset), targets, weights = data
        queries = self((tokens, reset), training=False, queries=True)
        queries, targets, weights = real_events(queries, targets, weights)
        real = tf.size(weights)

        def score_chunk(start):
            logits = self.scores(queries[start : start + EVAL_CHUNK])
            chunk_targets = targets[start : start + EVAL_CHUNK]
            log_probs = -ops.sparse_categorical_crossentropy(
                chunk_targets, logits, from_logits=True
            )
            ranks = metrics.pessimistic_ranks(logits, chunk_targets)
            chunk_weights = weights[start : start + EVAL_CHUNK]
            self.ranking.update_state(ranks, log_probs, sample_weight=chunk_weights)
            return start + EVAL_CHUNK

        tf.while_loop(lambda start: start < real, score_chunk, [tf.constant(0)])
        return self.ranking.result()


def check_num_sampled(num_sampled: int, num_songs: int) -> None:
    """Raises `ConfigError` naming --num_sampled unless 0 < num_sampled < num_songs."""
    if not 0 < num_sampled < num_songs:
        raise config_lib.ConfigError(
            f"--num_sampled={num_sampled}: must be in 1..{num_songs - 1} "
            f"(the catalog has {num_songs} songs)"
        )


def alias_table(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker's alias table (Vose's construction) for drawing from `probs` in O(1).

    Draw a column i uniformly, keep it with probability `accept[i]`, else take `alias[i]`.

    Args:
      probs: float [n], non-negative, summing to 1.

    Returns:
      (accept float64 [n], alias int64 [n]).
    """
    n = len(probs)
    scaled = np.asarray(probs, np.float64) * n
    accept, alias = np.ones(n), np.arange(n)
    small = [i for i in range(n) if scaled[i] < 1.0]
    large = [i for i in range(n) if scaled[i] >= 1.0]
    while small and large:
        low, high = small.pop(), large.pop()
        accept[low], alias[low] = scaled[low], high
        scaled[high] -= 1.0 - scaled[low]
        (small if scaled[high] < 1.0 else large).append(high)
    return accept, alias  # columns left over hold probability 1 up to rounding


class SongSampler:
    """Draws songs in the graph (XLA-friendly) with probability Q(s) ∝ count(s) + 1.

    Args:
      counts: int [songs], how often each song is a training target; or the catalog size for a
        uniform Q.
    """

    def __init__(self, counts: np.ndarray | int):
        counts = np.zeros(counts) if np.ndim(counts) == 0 else np.asarray(counts, np.float64)
        probs = (counts + 1.0) / (counts.sum() + len(counts))
        accept, alias = alias_table(probs)
        self.num_songs = len(probs)
        self.accept = tf.constant(accept, tf.float32)
        self.alias = tf.constant(alias, tf.int32)
        self.log_q = tf.constant(np.log(probs), tf.float32)

    def draw(self, num: int, seed) -> tf.Tensor:
        """int32 [num] song ids drawn with replacement; `seed`: int32 [2] (stateless)."""
        uniform = tf.random.stateless_uniform([2, num], seed)
        column = tf.minimum(tf.cast(uniform[0] * self.num_songs, tf.int32), self.num_songs - 1)
        keep = uniform[1] < tf.gather(self.accept, column)
        return tf.where(keep, column, tf.gather(self.alias, column))


def sampled_softmax_logits(queries, targets, kernel, bias, sampled, log_q):
    """Logits of [target, sampled negatives] minus log Q (Jean et al. 2015; TFRS logQ correction).

    Args:
      queries: float32 [..., dims]; targets: int32 [...] song ids.
      kernel: float32 [dims, songs]; bias: float32 [songs].
      sampled: int32 [num_sampled] song ids; log_q: float32 [songs], log sampling probabilities.

    Returns:
      float32 [..., 1 + num_sampled], column 0 the target; a negative that is the target itself
      gets -1e9 (removed), so the cross-entropy with label 0 is the sampled softmax loss.
    """
    corrected = bias - log_q
    events = ops.size(targets)
    # One gather of the targets' and the negatives' columns: one dense gradient, no transpose of
    # the [dims, songs] kernel (at 75,262 songs each costs about as much as the logits).
    columns = ops.take(kernel, ops.concatenate([ops.reshape(targets, (-1,)), sampled], 0), axis=1)
    true_vectors = ops.reshape(ops.transpose(columns[:, :events]), ops.shape(queries))
    true_logit = ops.sum(queries * true_vectors, axis=-1) + ops.take(corrected, targets)
    negatives = ops.matmul(queries, columns[:, events:])
    negatives = negatives + ops.take(corrected, sampled)
    negatives = ops.where(ops.expand_dims(targets, -1) == sampled, -1e9, negatives)
    return ops.concatenate([ops.expand_dims(true_logit, -1), negatives], axis=-1)


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
    the train step is XLA-compiled: at batch 1 a step takes ~13 ms on 2 CPU cores, against ~26 ms
    with Keras' unrolled GRU and ~90 ms with its time loop.
    """

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
        self.dropout_rate = dropout
        self.rnns = recurrent_stack(cell, num_layers, hidden_size, dropout, fixed_length=True)
        self.head = layers.Dense(pred_steps * num_features, name="next_features")

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "num_features": self.num_features,
            "seq_len": self.seq_len,
            "pred_steps": self.pred_steps,
            "cell": self.cell,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "dropout": self.dropout_rate,
        }

    def build(self, input_shape=None) -> None:
        self.call(ops.zeros((1, self.seq_len, self.num_features)))
        self.built = True

    def call(self, features, training: bool = False):
        x, _ = run_stack(self.rnns, features, [None] * self.num_layers, training=training)
        y = self.head(x[:, -1])
        return ops.reshape(y, (-1, self.pred_steps, self.num_features))


def build_audio_model(
    *,
    learning_rate: float,
    max_grad_norm: float,
    loss: str,
    jit_compile: bool = True,
    **model_args,
) -> AudioFeatureModel:
    """A built `AudioFeatureModel(**model_args)`, compiled with Adam and `AUDIO_LOSSES[loss]`."""
    model = AudioFeatureModel(**model_args)
    model.build()
    compile_model(model, learning_rate, max_grad_norm, AUDIO_LOSSES[loss](), jit_compile)
    return model


def next_power_of_two(n):
    """The smallest power of two >= n, for int32 n >= 1 (bit smearing of n - 1)."""
    n = n - 1
    for shift in (1, 2, 4, 8, 16):
        n = tf.bitwise.bitwise_or(n, tf.bitwise.right_shift(n, shift))
    return n + 1


SERVE_WIDTH_STEP = 4  # histories are padded to a multiple of 4 songs for XLA


def serving_function(
    model: MusicModel, top_k: int, exclude_history: bool
) -> tf.types.experimental.GenericFunction:
    """The next `top_k` songs after each history, as a `tf.function` with a fixed signature.

    The whole history runs through `model.features` from a zero state (no carried variables are
    read or written) and only the output after its last song is scored and ranked. That scoring
    is XLA-compiled (at 9,775 songs ~3x faster for one history than TF's graph executor, whose
    per-op cost dominates a 20-step LSTM at batch 1); XLA compiles once per input shape, so
    requests are padded to a few shapes first: the batch to a power of two, the history width to
    a multiple of `SERVE_WIDTH_STEP`. Padding after a history's last song does not change its
    scores (the model reads left to right).

    Args of the returned function:
      history: int32 [batch, time], song ids (0-based, as in song_hash.txt), oldest first;
        entries at positions >= length are padding and ignored.
      length: int32 [batch], songs in each history, 1 <= length <= time.

    Returns of the returned function:
      {"song_ids": int32 [batch, top_k] best first, "scores": float32 [batch, top_k] the model's
      probability that the song comes next}; with `exclude_history`, songs of the history are
      never returned (unless fewer than `top_k` other songs exist; their score is then -1).
    """
    num_songs = model.num_songs

    @tf.function(jit_compile=True)
    def ranked_songs(tokens, length):
        queries, _ = model.features(tokens, model.zero_state(tf.shape(tokens)[0]))
        last = tf.gather(queries, length - 1, batch_dims=1)  # only the last song is scored
        probs = tf.nn.softmax(model.scores(last))  # [batch, songs]
        ranked = probs
        if exclude_history:  # column t - 1 of token t; padding (token 0) lands in column -1
            batch = tf.shape(tokens)[0]
            rows = tf.broadcast_to(tf.range(batch)[:, None], tf.shape(tokens))
            where = tf.stack([rows, tokens], -1)
            seen = tf.scatter_nd(where, tf.ones_like(tokens), tf.stack([batch, 1 + num_songs]))
            ranked = tf.where(seen[:, 1:] > 0, -1.0, probs)
        return ranked

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.int32, name="history"),
            tf.TensorSpec([None], tf.int32, name="length"),
        ]
    )
    def recommend(history, length):
        batch, width = tf.shape(history)[0], tf.shape(history)[1]
        valid = tf.sequence_mask(length, width)
        songs = tf.boolean_mask(history, valid)
        checks = [
            tf.debugging.assert_positive(length, message="every length must be >= 1"),
            tf.debugging.assert_less_equal(
                length, width, message="a length exceeds the history width"
            ),
            tf.debugging.assert_non_negative(songs, message="song ids must be >= 0"),
            tf.debugging.assert_less(songs, num_songs, message="a song id is not in the catalog"),
        ]
        with tf.control_dependencies(checks):
            tokens = tf.where(valid, history + 1, yes_reader.PAD_ID)
        rows = next_power_of_two(batch) - batch
        columns = -width % SERVE_WIDTH_STEP
        tokens = tf.pad(tokens, [[0, rows], [0, columns]], constant_values=yes_reader.PAD_ID)
        length = tf.pad(length, [[0, rows]], constant_values=1)
        scores, song_ids = tf.math.top_k(ranked_songs(tokens, length)[:batch], top_k)
        return {"song_ids": song_ids, "scores": scores}

    return recommend


def step_function(model: MusicModel, top_k: int) -> tf.types.experimental.GenericFunction:
    """Incremental scoring: the next `top_k` songs after one more song, from the carried state.

    A client keeps the returned `state` of a history and sends only the song the user adds, so a
    request costs one time step instead of the whole history. The step is XLA-compiled (once per
    batch size).

    Args of the returned function:
      song: int32 [batch, 1], the added song id (0-based, as in song_hash.txt).
      state: float32 [num_layers, parts, batch, hidden_size] (parts: LSTM h, c; GRU h), the state
        after the history so far: zeros for an empty history, else the `state` last returned.

    Returns of the returned function:
      {"song_ids": int32 [batch, top_k] best first, "scores": float32 [batch, top_k] next-song
      probabilities, "state": the new state, same shape as `state`}.
    """
    parts = 2 if model.cell == "lstm" else 1

    @tf.function(jit_compile=True)
    def one_step(tokens, state):
        states = [tf.unstack(layer) for layer in tf.unstack(state)]
        logits, finals = model.forward(tokens, states)
        scores, song_ids = tf.math.top_k(tf.nn.softmax(logits[:, -1]), top_k)
        return {
            "song_ids": song_ids,
            "scores": scores,
            "state": tf.stack([tf.stack(f) for f in finals]),
        }

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 1], tf.int32, name="song"),
            tf.TensorSpec([model.num_layers, parts, None, model.hidden_size], tf.float32, "state"),
        ]
    )
    def step(song, state):
        checks = [
            tf.debugging.assert_non_negative(song, message="song ids must be >= 0"),
            tf.debugging.assert_less(
                song, model.num_songs, message="a song id is not in the catalog"
            ),
        ]
        with tf.control_dependencies(checks):
            tokens = song + 1
        return one_step(tokens, state)

    return step


def build_model(
    *,
    num_songs: int,
    cell: str,
    num_layers: int,
    embedding_size: int,
    hidden_size: int,
    dropout: float,
    batch_size: int,
    learning_rate: float,
    max_grad_norm: float,
    tie_embeddings: bool = False,
    loss_weighting: str = "window",
    softmax: str = "full",
    num_sampled: int = 1024,
    song_counts: np.ndarray | None = None,
    jit_compile: bool = False,
) -> MusicModel:
    """A built and compiled `MusicModel` (Adam, clipping by global norm; XLA if `jit_compile`)."""
    model = MusicModel(
        num_songs=num_songs,
        cell=cell,
        num_layers=num_layers,
        embedding_size=embedding_size,
        hidden_size=hidden_size,
        dropout=dropout,
        batch_size=batch_size,
        tie_embeddings=tie_embeddings,
        loss_weighting=loss_weighting,
        softmax=softmax,
        num_sampled=num_sampled,
        song_counts=song_counts,
    )
    model.build()
    # Keras also leaves XLA off under tf.distribute: collectives are not compiled on CPU.
    compile_model(
        model,
        learning_rate,
        max_grad_norm,
        jit_compile=jit_compile and not tf.distribute.has_strategy(),
    )
    return model


@keras.saving.register_keras_serializable(package="deepcf")
class FusedAdam(keras.optimizers.Adam):
    """`keras.optimizers.Adam` whose update of a variable is TF's fused `ResourceApplyAdam`.

    The formula is Keras' (lr_t = lr sqrt(1 - beta2^t) / (1 - beta1^t), m += (g - m)(1 - beta1),
    v += (g^2 - v)(1 - beta2), var -= lr_t m / (sqrt(v) + epsilon)), computed in one pass over
    the variable, its moments and its gradient instead of about ten: with a 75,262-song catalog
    (15 M embedding and output weights) Keras' update takes ~33 ms a step, the fused one ~9 ms.
    Under a `tf.distribute` strategy, and with amsgrad, Keras' own update runs.
    """

    def _clip_gradients(self, grads: list) -> list:
        """Keras' clipping by global norm, with one read of each gradient for the norm and no
        multiplication when the norm is within the bound (Keras would multiply by 1)."""
        clip = self.global_clipnorm
        if not clip or self.clipnorm or self.clipvalue or tf.distribute.has_strategy():
            return super()._clip_gradients(grads)
        norm = tf.linalg.global_norm([g for g in grads if g is not None])
        scale = clip / tf.maximum(norm, clip) + (norm - norm)  # NaN if the norm is not finite

        def clipped(g):
            if isinstance(g, tf.IndexedSlices):  # an embedding's rows
                return tf.IndexedSlices(clipped(g.values), g.indices, g.dense_shape)
            return tf.cond(norm <= clip, lambda: g, lambda: g * scale)

        return [g if g is None else clipped(g) for g in grads]

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or tf.distribute.has_strategy():
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        step = ops.cast(self.iterations + 1, variable.dtype)
        beta_1, beta_2 = (ops.cast(b, variable.dtype) for b in (self.beta_1, self.beta_2))
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=self._momentums[index].value.handle,
            v=self._velocities[index].value.handle,
            beta1_power=ops.power(beta_1, step),
            beta2_power=ops.power(beta_2, step),
            lr=ops.cast(learning_rate, variable.dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=ops.cast(self.epsilon, variable.dtype),
            grad=tf.convert_to_tensor(ops.cast(gradient, variable.dtype)),
        )


def compile_model(
    model: keras.Model,
    learning_rate: float,
    max_grad_norm: float,
    loss: keras.losses.Loss | None = None,
    jit_compile: bool = False,
) -> None:
    """Adam with global-norm clipping; builds the optimizer so checkpoints can restore into it.

    `loss` is for models trained by Keras' own `train_step` (`MusicModel` computes its own);
    `jit_compile` XLA-compiles the train step.
    """
    model.compile(
        optimizer=FusedAdam(learning_rate, global_clipnorm=max_grad_norm),
        loss=loss,
        jit_compile=jit_compile,
    )
    model.optimizer.build(model.trainable_variables)
