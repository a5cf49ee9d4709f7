"""`--repeat_window`: the per-gap bias worked by hand, its training loss against the biased
softmax, and a trained model whose windowed training loss, evaluation and serving all match one
pass over whole playlists."""

from __future__ import annotations

import json
import zipfile

import keras
import numpy as np
import pytest
from scipy.special import log_softmax

import config as config_lib
import modeltrainer
import musicmodel
import next_song_task
import repeats
import serving
import yes_reader
from conftest import train_small
from errors import ConfigError, ModelError


def layer(window: int) -> repeats.RepeatBias:
    """A bias whose gap bucket i and play count c weigh i + 1 + 100 (c - 1), so both show."""
    bias = repeats.RepeatBias(window)
    buckets = np.arange(1, len(repeats.GAP_EDGES) + 1, dtype=np.float32)[:, None]
    weights = buckets + 100 * np.arange(repeats.PLAY_COUNTS, dtype=np.float32)
    bias.stored.assign(weights / repeats.BIAS_STEP)
    return bias


def bias_at(window: int, history: list, position: int) -> list:
    """The bias of each play of one history for one step at `position`."""
    got = layer(window).bias(np.array([history], np.int32), np.array([[position]], np.int32))
    return np.asarray(got)[0, 0].tolist()


def test_bias_worked_by_hand():
    # Tokens (song id + 1) of one history; 0 is no play. At position 4 (token 6) the gaps are
    # token 6: 1 (bucket 0, weight 1), token 2: 2 (bucket 1, weight 2), token 5: 3 (its latest
    # play and its second: bucket 2, weight 3 + 100; its play at position 0 gets nothing),
    # token 3: 4 (bucket 2, weight 3).
    history = [5, 3, 5, 2, 6, 0]
    assert bias_at(8, history, 4) == [0, 3, 103, 2, 1, 0]
    assert bias_at(8, history, 2) == [0, 2, 101, 0, 0, 0]
    assert bias_at(8, history, 1) == [2, 1, 0, 0, 0, 0]
    # A window of 3 plays sees gaps 1 to 3 only and counts the plays in it: token 5 once.
    assert bias_at(3, history, 4) == [0, 0, 3, 2, 1, 0]
    # One step later every gap grows by one: token 3 has gap 5 (bucket 3); padding gets none.
    assert bias_at(8, history, 5) == [0, 4, 103, 3, 2, 0]
    # Three plays or more share a weight; gaps of 96 and more share the last bucket.
    assert bias_at(8, [4, 1, 4, 4, 2, 4], 5)[5] == 201
    assert bias_at(200, [7, *[9] * 95, 8], 96)[0] == 12


def test_biased_cross_entropy_equals_the_softmax_of_the_biased_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7)).astype(np.float32)
    songs = np.array([[3, 0, 5, 3], [1, 2, 7, 4], [6, 6, 0, 0]], np.int32)  # tokens
    bias = np.array([[0, 0, -2.0, 1.5], [0.5, -1, 3, 0], [0, 2, 0, 0]], np.float32)
    targets = np.array([2, 6, 0])
    expected = -log_softmax(np.asarray(repeats.add_bias(logits, songs, bias), np.float64), -1)
    expected = expected[np.arange(3), targets]
    cross_entropy = -log_softmax(logits.astype(np.float64), -1)[np.arange(3), targets]
    hit = (songs - 1 == targets[:, None]).astype(np.float32)
    log_p = log_softmax(logits, -1)
    log_p_plays = np.take_along_axis(log_p, np.maximum(songs - 1, 0), 1)
    got = repeats.biased_cross_entropy(cross_entropy.astype(np.float32), log_p_plays, bias, hit)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_flag_checks():
    with pytest.raises(ConfigError, match="--repeat_window=3 needs --softmax=full"):
        repeats.check_repeat_window(3, "sampled")
    with pytest.raises(ConfigError, match="--repeat_window=-1"):
        repeats.check_repeat_window(-1, "full")


@pytest.fixture(scope="module")
def trained(small_slice, tmp_path_factory) -> config_lib.Config:
    return train_small(small_slice, tmp_path_factory.mktemp("run"), num_epochs=2, repeat_window=6)


def whole_playlists(model, playlists: list) -> np.ndarray:
    """float64 [events, songs]: log-probabilities from one pass over whole token playlists from
    a zero state, each play's history the playlist so far (no windows, no carried songs)."""
    width = max(map(len, playlists))
    tokens = np.array([np.pad(p, (0, width - len(p))) for p in playlists], np.int32)
    logits, _ = model.forward(tokens, model.zero_state(len(playlists)), history=tokens)
    rows = [np.asarray(logits)[i, : len(p) - 1] for i, p in enumerate(playlists)]
    return log_softmax(np.concatenate(rows).astype(np.float64), -1)


