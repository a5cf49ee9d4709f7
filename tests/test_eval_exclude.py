"""`--mode=eval --exclude_history`: each test event ranked as `--mode=recommend` serves it.

The reference ranks come from the serving function itself (the whole catalog, history
excluded), with ties counted against the target; the test split has repeats, whose targets are
in their own history and so can never be recommended.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import config as config_lib
import modeltrainer
import serving
from conftest import run_cli, train_small, write_yes_dir

NUM_SONGS = 12
TRAIN = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [1, 2, 1, 3], [5, 6, 7, 4, 5]] * 4
TEST = [[1, 2, 1, 3], [4, 5, 6], [7, 8, 4, 9, 7], [0, 11]]  # 1 and 7 come back


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> config_lib.Config:
    base = tmp_path_factory.mktemp("eval_exclude")
    data = write_yes_dir(base / "data", TRAIN, TEST, NUM_SONGS)
    return train_small(data, base / "run", num_epochs=2)


def served_ranks(model) -> list[int]:
    """Pessimistic rank of each test target in the scores recommend serves (history at -1)."""
    serve = serving.serving_function(model, NUM_SONGS, exclude_history=True)
    ranks = []
    for playlist in TEST:
        for t in range(1, len(playlist)):
            out = serve(np.array([playlist[:t]], np.int32), np.array([t], np.int32))
            scores = np.zeros(NUM_SONGS)
            scores[out["song_ids"].numpy()[0]] = out["scores"].numpy()[0]
            ranks.append(int((scores >= scores[playlist[t]]).sum()))
    return ranks


def test_eval_exclude_history_matches_recommend(trained):
    args = ["--mode=eval", f"--data_dir={trained.data_dir}", f"--model_dir={trained.model_dir}"]
    path = f"{trained.model_dir}/metrics.json"
    plain = run_cli(*args, f"--num_steps={trained.num_steps}")
    assert plain.returncode == 0, plain.stderr[-2000:]
    with open(path) as f:
        kept = json.load(f)
    excluded = run_cli(*args, f"--num_steps={trained.num_steps}", "--exclude_history")
    assert excluded.returncode == 0, excluded.stderr[-2000:]
    with open(path) as f:
        served = json.load(f)
    assert (kept["exclude_history"], served["exclude_history"]) == (False, True)
    ranks = np.array(served_ranks(modeltrainer.load_model(trained.model_dir)))
    assert ranks.max() == NUM_SONGS  # the repeated targets come last
    for k in (1, 5, 10):
        assert served["recall"][str(k)] == pytest.approx(np.mean(ranks <= k), abs=1e-6)
        assert served["mrr"][str(k)] == pytest.approx(np.mean((ranks <= k) / ranks), abs=1e-6)
    assert served["recall"] != kept["recall"]
    assert served["log_likelihood"] == pytest.approx(kept["log_likelihood"], abs=1e-6)
