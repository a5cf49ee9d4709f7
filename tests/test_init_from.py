"""--init_from: a run continued on a grown catalog keeps the rows of the songs it knew.

The old model is trained on a yes_small slice; the new catalog holds the same songs under other
ids plus new ones. Row mapping is also checked on a hand-made catalog.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import numpy as np
import pytest

import config as config_lib
import importer
import musicmodel
import names
import next_song_task
import tasks
import warmstart
import yes_reader
from conftest import train_small, write_playlist_file
from errors import ConfigError


def test_rows_follow_the_song_keys_on_a_hand_made_catalog():
    cfg = config_lib.make_config(dict(embedding_size=4, hidden_size=3, batch_size=2))
    old = musicmodel.build_model(cfg, 3)
    old.head.bias.assign([-3.0, 0.5, 1.0])
    new = musicmodel.build_model(cfg, 4)
    before = [v.numpy().copy() for v in new.trainable_weights]
    old_keys = ["a - x", "b - x", "c - y"]
    new_keys = ["d - z", "c - y", "e - z", "b - x"]  # "b - x": id 1 before, id 3 now
    kept = warmstart.init_from(new, old, old_keys, new_keys, "--init_from=old")
    assert kept == 2
    emb, old_emb = new.embedding.embeddings.numpy(), old.embedding.embeddings.numpy()
    # Row s + 1 embeds song s; row 0 (padding) is copied too.
    np.testing.assert_array_equal(emb[[0, 4, 2]], old_emb[[0, 2, 3]])
    np.testing.assert_array_equal(emb[[1, 3]], before[0][[1, 3]])  # new songs: fresh rows
    kernel, bias = new.head.kernel.numpy(), new.head.bias.numpy()
    np.testing.assert_array_equal(kernel[:, [3, 1]], old.head.kernel.numpy()[:, [1, 2]])
    np.testing.assert_array_equal(bias[[3, 1]], old.head.bias.numpy()[[1, 2]])
    np.testing.assert_array_equal(bias, [-3.0, 1.0, -3.0, 0.5])  # new songs: the lowest bias
    np.testing.assert_array_equal(kernel[:, [0, 2]], 0.0)  # new songs: zero output columns
    for mine, theirs in zip(new.rnns, old.rnns, strict=True):  # recurrent layers: copied
        for a, b in zip(mine.weights, theirs.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_other_settings_or_shapes_are_refused():
    small = config_lib.make_config(dict(embedding_size=4, hidden_size=3, batch_size=2))
    old = musicmodel.build_model(small, 3)
    new = musicmodel.build_model(dataclasses.replace(small, hidden_size=5), 3)
    with pytest.raises(ConfigError, match=r"--init_from=o: that model has hidden_size=3"):
        warmstart.init_from(new, old, ["a"] * 3, ["a"] * 3, "--init_from=o")
    # Side features add weights: refused by name, not a traceback from the weight lists.
    tied = dataclasses.replace(small, tie_embeddings=True)
    plain = musicmodel.build_model(tied, 3)
    side = dict(num_artists=2, num_tags=0, song_artists=np.array([0, 1, 1]))
    artist = dataclasses.replace(tied, side_features="artist")
    with_side = musicmodel.build_model(artist, 3, np.ones(3), side)
    for new, old in ((with_side, plain), (plain, with_side)):
        with pytest.raises(ConfigError, match=r"--init_from=o: that model has side_features="):
            warmstart.init_from(new, old, ["a"] * 3, ["a"] * 3, "--init_from=o")
    # So does the transition component (its gate and β).
    mixed = musicmodel.build_model(dataclasses.replace(tied, transition="markov"), 3)
    for new, old in ((mixed, plain), (plain, mixed)):
        with pytest.raises(ConfigError, match=r"--init_from=o: that model has transition="):
            warmstart.init_from(new, old, ["a"] * 3, ["a"] * 3, "--init_from=o")


@pytest.fixture(scope="module")
def grown(small_slice, tmp_path_factory):
    """(old run's Config, new data dir, new id of each old song): the old model trained 2 epochs
    on the yes_small slice; the new catalog holds its songs in another order plus 60 new ones,
    and 200 more training playlists that use them."""
    base = tmp_path_factory.mktemp("init_from")
    old_cfg = train_small(small_slice, base / "old_run", num_epochs=2)
    catalog = yes_reader.read_catalog(os.path.join(small_slice, "song_hash.txt"))
    rng = np.random.default_rng(1)
    entries = [(t, a) for t, a in zip(catalog.titles, catalog.artists, strict=True)]
    entries += [(f"New song {i}", "New artist") for i in range(60)]
    order = rng.permutation(len(entries))  # new id j holds entry order[j]
    new_id = np.argsort(order)
    new_dir = base / "new"
    new_dir.mkdir()
    lines = "".join(f"{j}\t{entries[e][0]}\t{entries[e][1]}\n" for j, e in enumerate(order))
    (new_dir / "song_hash.txt").write_text(lines)
    moved = {}
    for split in ("train", "test"):
        playlists = yes_reader.read_playlists(
            os.path.join(small_slice, f"{split}.txt"), catalog.size
        )
        moved[split] = [new_id[p - 1].tolist() for p in playlists]
    extra = [rng.choice(len(entries), 8).tolist() for _ in range(200)]
    write_playlist_file(new_dir / "train.txt", moved["train"] + extra, len(entries))
    write_playlist_file(new_dir / "test.txt", moved["test"], len(entries))
    return old_cfg, new_dir, new_id[: catalog.size]


def keys_of(data_dir) -> list[str]:
    catalog = yes_reader.read_catalog(os.path.join(data_dir, "song_hash.txt"))
    return importer.catalog_keys(str(data_dir), catalog.titles, catalog.artists)


def test_continued_model_starts_at_the_old_validation_loss(grown):
    old_cfg, new_dir, new_id = grown
    old_keys, new_keys = keys_of(old_cfg.data_dir), keys_of(new_dir)
    valid = yes_reader.load(old_cfg.data_dir, old_cfg.valid_fraction, old_cfg.seed).valid
    moved = [(new_id[p - 1] + 1).astype(np.int32) for p in valid]  # the same songs, new ids

    def loss(model, playlists) -> float:
        windows = yes_reader.make_windows(playlists, model.batch_size, old_cfg.num_steps)
        return float(next_song_task.evaluate_windows(model, windows)["loss"])

    old = next_song_task.load_trained(old_cfg, len(old_keys))
    musicmodel.compile_model(old, old_cfg.learning_rate, old_cfg.max_grad_norm)
    new_cfg = dataclasses.replace(old_cfg, data_dir=str(new_dir))
    continued = musicmodel.build_model(new_cfg, len(new_keys))
    scratch_loss = loss(continued, moved)
    warmstart.init_from(continued, old, old_keys, new_keys, "--init_from")
    old_loss, continued_loss = loss(old, valid), loss(continued, moved)
    print(
        f"validation loss: old {old_loss:.4f}, continued {continued_loss:.4f}, "
        f"from scratch {scratch_loss:.4f} (log of the catalog {math.log(len(new_keys)):.4f})"
    )
    # The 60 new songs take a little probability (each scores as the rarest known song): the
    # continued loss is a little above the old one (7.3252 -> 7.4061 when written), far from
    # the from-scratch loss (8.0796).
    assert old_loss <= continued_loss < old_loss + 0.1
    assert scratch_loss > old_loss + 0.5
    # Shared songs score exactly as before, after the same histories (songs of a key that the
    # old catalog holds twice take the row of its first song, so they are left out here).
    unique = [s for s, key in enumerate(old_keys) if old_keys.count(key) == 1]
    for playlist, same in zip(valid[:20], moved, strict=False):
        before, _ = old.forward(playlist[None], old.zero_state(1))
        after, _ = continued.forward(same[None], continued.zero_state(1))
        np.testing.assert_allclose(
            np.asarray(after)[0][:, new_id[unique]], np.asarray(before)[0][:, unique], atol=1e-4
        )


def test_train_with_init_from_saves_the_keys_and_resume_wins(grown, tmp_path, caplog):
    old_cfg, new_dir, _ = grown
    cfg = dataclasses.replace(
        old_cfg,
        data_dir=str(new_dir),
        model_dir=str(tmp_path / "run"),
        init_from=old_cfg.model_dir,
        num_epochs=1,
    )
    caplog.set_level(logging.INFO, logger="absl")  # absl logs INFO only when told so
    tasks.TASKS["next_song"].train(cfg)
    new_keys = keys_of(new_dir)
    kept = len(new_keys) - 60  # the 60 new songs
    assert f"initialised from {old_cfg.model_dir}: {kept} of {len(new_keys)} songs" in caplog.text
    assert list(names.read_keys(str(tmp_path / "run"), len(new_keys))) == new_keys
    caplog.clear()
    tasks.TASKS["next_song"].train(cfg)  # its checkpoint is resumed, --init_from not used
    assert f"--init_from={old_cfg.model_dir} ignored: resuming" in caplog.text
    assert "initialised from" not in caplog.text


def test_a_run_without_song_keys_is_refused(tmp_path):
    cfg = config_lib.make_config(dict(init_from=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"--init_from=.*: no .*song_keys.txt; that run is older"):
        next_song_task.load_init_source(cfg)


def test_cooccurrence_rows_worked_by_hand():
    # Songs 0, 1 only ever play together, as do songs 2, 3; song 4 is alone. Within 2 positions
    # (both ways) n_01 = 3, n_00 = n_11 = 2, so every song of a pair has n = 5, PPMI(0, 1) =
    # log(3 * 4 / 5) and PPMI(0, 0) = log(2 * 4 / 5): two equal blocks whose top eigenvector is
    # (1, 1). At rank 2 the rows of a pair are equal, the two pairs orthogonal, song 4 is zero.
    playlists = [np.array(p) for p in ([1, 2, 1, 2], [3, 4, 3, 4], [5])]
    rows = warmstart.cooccurrence_rows(playlists, 5, 2, seed=0)
    assert rows.shape == (5, 2) and rows.dtype == np.float32
    np.testing.assert_allclose(rows[0], rows[1], atol=1e-6)
    np.testing.assert_allclose(rows[2], rows[3], atol=1e-6)
    assert abs(rows[0] @ rows[2]) < 1e-8 and np.all(rows[4] == 0)
    assert np.linalg.norm(rows[0]) > 0 and rows.std() == pytest.approx(warmstart.COOCCURRENCE_STD)


def test_song_init_sets_the_song_rows_and_keeps_the_padding_row():
    config = config_lib.Config(embedding_size=2, hidden_size=3, batch_size=2)
    model = musicmodel.build_model(config, 5)
    before = model.embedding.embeddings.numpy()
    playlists = [np.array(p) for p in ([1, 2, 1, 2], [3, 4, 3, 4], [5])]
    warmstart.init_songs(model, config, playlists)  # --song_init=random: nothing changes
    np.testing.assert_array_equal(model.embedding.embeddings.numpy(), before)
    config = dataclasses.replace(config, song_init="cooccurrence", seed=3)
    warmstart.init_songs(model, config, playlists)
    table = model.embedding.embeddings.numpy()
    np.testing.assert_array_equal(table[0], before[0])
    np.testing.assert_array_equal(table[1:], warmstart.cooccurrence_rows(playlists, 5, 2, seed=3))


@pytest.mark.parametrize("tied", [True, False])
def test_bias_init_starts_the_softmax_at_add_one_popularity(tied):
    # Counts 3, 0, 1, 7: biases log(4, 1, 2, 8) less their mean, log(64) / 4 = 1.0397.
    config = config_lib.Config(embedding_size=2, hidden_size=3, batch_size=2, tie_embeddings=tied)
    model = musicmodel.build_model(config, 4)
    bias = model.output_bias if tied else model.head.bias
    counts = np.array([3, 0, 1, 7])
    warmstart.init_bias(model, config, counts)  # --bias_init=zeros: nothing changes
    np.testing.assert_array_equal(bias.numpy(), np.zeros(4))
    warmstart.init_bias(model, dataclasses.replace(config, bias_init="popularity"), counts)
    mean = math.log(64) / 4
    expected = [math.log(4) - mean, -mean, math.log(2) - mean, math.log(8) - mean]
    np.testing.assert_allclose(bias.numpy(), expected, rtol=1e-6)
    # A query of zeros scores every song by its bias alone: the softmax is (count + 1) / 15.
    logits = np.asarray(model.scores(np.zeros((1, 2 if tied else 3), np.float32), [1]))
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(softmax, [[4 / 15, 1 / 15, 2 / 15, 8 / 15]], rtol=1e-5)
