"""Training speed-ups keep the full-softmax loss; sampled softmax, its sampler and fast scoring."""

from __future__ import annotations

import numpy as np
import pytest

import config as config_lib
import errors
import kernels
import musicmodel
import serving
import yes_reader

NUM_SONGS = 11
PLAYLISTS = [np.array(p, np.int32) for p in ([1, 2, 3, 4, 5, 6, 7, 8, 9], [3, 5], [11, 10, 1, 4])]


def tiny_model(song_counts: np.ndarray | None = None, **settings) -> musicmodel.MusicModel:
    """2 x LSTM 5 over embeddings of 6, batch 3, Adam 0.01, clip 5; `settings` override."""
    import keras

    keras.utils.set_random_seed(1)
    sizes = dict(embedding_size=6, hidden_size=5, batch_size=3, learning_rate=0.01)
    config = config_lib.Config(**{**sizes, **settings})
    return musicmodel.build_model(config, NUM_SONGS, song_counts)


def reference_loss(model: musicmodel.MusicModel, windows: yes_reader.Windows) -> float:
    """Straightforward Keras: the same weights in a Sequential model, numpy cross-entropy."""
    import keras

    plain = keras.Sequential(
        [
            keras.Input((windows.inputs.shape[2],), dtype="int32"),
            keras.layers.Embedding(NUM_SONGS + 1, 6),
            keras.layers.LSTM(5, return_sequences=True),
            keras.layers.LSTM(5, return_sequences=True),
            keras.layers.Dense(NUM_SONGS),
        ]
    )
    plain.set_weights([v.numpy() for v in model.trainable_variables])
    logits = plain.predict(windows.inputs[0], verbose=0).astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, windows.targets[0][..., None], -1)[..., 0]
    return float((ce * windows.weights[0]).sum() / windows.weights[0].sum())


@pytest.mark.parametrize("jit_compile", [False, True])
def test_full_softmax_loss_is_the_plain_cross_entropy(jit_compile):
    # One window from a zero state: the train step's loss (before its update) must equal the
    # mean cross-entropy over the 8 + 1 + 3 real events of plain Keras with the same weights.
    windows = yes_reader.make_windows(PLAYLISTS, 3, num_steps=8)
    model = tiny_model(jit_compile=jit_compile)
    expected = reference_loss(model, windows)
    x, y, w = (windows.inputs[0], windows.reset[0]), windows.targets[0], windows.weights[0]
    loss = model.train_on_batch(x, y, sample_weight=w, return_dict=True)["loss"]
    assert loss == pytest.approx(expected, rel=1e-5)


def test_tied_full_softmax_loss_is_the_cross_entropy_of_the_scored_songs():
    # Training reads the tied table whole (padding row 0 at bias PAD_LOGIT, song s in column
    # s + 1); its loss must be the mean cross-entropy over the 8 + 1 + 3 real events of the
    # logits that evaluation scores (songs' rows E[1:] and bias, no padding column).
    windows = yes_reader.make_windows(PLAYLISTS, 3, num_steps=8)
    model = tiny_model(tie_embeddings=True)
    x, y, w = (windows.inputs[0], windows.reset[0]), windows.targets[0], windows.weights[0]
    logits = np.asarray(model(x, training=False), np.float64)
    assert logits.shape[-1] == NUM_SONGS
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, y[..., None], -1)[..., 0]
    loss = model.train_on_batch(x, y, sample_weight=w, return_dict=True)["loss"]
    assert loss == pytest.approx((ce * w).sum() / w.sum(), rel=1e-5)


