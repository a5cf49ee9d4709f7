"""benchmarks/bench.py --quick runs end to end and writes the JSON shape of issue 6 (no timing)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_quick_benchmark_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", f"--out={out}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
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
