"""--mode=import: tiny hand-made files of plays with the data directory worked out by hand, the
shipped Spotify history read directly, and bad input refused with file:line, nothing written."""

from __future__ import annotations

import json
import os

import pytest

import config as config_lib
import importer
import names
import yes_reader
from conftest import ROOT, run_cli
from errors import ConfigError, DataError

PLAYLISTS_CSV = """playlist_id,position,title,artist
p1,1,Firework,Katy Perry
p1,2,Teenage Dream,Katy Perry
p1,3,Teenage Dream,Katy Perry
p2,2, firework ,KATY  PERRY
p1,4,Halo,Beyoncé
p2,1,Halo,Beyonce
p3,1,Alone,Nobody
p4,1,Roar,Katy Perry
p4,2,Firework,Katy Perry
"""
# By hand: p1 = Firework, Teenage Dream (twice: collapsed), Halo; p2 by position = Halo,
# firework (the same songs as "Halo - Beyoncé" and "Firework - Katy Perry" once normalised);
# p3 has one song: dropped, and "Alone" with it; p4 = Roar, Firework. Ids by first appearance:
# 0 Firework, 1 Teenage Dream, 2 Halo (first spelling: Beyoncé), 3 Roar.
PLAYLISTS = [[0, 1, 2], [2, 0], [3, 0]]
KEYS = [
    "firework - katy perry",
    "teenage dream - katy perry",
    "halo - beyonce",
    "roar - katy perry",
]


def run_import(tmp_path, name: str, text: str, **flags):
    """Writes `text` to tmp_path/name and imports it into tmp_path/data; returns the summary."""
    source = tmp_path / name
    source.write_text(text, encoding="utf-8")
    given = dict(input=str(source), data_dir=str(tmp_path / "data"), **flags)
    return importer.run(config_lib.make_config(given))


def read_dir(data_dir) -> tuple[yes_reader.Catalog, list[str], list[list[int]], list[list[int]]]:
    catalog = yes_reader.read_catalog(os.path.join(data_dir, "song_hash.txt"))
    keys = list(names.read_keys(str(data_dir), catalog.size))
    splits = [
        [
            (p - 1).tolist()
            for p in yes_reader.read_playlists(os.path.join(data_dir, f), catalog.size)
        ]
        for f in ("train.txt", "test.txt")
    ]
    return catalog, keys, *splits


def test_playlists_keyed_by_title_and_artist(tmp_path):
    report = run_import(tmp_path, "plays.csv", PLAYLISTS_CSV, test_fraction=0.34)
    catalog, keys, train, test = read_dir(tmp_path / "data")
    assert catalog.titles == ("Firework", "Teenage Dream", "Halo", "Roar")
    assert catalog.artists == ("Katy Perry", "Katy Perry", "Beyoncé", "Katy Perry")
    assert keys == KEYS
    assert len(test) == 1  # round(0.34 x 3) playlists, drawn by --seed: split random (positions)
    assert sorted(train + test) == sorted(PLAYLISTS)
    assert train + test != [] and [p for p in PLAYLISTS if p not in test] == train  # order kept
    text = "\n".join(report)
    assert "collapsed 1 immediate repeats" in text
    assert "dropped 1 playlists of 1 song (1 plays)" in text
    assert "kept 3 playlists, 7 plays, 4 songs (1 only in dropped playlists, left out)" in text
    assert "split by random" in text
    summary = json.loads((tmp_path / "data" / "import.json").read_text())
    assert summary["split"] == "random" and summary["columns"]["title"] == "title"


def test_keep_repeats_and_seed(tmp_path):
    run_import(tmp_path, "plays.csv", PLAYLISTS_CSV, keep_repeats=True, test_fraction=0.34)
    _, _, train, test = read_dir(tmp_path / "data")
    assert sorted(train + test) == sorted([[0, 1, 1, 2], [2, 0], [3, 0]])
    splits = []
    for seed in range(6):
        run_import(
            tmp_path, "plays.csv", PLAYLISTS_CSV, seed=seed, overwrite=True, test_fraction=0.34
        )
        splits.append(read_dir(tmp_path / "data")[3])
    assert len({str(s) for s in splits}) > 1  # the seed draws the test playlists


LOG_JSONL = "\n".join(
    json.dumps(row)
    for row in [
        dict(ts="2024-01-01T10:00:00Z", song="A", artist="X", ms_played=200000),
        dict(ts="2024-01-01T10:03:00Z", song="B", artist="X", ms_played=200000),
        dict(ts="2024-01-01T10:06:00Z", song="C", artist="X", ms_played=10000),  # a skip
        dict(ts="2024-01-01T12:00:00Z", song="A", artist="X"),  # 114 min later: new session
        dict(ts="2024-01-01T12:04:00Z", song="C", artist="X"),
        dict(ts="2024-01-01T12:05:00Z", song="c", artist="x"),  # the same song again
        dict(ts="2024-01-02T09:00:00Z", song="B", artist="X"),  # next day
        dict(ts="2024-01-02T09:03:00Z", song="A", artist="X"),
    ]
)
# By hand: sessions [A, B], [A, C], [B, A]; ids A 0, B 1, C 2. Span 10:00 .. 09:03 next day
# (23 h 3 min); --test_fraction=0.5: test = sessions starting at or after 21:31:30 = [B, A].


