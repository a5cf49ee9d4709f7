"""Model tests: padding never counts, state is carried across windows and reset per row."""

from __future__ import annotations

import numpy as np
import pytest

import config as config_lib
import errors
import kernels
import musicmodel
import yes_reader

NUM_SONGS = 11


def tiny_model(batch_size: int, cell: str = "lstm") -> musicmodel.MusicModel:
    import keras

    keras.utils.set_random_seed(1)
    sizes = dict(embedding_size=6, hidden_size=5, learning_rate=0.01)
    config = config_lib.Config(cell=cell, batch_size=batch_size, **sizes)
    return musicmodel.build_model(config, NUM_SONGS)


def evaluate(model, windows: yes_reader.Windows) -> dict:
    return model.evaluate(yes_reader.to_dataset(windows), verbose=0, return_dict=True)


PLAYLISTS = [np.array(p, np.int32) for p in ([1, 2, 3, 4, 5, 6, 7, 8, 9], [3, 5], [11, 10, 1, 4])]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_carried_state_equals_one_long_window(cell):
    # Same events, cut into windows of 2 (state carried 4 times) or 1 window of 8.
    model = tiny_model(batch_size=3, cell=cell)
    short = evaluate(model, yes_reader.make_windows(PLAYLISTS, 3, num_steps=2))
    long = evaluate(model, yes_reader.make_windows(PLAYLISTS, 3, num_steps=8))
    assert short["events"] == long["events"] == 8 + 1 + 3
    for key in ("log_likelihood", "recall@5", "mrr@20"):
        assert short[key] == pytest.approx(long[key], abs=1e-5)


def test_padding_changes_neither_loss_nor_metrics():
    model = tiny_model(batch_size=4)
    windows = yes_reader.make_windows(PLAYLISTS, 4, num_steps=3)
    before = evaluate(model, windows)
    rng = np.random.default_rng(0)
    pad = windows.weights == 0
    noisy = yes_reader.Windows(
        inputs=np.where(pad, rng.integers(1, NUM_SONGS + 1, pad.shape), windows.inputs).astype(
            np.int32
        ),
        targets=np.where(pad, rng.integers(0, NUM_SONGS, pad.shape), windows.targets).astype(
            np.int32
        ),
        weights=windows.weights,
        reset=windows.reset,
        batch_starts=windows.batch_starts,
        playlists=windows.playlists,
    )
    after = evaluate(model, noisy)
    for key in before:
        assert after[key] == pytest.approx(before[key], abs=1e-6), key


def test_evaluation_in_filled_chunks_equals_the_metrics_of_the_logits(monkeypatch):
    # 12 events scored 5 at a time: chunks of 5, 5 and 2 real + 3 weight-0 fill events. The
    # metrics must be those of the model's own logits, ranked and log-softmaxed in numpy.
    monkeypatch.setattr(musicmodel, "EVAL_CHUNK", 5)
    model = tiny_model(batch_size=3)
    windows = yes_reader.make_windows(PLAYLISTS, 3, num_steps=8)
    assert windows.inputs.shape[0] == 1  # one window: its logits come from the zero state
    got = evaluate(model, windows)
    logits, _ = model.forward(windows.inputs[0], model.zero_state(3))
    real = windows.weights[0] > 0
    logits, targets = np.asarray(logits)[real], windows.targets[0][real]
    target_logits = logits[np.arange(len(targets)), targets][:, None]
    ranks = (logits >= target_logits).sum(-1)
    log_probs = target_logits[:, 0] - np.log(np.exp(logits).sum(-1))
    assert got["events"] == len(targets) == 12
    assert got["recall@5"] == pytest.approx(np.mean(ranks <= 5), abs=1e-6)
    assert got["mrr@20"] == pytest.approx(np.mean(1.0 / ranks), abs=1e-6)
    assert got["log_likelihood"] == pytest.approx(log_probs.mean(), abs=1e-5)


def test_reset_flag_restarts_a_row_from_zero_state():
    # Row 0 reads playlist A then playlist B with reset; B's logits must equal a fresh run of B.
    model = tiny_model(batch_size=2)
    a = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    b = np.array([[7, 8, 9], [7, 8, 9]], np.int32)
    fresh = model((b, np.array([True, True])))
    model((a, np.array([True, True])))
    mixed = model((b, np.array([True, False])))  # row 0 resets, row 1 carries A's state
    np.testing.assert_allclose(mixed[0], fresh[0], atol=1e-6)
    assert not np.allclose(mixed[1], fresh[1], atol=1e-4)