def test_xla_and_graph_steps_train_the_same_weights():
    windows = yes_reader.make_windows(PLAYLISTS, 3, num_steps=4)
    models = [tiny_model(jit_compile=jit) for jit in (False, True)]
    for model in models:
        model.fit(yes_reader.to_dataset(windows).repeat(3), verbose=0)
    for a, b in zip(*(m.trainable_variables for m in models), strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fused_cross_entropy_and_gradients_equal_tensorflows(jit_compile):
    # The loss and every gradient of softmax_cross_entropy equal TF's sparse softmax
    # cross-entropy of the same logits, weighted per event as in the train step.
    import tensorflow as tf

    rng = np.random.default_rng(0)
    queries = tf.constant(rng.normal(size=(7, 4)), tf.float32)
    kernel = tf.constant(rng.normal(size=(4, 9)), tf.float32)
    bias = tf.constant(rng.normal(size=9), tf.float32)
    targets = tf.constant([0, 3, 3, 8, 1, 0, 5], tf.int32)
    weights = tf.constant([1, 1, 0, 1, 1, 1, 0.5], tf.float32)

    @tf.function(jit_compile=jit_compile)
    def loss_and_grads(fused):
        with tf.GradientTape() as tape:
            tape.watch([queries, kernel, bias])
            if fused:
                per_event = kernels.softmax_cross_entropy(
                    queries, targets, tf.transpose(kernel), bias
                )
            else:
                logits = tf.matmul(queries, kernel) + bias
                per_event = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)
            loss = tf.reduce_sum(per_event * weights) / tf.reduce_sum(weights)
        return [per_event, *tape.gradient(loss, [queries, kernel, bias])]

    for got, want in zip(loss_and_grads(True), loss_and_grads(False), strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_fused_cross_entropy_of_an_underflowing_probability_is_exact():
    # logits [0, 100, 0]: p(song 0) = e^-100 / (2 + e^100) underflows float32, so -log p would be
    # inf; the loss is logsumexp - logit = 100 + log(1 + 2 e^-100) - 0 = 100.0 (to float32).
    # Song 1's loss is log(1 + 2 e^-100) = 2 e^-100 = 0 in float32.
    queries = np.array([[1.0], [1.0]], np.float32)
    kernel = np.array([[0.0, 100.0, 0.0]], np.float32)
    per_event = kernels.softmax_cross_entropy(
        queries, np.array([0, 1], np.int32), kernel.T, np.zeros(3, np.float32)
    )
    np.testing.assert_allclose(np.asarray(per_event), [100.0, 0.0], atol=1e-6)


def test_fused_adam_takes_keras_adams_steps():
    # Same variables, same gradients (one of them IndexedSlices, as an embedding's), global norm
    # 2.4, 3.5, 3.1 at even steps (clipped to 1) and 0.21, 0.52 at odd ones (not clipped): after
    # 5 steps the fused kernel and clipping agree with Keras' Adam to float rounding.
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    start = [rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=4).astype(np.float32)]
    runs = []
    for optimizer in (keras.optimizers.Adam, kernels.FusedAdam):
        variables = [keras.Variable(v) for v in start]
        opt = optimizer(0.05, global_clipnorm=1.0)
        opt.build(variables)
        for step in range(5):
            step_rng, size = np.random.default_rng(step), 0.1 if step % 2 else 1.0
            values = tf.constant(size * step_rng.normal(size=(2, 3)), tf.float32)
            rows = tf.IndexedSlices(values, tf.constant([1, 4]), [6, 3])
            opt.apply([rows, tf.constant(size * step_rng.normal(size=4), tf.float32)], variables)
        runs.append([v.numpy() for v in variables])
    for keras_adam, fused in zip(*runs, strict=True):
        np.testing.assert_allclose(fused, keras_adam, atol=1e-5)  # steps are ~0.05
    assert not np.allclose(runs[0][0], start[0])  # the steps did move the weights


