"""benchmarks/bench.py compares like with like (smoke tests, no timing), and its --quick run.

The smoke tests run by default: the plain Keras reference and deepcf's training path, as the
benchmark sets them up, take the same steps over the same windows with the same first loss; the
FLOP count and the step-time statistic are worked out by hand. The --quick run of the whole
benchmark is timed work, so it is marked `benchmark` and runs only with `pytest --run-benchmark`.
"""

from __future__ import annotations

import importlib.util
import json

import keras
import numpy as np
import pytest

from conftest import ROOT, run_python

BENCH = ROOT / "benchmarks" / "bench.py"
_spec = importlib.util.spec_from_file_location("bench", BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


class BatchLosses(keras.callbacks.Callback):
    """Records `logs["loss"]` after every training step."""

    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


@pytest.mark.smoke
def test_plain_reference_and_deepcf_take_the_same_steps_from_the_same_loss():
    # Two windows (one warm-up step, one timed). Window 0 starts every playlist, so both models
    # start from a zero state there: with the same weights they must see the same batch, the
    # same targets and give the same mean cross-entropy. Weights of std 0.5 (not the near-zero
    # initial ones, whose loss is about log(3168) whatever the batch) make the loss depend on
    # which targets follow which inputs.
    spec = {"catalog": bench.CATALOGS[0], "softmax": "full", "warmup": 1, "steps": 1}
    deepcf, deepcf_fit = bench.train_setup({**spec, "impl": "deepcf"})
    plain, plain_fit = bench.train_setup({**spec, "impl": "plain"})
    rng = np.random.default_rng(0)
    for variable in deepcf.trainable_variables:
        variable.assign(rng.normal(0, 0.5, variable.shape).astype(np.float32))
    plain.set_weights([v.numpy() for v in deepcf.trainable_variables])  # same architecture
    losses = {}
    for name, fit in (("deepcf", deepcf_fit), ("plain", plain_fit)):
        recorder = BatchLosses()
        fit([recorder])
        losses[name] = recorder.losses
    assert len(losses["deepcf"]) == len(losses["plain"]) == 2  # one step per window
    assert losses["plain"][0] == pytest.approx(losses["deepcf"][0], rel=1e-5)


@pytest.mark.smoke
def test_train_flops_worked_by_hand():
    # LSTM layer (100 inputs, 100 units): 2 x 4 x 100 x 100 input + the same recurrent = 160,000
    # per transition; 2 layers 320,000. Output: 2 x 100 x 3168 = 633,600 (full) or
    # 2 x 100 x (1024 + 1) = 205,000 (sampled). Forward + 2 x backward: x 3.
    assert bench.train_flops(3168, "full") == 3 * (320_000 + 633_600)
    assert bench.train_flops(3168, "sampled") == 3 * (320_000 + 205_000)


@pytest.mark.smoke
def test_step_seconds_is_the_lower_quartile_after_warmup(monkeypatch):
    # Steps of 9, 1, 2, 3, 4 s by a fake clock; the first is warm-up. The lower quartile of
    # 1, 2, 3, 4 (linear interpolation) is 1 + 0.75 x (2 - 1) = 1.75.
    ticks = iter([0, 9, 10, 11, 20, 22, 30, 33, 40, 44, *range(100, 120)])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))

    def fit(callbacks):
        for step in range(5):
            for callback in callbacks:
                callback.on_train_batch_begin(step)
                callback.on_train_batch_end(step)

    assert bench.step_seconds(fit, 5, warmup=1) == 1.75
    with pytest.raises(RuntimeError, match="expected 6 timed steps, got 5"):
        bench.step_seconds(fit, 6, warmup=1)


@pytest.mark.benchmark
def test_quick_benchmark_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    done = run_python(str(BENCH), "--quick", f"--out={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result) == [
        "ceiling_gflops",
        "train",
        "eval_events_per_s",
        "latency_ms",
        "incremental_latency_ms",
        "batched_histories_per_s",
    ]
    rows = {(r["catalog"], r["impl"], r["softmax"]) for r in result["train"]}
    assert rows == {(3168, "plain", "full"), (3168, "deepcf", "full"), (3168, "deepcf", "sampled")}
    for row in result["train"]:
        assert set(row) == {
            "catalog", "impl", "softmax", "transitions_per_s", "gflops", "ceiling_fraction",
            "peak_rss_mb",
        }  # fmt: skip
        assert row["transitions_per_s"] > 0 and row["peak_rss_mb"] > 0
        assert abs(row["ceiling_fraction"] - row["gflops"] / result["ceiling_gflops"]) < 1e-9
    for key in ("latency_ms", "incremental_latency_ms"):
        assert 0 < result[key]["p50"] <= result[key]["p95"]
    assert result["eval_events_per_s"] > 0 and result["batched_histories_per_s"] > 0
    assert "vs plain" in done.stdout
