"""docs/data_format.md: the CSV playlist alternative and the tag files, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

import errors
import yes_reader
from conftest import write_yes_dir


def test_csv_groups_rows_by_playlist_and_orders_by_position(tmp_path):
    path = tmp_path / "train.csv"
    # Playlist "a,b" (quoted) has rows at positions 2 and 1 (out of order, not adjacent);
    # playlist q has positions 0 and 5 (a gap). A blank line and spaces are ignored.
    path.write_text(
        'playlist_id,position,song_id\r\n"a,b",2,5\r\nq, 0 ,1\r\n"a,b",1,4\r\n\r\nq,5,2\r\n'
    )
    playlists = yes_reader.read_playlists(str(path), num_songs=10)
    # Tokens are song id + 1, playlists in order of first appearance: a,b = [4, 5], q = [1, 2].
    assert [p.tolist() for p in playlists] == [[5, 6], [2, 3]]
    assert all(p.dtype == np.int32 for p in playlists)


@pytest.mark.parametrize(
    "text, message",
    [
        ("playlist,position,song_id\nq,1,1\n", ":1: expected the header"),
        ("", ":1: expected the header"),
        ("playlist_id,position,song_id\n", ": no playlist rows"),
        ("playlist_id,position,song_id\nq,1,1\nq,x,2\n", ":3: position 'x' is not an integer"),
        ("playlist_id,position,song_id\nq,1,1.5\n", ":2: song_id '1.5' is not an integer"),
        ("playlist_id,position,song_id\nq,1,10\n", ":2: song id 10 is outside the catalog"),
        ("playlist_id,position,song_id\nq,1,-1\n", ":2: song id -1 is outside the catalog"),
        ("playlist_id,position,song_id\nq,1\n", ":2: expected 3 fields"),
        ("playlist_id,position,song_id\nq,1,1\nr,1,1\nq,1,2\n", ":4: playlist 'q' already has"),
    ],
)
def test_bad_csv_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "test.csv"
    path.write_text(text)
    with pytest.raises(errors.DataError, match=str(path) + message):
        yes_reader.read_playlists(str(path), num_songs=10)


def test_load_reads_csv_when_there_is_no_txt(tmp_path):
    write_yes_dir(tmp_path, train=[[0, 1, 2]] * 4, test=[[2, 1]], num_songs=3)
    (tmp_path / "test.txt").unlink()
    (tmp_path / "test.csv").write_text("playlist_id,position,song_id\nx,1,2\nx,2,0\n")
    data = yes_reader.load(str(tmp_path), valid_fraction=0.0, seed=0)
    assert yes_reader.playlist_path(str(tmp_path), "train").endswith("train.txt")
    assert [p.tolist() for p in data.test] == [[3, 1]]


def test_read_tags_picks_the_tag_most_songs_carry(tmp_path):
    (tmp_path / "tag_hash.txt").write_text("0, rock\n1, pop\n2, loved")
    # Tag counts over the 5 songs: rock 2, pop 3, loved 2. Song 0 {rock, pop} -> pop; song 1
    # has none; song 2 {rock, loved} ties 2-2 -> rock (lower id); song 3 {pop, loved} -> pop.
    (tmp_path / "tags.txt").write_text("0 1\n#\n0 2\n1 2\n1")
    with pytest.raises(errors.DataError, match="one line per song"):
        yes_reader.read_tags(str(tmp_path / "tags.txt"), str(tmp_path / "tag_hash.txt"), 4)
    tags = yes_reader.read_tags(str(tmp_path / "tags.txt"), str(tmp_path / "tag_hash.txt"), 5)
    assert tags == ("pop", "", "rock", "pop", "pop")


def test_read_tags_unknown_tag_names_line(tmp_path):
    (tmp_path / "tag_hash.txt").write_text("0, rock\n")
    (tmp_path / "tags.txt").write_text("0\n3\n")
    with pytest.raises(errors.DataError, match=r"tags.txt:2: a tag id is not in"):
        yes_reader.read_tags(str(tmp_path / "tags.txt"), str(tmp_path / "tag_hash.txt"), 2)
