"""The cold-start protocol and the side features: tiny hand-made catalogs, worked out by hand."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import coldstart
import config as config_lib
import errors
import modeltrainer
import musicmodel
import songrows
import yes_reader
from conftest import run_cli, train_small, write_yes_dir


def tokens(playlists: list[list[int]]) -> list[np.ndarray]:
    return [np.array(p, np.int32) + 1 for p in playlists]


def test_cold_songs_are_a_seeded_share_removed_from_training_and_validation_only():
    cold = coldstart.cold_songs(20, 0.1, seed=3)
    assert cold.sum() == 2 and np.array_equal(cold, coldstart.cold_songs(20, 0.1, seed=3))
    assert not np.array_equal(cold, coldstart.cold_songs(20, 0.1, seed=4))
    a, b = np.flatnonzero(cold)
    catalog = yes_reader.Catalog(tuple("t" * 20), tuple("a" * 20))
    test = tokens([[a, 0, b]])
    data = yes_reader.YesData(catalog, tokens([[a, 5, b, 6], [7, a]]), tokens([[b, 8, 9]]), test)
    kept, got = coldstart.remove_cold(data, 0.1, seed=3)
    assert np.array_equal(got, cold)
    assert [p.tolist() for p in kept.train] == [[6, 7], [8]]  # tokens = id + 1
    assert [p.tolist() for p in kept.valid] == [[9, 10]]
    assert kept.test is test  # test histories keep every song
    assert coldstart.remove_cold(data, 0.0, seed=3)[0] is data
    with pytest.raises(errors.DataError, match="--cold_fraction"):
        coldstart.remove_cold(data, 0.95, seed=3)


@pytest.mark.parametrize(
    "valid, tied, kind",
    [
        # 20 validation targets, songs 1..20 (ids); training holds songs 0..19: one new target,
        # song 20, is 5 %: artist rows.
        ([list(range(21))], True, "artist"),
        # Songs 0..19 only: no new target.
        ([list(range(20))], True, "none"),
        # The new target again, but untied rows cannot take side features.
        ([list(range(21))], False, "none"),
    ],
)
def test_auto_side_features_follow_the_share_of_new_validation_targets(valid, tied, kind):
    catalog = yes_reader.Catalog(tuple("t" * 30), tuple("a" * 30))
    data = yes_reader.YesData(catalog, tokens([list(range(20))]), tokens(valid), [])
    given = dict(side_features="auto", tie_embeddings=tied)
    config = coldstart.resolve_side_features(config_lib.make_config(given), data)
    assert config.side_features == kind
    fixed = config_lib.make_config(dict(side_features="artist_tags"))
    assert coldstart.resolve_side_features(fixed, data) is fixed


@pytest.mark.parametrize("minimum, batch", [(0, 100), (1, 100), (2, 50), (3, 20), (4, 20)])
def test_min_updates_per_epoch_takes_a_smaller_batch_for_a_small_split(minimum, batch):
    import next_song_task

    # 60 playlists of 3 songs, one 20-step window each: batch 100 makes 1 window an epoch,
    # 50 makes 2 (60 = 50 + 10), 20 makes 3; none makes 4, so the smallest, 20, is taken.
    catalog = yes_reader.Catalog(tuple("t" * 3), tuple("a" * 3))
    data = yes_reader.YesData(catalog, tokens([[0, 1, 2]] * 60), tokens([[0, 1]]), [])
    given = dict(batch_size=100, min_updates_per_epoch=minimum)
    config = next_song_task.decide_auto(config_lib.make_config(given), data)
    assert config.batch_size == batch


@pytest.mark.parametrize("side, kept", [("none", "markov"), ("artist", "markov_artist")])
def test_markov_artist_needs_artist_rows_else_it_is_markov(side, kept):
    import next_song_task

    catalog = yes_reader.Catalog(tuple("t" * 3), tuple("a" * 3))
    data = yes_reader.YesData(catalog, tokens([[0, 1, 2]]), tokens([[0, 1]]), [])
    given = dict(transition="markov_artist", side_features=side, tie_embeddings=True)
    assert next_song_task.decide_auto(config_lib.make_config(given), data).transition == kept


def test_cold_target_windows_weigh_only_events_with_a_cold_target():
    windows = yes_reader.make_windows(tokens([[0, 1, 2, 1]]), batch_size=1, num_steps=5)
    cold = np.array([False, True, False])
    only = coldstart.cold_target_windows(windows, cold)
    # Events 0 -> 1, 1 -> 2, 2 -> 1: the first and the last have the cold target 1.
    assert only.weights[0, 0].tolist() == [1, 0, 1, 0, 0]
    np.testing.assert_array_equal(only.inputs, windows.inputs)


def test_side_features_normalise_artists_and_average_tags(tmp_path):
    write_yes_dir(tmp_path, [[0, 1, 2]], [[0, 1]], num_songs=3)
    (tmp_path / "song_hash.txt").write_text("0\tA\tBeyoncé\n1\tB\t beyonce \n2\tC\tAdele\n")
    (tmp_path / "tags.txt").write_text("0 2\n#\n1\n")
    (tmp_path / "tag_hash.txt").write_text("0, pop\n1, soul\n2, rnb\n")
    catalog = yes_reader.read_catalog(str(tmp_path / "song_hash.txt"))
    side = coldstart.side_features(str(tmp_path), catalog, "artist_tags")
    # Normal forms: "adele" (0) and "beyonce" (1), which "Beyoncé" and " beyonce " share.
    assert side.artists.tolist() == [1, 1, 0] and side.num_artists == 2
    np.testing.assert_allclose(side.tags, [[0.5, 0, 0.5], [0, 0, 0], [0, 1, 0]])
    assert coldstart.side_features(str(tmp_path), catalog, "artist").tags is None
    assert coldstart.side_features(str(tmp_path), catalog, "none") is None
    os.remove(tmp_path / "tags.txt")
    with pytest.raises(errors.DataError, match="tags.txt: file not found"):
        coldstart.side_features(str(tmp_path), catalog, "artist_tags")


def test_side_rows_add_artist_and_mean_tag_rows_and_drop_own_rows_in_training():
    rows = songrows.SideRows(
        3, 2, 2, 2, artists=np.array([1, 1, 0]), tags=np.array([[0.5, 0.5], [0, 0], [0, 1]]),
        counts=np.array([4, 0, 1]),
    )  # fmt: skip
    rows.artist_vectors.assign([[1.0, 0.0], [0.0, 1.0]])
    rows.artist_bias.assign([0.5, -0.5])
    rows.tag_vectors.assign([[2.0, 2.0], [4.0, 0.0]])
    rows.tag_bias.assign([[1.0], [3.0]])
    own = np.array([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]], np.float32)
    own_bias = np.array([1.0, 2.0, 3.0], np.float32)
    vectors, bias = rows.combine(own, own_bias)
    # Song 0: own + artist 1 + (tag 0 + tag 1) / 2 = (10,10) + (0,1) + (3,1); bias 1 - 0.5 + 2.
    np.testing.assert_allclose(vectors, [[13, 12], [20, 21], [35, 30]])
    np.testing.assert_allclose(bias, [2.5, 1.5, 6.5])
    assert np.asarray(rows.unseen).tolist() == [0, 1, 0]  # song 1 is no training target
    # In training a song's own rows are either all there or all dropped (side rows stay).
    vectors, bias = (np.asarray(t) for t in rows.combine(own, own_bias, training=True))
    side, side_bias = (np.asarray(t) for t in rows.combine(0 * own, 0 * own_bias))
    for song in range(3):
        kept = np.allclose(vectors[song], side[song] + own[song])
        kept &= np.isclose(bias[song], side_bias[song] + own_bias[song])
        dropped = np.allclose(vectors[song], side[song]) and np.isclose(bias[song], side_bias[song])
        assert kept != dropped


def test_side_features_need_tied_embeddings_and_the_full_softmax(tmp_path):
    config = config_lib.Config(side_features="artist")
    with pytest.raises(errors.ConfigError, match="--side_features=artist"):
        musicmodel.build_model(config, 5, np.ones(5), dict(num_artists=2, num_tags=0))
    # On the command line: exit 2 before --model_dir is made (also for missing tags files).
    data = write_yes_dir(tmp_path / "d", [[0, 1, 2]], [[0, 1]], num_songs=3)
    cases = {
        "--side_features=artist: needs --tie_embeddings": ["--side_features=artist"],
        "tags.txt: file not found": ["--side_features=artist_tags", "--tie_embeddings"],
    }
    for message, flags in cases.items():
        model_dir = f"--model_dir={tmp_path / 'm'}"
        result = run_cli("--mode=train", f"--data_dir={data}", model_dir, *flags)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert not (tmp_path / "m").exists()


def test_a_song_never_trained_on_scores_through_its_artist(tmp_path):
    # Songs 0-5, artist = id % 3 (write_yes_dir). Song 4 is in no training playlist: its own rows
    # stay 0 and it is left out of the training softmax, so its output row is artist 1's.
    data = write_yes_dir(tmp_path / "d", [[0, 1, 2, 3, 5]] * 30, [[0, 1, 4]], num_songs=6)
    model_dir = tmp_path / "m"
    cfg = train_small(data, model_dir, 2, side_features="artist", tie_embeddings=True)
    model = modeltrainer.load_model(str(model_dir))
    assert model.side_features == "artist" and model.num_artists == 3
    own = np.asarray(model.embedding.embeddings)
    np.testing.assert_array_equal(own[1 + 4], 0.0)
    kernel, bias = (np.asarray(t) for t in model.output_layer())
    artist_1 = np.asarray(model.side.artist_vectors)[1]
    np.testing.assert_allclose(kernel[:, 4], artist_1, rtol=1e-6)
    assert bias[4] == pytest.approx(float(np.asarray(model.side.artist_bias)[1]))
    # Eval with the protocol prints the cold-target table and writes it to metrics.json.
    result = run_cli(
        "--mode=eval", f"--data_dir={data}", f"--model_dir={model_dir}", "--num_steps=5",
        "--cold_fraction=0.5", "--baselines=popularity,vstan",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "events with a cold target" in result.stdout
    m = json.load(open(model_dir / "metrics.json"))
    cold = coldstart.cold_songs(6, 0.5, cfg.seed)
    assert m["cold"]["events"] == int(cold[[1, 4]].sum())
    assert set(m["cold"]["baselines"]) == {"popularity", "vstan"}
