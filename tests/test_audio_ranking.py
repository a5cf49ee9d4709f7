"""The audio ranking head: causal priors, past-only scaling, the candidate-softmax loss, distinct
recommendations, and the regression head's hit rates as they were before the ranking head."""

from __future__ import annotations

import json

import numpy as np
import pytest

import audio_task
import audio_windows
import audiomodel
import config as config_lib
import priors
from conftest import ROOT

HARRY = ROOT / "data" / "harry2687-spotify-2023"


def test_a_future_play_changes_no_prior_of_an_earlier_prediction():
    rng = np.random.default_rng(0)
    songs, days = rng.integers(0, 30, 400), np.sort(rng.uniform(0, 50, 400))
    point, cands = 250, np.arange(30)
    before = priors.PriorState(songs, days, 30, seq_len=10).priors(point, cands)
    other_songs, other_days = songs.copy(), days.copy()
    other_songs[point:] = rng.integers(0, 30, 400 - point)  # another future, the next play too
    other_days[point:] += 2.5
    after = priors.PriorState(other_songs, other_days, 30, seq_len=10).priors(point, cands)
    np.testing.assert_array_equal(before, after)
    other_songs[point - 1] = (songs[point - 1] + 1) % 30  # the last known play does count
    changed = priors.PriorState(other_songs, other_days, 30, seq_len=10).priors(point, cands)
    assert not np.array_equal(before, changed)


def test_priors_worked_out_by_hand():
    # Plays 0 1 0 2 | point 4. All-time counts s0 = 2, s1 = 1, s2 = 1; plays since last heard
    # s0 = 2, s1 = 3, s2 = 1; the last song is 2, which nothing followed yet: co1 = 0. co3 over
    # the last 3 songs (1, 0, 2), M[a, b] = times b came within 3 plays after a: M[1, 0] = 1,
    # M[1, 2] = 1, M[0, 2] = 2 (after plays 0 and 2), M[0, 1] = M[0, 0] = 1, row 2 empty:
    # b = 0: 1 + 1 + 0 = 2; b = 1: 0 + 1 + 0 = 1; b = 2: 1 + 2 + 0 = 3.
    state = priors.PriorState(np.array([0, 1, 0, 2, 1]), np.arange(5.0), 3, seq_len=2)
    got = state.priors(4, np.array([0, 1, 2]))
    column = {name: i for i, name in enumerate(priors.NAMES)}
    np.testing.assert_allclose(np.expm1(got[:, column["cnt_all"]]), [2, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(np.expm1(-got[:, column["since"]]), [2, 3, 1], rtol=1e-6)
    np.testing.assert_array_equal(got[:, column["is_last"]], [0, 0, 1])
    np.testing.assert_array_equal(got[:, column["co1"]], [0, 0, 0])
    np.testing.assert_allclose(np.expm1(got[:, column["co3"]]), [2, 1, 3], rtol=1e-6)
    np.testing.assert_array_equal(got[:, column["seq_in"]], [1, 0, 1])  # the last 2 plays: 0, 2


def test_candidate_softmax_loss_by_hand():
    # Logits [0, ln 2, ln 3, pad], positives {1, 2}: p = (2 + 3) / (1 + 2 + 3), loss ln(6 / 5).
    # A sample without a positive has loss 0 (and weight 0 in training).
    logits = np.array([[0, np.log(2), np.log(3), audiomodel.NEG], [1, 2, 3, 4]], np.float32)
    positives = np.array([[0, 1, 1, 0], [0, 0, 0, 0]], np.float32)
    loss = np.asarray(audiomodel.candidate_softmax_loss(positives, logits))
    np.testing.assert_allclose(loss, [np.log(6 / 5), 0.0], rtol=1e-5)


def test_top_k_is_distinct_and_ties_go_to_the_more_recent_song():
    ids = np.array([[5, 3, 9, 0, 0]])  # song id + 1, most recent first, padding last
    scores = np.array([[1.0, 1.0, 2.0, 9.0, 9.0]])
    np.testing.assert_array_equal(priors.top_k_distinct(scores, ids, 4), [[8, 4, 2, -1]])


def test_monthly_scaling_is_fitted_on_the_past_only():
    months = np.array(["2023-01"] * 10 + ["2023-02"] * 10)
    splits = audio_windows.split_months(months)  # month 1: train plays 0-7, test 8-9
    features = np.arange(20.0)[:, None]
    z = audio_windows.monthly_z(features, splits)
    np.testing.assert_allclose(z[0][:8, 0], (np.arange(8) - 3.5) / np.arange(8).std(), rtol=1e-6)
    changed = features.copy()
    changed[8:] += 100  # month 1's test plays and everything after
    np.testing.assert_array_equal(audio_windows.monthly_z(changed, splits)[0][:8], z[0][:8])


@pytest.fixture(scope="module")
def golden_history(tmp_path_factory) -> str:
    """The first 400 plays of each of Feb-May 2023 of the shipped harry2687 history."""
    plays = json.loads((HARRY / "StreamingHistory_music_0.json").read_text())
    months = ("2023-02", "2023-03", "2023-04", "2023-05")
    kept = [p for m in months for p in [q for q in plays if q["endTime"][:7] == m][:400]]
    path = tmp_path_factory.mktemp("golden") / "history.json"
    path.write_text(json.dumps(kept))
    return str(path)


def run_config(log: str, model_dir: str, head: str) -> config_lib.Config:
    features = f"{HARRY}/full_track_features.csv,{HARRY}/track_features.csv"
    settings = dict(listening_log=log, features=features, model_dir=model_dir, audio_head=head)
    tiny = dict(hidden_size=8, num_layers=1, num_epochs=1, ranking_epochs=2)
    return config_lib.make_config(dict(task="audio_features", **settings, **tiny))


def test_the_regression_head_gives_the_hit_rates_it_gave_before_the_ranking_head(
    golden_history, tmp_path
):
    # Recorded with the code of commit 601346b (before the ranking head) on this history.
    config = run_config(golden_history, str(tmp_path / "run"), "regression")
    task = audio_task.AudioFeaturesTask()
    task.train(config)
    out = task.evaluate(config)
    hits = {
        protocol: {
            method: {m: row["hits"] for m, row in out[protocol][method]["months"].items()}
            for method in ("model", "model_single")
        }
        for protocol in ("window", "open_catalog")
    }
    zero = {"2023-02": 0.0, "2023-04": 0.0, "2023-05": 0.0}
    assert hits == {
        "window": {"model": zero, "model_single": {**zero, "2023-05": 1.0}},
        "open_catalog": {"model": zero, "model_single": {**zero, "2023-05": 2.0}},
    }
    assert "ranking" not in out["window"]


def test_ranking_head_trains_evaluates_and_recommends_distinct_songs(golden_history, tmp_path):
    config = run_config(golden_history, str(tmp_path / "run"), "ranking")
    task = audio_task.AudioFeaturesTask()
    task.train(config)
    out = task.evaluate(config)
    assert "model" not in out["window"]
    for protocol in ("window", "open_catalog"):
        ranking, ceiling = out[protocol]["ranking"], out[protocol]["ceiling"]
        assert ranking["samples"] == ceiling["samples"] == 57
        assert ranking["hits"] <= ceiling["hits"]  # the head ranks only these candidates
    rows = task.recommend(config)
    songs = [row["song_id"] for row in rows]
    assert len(songs) == config.pred_steps == len(set(songs))
    scores = [row["score"] for row in rows]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1
