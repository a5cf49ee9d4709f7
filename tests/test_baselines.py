"""Baselines and blends on tiny playlists whose scores and ranks are worked out by hand."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess

import numpy as np
import pytest

import baselines
import blend
import config as config_lib
import errors
import metrics
import neighbours
import tasks
import yes_reader
from conftest import reference_events, run_cli


def tokens(playlists: list[list[int]]) -> list[np.ndarray]:
    """Song ids -> reader tokens (id + 1)."""
    return [np.array(p, np.int32) + 1 for p in playlists]


# Five songs. Occurrences: song 0: 2, song 1: 2, song 2: 3, song 3: 3, song 4: 1 (total 11).
# Sets: P0 {0,1}, P1 {1,2}, P2 {2,3}, P3 {0,3,4}; transitions 0->1, 1->2, 2->3, 3->2, 0->3,
# 3->4, 4->3: n_0 = 2, n_1 = 1, n_2 = 1, n_3 = 2, n_4 = 1.
TRAIN = tokens([[0, 1], [1, 2], [2, 3, 2], [0, 3, 4, 3]])
NUM_SONGS = 5


def ranks(baseline, histories: list[list[int]], targets: list[int]) -> list[int]:
    scores = baseline.scores([np.array(h) for h in histories])
    return np.asarray(metrics.pessimistic_ranks(scores, np.array(targets))).tolist()


def test_popularity_scores_are_training_counts_with_laplace_probabilities():
    pop = baselines.Popularity(TRAIN, NUM_SONGS)
    assert pop.counts.tolist() == [2, 2, 3, 3, 1]
    # Target 0 (count 2) ties song 1 and is below songs 2, 3: rank 4 (ties count against it).
    assert ranks(pop, [[4], [1, 2]], [0, 2]) == [4, 2]
    # p(0) = (2 + 1) / (11 + 5) = 3/16.
    assert pop.log_likelihood([np.array([4])], np.array([0]))[0] == pytest.approx(math.log(3 / 16))


def test_markov_interpolates_transitions_with_popularity():
    markov = baselines.Markov(TRAIN, [], NUM_SONGS, beta=1.0)
    # p_pop = [3, 3, 4, 4, 2] / 16. After song 0 (n_0 = 2: 0->1 once, 0->3 once), λ = 2/3:
    # p(j|0) = 2/3 * n_0j/2 + 1/3 * p_pop(j) = [1/16, 1/3 + 1/16, 1/12, 1/3 + 1/12, 1/24].
    expected = [1 / 16, 1 / 3 + 1 / 16, 1 / 12, 1 / 3 + 1 / 12, 1 / 24]
    np.testing.assert_allclose(markov.probabilities([np.array([2, 0])])[0], expected)
    assert ranks(markov, [[2, 0]], [1]) == [2]  # below song 3 only
    ll = markov.log_likelihood([np.array([2, 0])], np.array([4]))
    assert ll[0] == pytest.approx(math.log(1 / 24))
    # Only the last song counts; a song never followed by anything gives p_pop.
    np.testing.assert_allclose(
        baselines.Markov(tokens([[0, 1]]), [], 3, beta=5.0).probabilities([np.array([1])])[0],
        [2 / 5, 2 / 5, 1 / 5],  # (counts + 1) / (2 + 3)
    )


def test_markov_tunes_beta_by_validation_log_likelihood():
    # Validation = training: the raw transition frequencies are best, so the smallest β wins.
    assert baselines.Markov(TRAIN, TRAIN, NUM_SONGS).beta == baselines.BETAS[0]
    # Validation follows song 0 by song 4, never seen after it: popularity must take over.
    assert baselines.Markov(TRAIN, tokens([[0, 4]]), NUM_SONGS).beta == baselines.BETAS[-1]
    with pytest.raises(errors.DataError, match="markov"):
        baselines.Markov(TRAIN, tokens([[3]]), NUM_SONGS)


def test_history_weights_are_linear_in_recency_and_keep_the_latest_repeat():
    weighted = neighbours.history_matrix([np.array([3, 1, 3, 0])], NUM_SONGS).toarray()
    # Positions 1..4 of 4 weigh 1/4, 2/4, 3/4, 1; song 3 keeps 3/4 (its latest position).
    np.testing.assert_allclose(weighted[0], [1.0, 0.5, 0.0, 0.75, 0.0])


S10, S15 = math.sqrt(10), math.sqrt(15)


def test_sknn_similarities_and_neighbour_scores():
    # History [0, 1] weighs song 0 by 1/2 and song 1 by 1, norm sqrt(5)/2.
    # cos(P0 {0,1}) = 1.5 / (sqrt(5)/2 * sqrt(2)) = 3/sqrt(10); cos(P1 {1,2}) = 2/sqrt(10);
    # cos(P3 {0,3,4}) = 0.5 / (sqrt(5)/2 * sqrt(3)) = 1/sqrt(15); P2 shares no song.
    history = [np.array([0, 1])]
    knn = baselines.SessionKNN(TRAIN, NUM_SONGS)
    expected = [3 / S10 + 1 / S15, 5 / S10, 2 / S10, 1 / S15, 1 / S15]
    np.testing.assert_allclose(knn.neighbour_scores(history)[0], expected)
    # k = 2 keeps P0 and P1 only.
    knn2 = baselines.SessionKNN(TRAIN, NUM_SONGS, neighbours=2)
    np.testing.assert_allclose(knn2.neighbour_scores(history)[0], [3 / S10, 5 / S10, 2 / S10, 0, 0])
    # 2 candidates: the most recent playlists sharing a song are P3 and P1 (P0 is older).
    knn_recent = baselines.SessionKNN(TRAIN, NUM_SONGS, candidates=2)
    expected = [1 / S15, 2 / S10, 2 / S10, 1 / S15, 1 / S15]
    np.testing.assert_allclose(knn_recent.neighbour_scores(history)[0], expected)


def test_sknn_breaks_ties_by_popularity_and_can_rank_the_history_last():
    # With 2 candidates (see above) songs 1, 2 tie at 2/sqrt(10) and songs 0, 3, 4 at
    # 1/sqrt(15). Popularity (2, 2, 3, 3, 1) orders them: 2, 1, 3, 0, 4.
    knn = baselines.SessionKNN(TRAIN, NUM_SONGS, candidates=2)
    assert ranks(knn, [[0, 1]] * 5, [0, 1, 2, 3, 4]) == [4, 2, 1, 3, 5]
    # History last: 2, 3, 4, then the history songs 1, 0.
    last = baselines.SessionKNN(TRAIN, NUM_SONGS, history_last=True, candidates=2)
    assert ranks(last, [[0, 1]] * 5, [0, 1, 2, 3, 4]) == [5, 4, 1, 2, 3]
    # History [4]: only P3 shares a song, so songs 0, 3, 4 tie at 1/sqrt(3) and songs 1, 2 score
    # 0; popularity orders them 3, 0, 4, 2, 1.
    assert ranks(knn, [[4]] * 2, [3, 1]) == [1, 5]


def test_events_from_windows_are_every_position_of_every_playlist():
    playlists = tokens([[0, 1, 2, 3, 4], [1], [2, 3], [4, 0, 1]])
    windows = yes_reader.make_windows(playlists, batch_size=2, num_steps=2)
    events = baselines.Events.from_windows(windows)
    got = sorted(
        (tuple(h.tolist()), int(t))
        for h, t in zip(events.histories(slice(None)), events.targets, strict=True)
    )
    usable = ([0, 1, 2, 3, 4], [2, 3], [4, 0, 1])  # [1] has no next song
    expected = sorted((tuple(p[:t]), p[t]) for p in usable for t in range(1, len(p)))
    assert got == expected and len(events) == windows.events
    # Events follow the C order of the windows' weights, so model outputs line up.
    assert np.all(np.diff(events.window) >= 0)
    w, r, s = np.nonzero(windows.weights)
    np.testing.assert_array_equal(events.targets, windows.targets[w, r, s])


def test_evaluate_uses_the_shared_metrics():
    pop = baselines.Popularity(TRAIN, NUM_SONGS)
    windows = yes_reader.make_windows(tokens([[4, 0, 2]]), batch_size=1, num_steps=5)
    report = baselines.evaluate(pop, baselines.Events.from_windows(windows))
    # Events: [4] -> 0 (rank 4), [4, 0] -> 2 (rank 2, tie with song 3).
    assert report["events"] == 2
    assert report["recall"]["1"] == 0 and report["recall"]["5"] == 1
    assert report["mrr"]["20"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert report["log_likelihood"] == pytest.approx((math.log(3 / 16) + math.log(4 / 16)) / 2)
    knn = baselines.evaluate(
        baselines.SessionKNN(TRAIN, NUM_SONGS), baselines.Events.from_windows(windows)
    )
    assert knn["log_likelihood"] is None and knn["perplexity"] is None


def test_blend_mixes_per_event_probabilities():
    fitted = {
        "popularity": baselines.Popularity(TRAIN, NUM_SONGS),
        "markov": baselines.Markov(TRAIN, [], NUM_SONGS, beta=1.0),
    }
    windows = yes_reader.make_windows(tokens([[2, 0, 3]]), batch_size=1, num_steps=5)
    # Event [2, 0] -> 3: markov [1/16, 19/48, 1/12, 5/12, 1/24], popularity [3,3,4,4,2]/16.
    # Weights 1:3 (divided by their sum): song 1 = 19/192 + 9/64 = 46/192, song 3 =
    # 5/48 + 3/16 = 56/192, song 2 = 1/48 + 3/16 = 40/192: target 3 is first.
    # Event [2] -> 0: markov after 2 (n_2 = 1, only 2->3): [3/32, 3/32, 1/8, 1/2 + 1/8, 1/16];
    # blend song 0 = 3/128 + 9/64 = 21/128, songs 1 the same, 2 = 1/32 + 3/16, 3 = 5/32 + 3/16:
    # target 0 ties song 1 and is below 2 and 3: rank 4.
    weights = {"markov": 1.0, "popularity": 3.0}
    (report,) = blend.evaluate_blends([weights], fitted, None, windows)
    assert report["events"] == 2
    assert report["recall"]["1"] == 0.5 and report["mrr"]["20"] == pytest.approx((1 + 1 / 4) / 2)
    expected_ll = (math.log(21 / 128) + math.log(56 / 192)) / 2
    assert report["log_likelihood"] == pytest.approx(expected_ll, rel=1e-5)
    # The grid is the simplex; the vertices are the components alone.
    assert blend.simplex(["a", "b"], 0.5) == [
        {"a": 0.0, "b": 1.0},
        {"a": 0.5, "b": 0.5},
        {"a": 1.0, "b": 0.0},
    ]
    (alone,) = blend.evaluate_blends([{"markov": 1.0, "popularity": 0.0}], fitted, None, windows)
    markov_alone = baselines.evaluate(fitted["markov"], baselines.Events.from_windows(windows))
    assert alone["mrr"]["20"] == pytest.approx(markov_alone["mrr"]["20"])
    assert alone["log_likelihood"] == pytest.approx(markov_alone["log_likelihood"], rel=1e-5)


def test_fill_history_by_hand():
    # Event with history [3, 1]: p_rnn [.1, .2, .3, .4] puts m = .2 + .4 = .6 on the history.
    # A history-last component [.5, 0, .5, 0] keeps its shape off the history, scaled to
    # 1 - m = .4: [.2, 0, .2, 0], and takes p_rnn there: [.2, .2, .2, .4] (sums to 1).
    # Markov does not rank the history last: unchanged, like the model itself.
    stack = np.array([[[0.1, 0.2, 0.3, 0.4]], [[0.5, 0.0, 0.5, 0.0]], [[0.7, 0.1, 0.1, 0.1]]])
    names = ["rnn", "knn", "markov"]
    fitted = {
        "knn": baselines.SessionKNN(TRAIN, NUM_SONGS, history_last=True),
        "markov": baselines.Markov(TRAIN, [], NUM_SONGS, beta=1.0),
    }
    filled = blend.fill_history(stack, names, fitted, [np.array([3, 1])])
    np.testing.assert_allclose(filled[1, 0], [0.2, 0.2, 0.2, 0.4], rtol=1e-6)
    np.testing.assert_allclose(filled[[0, 2]], stack[[0, 2]], rtol=1e-6)
    # Without the model in the blend, or without history-last components, nothing to fill.
    assert blend.history_last(names[1:], fitted) == []
    assert blend.history_last(["rnn", "markov"], fitted) == []
    alone = blend.fill_history(stack[1:], names[1:], fitted, [np.array([3, 1])])
    np.testing.assert_allclose(alone, stack[1:])


@pytest.fixture(scope="module")
def trained(small_slice, tmp_path_factory) -> config_lib.Config:
    """A tiny model trained for one epoch on the yes_small slice."""
    cfg = config_lib.make_config(
        dict(
            data_dir=str(small_slice),
            model_dir=str(tmp_path_factory.mktemp("baselines_run")),
            embedding_size=8,
            hidden_size=8,
            batch_size=50,
            num_steps=5,
            num_epochs=1,
        )
    )
    tasks.TASKS["next_song"].train(cfg)
    return cfg


def run_eval(cfg: config_lib.Config, *flags: str) -> subprocess.CompletedProcess:
    return run_cli(
        "--mode=eval",
        f"--data_dir={cfg.data_dir}",
        f"--model_dir={cfg.model_dir}",
        f"--num_steps={cfg.num_steps}",
        *flags,
    )


def test_eval_cli_prints_baselines_and_blend_and_writes_them(trained, model):
    result = run_eval(
        trained, "--baselines=popularity,markov,sknn,vstan,artist", "--blend=rnn:0.5,markov:0.5"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split()[0] for line in result.stdout.splitlines()]
    assert rows == ["method", "popularity", "markov", "sknn", "vstan", "artist", "model", "blend"]
    m = json.load(open(os.path.join(trained.model_dir, "metrics.json")))
    assert list(m["baselines"]) == ["popularity", "markov", "sknn", "vstan", "artist"]
    assert "cold" not in m  # no --cold_fraction, no cold-target report
    schema = {"events", "recall", "mrr", "ndcg", "log_likelihood", "perplexity"}
    for report in m["baselines"].values():
        assert set(report) == schema and report["events"] == m["events"]
        assert list(report["recall"]) == list(m["recall"])
    assert m["baselines"]["sknn"]["log_likelihood"] is None
    assert m["baselines"]["vstan"]["log_likelihood"] is None
    assert m["baselines"]["artist"]["log_likelihood"] is None
    assert m["blend"]["weights"] == {"rnn": 0.5, "markov": 0.5}
    assert m["blend"]["events"] == m["events"]
    # Per test event, p_blend = 0.5 p_model + 0.5 p_markov; p_model from a forward pass over each
    # whole playlist, p_markov from Markov fitted as --mode=eval fits it (train, beta on valid).
    test = yes_reader.read_playlists(os.path.join(trained.data_dir, "test.txt"), 3168)
    model_log_p, _ = reference_events(model, test)
    data = yes_reader.load(trained.data_dir, trained.valid_fraction, trained.seed)
    markov = baselines.fit(["markov"], data)["markov"]
    histories = [p[:t] - 1 for p in test for t in range(1, len(p))]
    targets = np.concatenate([p[1:] - 1 for p in test])
    markov_p = markov.probabilities(histories)[np.arange(len(targets)), targets]
    assert m["log_likelihood"] == pytest.approx(np.mean(model_log_p), rel=1e-5)
    assert m["baselines"]["markov"]["log_likelihood"] == pytest.approx(np.mean(np.log(markov_p)))
    blend = np.log(0.5 * np.exp(model_log_p) + 0.5 * markov_p)
    assert m["blend"]["log_likelihood"] == pytest.approx(np.mean(blend), rel=1e-5)


def test_eval_cli_tunes_blend_weights_on_validation(trained):
    result = run_eval(trained, "--blend=rnn,markov")
    assert result.returncode == 0, result.stderr[-2000:]
    m = json.load(open(os.path.join(trained.model_dir, "metrics.json")))
    weights = m["blend"]["weights"]
    assert set(weights) == {"rnn", "markov"} and sum(weights.values()) == pytest.approx(1.0)
    valid = yes_reader.load(trained.data_dir, trained.valid_fraction, trained.seed).valid
    assert m["blend"]["validation"]["events"] == sum(max(len(p) - 1, 0) for p in valid)
    assert "baselines" in m
    assert m["blend"]["fill_history"] is False  # Markov does not rank the history last


def test_choose_blend_searches_the_history_fill(trained, model):
    data = yes_reader.load(trained.data_dir, trained.valid_fraction, trained.seed)
    valid = yes_reader.make_windows(data.valid, trained.batch_size, trained.num_steps)
    names = ["rnn", "sknn_history_last"]
    fitted = baselines.fit(names[1:], data)
    chosen = blend.choose_blend(names, fitted, model, valid)
    grid = blend.simplex(names)
    score = {}
    for fill in (False, True):
        reports = blend.evaluate_blends(grid, fitted, model, valid, False, [fill] * len(grid))
        score[fill] = [r["recall"]["20"] * r["mrr"]["20"] for r in reports]
    # Filling changes the blends of both (else this test shows nothing) ...
    assert score[True] != score[False]
    # ... and the choice is the best of both grids (ties to the unfilled, which comes first).
    fill = max(score[True]) > max(score[False])
    assert chosen["fill_history"] is fill
    assert chosen["weights"] == grid[int(np.argmax(score[fill]))]
    report = chosen["validation"]
    assert report["recall"]["20"] * report["mrr"]["20"] == max(score[fill])


def test_unknown_baseline_is_a_flag_error(trained):
    result = run_eval(trained, "--baselines=popularity,knn")
    assert result.returncode == 2
    assert "--baselines=popularity,knn" in result.stderr and "knn" in result.stderr


def test_sequential_rules_by_hand():
    # Songs 0 1 2 in one playlist, rules within 2 plays: 0 -> 1 (gap 1, weight 1), 1 -> 2 (1),
    # 0 -> 2 (gap 2, weight 1/2). After [.., 0]: song 1 (1) above song 2 (1/2) above the rest,
    # which tie at 0 and go by popularity (song 3, played twice, before 4 and 0).
    train = tokens([[0, 1, 2], [3, 4, 3]])
    sr = baselines.SequentialRules(train, [], 5, steps=2)
    order = np.argsort(-sr.scores([np.array([4, 0])])[0], kind="stable")
    assert order.tolist() == [1, 2, 3, 0, 4]
    np.testing.assert_allclose(sr.probabilities([np.array([0])]), [[0, 2 / 3, 1 / 3, 0, 0]])
    # No rule from song 2: the probabilities fall back to add-one popularity (counts 1 1 1 2 1).
    np.testing.assert_allclose(sr.probabilities([np.array([2])])[0], np.array([2, 2, 2, 3, 2]) / 11)


def test_sequential_rules_window_is_chosen_on_validation():
    # The validation event 0 -> 1 has 1 two plays after 0 in training: with a 1-play window only
    # the rule 0 -> 5 fires and song 1 ties songs 0 and 5 on popularity (rank 3, counted against
    # it); from 2 plays on the rule 0 -> 1 ranks it second, behind 0 -> 5: the smallest such
    # window wins.
    train = tokens([[0, 5, 1], [0, 5, 1], [2, 3, 4]])
    valid = tokens([[0, 1]])
    assert baselines.SequentialRules(train, valid, 6).steps == 2


def test_repeat_ranks_the_history_by_recency_then_popularity():
    # History [2, 0, 2, 1] (L = 4, λ = 1): latest positions song 1 at 4, song 2 at 3, song 0 at
    # 2: weights 1, e^-1, e^-2; songs 3 and 4 are not in it and go by popularity (3 before 4).
    repeat = baselines.Repeat(TRAIN, [], NUM_SONGS, decay=1.0)
    history = [np.array([2, 0, 2, 1])]
    assert np.argsort(-repeat.scores(history)[0], kind="stable").tolist() == [1, 2, 0, 3, 4]
    weights = np.array([math.exp(-2), 1.0, math.exp(-1), 0.0, 0.0])
    np.testing.assert_allclose(repeat.probabilities(history)[0], weights / weights.sum())
    assert repeat.log_likelihood(history, np.array([3])) is None


@pytest.mark.parametrize(
    "valid, decay",
    [
        # After [0, 1] the target 0 is the older song: p(0) = e^(-1/λ) / (1 + e^(-1/λ)) grows
        # with λ, so the largest λ (uniform over the history) fits best.
        ([[0, 1, 0]], baselines.REPEAT_DECAYS[-1]),
        # After [0, 1] the target 1 is the latest song: p(1) = 1 / (1 + e^(-1/λ)) falls with λ.
        ([[0, 1, 1]], baselines.REPEAT_DECAYS[0]),
    ],
)
def test_repeat_decay_is_chosen_by_the_validation_likelihood_of_repeats(valid, decay):
    assert baselines.Repeat(TRAIN, tokens(valid), NUM_SONGS).decay == decay


# The TRAIN songs plus song 5, never in training. Artists: "Ann" and "ann " (one artist after
# normalising) sing 0 and 1, Bo sings 2, 3 and 5, song 4's artist is unknown (an artist alone).
ARTIST_CATALOG = yes_reader.Catalog(tuple("t" * 6), ("Ann", "ann ", "Bo", "Bo", "", "Bo"))


def test_artist_ids_normalise_names_and_keep_unknown_artists_apart():
    ids = baselines.artist_ids(("Ann", "ann ", "Bo", "", "", "ANN"))
    assert ids[0] == ids[1] == ids[5] and len({ids[0], ids[2], ids[3], ids[4]}) == 4


def test_artist_spreads_the_sessions_artists_over_their_songs_by_hand():
    # Within an artist, training count + 1: Ann 3, 3 -> 1/2 each; Bo 4, 4, 1 (song 5 unseen) ->
    # 4/9, 4/9, 1/9; song 4 alone -> 1. History [0, 2], λ = 1: Ann's play at p = 1 of L = 2
    # weighs e^-1, Bo's at p = 2 weighs 1, so P(Ann) = e^-1 / (1 + e^-1), P(Bo) = 1 / (1 + e^-1).
    artist = baselines.Artist(TRAIN, [], ARTIST_CATALOG, decay=1.0)
    ann, bo = math.exp(-1) / (1 + math.exp(-1)), 1 / (1 + math.exp(-1))
    expected = [ann / 2, ann / 2, bo * 4 / 9, bo * 4 / 9, 0.0, bo / 9]
    np.testing.assert_allclose(artist.probabilities([np.array([0, 2])])[0], expected)
    # Ranked: 2 and 3 tie, then 0 and 1 tie, then the unseen song 5 through its artist, then
    # song 4 (no share) by popularity. Ties count against the target.
    assert ranks(artist, [[0, 2]] * 4, [3, 1, 5, 4]) == [2, 4, 5, 6]
    np.testing.assert_allclose(artist.probabilities([np.array([4])])[0], [0, 0, 0, 0, 1, 0])
    assert artist.log_likelihood([np.array([0])], np.array([4])) is None


@pytest.mark.parametrize(
    "valid, decay",
    [
        # Event [0, 2] -> 3 (Bo is the latest artist): P(Bo) = 1 / (1 + e^(-1/λ)) falls with λ.
        # Event [0] -> 2 does not count: Bo is not in its history.
        ([[0, 2, 3]], baselines.REPEAT_DECAYS[0]),
        # Event [2, 0] -> 3 (Bo is the older artist): P(Bo) = e^(-1/λ) / (1 + e^(-1/λ)) grows.
        ([[2, 0, 3]], baselines.REPEAT_DECAYS[-1]),
    ],
)
def test_artist_decay_is_chosen_by_the_validation_likelihood(valid, decay):
    assert baselines.Artist(TRAIN, tokens(valid), ARTIST_CATALOG).decay == decay


def stan(**settings) -> neighbours.VSTAN:
    """V-STAN on TRAIN with every decay off unless given."""
    off = dict(position=math.inf, neighbour_position=math.inf, history_last=False)
    return neighbours.VSTAN(TRAIN, [], NUM_SONGS, neighbours.StanSettings(**(off | settings)))


S6 = math.sqrt(6)


def test_vstan_without_decays_sums_binary_cosines():
    # History [0, 1], both weigh 1 (norm sqrt 2): cos(P0 {0,1}) = 1, cos(P1 {1,2}) = 1/2,
    # cos(P3 {0,3,4}) = 1/sqrt(6); P2 shares no song.
    expected = [1 + 1 / S6, 1.5, 0.5, 1 / S6, 1 / S6]
    np.testing.assert_allclose(stan().neighbour_scores([np.array([0, 1])])[0], expected)
    # idf = log(4 / playlists holding the song): log 2 for songs 0-3, log 4 for song 4.
    idf = stan(idf=1.0).neighbour_scores([np.array([0, 1])])[0]
    np.testing.assert_allclose(idf, np.array(expected) * (1 + np.log([2, 2, 2, 2, 4])))
    # Position decay 1: song 0 weighs 1/e, song 1 weighs 1, norm n = sqrt(1 + 1/e^2).
    n, e = math.sqrt(1 + math.exp(-2)), math.e
    sims = [(1 + 1 / e) / (n * math.sqrt(2)), 1 / (n * math.sqrt(2)), 1 / (e * n * math.sqrt(3))]
    expected = [sims[0] + sims[2], sims[0] + sims[1], sims[1], sims[2], sims[2]]
    np.testing.assert_allclose(stan(position=1.0).neighbour_scores([np.array([0, 1])])[0], expected)


def test_vstan_match_and_neighbour_position_decays():
    # History [0, 1] (L = 2), similarities as without decays: P0 1, P1 1/2, P3 1/sqrt(6).
    # Match weight exp(p* - L): P0 and P1 hold song 1 (p* = 2): 1; P3 only song 0 (p* = 1): 1/e.
    # q* (latest position in the neighbour of a history song): P0 [0,1]: 2; P1 [1,2]: 1;
    # P3 [0,3,4,3]: 1 (song 0). A song at q weighs exp(-|q - q*|): P0: song 0 1/e, song 1 1;
    # P1: song 1 1, song 2 1/e; P3: song 0 1, song 4 (q = 3) e^-2, song 3 (latest q = 4) e^-3.
    e = math.e
    got = stan(match_position=1.0, neighbour_position=1.0).neighbour_scores([np.array([0, 1])])
    expected = [1 / e + 1 / (e * S6), 1 + 0.5, 0.5 / e, e**-4 / S6, e**-3 / S6]
    np.testing.assert_allclose(got[0], expected)


def test_vstan_recency_weights_later_playlists_and_picks_neighbours():
    # Recency 1: playlist i of 4 weighs exp(-(4 - i) / 4): P0 1/e, P1 e^-0.75, P3 e^-0.25.
    got = stan(recency=1.0).neighbour_scores([np.array([0, 1])])[0]
    p0, p1, p3 = math.exp(-1), 0.5 * math.exp(-0.75), math.exp(-0.25) / S6
    np.testing.assert_allclose(got, [p0 + p3, p0 + p1, p1, p3, p3])
    # One neighbour: without recency P0 (similarity 1); with recency 0.25, P0 1 x e^-4, P1
    # 1/2 x e^-3, P3 1/sqrt(6) x e^-1: P3 wins, so only its songs 0, 3, 4 score.
    settings = neighbours.StanSettings(position=math.inf, neighbour_position=math.inf)
    one = neighbours.VSTAN(TRAIN, [], NUM_SONGS, settings, neighbours=1)
    np.testing.assert_allclose(one.neighbour_scores([np.array([0, 1])])[0], [1, 1, 0, 0, 0])
    recent = neighbours.VSTAN(
        TRAIN, [], NUM_SONGS, dataclasses.replace(settings, recency=0.25), neighbours=1
    )
    r = math.exp(-1) / S6
    np.testing.assert_allclose(recent.neighbour_scores([np.array([0, 1])])[0], [r, 0, 0, r, r])


def test_vstan_ranks_ties_by_popularity_and_history_last():
    # Without decays (scores above): 1 > 0 > 2 > 3 = 4, ties by popularity (3 before 4).
    assert ranks(stan(), [[0, 1]] * 5, [0, 1, 2, 3, 4]) == [2, 1, 3, 4, 5]
    # History last: 2, 3, 4, then 1, 0.
    assert ranks(stan(history_last=True), [[0, 1]] * 5, [0, 1, 2, 3, 4]) == [5, 4, 1, 2, 3]
    # History [4]: only P3 (songs 0, 3, 4, tied) scores; popularity orders 3, 0, 4, then 2, 1.
    assert ranks(stan(), [[4]] * 5, [0, 1, 2, 3, 4]) == [2, 5, 4, 1, 3]
    # Probabilities: scores over their sum; popularity where no neighbour holds a song.
    total = 3 + 3 / S6
    probs = stan().probabilities([np.array([0, 1])])[0]
    np.testing.assert_allclose(probs, np.array([1 + 1 / S6, 1.5, 0.5, 1 / S6, 1 / S6]) / total)
    unknown = neighbours.VSTAN(TRAIN, [], NUM_SONGS + 1, stan().settings)
    np.testing.assert_allclose(
        unknown.probabilities([np.array([5])])[0], np.array([3, 3, 4, 4, 2, 1]) / 17
    )


def test_vstan_settings_are_chosen_on_validation():
    # Five songs; training [0,1] twice and [1]; validation [1, 0, 1]. History last: [1] -> 0
    # rank 1, and [1, 0] -> 1 rank 4 (below the unscored 2, 3, 4): recall 1 x MRR 5/8. Without
    # it song 1 outscores song 0 (it is in every neighbour): ranks 2 and 1, recall 1 x MRR 3/4.
    train = tokens([[0, 1], [0, 1], [1]])
    chosen = neighbours.VSTAN(train, tokens([[1, 0, 1]]), 5).settings
    assert chosen.history_last is False
    with pytest.raises(errors.DataError, match="vstan"):
        neighbours.VSTAN(train, tokens([[1]]), 3)
