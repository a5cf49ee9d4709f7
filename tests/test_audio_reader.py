"""audio_reader: reading, cleaning and joining tiny hand-made logs; monthly splits and windows."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import audio_reader as ar
import audio_windows
from conftest import ROOT
from errors import DataError

FEATURE_HEADER = "artistName,trackName,trackID," + ",".join(ar.FEATURES)
ROW = "0.5,0.6,1,-5.0,1,0.05,0.1,0.0,0.1,0.4,120.0"  # 11 valid features
HARRY = ROOT / "data" / "harry2687-spotify-2023"


def write_features(path: pathlib.Path, rows: list[str]) -> str:
    path.write_text("\n".join([FEATURE_HEADER, *rows]) + "\n")
    return str(path)


def write_json(path: pathlib.Path, plays: list[dict]) -> str:
    path.write_text(json.dumps(plays, indent=2))  # one key per line: play k starts on line 2+6k
    return str(path)


def play(end: str, artist: str, title: str, ms: int) -> dict:
    return {"endTime": end, "artistName": artist, "trackName": title, "msPlayed": ms}


@pytest.fixture
def tiny(tmp_path: pathlib.Path) -> ar.AudioData:
    """Seven plays, two log files, two feature tables. Worked out by hand:

    time order (file 1 is out of order):       fate
      03-01 09:00 B / "Song 2 - Remastered 2011"  joined, loose key → table row B/Song 2 (id2)
      03-01 10:00 A / Song1                     joined, exact key → id1 (features of table 1)
      03-01 10:05 A / Song1, 10 s               skipped (< 30 s)
      03-02 08:00 A / "SONG1"                   joined, case-folded key → id1, same song
      04-02 10:00 C / 日本語                    joined (english_only is off) → id3
      04-03 10:00 D / Unknown                   no_features
      04-04 10:00 Z / Other Name, uri id2       joined by Spotify id (extended history format)
    songs in order of first play: id2 → 0, id1 → 1, id3 → 2; songs = [0, 1, 1, 2, 0].
    table 2 repeats A/Song1 with other features and a row without features: the first wins.
    """
    write_json(
        tmp_path / "a.json",
        [
            play("2023-03-01 10:00", "A", "Song1", 200_000),
            play("2023-03-01 10:05", "A", "Song1", 10_000),
            play("2023-03-01 09:00", "B", "Song 2 - Remastered 2011", 100_000),
            play("2023-03-02 08:00", "A", "SONG1", 40_000),
            play("2023-04-02 10:00", "C", "日本語", 60_000),
            play("2023-04-03 10:00", "D", "Unknown", 60_000),
        ],
    )
    extended = {
        "ts": "2023-04-04T10:00:00Z",
        "master_metadata_album_artist_name": "Z",
        "master_metadata_track_name": "Other Name",
        "ms_played": 50_000,
        "spotify_track_uri": "spotify:track:id2",
    }
    write_json(tmp_path / "b.json", [extended])
    t1 = write_features(tmp_path / "t1.csv", [f"A,Song1,id1,{ROW}", f"B,Song 2,id2,{ROW}"])
    other = ROW.replace("120.0", "90.0")
    t2 = write_features(
        tmp_path / "t2.csv",
        [f"A,Song1,id9,{other}", "E,Empty,id5" + "," * 11, f"C,日本語,id3,{ROW}"],
    )
    return ar.load([str(tmp_path / "*.json")], [t1, t2])


def test_join_and_cleaning(tiny):
    assert list(tiny.songs) == [0, 1, 1, 2, 0]
    assert tiny.names == ("B – Song 2", "A – Song1", "C – 日本語")
    assert list(tiny.plays.title) == [
        "Song 2 - Remastered 2011",
        "Song1",
        "SONG1",
        "日本語",
        "Other Name",
    ]
    assert tiny.features.shape == (5, 11)
    assert np.all(tiny.features[:, 10] == 120.0)  # table 1's A/Song1 wins over table 2's
    assert tiny.summary.loc["2023-03"].to_dict() == dict(
        read=4, skipped=1, non_english=0, no_features=0, joined=3
    )
    assert tiny.summary.loc["2023-04"].to_dict() == dict(
        read=3, skipped=0, non_english=0, no_features=1, joined=2
    )
    assert list(tiny.months) == ["2023-03"] * 3 + ["2023-04"] * 2


def test_english_only_counts_drops(tmp_path):
    log = write_json(
        tmp_path / "a.json",
        [
            play("2023-03-01 10:00", "C", "日本語", 60_000),
            play("2023-03-01 11:00", "É", "Café", 60_000),
        ],
    )
    table = write_features(tmp_path / "t.csv", [f"C,日本語,x,{ROW}", f"É,Café,y,{ROW}"])
    data = ar.load(log, table, english_only=True)
    assert data.summary.loc["2023-03", "non_english"] == 1  # accented Latin counts as English
    assert data.names == ("É – Café",)


def test_lastfm_tsv_newest_first_and_user(tmp_path):
    tsv = tmp_path / "lf.tsv"
    tsv.write_text(
        "u1\t2009-01-02T10:00:00Z\t\tA\t\tSong1\n"
        "u2\t2009-01-02T09:00:00Z\t\tB\t\tSong 2\n"
        "u1\t2009-01-02T10:00:00Z\t\tB\t\tSong 2 (Live)\n"
    )
    table = write_features(tmp_path / "t.csv", [f"A,Song1,id1,{ROW}", f"B,Song 2,id2,{ROW}"])
    data = ar.load(str(tsv), table, user="u1")
    # Same timestamp: the line further down a newest-first file is the older play. Loose key.
    assert list(data.plays.title) == ["Song 2 (Live)", "Song1"]
    with pytest.raises(DataError, match=r"lf\.tsv: 2 users \(u1, u2\); pick one with --user"):
        ar.load(str(tsv), table)


def test_csv_log(tmp_path):
    log = tmp_path / "h.csv"
    log.write_text("endTime,artistName,trackName,msPlayed\n2019-02-13 06:25:00,A,Song1,5827\n"
                   "2019-02-13 06:30:00,A,Song1,185000\n")  # fmt: skip
    data = ar.load(str(log), write_features(tmp_path / "t.csv", [f"A,Song1,id1,{ROW}"]))
    assert data.summary.loc["2019-02"].to_dict() == dict(
        read=2, skipped=1, non_english=0, no_features=0, joined=1
    )


@pytest.mark.parametrize(
    "rows, message",
    [
        ([f"A,S,i,{ROW}", "B,T,j,0.5,nan" + ",1" * 9], r"t\.csv:3: energy='nan' is not a finite"),
        ([f"A,S,i,{ROW.replace('120.0', 'fast')}"], r"t\.csv:2: tempo='fast' is not a finite"),
        ([f"A,S,i,{ROW.replace('0.4,', ',')}"], r"t\.csv:2: valence='' is not a finite"),
    ],
)
def test_bad_feature_values_name_file_and_line(tmp_path, rows, message):
    table = write_features(tmp_path / "t.csv", rows)
    with pytest.raises(DataError, match=message):
        ar.read_features(table)


def test_feature_table_missing_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(FEATURE_HEADER.replace(",tempo", "") + "\nA,S,i,1,2,3,4,5,6,7,8,9,10\n")
    with pytest.raises(DataError, match=r"t\.csv:1: missing column\(s\) tempo"):
        ar.read_features(str(path))


def test_bad_timestamps_name_file_and_line(tmp_path):
    plays = [play("2023-03-01 10:00", "A", "S", 1), play("01/03/2023 25:00", "A", "S", 1)]
    log = write_json(tmp_path / "a.json", plays)
    with pytest.raises(DataError, match=r"a\.json:8: cannot parse timestamp '01/03/2023 25:00'"):
        ar.read_log(log)
    csv_log = tmp_path / "h.csv"
    csv_log.write_text("endTime,artistName,trackName\n2019-02-13 06:25:00,A,S\nyesterday,A,S\n")
    with pytest.raises(DataError, match=r"h\.csv:3: cannot parse timestamp 'yesterday'"):
        ar.read_log(str(csv_log))


def test_join_matching_no_track_names_file_and_line(tmp_path):
    log = write_json(tmp_path / "a.json", [play("2023-03-01 10:00", "X", "Nope", 60_000)])
    table = write_features(tmp_path / "t.csv", [f"A,Song1,id1,{ROW}"])
    with pytest.raises(DataError, match=r"a\.json:2: none of the 1 plays .*/t\.csv"):
        ar.load(log, table)


def test_split_months_sizes():
    # 10 plays in January → 8 train + 2 test; 7 in February → floor(5.6) = 5 + 2.
    splits = audio_windows.split_months(np.array(["2023-01"] * 10 + ["2023-02"] * 7))
    assert [(s.month, list(s.train), list(s.test)) for s in splits] == [
        ("2023-01", list(range(8)), [8, 9]),
        ("2023-02", list(range(10, 15)), [15, 16]),
    ]


def test_window_index_and_count():
    # N = plays - seq_len - pred_steps + 1 = 20 - 10 - 5 + 1 = 6; row i = segment[i : i + 15].
    segment = np.arange(100, 120)
    rows = audio_windows.window_index(segment, seq_len=10, pred_steps=5)
    assert rows.shape == (6, 15)
    assert list(rows[0]) == list(range(100, 115)) and list(rows[5]) == list(range(105, 120))
    assert audio_windows.window_index(np.arange(14), 10, 5).shape == (0, 15)
    z = np.arange(40, dtype=np.float32).reshape(20, 2)
    x, y = audio_windows.to_arrays(z, audio_windows.window_index(np.arange(20), 10, 5), seq_len=10)
    assert x.shape == (6, 10, 2) and y.shape == (6, 5, 2)
    assert list(y[1, 0]) == [22.0, 23.0]  # window 1's first target is play 11


def test_dynamic_train_sampling_fractions():
    # seq_len 2 + pred_steps 1: a run of n plays has n - 2 windows.
    # month 0: 20 train (18 windows), 10 test (8 windows); month 1: 30 train (28 windows).
    # month 1 trains on 28 + floor(0.5 * 8) = 4 + floor(0.2 * 18) = 3 = 35 windows.
    months = np.array(["2023-01"] * 25 + ["2023-02"] * 37)
    splits = audio_windows.split_months(months)
    assert [(len(s.train), len(s.test)) for s in splits] == [(20, 5), (29, 8)]
    splits = [
        audio_windows.MonthSplit("a", np.arange(0, 20), np.arange(20, 30)),
        audio_windows.MonthSplit("b", np.arange(30, 60), np.arange(60, 70)),
    ]
    sets = audio_windows.dynamic_train(splits, seq_len=2, pred_steps=1, seed=3)
    assert [len(s) for s in sets] == [18, 35]
    starts = sets[1][:, 0]
    assert np.sum((starts >= 20) & (starts < 30)) == 4  # previous test windows
    assert np.sum(starts < 20) == 3  # previous train windows
    assert np.sum(starts >= 30) == 28 and np.all(np.diff(starts) > 0)  # sorted, no repeats
    assert np.all(np.diff(sets[1], axis=1) == 1)  # every window is a run of consecutive plays
    again = audio_windows.dynamic_train(splits, seq_len=2, pred_steps=1, seed=3)
    assert np.array_equal(again[1], sets[1])
    other = audio_windows.dynamic_train(splits, seq_len=2, pred_steps=1, seed=4)
    assert not np.array_equal(other[1], sets[1])


def test_standardize_train_vs_global():
    # train plays 0, 1 have values 0, 2 → mean 1, std 1 → z = (x - 1) / 1.
    features = np.array([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0], [10.0, 5.0]])
    splits = [audio_windows.MonthSplit("m", np.array([0, 1]), np.array([2, 3]))]
    z, mean, std = audio_windows.standardize(features, splits, "train")
    assert list(z[:, 0]) == [-1.0, 1.0, 3.0, 9.0] and list(z[:, 1]) == [0.0] * 4  # constant: std 1
    z, mean, std = audio_windows.standardize(features, splits, "global")
    assert mean[0] == 4.0 and std[0] == pytest.approx(14**0.5)  # var = (16 + 4 + 0 + 36) / 4


def test_too_few_plays_for_a_window(tiny):
    with pytest.raises(DataError, match=r"a\.json, .*b\.json: 5 plays left .* the 15 plays"):
        audio_windows.check_windows(
            tiny, audio_windows.split_months(tiny.months), seq_len=10, pred_steps=5
        )


def test_shipped_slice_of_harry2687():
    # The last export file: 1,302 plays, 2024-01-19 → 2024-02-01 (figures measured, not by hand).
    data = ar.load(
        str(HARRY / "StreamingHistory_music_2.json"),
        [str(HARRY / "full_track_features.csv"), str(HARRY / "track_features.csv")],
    )
    assert data.summary.to_dict("index") == {
        "2024-01": dict(read=1126, skipped=739, non_english=0, no_features=0, joined=387),
        "2024-02": dict(read=176, skipped=137, non_english=0, no_features=0, joined=39),
    }
    assert len(data.songs) == 426 and len(data.names) == 216
    assert data.features.shape == (len(data.songs), 11) and np.isfinite(data.features).all()