def test_scaled_steps_are_keras_adams_steps_times_the_scale():
    # Adam's moments do not depend on the weights, so with the same gradients every step of a
    # scaled entry is `scale` x Keras' step, and so is the sum of 4 steps. Column 1 gets no
    # gradient at steps 0 and 2 (not sampled) and still moves on its momentum. Step 0 of a
    # column with gradient moves lr x scale: m / sqrt(v) = 0.1 g / sqrt(0.001 g^2) = sqrt(10),
    # lr_t = lr sqrt(0.001) / 0.1, so the step is lr (up to epsilon).
    import keras
    import tensorflow as tf

    start = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
    scale = np.array([1.0, 3.0, 0.5], np.float32)
    grads = [[[0.5, 0.0, -1.0], [2.0, 0.0, 0.1]], [[0.3, 0.4, 0.2], [-0.1, 1.0, 0.2]]] * 2
    moved = []
    for optimizer in (keras.optimizers.Adam, kernels.FusedAdam):
        variable = keras.Variable(start)
        opt = optimizer(0.1, global_clipnorm=5.0)
        opt.build([variable])
        if optimizer is kernels.FusedAdam:
            opt.scale_steps(variable, scale)
        for step, grad in enumerate(grads):
            opt.apply([tf.constant(grad, tf.float32)], [variable])
            if step == 0:
                first = variable.numpy() - start
        moved.append(variable.numpy() - start)
    np.testing.assert_allclose(first[:, [0, 2]], [[-0.1, 0.05], [-0.1, -0.05]], atol=1e-5)
    np.testing.assert_allclose(first[:, 1], 0.0)
    np.testing.assert_allclose(moved[1], moved[0] * scale, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_sampled_output_rows_step_by_their_chance_to_be_sampled(tie_embeddings):
    # counts 9, 0, 0, ...: Q = 10/20 for song 0 and 1/20 for the 10 others; 2 draws a step
    # include song 0 with pi = 1 - 0.5^2 = 0.75, another with 1 - 0.95^2 = 0.0975, so their
    # output rows and biases take pi^(-1/4) = 1.0746 and 1.7896 x the steps of plain Adam.
    # The first step sees the same gradients (same weights, same negatives) with both.
    windows = yes_reader.make_windows(PLAYLISTS, 3, num_steps=8)
    counts = np.array([9] + [0] * (NUM_SONGS - 1))
    moved = {}
    for steps in ("scaled", "plain"):
        model = tiny_model(
            softmax="sampled", num_sampled=2, song_counts=counts, sampled_steps=steps,
            tie_embeddings=tie_embeddings,
        )  # fmt: skip
        before = [np.asarray(w) for w in model.output_layer()]
        model.fit(yes_reader.to_dataset(windows).take(1), verbose=0)
        after = [np.asarray(w) for w in model.output_layer()]
        moved[steps] = [a - b for a, b in zip(after, before, strict=True)]
    expected = np.array([0.75**-0.25] + [(1 - 0.95**2) ** -0.25] * (NUM_SONGS - 1))
    for scaled, plain in zip(moved["scaled"], moved["plain"], strict=True):
        assert np.abs(plain).max() > 1e-4  # the step moved the rows
        np.testing.assert_allclose(scaled, plain * expected, rtol=1e-4, atol=1e-6)


def test_keras_still_has_the_private_adam_api_fused_adam_uses():
    # kernels.FusedAdam overrides Adam._clip_gradients and reads _get_variable_index, _momentums
    # and _velocities; setup.py pins the Keras releases that have them. A Keras that renames or
    # reshapes one of them fails here (and in the test above), not in a user's training.
    import keras

    variables = [keras.Variable(np.zeros((2, 3), np.float32)), keras.Variable(np.ones(4))]
    opt = keras.optimizers.Adam(0.1, global_clipnorm=1.0)
    opt.build(variables)
    assert [opt._get_variable_index(v) for v in variables] == [0, 1]
    assert [m.shape for m in opt._momentums] == [(2, 3), (4,)]
    assert [v.shape for v in opt._velocities] == [(2, 3), (4,)]
    big = [np.full((2, 3), 3.0, np.float32), np.full(4, 4.0, np.float32)]  # norm sqrt(118)
    clipped = opt._clip_gradients(big)
    np.testing.assert_allclose(
        np.linalg.norm(np.concatenate([np.ravel(g) for g in clipped])), 1.0, rtol=1e-6
    )


def test_next_power_of_two():
    import tensorflow as tf

    n = tf.constant([1, 2, 3, 5, 8, 9, 1000, 1024, 1025])
    np.testing.assert_array_equal(
        serving.next_power_of_two(n), [1, 2, 4, 8, 8, 16, 1024, 1024, 2048]
    )


def test_serving_pads_requests_to_buckets_without_changing_them():
    # 3 histories of width 5 run as 4 rows of 8 songs (XLA shape buckets); each row must equal
    # the model's own forward pass over that history alone, history songs excluded.
    import tensorflow as tf

    model = tiny_model()
    histories = [[3, 0, 7, 2, 9], [5], [1, 1, 4]]
    padded, length = serving.pad_histories(histories)
    assert padded.shape == (3, 5)
    out = serving.serving_function(model, top_k=4, exclude_history=True)(padded, length)
    for row, history in enumerate(histories):
        logits, _ = model.forward(np.array([history], np.int32) + 1, model.zero_state(1))
        probs = tf.nn.softmax(logits[0, -1]).numpy()
        order = [s for s in np.argsort(-probs, kind="stable") if s not in history][:4]
        np.testing.assert_array_equal(out["song_ids"][row], order)
        np.testing.assert_allclose(out["scores"][row], probs[order], rtol=1e-5)


def test_sampled_logits_worked_by_hand():
    # dims 1: query 2; kernel [1, 2, 3], bias [0, 1, 0], log_q [-1, -2, -3].
    # target 1: 2 * 2 + 1 - (-2) = 7; negatives [0, 1, 2]: 2 + 0 + 1 = 3, (hit: masked), 6 + 3 = 9.
    logits = kernels.sampled_softmax_logits(
        np.array([[2.0]], np.float32),
        np.array([1], np.int32),
        np.array([[1.0, 2.0, 3.0]], np.float32),
        np.array([0.0, 1.0, 0.0], np.float32),
        np.array([0, 1, 2], np.int32),
        np.array([-1.0, -2.0, -3.0], np.float32),
    )
    np.testing.assert_allclose(np.asarray(logits), [[7.0, 3.0, -1e9, 9.0]], rtol=1e-6)


def test_alias_table_gives_exactly_the_probabilities():
    # P(song j) = (accept[j] + sum of (1 - accept[i]) over columns i aliased to j) / n.
    probs = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])
    accept, alias = kernels.alias_table(probs)
    implied = accept.copy()
    np.add.at(implied, alias, 1.0 - accept)
    np.testing.assert_allclose(implied / len(probs), probs, atol=1e-12)