def test_listening_log_cut_into_sessions_and_split_by_time(tmp_path):
    report = run_import(tmp_path, "log.jsonl", LOG_JSONL, test_fraction=0.5)
    catalog, keys, train, test = read_dir(tmp_path / "data")
    assert keys == ["a - x", "b - x", "c - x"] and catalog.titles == ("A", "B", "C")
    assert (train, test) == ([[0, 1], [0, 2]], [[1, 0]])
    text = "\n".join(report)
    assert "dropped 1 skips (ms_played < --min_ms_played=30000)" in text
    assert "collapsed 1 immediate repeats" in text
    assert "split by time, test = those starting at or after 2024-01-01 21:31:30+00:00" in text
    run_import(tmp_path, "log.jsonl", LOG_JSONL, session_gap=120.0, overwrite=True)
    _, _, train, test = read_dir(tmp_path / "data")
    assert train + test == [[0, 1, 0, 2], [1, 0]]  # a 114-minute pause no longer cuts


LISTENERS_TSV = """u1\t2024-01-01T10:00:00Z\tA\tX
u2\t2024-01-01T10:01:00Z\tC\tX
u1\t2024-01-01T10:03:00Z\tB\tX
u2\t2024-01-01T10:04:00Z\tA\tX
u1\t2024-01-01T12:00:00Z\tC\tX
u1\t2024-01-01T12:02:00Z\tA\tX
u2\t2024-01-01T11:00:00Z\tB\tX
u2\t2024-01-01T11:05:00Z\tC\tX
"""
# By hand, sessions per listener (pauses > 30 min cut): u1 [A, B] from 10:00, [C, A] from
# 12:00; u2 [C, A] from 10:01, [B, C] from 11:00; in order of their first play: [A, B], [C, A],
# [B, C], [C, A]; ids A 0, B 1, C 2. Span 10:00 .. 12:02; --test_fraction=0.5: test = the
# sessions starting at or after 11:01 = u1's [C, A]. Cut in time order without the listener
# column, the log would give [A, C, B, A], [B, C], [C, A] (ids A 0, C 1, B 2).


def test_headerless_tsv_log_of_two_listeners_is_cut_per_listener(tmp_path):
    names = "user,ts,title,artist"
    report = run_import(tmp_path, "log.tsv", LISTENERS_TSV, column_names=names, test_fraction=0.5)
    _, keys, train, test = read_dir(tmp_path / "data")
    assert keys == ["a - x", "b - x", "c - x"]
    assert (train, test) == ([[0, 1], [2, 0], [1, 2]], [[2, 0]])
    assert "columns: user=user, order=ts, title=title, artist=artist" in report[0]
    names = "listener_name,ts,title,artist"  # not a listener column: one log, cut in time
    run_import(tmp_path, "log.tsv", LISTENERS_TSV, column_names=names, overwrite=True)
    _, _, train, test = read_dir(tmp_path / "data")
    assert train + test == [[0, 1, 2, 0], [2, 1], [1, 0]]


def test_column_names_checked(tmp_path):
    with pytest.raises(DataError, match=r"log.tsv:2: 5 fields, but --column_names gives 4"):
        run_import(tmp_path, "log.tsv", "u\t1\tA\tX\nu\t2\tB\tX\textra\n", column_names="u,t,a,b")
    with pytest.raises(ConfigError, match=r"--column_names: .*l.jsonl is JSON"):
        run_import(tmp_path, "l.jsonl", '{"ts": 1}\n', column_names="ts")
    assert not (tmp_path / "data").exists()


def test_spotify_history_json_read_directly(tmp_path):
    history = ROOT / "data" / "harry2687-spotify-2023" / "StreamingHistory_music_2.json"
    given = dict(input=str(history), data_dir=str(tmp_path / "data"))
    report = importer.run(config_lib.make_config(given))
    assert report[0].startswith(f"read 1302 plays from {history} (columns: order=endTime")
    catalog, keys, train, test = read_dir(tmp_path / "data")
    assert train and test and len(keys) == catalog.size == len(set(keys))
    assert all(len(p) >= 2 for p in train + test)


