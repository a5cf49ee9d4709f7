"""`--transition=markov`: the transition tables, the gated mixture worked by hand, and a trained
model whose evaluation and serving match the Markov baseline mixed in by its own gate."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit, log_softmax

import baselines
import config as config_lib
import kernels
import musicmodel
import next_song_task
import repeats
import serving
import transitions
import yes_reader
from conftest import train_small

# Tokens (song id + 1) of four playlists over 5 songs. Transitions (song ids): 0->1 three times,
# 1->2 three times, 2->3, 2->4, 3->4, 4->0. Song occurrences 3, 4, 3, 2, 2 of 14.
PLAYLISTS = [np.array(p) for p in ([1, 2, 3, 4], [2, 3, 5], [1, 2, 3], [4, 5, 1, 2])]


def test_successor_table_keeps_the_most_frequent_successors_by_token():
    table = baselines.successor_table(PLAYLISTS, 5, 3)
    assert table["successors"][:, 0].tolist() == [0, 1, 2, 3, 4, 0]
    assert table["successors"][3].tolist() == [3, 4, 0]  # token 3 = song 2: a tie, id order
    assert table["counts"].tolist() == [
        [0, 0, 0], [3, 0, 0], [3, 0, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0]
    ]  # fmt: skip
    np.testing.assert_allclose(table["popularity"], np.array([4, 5, 4, 3, 3]) / 19)
    cut = baselines.successor_table(PLAYLISTS, 5, 1)
    assert cut["successors"][3].tolist() == [3] and cut["counts"][3].tolist() == [1]


# Artists for markov_artist: songs 0 and 1 by one, 2 and 3 by another, 4 alone. Shares of the
# add-one popularity within the artist: 4/9, 5/9, 4/7, 3/7, 1.
ARTISTS = ("Ann", "Ann", "Bo", "Bo", "Cy")


def mixture(width: int, dims: int = 2, artists: bool = False) -> transitions.TransitionMixture:
    """A mixture over `PLAYLISTS` with β = 2 and a new gate: zero weights, g = 1/2 (with
    `artists`, the markov_artist tables of `ARTISTS` and ρ = 1/2)."""
    catalog = yes_reader.Catalog(("t",) * 5, ARTISTS)
    data = yes_reader.YesData(catalog, PLAYLISTS, [], [])
    cfg = config_lib.make_config(
        {"transition": "markov_artist" if artists else "markov", "transition_width": width}
    )
    tables = next_song_task.transition_tables(cfg, data)
    layer = transitions.TransitionMixture(5, width, dims, tables, artists=artists)
    layer.log_beta.assign(np.log(2.0))
    return layer


def target_log_prob(layer, log_p_model, queries, tokens, targets, leave_one_out: bool):
    """The mixture's log p [events] at each event's target (`log_p_model` [events] there)."""
    targets = np.asarray(targets)
    p = layer.log_prob(
        np.asarray(log_p_model)[:, None], queries, tokens, targets[:, None],
        targets if leave_one_out else None,
    )  # fmt: skip
    return np.asarray(p)[:, 0]


def test_target_probability_worked_by_hand_with_and_without_leave_one_out():
    layer = mixture(width=3)
    queries, tokens, targets = np.zeros((1, 2), np.float32), np.array([2]), np.array([2])
    log_p_model = np.log(np.array([0.1], np.float32))
    # Song 1 -> song 2: n_aj = n_a = 3; p_pop(2) = 4/19; q = (3 + 2 * 4/19) / (3 + 2) = 13/19.
    p = np.exp(target_log_prob(layer, log_p_model, queries, tokens, targets, False))
    np.testing.assert_allclose(p, [0.5 * 0.1 + 0.5 * 13 / 19], rtol=1e-6)
    # Left out: n_aj = n_a = 2; q = (2 + 8/19) / (2 + 2) = 23/38.
    p = np.exp(target_log_prob(layer, log_p_model, queries, tokens, targets, True))
    np.testing.assert_allclose(p, [0.5 * 0.1 + 0.5 * 23 / 38], rtol=1e-6)
    # Width 1 cuts song 2 -> song 4 (a tie, later id): nothing of it to leave out, n_a = 1;
    # q = (0 + 2 * 3/19) / (1 + 2) = 2/19.
    p = np.exp(target_log_prob(mixture(width=1), log_p_model, queries, [3], [4], True))
    np.testing.assert_allclose(p, [0.5 * 0.1 + 0.5 * 2 / 19], rtol=1e-6)


def test_several_songs_of_an_event_leave_its_own_transition_out_by_hand():
    layer = mixture(width=3)
    queries, log_p_model = np.zeros((1, 2), np.float32), np.log([[0.1, 0.2, 0.3]])
    # After song 1 (token 2; 1 -> 2 three times), target song 2 left out: n_a = 2, n_12 = 2.
    # q(2) = (2 + 2 * 4/19) / 4, q(0) = 2 * 4/19 / 4, q(3) = 2 * 3/19 / 4.
    p = np.exp(layer.log_prob(log_p_model.astype(np.float32), queries, [2], [[2, 0, 3]], [2]))
    q = np.array([2 + 8 / 19, 8 / 19, 6 / 19]) / 4
    np.testing.assert_allclose(p, 0.5 * np.array([[0.1, 0.2, 0.3]]) + 0.5 * q, rtol=1e-6)
    # Every song's left-out probability, with p_model a distribution: they sum to 1.
    log_p_model = log_softmax(np.arange(5, dtype=np.float32))[None]
    p = np.exp(layer.log_prob(log_p_model, queries, [2], [np.arange(5)], [2]))
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)


def test_repeat_bias_on_the_left_out_mixture_by_hand():
    # The training loss of --transition with --repeat_window: -log of the target under the
    # left-out mixture (one event: song 1 -> song 2), biased at the history's songs and
    # renormalised, from the mixture at the target and at the plays alone.
    layer = mixture(width=3)
    counts = layer.counts.numpy()
    counts[2, 0] -= 1  # token 2's successor 0 is song 2
    layer.counts.assign(counts)
    queries = np.zeros((1, 2), np.float32)
    log_p_model = log_softmax(np.array([[0.3, -1.0, 0.5, 2.0, 0.1]]), -1).astype(np.float32)
    full = np.asarray(layer.log_mixture(log_p_model, queries, [2]))  # counts already left out
    plays, bias = np.array([[4, 1, 2]]), np.array([[0.7, -2.0, 0.0]], np.float32)  # song ids
    biased = full.copy()
    biased[0, plays[0]] += bias[0]
    expected = -log_softmax(biased, -1)[0, 2]
    layer = mixture(width=3)  # the table with the event's own transition, left out in training
    at_target = target_log_prob(layer, log_p_model[:, 2], queries, [2], [2], True)
    at_plays = layer.log_prob(np.take(log_p_model, plays), queries, [2], plays, [2])
    hit = (plays == 2).astype(np.float32)
    got = repeats.biased_cross_entropy(-at_target, at_plays, bias, hit)
    np.testing.assert_allclose(got, [expected], rtol=1e-5)


def test_artist_prior_worked_by_hand():
    layer = mixture(width=3, artists=True)
    queries, log_p_model = np.zeros((2, 2), np.float32), np.log(np.full(2, 0.1, np.float32))
    # After song 1 (token 2; n_a = 3, all to song 2), ρ = 1/2:
    # song 0, Ann like song 1, no transition: prior = 4/19 / 2 + 4/9 / 2, q = 2 prior / 5;
    # song 2, Bo: prior = 4/19 / 2, q = (3 + 2 prior) / 5 (markov alone: 13/19).
    p = np.exp(target_log_prob(layer, log_p_model, queries, [2, 2], [0, 2], False))
    prior_0 = (4 / 19 + 4 / 9) / 2
    q = [2 * prior_0 / 5, (3 + 2 * (4 / 19) / 2) / 5]
    np.testing.assert_allclose(p, 0.5 * 0.1 + 0.5 * np.array(q), rtol=1e-6)
    # ρ is learned: at ρ -> 0 the prior is popularity again, markov's q.
    layer.artist_logit.assign(-50.0)
    p = np.exp(target_log_prob(layer, log_p_model[:1], queries[:1], [2], [2], False))
    np.testing.assert_allclose(p, [0.5 * 0.1 + 0.5 * 13 / 19], rtol=1e-6)


@pytest.mark.parametrize("artists", [False, True])
def test_full_rows_are_distributions_that_agree_with_the_target_path(artists):
    layer = mixture(width=3, artists=artists)
    layer.gate.kernel.assign(np.array([[0.5], [-1.0], [0.3]], np.float32))
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    queries = rng.normal(size=(2, 3, 2)).astype(np.float32)
    tokens = np.array([[1, 2, 3], [0, 4, 5]])  # 0: padding, scored by popularity alone
    log_p = np.asarray(layer.log_mixture(logits, queries, tokens))
    np.testing.assert_allclose(np.exp(log_p).sum(-1), 1.0, rtol=1e-5)
    for target in range(5):
        targets = np.full(6, target)
        at_target = np.take_along_axis(log_softmax(logits, -1).reshape(6, 5), targets[:, None], 1)
        expected = target_log_prob(
            layer, at_target[:, 0], queries.reshape(6, 2), tokens.reshape(6), targets, False
        )
        np.testing.assert_allclose(log_p.reshape(6, 5)[:, target], expected, rtol=1e-5)


def test_sampled_training_loss_mixes_the_sampled_softmax_estimate_by_hand():
    # Two windows of 4 steps, batch 2; a new gate gives g = 1/2 and β starts at 10. Each event's
    # loss is -log(p_s / 2 + q / 2): p_s the sampled softmax's estimate at the target (column 0
    # of the corrected logits, the step's negatives drawn with seed [0, 0]), q the Markov
    # probability with the event left out of its own counts.
    import keras

    keras.utils.set_random_seed(0)
    windows = yes_reader.make_windows(PLAYLISTS, 2, num_steps=4)
    counts = np.bincount(windows.targets[windows.weights > 0], minlength=5)
    tables = baselines.successor_table(PLAYLISTS, 5, 3)
    settings = dict(embedding_size=4, hidden_size=3, batch_size=2, dropout=0.0)
    settings.update(softmax="sampled", num_sampled=3, transition="markov", transition_width=3)
    model = musicmodel.build_model(config_lib.Config(**settings), 5, counts, None, tables)
    tokens, reset = windows.inputs[0], windows.reset[0]
    targets, weights = windows.targets[0], windows.weights[0]
    queries = model((tokens, reset), training=True, queries=True)
    kernel, bias = model.output_layer()
    sampled = model.sampler.draw(3, np.array([0, 0], np.int32))
    logits = kernels.sampled_softmax_logits(
        queries, targets, kernel, bias, sampled, model.sampler.log_q
    )
    p_s = np.exp(log_softmax(np.asarray(logits, np.float64), -1)[..., 0])
    successors, table_counts = tables["successors"], tables["counts"]
    popularity = tables["popularity"]
    expected = []
    for b, t in zip(*np.nonzero(weights), strict=True):
        a, j = tokens[b, t], targets[b, t]
        n_aj = table_counts[a][successors[a] == j].sum() - 1  # every transition is in the table
        q = (n_aj + 10 * popularity[j]) / (table_counts[a].sum() - 1 + 10)
        expected.append(-np.log(p_s[b, t] / 2 + q / 2))
    history = model.fit(yes_reader.to_dataset(windows).take(1), verbose=0).history
    np.testing.assert_allclose(history["loss"][0], np.mean(expected), rtol=1e-5)


@pytest.fixture(scope="module")
def trained(small_slice, tmp_path_factory) -> config_lib.Config:
    return train_small(
        small_slice, tmp_path_factory.mktemp("run"), num_epochs=2, transition="markov",
        transition_width=300,  # above every song's successors: the counts are whole
    )  # fmt: skip


def reference_mixture(model, data: yes_reader.YesData, playlists: list) -> np.ndarray:
    """float64 [events, songs]: the Markov baseline (β = the model's) mixed with the model's
    own softmax by the gate's weights, worked out in numpy from the loaded weights."""
    beta = float(np.exp(model.mixture.log_beta))
    markov = baselines.Markov(data.train, [], data.catalog.size, beta)
    rows = []
    for playlist in playlists:
        tokens = np.asarray(playlist, np.int32)[None, :-1]
        queries, _ = model.features(tokens, model.zero_state(1))
        queries = np.asarray(queries, np.float64)[0]
        p_model = np.exp(log_softmax(queries @ model.head.kernel.numpy() + model.head.bias, -1))
        histories = [playlist[: t + 1] for t in range(len(playlist) - 1)]
        last = np.array([h[-1] for h in histories]) - 1
        log_n = np.log1p(markov.n_a[last])[:, None]
        kernel, bias = model.mixture.gate.kernel.numpy(), model.mixture.gate.bias.numpy()
        g = expit(np.concatenate([queries, log_n], 1) @ kernel + bias)
        shifted = [h - 1 for h in histories]  # Markov reads song ids
        rows.append(g * p_model + (1 - g) * markov.probabilities(shifted))
    return np.concatenate(rows)


def test_trained_model_scores_like_the_markov_baseline_behind_its_gate(trained):
    model = next_song_task.load_trained(trained, 3168)
    data = yes_reader.load(trained.data_dir, trained.valid_fraction, trained.seed)
    test = [p for p in data.test if len(p) >= 2][:30]
    expected = reference_mixture(model, data, test)
    targets = np.concatenate([p[1:] - 1 for p in test])
    musicmodel.compile_model(model, trained.learning_rate, trained.max_grad_norm)
    windows = yes_reader.make_windows(test, model.batch_size, trained.num_steps)
    report = next_song_task.evaluate_windows(model, windows)
    target_p = expected[np.arange(len(targets)), targets]
    ranks = (expected >= target_p[:, None]).sum(1)
    assert report["recall@20"] == pytest.approx(np.mean(ranks <= 20), abs=1e-6)
    assert report["log_likelihood"] == pytest.approx(np.mean(np.log(target_p)), rel=1e-4)
    # Serving ranks the same mixture after the whole history.
    history = test[0] - 1
    recommend = serving.ranking_function(model, exclude_history=False)
    got = recommend(history[None].astype(np.int32), np.array([len(history)], np.int32), 5)
    last = reference_mixture(model, data, [np.r_[test[0], 1]])[-1]
    np.testing.assert_array_equal(got["song_ids"][0], np.argsort(-last, kind="stable")[:5])
    np.testing.assert_allclose(got["scores"][0], np.sort(last)[::-1][:5], rtol=1e-4)


def test_markov_artist_model_saves_its_tables_and_scores_alike_in_eval_and_serving(
    small_slice, tmp_path_factory
):
    cfg = train_small(
        small_slice, tmp_path_factory.mktemp("artist_run"), num_epochs=1,
        transition="markov_artist", side_features="artist", tie_embeddings=True,
    )  # fmt: skip
    model = next_song_task.load_trained(cfg, 3168)
    data = yes_reader.load(cfg.data_dir, cfg.valid_fraction, cfg.seed)
    artists = baselines.artist_ids(data.catalog.artists)
    np.testing.assert_array_equal(model.mixture.artists.numpy(), np.r_[-1, artists])
    assert abs(float(model.mixture.artist_logit.numpy())) > 1e-4  # ρ was trained
    test = [p for p in data.test if len(p) >= 2][:30]
    width = max(map(len, test))
    tokens = np.array([np.pad(p, (0, width - len(p))) for p in test], np.int32)
    log_p, _ = model.forward(tokens, model.zero_state(len(test)))  # the mixture, whole playlists
    log_p = np.concatenate([np.asarray(log_p)[i, : len(p) - 1] for i, p in enumerate(test)])
    np.testing.assert_allclose(np.exp(log_p).sum(-1), 1.0, rtol=1e-4)
    targets = np.concatenate([p[1:] - 1 for p in test])
    target_log_p = log_p[np.arange(len(targets)), targets]
    musicmodel.compile_model(model, cfg.learning_rate, cfg.max_grad_norm)
    windows = yes_reader.make_windows(test, model.batch_size, cfg.num_steps)
    report = next_song_task.evaluate_windows(model, windows)
    assert report["log_likelihood"] == pytest.approx(np.mean(target_log_p), rel=1e-4)
    history = test[0][:-1] - 1  # serving after the first playlist but its last song
    recommend = serving.ranking_function(model, exclude_history=False)
    got = recommend(history[None].astype(np.int32), np.array([len(history)], np.int32), 5)
    last = log_p[len(test[0]) - 2]
    np.testing.assert_array_equal(got["song_ids"][0], np.argsort(-last, kind="stable")[:5])