def test_sampler_draws_songs_in_proportion_to_counts_plus_one():
    import tensorflow as tf

    counts = np.array([99, 0, 49, 0])  # Q = [100, 1, 50, 1] / 152
    sampler = kernels.SongSampler(counts)
    draws = sampler.draw(20000, tf.constant([3, 0])).numpy()
    assert draws.min() >= 0 and draws.max() < 4
    share = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(share, [100 / 152, 1 / 152, 50 / 152, 1 / 152], atol=0.01)
    np.testing.assert_allclose(
        np.exp(sampler.log_q.numpy()), [100 / 152, 1 / 152, 50 / 152, 1 / 152]
    )


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_sampled_training_lowers_the_full_catalog_loss(tie_embeddings):
    windows = yes_reader.make_windows(PLAYLISTS, 3, num_steps=8)
    counts = np.bincount(windows.targets[windows.weights > 0], minlength=NUM_SONGS)
    model = tiny_model(
        softmax="sampled", num_sampled=4, song_counts=counts, jit_compile=True,
        tie_embeddings=tie_embeddings,
    )  # fmt: skip
    before = model.evaluate(yes_reader.to_dataset(windows), verbose=0, return_dict=True)
    model.fit(yes_reader.to_dataset(windows).repeat(100), verbose=0)
    after = model.evaluate(yes_reader.to_dataset(windows), verbose=0, return_dict=True)
    assert after["events"] == before["events"] == 12  # evaluation: all events, full catalog
    assert after["loss"] < before["loss"] - 0.3


@pytest.mark.parametrize(
    "given, flag",
    [({"softmax": "partial"}, "--softmax"), ({"num_sampled": 0}, "--num_sampled")],
)
def test_bad_softmax_settings_name_the_flag(given, flag):
    with pytest.raises(errors.ConfigError, match=flag):
        config_lib.make_config(given)


def test_more_samples_than_songs_names_the_flag():
    with pytest.raises(errors.ConfigError, match="--num_sampled=11"):
        tiny_model(softmax="sampled", num_sampled=NUM_SONGS)


def test_incremental_step_equals_scoring_the_whole_history():
    import tensorflow as tf

    model = tiny_model()
    history = np.array([[3, 0, 7, 2]], np.int32)
    whole = serving.serving_function(model, top_k=5, exclude_history=False)(
        history, np.array([4], np.int32)
    )
    step = serving.step_function(model, top_k=5)
    state = tf.zeros([2, 2, 1, 5])
    for song in history[0]:
        out = step(np.array([[song]], np.int32), state)
        state = out["state"]
    np.testing.assert_array_equal(out["song_ids"], whole["song_ids"])
    np.testing.assert_allclose(out["scores"], whole["scores"], rtol=1e-5)


