"""Ops with their gradients written out, the negative sampler and the fused Adam update.

Each computes what a TensorFlow/Keras reference computes (tests/test_softmax.py and
tests/test_musicmodel.py check them against it) with fewer passes over memory:
`gru_sequence`/`FixedLengthGRU` (Keras' GRU), `softmax_cross_entropy` (sparse categorical
cross-entropy of the logits), `FusedAdam` (Keras' Adam). `SongSampler` and
`sampled_softmax_logits` are the sampled softmax's negatives and logits. `fixed_weight` is the
non-trainable weight that holds a table given to a layer (side features, transition counts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from keras import layers, ops


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


@tf.custom_gradient
def softmax_cross_entropy(queries, targets, rows, bias):
    """Full-softmax cross-entropy of `queries @ rows^T + bias`, with the gradient written out.

    Same loss and gradient as `sparse_categorical_crossentropy` of the logits, in fewer passes
    over the [events, songs] matrix, which at 9,775 songs is most of a training step: the
    probabilities come from one oneDNN softmax (faster on CPU than TF's fused sparse
    cross-entropy kernel; docs/results.md), the loss of event i is log(sum exp) - logit =
    -log p[i, target] (its rows recomputed with logsumexp where p underflows), the bias is a
    column of the matmul (no pass of its own), and the backward pass never forms p - onehot: the
    one-hot part is a scatter of the queries, so the two gradient matmuls read the
    probabilities as they are. The songs' vectors are read in their row layout (a tied
    embedding table as it is stored), so no matmul needs a transposed copy.

    The three matmuls run in the dtype of `queries`: bfloat16 queries (a mixed-precision trunk)
    make them bfloat16 matmuls, while the softmax, the loss and the row and bias gradients
    stay float32.

    Args:
      queries: float32 or bfloat16 [events, dims]; targets: int32 [events] song ids.
      rows: float32 [songs, dims], one vector per song; bias: float32 [songs].

    Returns:
      float32 [events], the cross-entropy (nats) of each event.
    """
    low = queries.dtype  # the matmuls' dtype
    augmented = tf.concat([queries, tf.ones_like(queries[:, :1])], 1)  # the bias rides along
    weights = tf.cast(tf.concat([rows, bias[:, None]], 1), low)
    logits = tf.cast(tf.matmul(augmented, weights, transpose_b=True), tf.float32)
    probs = tf.nn.softmax(logits)
    target_logit = tf.gather(logits, targets, batch_dims=1)
    per_event = -tf.math.log(tf.gather(probs, targets, batch_dims=1))
    far = tf.where(~(per_event < 80.0))  # p < e^-80 or 0: exact rows instead of log(0)
    exact = tf.reduce_logsumexp(tf.gather_nd(logits, far), -1) - tf.gather_nd(target_logit, far)
    per_event = tf.tensor_scatter_nd_update(per_event, far, exact)

    def grad(d_event):
        # d logits = d_event * (p - onehot(target)): both matmuls read p, the one-hot terms
        # are a gather (d queries) and a scatter (d rows, d bias) of one row per event.
        scaled = tf.cast(augmented, tf.float32) * d_event[:, None]
        low_probs = tf.cast(probs, low)
        d_weights = tf.cast(
            tf.matmul(low_probs, tf.cast(scaled, low), transpose_a=True), tf.float32
        ) - tf.math.unsorted_segment_sum(scaled, targets, tf.shape(rows)[0])
        product = tf.cast(tf.matmul(low_probs, tf.cast(rows, low)), tf.float32)
        d_queries = d_event[:, None] * (product - tf.gather(rows, targets))
        return tf.cast(d_queries, low), None, d_weights[:, :-1], d_weights[:, -1]

    return per_event, grad


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def fixed_weight(layer: layers.Layer, name: str, shape: tuple, dtype: str, value) -> keras.Variable:
    """A non-trainable weight of `layer` holding `value` (zeros until loaded if None)."""
    var = layer.add_weight(
        shape=shape, dtype=dtype, initializer="zeros", trainable=False, name=name
    )
    if value is not None:
        var.assign(np.asarray(value, dtype))
    return var


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The CPU flags of `BF16_CPU_FLAGS` that `cpuinfo` lists (empty if it is unreadable)."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            flags = {word for line in f if line.startswith("flags") for word in line.split()}
    except OSError:
        return []
    return [flag for flag in BF16_CPU_FLAGS if flag in flags]


@contextlib.contextmanager
def precision_policy(precision: str) -> Iterator[None]:
    """Keras' dtype policy of the layers created inside: "mixed_bfloat16" for `precision`
    "bfloat16" (with a warning where the CPU has no bf16 units), else the current one."""
    policy = keras.config.dtype_policy()
    if precision == "bfloat16":
        keras.config.set_dtype_policy("mixed_bfloat16")
        if not cpu_bf16_flags():
            logging.warning(
                "--precision=bfloat16: this CPU lists none of %s in /proc/cpuinfo, so bfloat16 "
                "matmuls are emulated and will not be faster than float32",
                ", ".join(BF16_CPU_FLAGS),
            )
    try:
        yield
    finally:
        keras.config.set_dtype_policy(policy)


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

    def step_scales(self, num: int) -> np.ndarray:
        """float32 [songs]: pi^(-1/4), pi = 1 - (1 - Q)^num the probability that a song is
        among `num` draws: the Adam step scale of the sampled output rows. Dense Adam moves a
        row that gets a gradient in a share pi of the steps about sqrt(pi) as far per step as
        one that gets it every step; pi^(-1/2) would undo that fully, pi^(-1/4) (half of it
        in log scale) won on validation (docs/results.md, "Sampled softmax convergence")."""
        rates = -np.expm1(num * np.log1p(-np.exp(self.log_q.numpy().astype(np.float64))))
        return (rates**-0.25).astype(np.float32)

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


@tf.function(jit_compile=True)
def scaled_adam(variable, m, v, grad, scale, lr, beta_1, beta_2, epsilon) -> None:
    """Keras' Adam update with the step multiplied by `scale`, as one XLA program (one pass
    over variable, moments and gradient, as `ResourceApplyAdam`; lr: the bias-corrected rate)."""
    m.assign_add((grad - m) * (1.0 - beta_1))
    v.assign_add((tf.square(grad) - v) * (1.0 - beta_2))
    variable.assign_sub(scale * lr * m / (tf.sqrt(v) + epsilon))


@keras.saving.register_keras_serializable(package="deepcf")
class FusedAdam(keras.optimizers.Adam):
    """`keras.optimizers.Adam` whose update of a variable is TF's fused `ResourceApplyAdam`.

    The formula is Keras' (lr_t = lr sqrt(1 - beta2^t) / (1 - beta1^t), m += (g - m)(1 - beta1),
    v += (g^2 - v)(1 - beta2), var -= lr_t m / (sqrt(v) + epsilon)), computed in one pass over
    the variable, its moments and its gradient instead of about ten (docs/results.md measures
    both on a 75,262-song catalog).
    Under a `tf.distribute` strategy, and with amsgrad, Keras' own update runs (unscaled).

    `scale_steps` multiplies the step of chosen variables entry by entry (the sampled softmax's
    output rows, `scale_sampled_steps`); their update is `scaled_adam` (same formula).
    """

    def scale_steps(self, variable, scale: np.ndarray) -> None:
        """Multiplies the Adam step of `variable` by `scale` (broadcast to its shape).

        Moments are updated as usual; only `var -= scale * lr_t m / (sqrt(v) + epsilon)`
        changes. Not saved with the optimizer: the model sets it again when it is built.
        """
        if not hasattr(self, "_step_scales"):
            self._step_scales = {}
        self._step_scales[self._var_key(variable)] = tf.constant(scale, tf.float32)

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
        scale = getattr(self, "_step_scales", {}).get(self._var_key(variable))
        if scale is not None:
            lr = ops.cast(learning_rate, variable.dtype) * ops.sqrt(1.0 - ops.power(beta_2, step))
            lr = lr / (1.0 - ops.power(beta_1, step))
            moments = (self._momentums[index].value, self._velocities[index].value)
            grad = tf.convert_to_tensor(ops.cast(gradient, variable.dtype))
            return scaled_adam(variable, *moments, grad, scale, lr, beta_1, beta_2, self.epsilon)
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


def scale_sampled_steps(model: keras.Model) -> None:
    """Scales the Adam steps of each song's output row of a `MusicModel` (kernel column or tied
    embedding row, and bias) by pi^(-1/4), pi the chance that the row is among a step's
    negatives."""
    scale = model.sampler.step_scales(model.num_sampled)
    if model.tie_embeddings:  # row s + 1 embeds song s; the padding row keeps its steps
        rows = [(model.embedding.embeddings, np.insert(scale, 0, 1.0)[:, None])]
        rows.append((model.output_bias, scale))
    else:
        rows = [(model.head.kernel, scale), (model.head.bias, scale)]
    for variable, row_scale in rows:
        model.optimizer.scale_steps(variable, row_scale)
