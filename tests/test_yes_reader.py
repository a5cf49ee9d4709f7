"""Reader tests on hand-made Yes.com files whose windows were worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import errors
import yes_reader
from conftest import write_playlist_file, write_yes_dir


def test_read_playlists_skips_headers_and_shifts_ids(tmp_path):
    path = tmp_path / "train.txt"
    write_playlist_file(path, [[0, 1, 2], [5], [4, 4]], num_songs=6)
    playlists = yes_reader.read_playlists(str(path), 6)
    assert [p.tolist() for p in playlists] == [[1, 2, 3], [6], [5, 5]]
    assert all(p.dtype == np.int32 for p in playlists)


def test_read_catalog_tolerates_stray_spaces_and_unescapes(tmp_path):
    path = tmp_path / "song_hash.txt"
    path.write_text("0 \tA\\/B\tX \n1\t C \tY\n")
    catalog = yes_reader.read_catalog(str(path))
    assert catalog.titles == ("A/B", "C") and catalog.artists == ("X", "Y")


@pytest.mark.parametrize(
    "line, message",
    [
        ("12 x3 7", "'x3' is not an integer"),
        ("1 6", "song id 6 is outside"),
        ("-1 2", "song id -1"),
    ],
)
def test_bad_playlist_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "train.txt"
    write_playlist_file(path, [[0, 1]], num_songs=6)
    with open(path, "a") as f:
        f.write(line + "\n")
    with pytest.raises(errors.DataError, match=f"{path}:4: .*{message}"):
        yes_reader.read_playlists(str(path), 6)


def test_missing_header_is_reported(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("0 1 2\n3 4\n")
    with pytest.raises(errors.DataError, match=f"{path}:1: expected header line 1"):
        yes_reader.read_playlists(str(path), 6)


def test_windows_worked_out_by_hand():
    # Playlists (song ids) [0,1,2,3,4] and [5,2]; [3] has no event. batch_size=2, num_steps=2.
    # Sorted by length: row 0 = [5,2] -> tokens [6,3], row 1 = [0..4] -> tokens [1,2,3,4,5].
    # 4 events in the longest row -> 2 windows. Inputs are tokens[:-1], targets ids[1:].
    playlists = [np.array(p, np.int32) + 1 for p in ([0, 1, 2, 3, 4], [5, 2], [3])]
    w = yes_reader.make_windows(playlists, batch_size=2, num_steps=2)
    np.testing.assert_array_equal(w.inputs, [[[6, 3], [1, 2]], [[0, 0], [3, 4]]])
    np.testing.assert_array_equal(w.targets, [[[2, 0], [1, 2]], [[0, 0], [3, 4]]])
    np.testing.assert_array_equal(w.weights, [[[1, 0], [1, 1]], [[0, 0], [1, 1]]])
    np.testing.assert_array_equal(w.reset, [[True, True], [False, False]])
    assert w.batch_starts.tolist() == [0, 2] and w.events == 5 and w.playlists == 3


def test_last_partial_batch_and_window_are_kept():
    # 3 playlists with batch_size=2: the second batch has one real row and one empty row.
    # Lengths 2, 3, 4 -> events 1 + 2 + 3 = 6; num_steps=2 -> batch 1: 1 window, batch 2: 2.
    playlists = [np.arange(1, n + 1, dtype=np.int32) for n in (4, 2, 3)]
    w = yes_reader.make_windows(playlists, batch_size=2, num_steps=2)
    assert w.events == 6 and w.num_windows == 3
    assert w.batch_starts.tolist() == [0, 1, 3]
    assert w.weights[1:, 1].sum() == 0  # the filler row has no event
    np.testing.assert_array_equal(w.reset[:, 0], [True, True, False])


def test_windows_are_cut_after_their_last_real_step_in_multiples_of_five():
    # Batch 1, 20 steps. Lengths 3, 7, 25 -> events 2, 6, 24: windows of 2, 6, 20 and 4 real
    # steps, cut to 5, 10, 20 and 5. What is cut is padding in every row.
    playlists = [np.arange(1, n + 1, dtype=np.int32) for n in (25, 3, 7)]
    w = yes_reader.make_windows(playlists, batch_size=1, num_steps=20)
    assert yes_reader.used_steps(w).tolist() == [5, 10, 20, 5]
    elements = list(yes_reader.to_dataset(w).as_numpy_iterator())
    assert [e[0][0].shape for e in elements] == [(1, 5), (1, 10), (1, 20), (1, 5)]
    assert sum(e[2].sum() for e in elements) == w.events == 32
    for (inputs, _), targets, _ in elements:  # the kept steps are the windows' first steps
        assert inputs[0, 0] != 0 and targets.shape == inputs.shape


def test_no_playlist_with_events_is_an_error():
    with pytest.raises(errors.DataError, match="nothing to learn"):
        yes_reader.make_windows([np.array([3], np.int32)], batch_size=2, num_steps=2)


def test_schedule_keeps_batch_windows_together_and_depends_on_epoch_only():
    playlists = [np.arange(1, n + 1, dtype=np.int32) for n in (2, 5, 9, 3, 7)]
    w = yes_reader.make_windows(playlists, batch_size=2, num_steps=2)
    order = yes_reader.schedule(w, num_epochs=3, seed=7)
    per_epoch = np.split(order, 3)
    for epoch in per_epoch:
        assert sorted(epoch.tolist()) == list(range(w.num_windows))
        starts = [i for i, win in enumerate(epoch) if w.reset[win].all()]
        assert len(starts) == len(w.batch_starts) - 1
    again = yes_reader.schedule(w, num_epochs=2, seed=7)
    np.testing.assert_array_equal(again, order[: len(again)])


def test_load_splits_validation_by_seeded_fraction(tmp_path):
    train = [[i % 6, (i + 1) % 6] for i in range(20)]
    write_yes_dir(tmp_path, train, [[0, 1]], num_songs=6)
    data = yes_reader.load(str(tmp_path), valid_fraction=0.25, seed=3)
    assert len(data.train) == 15 and len(data.valid) == 5 and len(data.test) == 1
    again = yes_reader.load(str(tmp_path), valid_fraction=0.25, seed=3)
    assert [p.tolist() for p in again.valid] == [p.tolist() for p in data.valid]


def test_valid_split_tail_holds_out_the_last_lines_and_auto_follows_import_json(tmp_path):
    train = [[i % 6, (i + 1) % 6, i % 5] for i in range(8)]
    write_yes_dir(tmp_path, train, [[0, 1]], num_songs=6)
    tail = yes_reader.load(str(tmp_path), valid_fraction=0.25, seed=0, valid_split="tail")
    tokens = [[s + 1 for s in p] for p in train]  # token = song id + 1
    assert [p.tolist() for p in tail.valid] == tokens[6:]
    assert [p.tolist() for p in tail.train] == tokens[:6]
    random = yes_reader.load(str(tmp_path), valid_fraction=0.25, seed=0, valid_split="random")
    assert [p.tolist() for p in random.valid] == [tokens[2], tokens[4]]  # lines 3 and 5
    assert yes_reader.load(str(tmp_path), 0.25, 0).valid[0].tolist() == random.valid[0].tolist()
    (tmp_path / "import.json").write_text('{"split": "time", "test": "..."}')
    assert [p.tolist() for p in yes_reader.load(str(tmp_path), 0.25, 0).valid] == tokens[6:]
    (tmp_path / "import.json").write_text('{"split": "random"}')
    assert yes_reader.load(str(tmp_path), 0.25, 0).valid[0].tolist() == random.valid[0].tolist()
    (tmp_path / "import.json").write_text("[1, 2")
    with pytest.raises(errors.DataError, match="import.json: not the JSON object"):
        yes_reader.load(str(tmp_path), 0.25, 0)


def test_recency_half_life_weights_playlists_by_line_worked_by_hand():
    # 4 playlists in time order; the second has no event. Ages (3, 2, 1, 0) / 4 with half-life
    # 1/4 of the lines: raw weights 1/8, 1/4 (dropped), 1/2, 1. Events 1, 2, 1: the scale is
    # 4 / (1/8 + 2 * 1/2 + 1) = 32 / 17, so the weights are 4/17, 16/17 (twice) and 32/17.
    playlists = [np.array(p) for p in ([1, 2], [3], [2, 3, 1], [3, 1])]
    w = yes_reader.make_windows(playlists, batch_size=4, num_steps=2, recency_half_life=0.25)
    by_playlist = {tuple(w.inputs[0, r]): w.weights[:, r].ravel() for r in range(3)}
    np.testing.assert_allclose(by_playlist[(1, 2)], [4 / 17, 0], rtol=1e-6)
    np.testing.assert_allclose(by_playlist[(2, 3)], [16 / 17, 16 / 17], rtol=1e-6)
    np.testing.assert_allclose(by_playlist[(3, 1)], [32 / 17, 0], rtol=1e-6)
    assert w.events == 4 and w.weights.sum() == pytest.approx(4)
    plain = yes_reader.make_windows(playlists, batch_size=4, num_steps=2)
    assert set(np.unique(plain.weights)) == {0.0, 1.0}


def test_crlf_and_cr_line_endings(tmp_path):
    path = tmp_path / "train.txt"
    write_playlist_file(path, [[0, 1], [2, 3, 4]], num_songs=6)
    text = path.read_text()
    for ending in ("\r\n", "\r"):
        path.write_bytes(text.replace("\n", ending).encode())
        got = yes_reader.read_playlists(str(path), 6)
        assert [p.tolist() for p in got] == [[1, 2], [3, 4, 5]]


playlist_lists = st.lists(
    st.lists(st.integers(1, 30), min_size=0, max_size=25).map(lambda p: np.array(p, np.int32)),
    min_size=1,
    max_size=30,
).filter(lambda ps: any(len(p) >= 2 for p in ps))


@settings(deadline=None, derandomize=True, max_examples=60)
@given(playlists=playlist_lists, batch_size=st.integers(1, 7), num_steps=st.integers(1, 6))
def test_unpadding_returns_the_playlists(playlists, batch_size, num_steps):
    w = yes_reader.make_windows(playlists, batch_size, num_steps)
    assert w.events == sum(max(len(p) - 1, 0) for p in playlists)
    real = w.weights == 1
    assert (w.inputs[real] != yes_reader.PAD_ID).all()
    recovered = []
    for b in range(len(w.batch_starts) - 1):
        span = slice(w.batch_starts[b], w.batch_starts[b + 1])
        inputs = np.concatenate(list(w.inputs[span]), axis=1)  # [batch, time]
        targets = np.concatenate(list(w.targets[span]), axis=1)
        weights = np.concatenate(list(w.weights[span]), axis=1)
        for row in range(batch_size):
            n = int(weights[row].sum())
            if n:
                assert weights[row, :n].all()  # real events are contiguous from the start
                recovered.append([int(inputs[row, 0])] + (targets[row, :n] + 1).tolist())
    expected = [p.tolist() for p in playlists if len(p) >= 2]
    assert sorted(recovered) == sorted(expected)