def test_loss_is_mean_over_real_events_of_the_batch():
    # Two events with cross-entropies c1, c2 and one padded position: loss = (c1 + c2) / 2.
    import keras

    logits = keras.ops.convert_to_tensor(np.log([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]), "float32")
    targets = np.array([[0, 1, 1]], np.int32)
    weights = np.array([[1.0, 1.0, 0.0]], np.float32)
    per_event = keras.ops.sparse_categorical_crossentropy(targets, logits, from_logits=True)
    mean = musicmodel.weighted_mean(per_event, weights)
    expected = (-np.log(0.5) - np.log(0.1)) / 2
    assert float(mean) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(per_event[0, :2], [-np.log(0.5), -np.log(0.1)], rtol=1e-5)


def test_training_lowers_the_loss_on_a_fixed_batch():
    model = tiny_model(batch_size=3)
    windows = yes_reader.make_windows(PLAYLISTS, 3, num_steps=8)
    first = evaluate(model, windows)["loss"]
    model.fit(yes_reader.to_dataset(windows).repeat(40), verbose=0)
    assert evaluate(model, windows)["loss"] < first - 0.5


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fixed_length_gru_matches_keras_gru_and_its_gradients(jit_compile):
    # FixedLengthGRU writes back-propagation through time out by hand; Keras' GRU, given the same
    # weights (random biases too, so every gate term counts), is the reference for the outputs,
    # the final state and the gradients of a loss that reads both (as the next layer does).
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(3)
    batch, time, inputs, units = 3, 4, 5, 6
    x, h0 = tf.random.normal((batch, time, inputs)), tf.random.normal((batch, units))
    w_seq, w_final = tf.random.normal((batch, time, units)), tf.random.normal((batch, units))
    reference = keras.layers.GRU(units, return_sequences=True, return_state=True)
    reference.build((batch, time, inputs))
    reference.cell.bias.assign(tf.random.normal(reference.cell.bias.shape))
    fused = kernels.FixedLengthGRU(units)
    fused.build((batch, time, inputs))
    fused.set_weights(reference.get_weights())

    def run(layer):
        @tf.function(jit_compile=jit_compile)
        def f(x, h0):
            with tf.GradientTape() as tape:
                tape.watch([x, h0])
                outputs, final = layer(x, initial_state=[h0])
                loss = tf.reduce_sum(outputs * w_seq) + tf.reduce_sum(final * w_final)
            return [outputs, final, *tape.gradient(loss, [x, h0, *layer.trainable_variables])]

        return [t.numpy() for t in f(x, h0)]

    for got, want in zip(run(fused), run(reference), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_linear_lr_decay_trains_step_i_of_t_at_its_share_of_the_rate():
    # PLAYLISTS in batches of 3, windows of 4 steps: 8 events in the longest row, so 2 windows
    # an epoch; 3 epochs give T = 6 steps, and step i trains at 0.01 x (6 - i) / 6.
    import keras

    keras.utils.set_random_seed(1)
    config = config_lib.Config(
        batch_size=3, embedding_size=6, hidden_size=5, learning_rate=0.01, num_epochs=3,
        lr_decay="linear",
    )  # fmt: skip
    windows = yes_reader.make_windows(PLAYLISTS, 3, num_steps=4)
    assert windows.num_windows == 2
    model = musicmodel.build_model(config, NUM_SONGS, train_steps=3 * windows.num_windows)
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: seen.append(float(model.optimizer.learning_rate))
    )
    order = yes_reader.schedule(windows, 3, seed=0)
    model.fit(yes_reader.to_dataset(windows, order), epochs=3, steps_per_epoch=2, verbose=0,
              callbacks=[record])  # fmt: skip
    np.testing.assert_allclose(seen, [0.01 * (6 - i) / 6 for i in range(6)], rtol=1e-6)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.0)  # after the last step
    with pytest.raises(ValueError, match="--lr_decay=linear needs the run's number of steps"):
        musicmodel.build_model(config, NUM_SONGS)
    with pytest.raises(errors.ConfigError, match="--lr_decay=linear: excludes --reduce_lr"):
        config_lib.Config(lr_decay="linear", reduce_lr_patience=1)