def test_exported_step_signature_matches_the_model(tmp_path):
    import tensorflow as tf

    import modeltrainer

    model = tiny_model()
    step = serving.step_function(model, top_k=3)
    path = modeltrainer.export_saved_model(model, {"next_step": step}, str(tmp_path))
    served = tf.saved_model.load(path).signatures["next_step"]
    song, state = np.array([[4]], np.int32), np.zeros([2, 2, 1, 5], np.float32)
    want = step(song, state)
    got = served(song=tf.constant(song), state=tf.constant(state))
    np.testing.assert_array_equal(got["song_ids"], want["song_ids"])
    np.testing.assert_allclose(got["state"], want["state"], atol=1e-6)


def test_cli_rejects_more_samples_than_songs_before_writing(small_slice, tmp_path):
    from conftest import run_cli

    model_dir = tmp_path / "run"
    done = run_cli(
        f"--data_dir={small_slice}", f"--model_dir={model_dir}", "--softmax=sampled",
        "--num_sampled=3168",
    )  # fmt: skip
    assert done.returncode == 2
    assert "--num_sampled=3168: must be in 1..3167" in done.stderr
    assert not model_dir.exists()


def test_bfloat16_queries_make_bfloat16_matmuls_with_float32_loss_and_weight_gradients():
    # The same loss and gradients as the float32 path (which equals TF's, above) to bfloat16
    # rounding (8-bit mantissa: about 0.4 % per operand), with the dtypes of mixed precision.
    import tensorflow as tf

    rng = np.random.default_rng(0)
    queries = tf.constant(rng.normal(size=(7, 4)), tf.float32)
    kernel = tf.constant(rng.normal(size=(4, 9)), tf.float32)
    bias = tf.constant(rng.normal(size=9), tf.float32)
    targets = tf.constant([0, 3, 3, 8, 1, 0, 5], tf.int32)
    results = {}
    for dtype in (tf.float32, tf.bfloat16):
        low = tf.cast(queries, dtype)
        with tf.GradientTape() as tape:
            tape.watch([low, kernel, bias])
            per_event = kernels.softmax_cross_entropy(low, targets, tf.transpose(kernel), bias)
            loss = tf.reduce_mean(per_event)
        results[dtype] = [per_event, *tape.gradient(loss, [low, kernel, bias])]
    got, want = results[tf.bfloat16], results[tf.float32]
    assert [t.dtype for t in got] == [tf.float32, tf.bfloat16, tf.float32, tf.float32]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(tf.cast(a, tf.float32).numpy(), b.numpy(), rtol=0.05, atol=0.02)


def test_bfloat16_model_trains_in_mixed_precision_and_scores_in_float32(caplog, monkeypatch):
    # Layers in mixed_bfloat16 (bfloat16 compute, float32 weights) but the output layer and the
    # scores in float32; the global policy is left as it was; the loss stays finite and falls.
    import keras
    import tensorflow as tf

    monkeypatch.setattr(kernels, "cpu_bf16_flags", lambda: [])
    with caplog.at_level("WARNING", logger="absl"):
        model = tiny_model(precision="bfloat16")
    assert "will not be faster than float32" in caplog.text
    assert keras.config.dtype_policy().name == "float32"
    assert model.embedding.dtype_policy.name == "mixed_bfloat16"
    assert model.rnns[0].dtype_policy.compute_dtype == "bfloat16"
    assert model.head.dtype_policy.name == "float32"
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    windows = yes_reader.make_windows(PLAYLISTS, 3, num_steps=4)
    losses = model.fit(yes_reader.to_dataset(windows).repeat(20), verbose=0).history["loss"]
    assert np.isfinite(losses[-1]) and losses[-1] < np.log(NUM_SONGS)
    queries, _ = model.features(windows.inputs[0], model.zero_state(3))
    scores = model.scores(queries, windows.inputs[0])
    assert queries.dtype == tf.bfloat16 and scores.dtype == tf.float32
    results = model.evaluate(yes_reader.to_dataset(windows), verbose=0, return_dict=True)
    assert np.isfinite(results["loss"]) and results["events"] == windows.events


def test_cpu_bf16_flags_reads_the_flags_lines(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: X avx512_bf16\nflags\t\t: fpu avx2 amx_bf16 sse\n")
    assert kernels.cpu_bf16_flags(str(cpuinfo)) == ["amx_bf16"]  # not from the model name
    assert kernels.cpu_bf16_flags(str(tmp_path / "missing")) == []