@pytest.mark.parametrize(
    "name, text, message",
    [
        (
            "p.csv",
            "playlist_id,position,title,artist\np,1,A,X\np,x2,B,X\n",
            r"p.csv:3: cannot parse position 'x2'",
        ),
        (
            "p.csv",
            "playlist_id,position,title,artist\np,1,A,X\np,2,,X\n",
            r"p.csv:3: no title \(empty or missing\)",
        ),
        (
            "p.csv",
            "playlist_id,position,name\np,1,A\n",
            r"p.csv:1: no song key: give --song_column",
        ),
        (
            "l.jsonl",
            '{"ts": "2024-01-01T10:00:00Z", "title": "A", "artist": "X"}\n{"ts": 1,\n',
            r"l.jsonl:2: bad JSON",
        ),
        (
            "l.jsonl",
            '{"ts": "2024-01-01T10:00:00Z", "title": "A", "artist": "X"}\n\n'
            '{"title": "B", "artist": "X"}\n',
            r"l.jsonl:3: no ts \(empty or missing\)",
        ),
        (
            "l.json",
            '[\n {"endTime": "2024-01-01 10:00", "trackName": "A", "artistName": "X"},\n'
            ' {"endTime": "noon", "trackName": "B", "artistName": "X"}\n]',
            r"l.json:3: cannot parse endTime 'noon'",
        ),
        (
            "l.json",
            '[\n {"endTime": "2024-01-01 10:00", "trackName": ["A"], "artistName": "X"}\n]',
            r"l.json:2: trackName \['A'\] is not a string or a number",
        ),
        (
            "l.jsonl",
            '{"position": 1, "title": "A", "artist": "X"}\n',
            r"l.jsonl: no playlist column and no timestamps",
        ),
        (
            "p.csv",
            "playlist_id,position,title,artist\np,1,A,X\n",
            r"p.csv: no playlists of 2 or more songs",
        ),
    ],
)
def test_bad_rows_are_refused_with_file_and_line(tmp_path, name, text, message):
    with pytest.raises(DataError, match=message):
        run_import(tmp_path, name, text)
    assert not (tmp_path / "data").exists()


def test_flags_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"--song_column=uri: .* has no such column"):
        run_import(tmp_path, "p.csv", PLAYLISTS_CSV, song_column="uri")
    with pytest.raises(ConfigError, match=r"--split=time: .* has no timestamps"):
        run_import(tmp_path, "p.csv", PLAYLISTS_CSV, split="time")
    with pytest.raises(DataError, match=r"--test_fraction=0.01 leaves 3 training and 0 test"):
        run_import(tmp_path, "p.csv", PLAYLISTS_CSV, test_fraction=0.01)
    assert not (tmp_path / "data").exists()


def test_cli_refuses_a_full_data_dir_and_overwrites_only_when_asked(tmp_path):
    source = tmp_path / "plays.csv"
    source.write_text(PLAYLISTS_CSV)
    data = tmp_path / "data"
    data.mkdir()
    (data / "mine.txt").write_text("keep me")
    args = ["--mode=import", f"--input={source}", f"--data_dir={data}", "--test_fraction=0.34"]
    result = run_cli(*args)
    assert result.returncode == 2
    assert f"deepcf: error: --data_dir={data}: not empty; pass --overwrite" in result.stderr
    assert os.listdir(data) == ["mine.txt"]
    bad = tmp_path / "bad.csv"
    bad.write_text(PLAYLISTS_CSV.replace("p4,1,", "p4,one,"))
    result = run_cli("--mode=import", f"--input={bad}", f"--data_dir={data}", "--overwrite")
    assert result.returncode == 2 and f"{bad}:9: cannot parse position 'one'" in result.stderr
    assert os.listdir(data) == ["mine.txt"]  # nothing replaced
    result = run_cli(*args, "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote" in result.stdout
    files = ["import.json", "song_hash.txt", "song_keys.txt", "test.txt", "train.txt"]
    assert sorted(os.listdir(data)) == files
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporary left


def test_catalog_keys_without_song_keys_file(tmp_path):
    (tmp_path / "song_hash.txt").write_text("0\tHalo\tBeyoncé\n1\tFirework  \tKaty Perry\n")
    catalog = yes_reader.read_catalog(str(tmp_path / "song_hash.txt"))
    keys = importer.catalog_keys(str(tmp_path), catalog.titles, catalog.artists)
    assert keys == ["halo - beyonce", "firework - katy perry"]
    (tmp_path / "song_keys.txt").write_text("0\tspotify:track:1\n")  # song 1 has no key there
    keys = importer.catalog_keys(str(tmp_path), catalog.titles, catalog.artists)
    assert keys == ["spotify:track:1", "firework - katy perry"]
    (tmp_path / "song_keys.txt").write_text("0\tspotify:track:1\n2\tx\n")
    with pytest.raises(DataError, match=r"song_keys.txt:2: song id 2 is outside the catalog"):
        importer.catalog_keys(str(tmp_path), catalog.titles, catalog.artists)
