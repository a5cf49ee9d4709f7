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
_spec = importlib.util.spec_from_file_location("ttq", ROOT / "benchmarks" / "time_to_quality.py")
ttq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ttq)


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


@pytest.mark.smoke
def test_train_rounds_alternate_the_order_and_keep_each_best(monkeypatch):
    # Specs A, B, C over 3 rounds run A B C, then C B A, then A B C, one process each. A fake
    # worker answers each call with its call number (1..9) as transitions/s: A gets rounds 1, 6,
    # 7 (best 7), B 2, 5, 8 (best 8), C 3, 4, 9 (best 9).
    calls = []

    def fake(specs):
        calls.append(specs[0]["name"])
        return [{"transitions_per_s": float(len(calls)), "call": len(calls)}]

    monkeypatch.setattr(bench, "in_subprocess", fake)
    best = bench.train_rounds([{"name": n} for n in "ABC"], rounds=3)
    assert "".join(calls) == "ABCCBAABC"
    assert [b["rounds"] for b in best] == [[1, 6, 7], [2, 5, 8], [3, 4, 9]]
    assert [b["call"] for b in best] == [7, 8, 9]


@pytest.mark.benchmark
def test_quick_benchmark_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    done = run_python(str(BENCH), "--quick", f"--out={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result) == [
        "cpu_bf16_flags",
        "ceiling_gflops",
        "bf16_ceiling_gflops",
        "train",
        "eval_events_per_s",
        "latency_ms",
        "incremental_latency_ms",
        "batched_histories_per_s",
    ]
    rows = {(r["catalog"], r["impl"], r["softmax"], r["precision"]) for r in result["train"]}
    assert rows == {
        (3168, "plain", "full", "float32"),
        (3168, "deepcf", "full", "float32"),
        (3168, "deepcf", "sampled", "float32"),
        (3168, "deepcf", "full", "bfloat16"),
    }
    for row in result["train"]:
        assert set(row) == {
            "catalog", "impl", "softmax", "precision", "transitions_per_s", "gflops",
            "ceiling_fraction", "peak_rss_mb", "rounds",
        }  # fmt: skip
        assert row["transitions_per_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["rounds"] == [row["transitions_per_s"]]  # --quick: one round
        ceiling = result[bench.ceiling_key(row)]
        assert abs(row["ceiling_fraction"] - row["gflops"] / ceiling) < 1e-9
    for key in ("latency_ms", "incremental_latency_ms"):
        assert 0 < result[key]["p50"] <= result[key]["p95"]
    assert result["eval_events_per_s"] > 0 and result["batched_histories_per_s"] > 0
    assert "vs plain" in done.stdout


@pytest.mark.smoke
def test_seconds_to_bar_is_the_first_epoch_with_both_test_metrics_at_the_bar():
    # Epoch 1 has the recall but not the MRR, epoch 2 both (first), epoch 3 both again.
    rows = [
        {"seconds": 10.0, "test_recall@20": 0.22, "test_mrr@20": 0.049},
        {"seconds": 20.0, "test_recall@20": 0.21, "test_mrr@20": 0.050},
        {"seconds": 30.0, "test_recall@20": 0.25, "test_mrr@20": 0.060},
    ]
    assert ttq.seconds_to_bar(rows) == 20.0
    assert ttq.seconds_to_bar(rows[:1]) is None


@pytest.mark.smoke
def test_quality_record_does_not_count_the_test_evaluation():
    # Fake clock: the record is made at 100 (set-up and training start); epoch 1 ends at 110
    # and its test evaluation takes 5 s (to 115); epoch 2 ends at 125: 10 + 10 seconds, not 25.
    ticks = iter([100.0, 110.0, 115.0, 125.0, 127.0])
    tests = iter([{"recall@20": 0.1, "mrr@20": 0.01}, {"recall@20": 0.2, "mrr@20": 0.03}])
    record = ttq.QualityRecord(lambda: next(tests), clock=lambda: next(ticks))
    for epoch, val in enumerate((0.11, 0.19)):
        record.on_epoch_end(epoch, {"val_recall@20": val, "val_mrr@20": val / 10})
    assert [r["seconds"] for r in record.rows] == [10.0, 20.0]
    assert record.rows[1] == {
        "epoch": 2, "seconds": 20.0, "val_recall@20": 0.19, "val_mrr@20": 0.019,
        "test_recall@20": 0.2, "test_mrr@20": 0.03,
    }  # fmt: skip


@pytest.mark.smoke
def test_best_rnn_flags_read_into_a_config():
    import config as config_lib

    given = ttq.read_flags(str(ROOT / "configs" / "best_rnn.flags"))
    config = config_lib.Config(**given)
    assert (config.cell, config.num_layers, config.hidden_size) == ("gru", 1, 200)
    assert config.tie_embeddings is True and config.learning_rate == 0.002
    assert config.early_stopping_patience == 3 and config.loss_weighting == "event"
    assert config.transition == "markov_artist"  # markov where no artist rows (decide_auto)


@pytest.mark.smoke
def test_fast_rnn_flags_are_best_rnn_with_a_four_epoch_linear_budget_from_cooccurrence():
    import config as config_lib

    config = ttq.load_config(str(ROOT), "fast_rnn.flags", quick=False)
    best = config_lib.Config(**ttq.read_flags(str(ROOT / "configs" / "best_rnn.flags")))
    assert (config.cell, config.hidden_size, config.transition) == ("gru", 200, "markov_artist")
    assert (config.batch_size, config.learning_rate, config.num_epochs) == (50, 0.004, 4)
    assert config.song_init == "cooccurrence" and best.song_init == "random"
    assert config.lr_decay == "linear" and config.reduce_lr_patience == 0
    assert config.data_dir == str(ROOT / "data" / "yes_big") and best.batch_size == 100
    assert ttq.load_config(str(ROOT), "fast_rnn.flags", quick=True).num_epochs == 2


@pytest.mark.smoke
def test_read_flags_parses_booleans_as_deepcf_does(tmp_path):
    path = tmp_path / "f.flags"
    path.write_text("# comment\n--tie_embeddings=false\n--nojit_compile\n--dropout=0.5\n")
    assert ttq.read_flags(str(path)) == dict(tie_embeddings=False, jit_compile=False, dropout=0.5)
    path.write_text("--tie_embeddings\n--jit_compile=true\n")
    assert ttq.read_flags(str(path)) == dict(tie_embeddings=True, jit_compile=True)


@pytest.mark.benchmark
def test_quick_time_to_quality_writes_its_json_and_plot(tmp_path):
    out = tmp_path / "ttq.json"
    done = run_python(str(BENCH), "--time_to_quality", "--quick", f"--out={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"deepcf", "deepcf_fast", "plain"}
    for run in result["runs"].values():
        assert [r["epoch"] for r in run["epochs"]] == [1, 2]
        seconds = [r["seconds"] for r in run["epochs"]]
        assert 0 < seconds[0] < seconds[1]
        assert all(0 <= r["test_recall@20"] <= 1 for r in run["epochs"])
    assert (tmp_path / "ttq.png").read_bytes()[:4] == b"\x89PNG"
    assert "seconds to the bar" in done.stdout