def test_trained_model_windows_match_whole_playlists(trained):
    model = next_song_task.load_trained(trained, 3168)
    assert np.abs(model.repeat.gap_bias.numpy()).max() > 0.01  # the weights moved in training
    model.repeat.stored.assign(np.linspace(-0.3, 0.3, 36).reshape(12, 3))  # w: -3 to 3, to bite
    data = yes_reader.load(trained.data_dir, trained.valid_fraction, trained.seed)
    test = [p for p in data.test if len(p) >= 2][:40]
    assert max(map(len, test)) > 2 * trained.num_steps  # windows carry songs across
    log_p = whole_playlists(model, test)
    targets = np.concatenate([p[1:] - 1 for p in test])
    target_log_p = log_p[np.arange(len(targets)), targets]
    ranks = (log_p >= target_log_p[:, None]).sum(1)
    musicmodel.compile_model(model, trained.learning_rate, trained.max_grad_norm)
    windows = yes_reader.make_windows(test, model.batch_size, trained.num_steps)
    report = next_song_task.evaluate_windows(model, windows)
    assert report["recall@20"] == pytest.approx(np.mean(ranks <= 20), abs=1e-6)
    assert report["log_likelihood"] == pytest.approx(np.mean(target_log_p), rel=1e-5)
    # Serving after the whole first playlist but its last song: its last event's row.
    history = test[0][:-1] - 1
    recommend = serving.ranking_function(model, exclude_history=False)
    got = recommend(history[None].astype(np.int32), np.array([len(history)], np.int32), 5)
    last = log_p[len(test[0]) - 2]
    np.testing.assert_array_equal(got["song_ids"][0], np.argsort(-last, kind="stable")[:5])
    # The training loss (dropout 0, no step taken) of the windows: the same events' mean.
    keras.utils.set_random_seed(0)
    settings = {k: getattr(trained, k) for k in ("embedding_size", "hidden_size", "batch_size")}
    fresh = musicmodel.build_model(
        config_lib.Config(**settings, learning_rate=1e-30, repeat_window=6), 3168
    )
    fresh.set_weights(model.get_weights())
    fresh.repeat.stored.assign(model.repeat.stored)
    expected = -np.mean(whole_playlists(fresh, test)[np.arange(len(targets)), targets])
    loss = fresh.fit(yes_reader.to_dataset(windows), verbose=0).history["loss"][0]
    assert loss == pytest.approx(expected, rel=1e-4)


def test_a_model_saved_before_the_bias_step_is_refused_with_a_clear_error(trained, tmp_path):
    assert modeltrainer.load_model(trained.model_dir).repeat_step == repeats.BIAS_STEP
    old = tmp_path / "model.keras"  # the same file as an earlier deepcf wrote it: no repeat_step
    with (
        zipfile.ZipFile(f"{trained.model_dir}/model.keras") as src,
        zipfile.ZipFile(old, "w") as dst,
    ):
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                del config["config"]["repeat_step"]
                data = json.dumps(config)
            dst.writestr(item, data)
    with pytest.raises(ModelError, match="model.keras: cannot load .*saved by an earlier deepcf"):
        modeltrainer.load_model(str(tmp_path))


def left_out_biased_log_p(model, playlists: list) -> np.ndarray:
    """float64 [events]: log p(target) of each event of whole `playlists` under the repeat bias
    on the transition mixture with the event's own transition left out, worked out one event at
    a time from the model's parts (the event's count taken out of a copy of the table)."""
    width = max(map(len, playlists))
    tokens = np.array([np.pad(p, (0, width - len(p))) for p in playlists], np.int32)
    queries, _ = model.features(tokens, model.zero_state(len(playlists)))
    logits = np.asarray(model.head(queries))
    songs, bias = model.repeat_inputs(tokens, width)
    mixture, saved = model.mixture, model.mixture.counts.numpy()
    out = []
    for i, playlist in enumerate(playlists):
        for t in range(len(playlist) - 1):
            last, target = playlist[t], playlist[t + 1] - 1
            counts = saved.copy()
            counts[last] -= (mixture.successors.numpy()[last] == target) * (counts[last] > 0)
            mixture.counts.assign(counts)
            log_p = mixture.log_mixture(logits[i, t][None], queries[i, t][None], [last])
            biased = repeats.add_bias(log_p, songs[i, t][None], bias[i, t][None])
            out.append(log_softmax(np.asarray(biased, np.float64), -1)[0, target])
    mixture.counts.assign(saved)
    return np.array(out)


def test_training_loss_biases_the_left_out_transition_mixture():
    # Tokens of playlists over 5 songs that come back to their songs: with few transitions and
    # a catalog this small, leaving an event out and the plays' bias both move the loss.
    train = [np.array(p) for p in ([1, 2, 3, 1, 2, 4], [2, 3, 1, 2, 3], [4, 5, 4, 5, 1, 3, 4])]
    catalog = yes_reader.Catalog(("t",) * 5, ("a",) * 5)
    data = yes_reader.YesData(catalog, train, [], [])
    cfg = config_lib.Config(
        embedding_size=8, hidden_size=8, batch_size=2, num_steps=3, learning_rate=1e-30,
        transition="markov", repeat_window=6,
    )  # fmt: skip
    keras.utils.set_random_seed(0)
    model = musicmodel.build_model(
        cfg, 5, transition_tables=next_song_task.transition_tables(cfg, data)
    )
    model.repeat.stored.assign(np.linspace(-0.3, 0.3, 36).reshape(12, 3))
    model.mixture.gate.bias.assign([-1.0])  # mostly the transitions
    expected = -np.mean(left_out_biased_log_p(model, train))
    windows = yes_reader.make_windows(train, cfg.batch_size, cfg.num_steps)
    loss = model.fit(yes_reader.to_dataset(windows), verbose=0).history["loss"][0]
    assert loss == pytest.approx(expected, rel=1e-5)
