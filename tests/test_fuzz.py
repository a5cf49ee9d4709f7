"""Every reader fuzzed with hypothesis: valid generated files read as an independent reference
parse (written here) says; mutated files are read or refused with `DataError("path[:line]: ...")`,
never another exception.

Mutations: bytes flipped, lines cut or doubled, a token replaced (2**70, 2**70 digits, negative
numbers, floats, NaN/inf, '²', '١', quotes, NUL, JSON nesting), a field added or dropped, other
encodings and BOMs, CR/CRLF endings, an empty file; and a directory, a dangling link and a link loop
where a file belongs.

CI runs a bounded, derandomized number of examples. A longer, random run:
    HYPOTHESIS_PROFILE=long pytest tests/test_fuzz.py   (HYPOTHESIS_EXAMPLES=N sets the count)
"""

from __future__ import annotations

import collections
import csv
import datetime
import io
import json
import os
import pathlib
import re
import tempfile
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import audio_reader
import errors
import names
import serving
import yes_reader

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
FUZZ = settings(
    max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", 2000 if LONG else 40)),
    deadline=None,
    derandomize=not LONG,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ODD_TOKENS = (
    str(2**70),
    "-" + str(2**70),
    "9" * 5000,  # past Python's 4300-digit limit of int()
    "-1",
    "-5",
    "1.5",
    "1e400",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "",
    "x3",
    "²",
    "١",
    "+3",
    "--5",
    "0x10",
    '"',
    "\x00",
    "null",
    "[]",
    "{}",
    "[" * 3000,
    "\ufeff",
    "\u2028",
    "true",
    "1_0",
)
SEPARATORS = (" ", ",", "\t", "\n", '"', "\r")
NAME = st.text(st.characters(codec="utf-8", exclude_characters="\t\n\r\\,\"'"), max_size=8)


def write(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def read_or_refuse(read: Callable[[], object], *paths: str) -> object:
    """Returns read()'s result, or None if it raised a DataError starting with one of `paths`
    (and `:line` where it names one); any other exception fails the test."""
    try:
        return read()
    except errors.DataError as e:
        message = str(e)
        heads = "|".join(re.escape(p) for p in paths)
        assert re.match(rf"(?:{heads})(?::\d+)?: \S", message), message
        line = re.match(rf"(?:{heads}):(\d+):", message)
        assert line is None or int(line.group(1)) >= 1, message
        return None


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    """`valid` with one to three mutations applied."""
    data = valid
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "line", "token", "field", "encode", "empty"]))
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
        elif kind == "cut":
            data = data[: draw(st.integers(0, len(data)))]
        elif kind == "line":
            lines = data.split(b"\n")
            i = draw(st.integers(0, len(lines) - 1))
            action = draw(st.sampled_from(["drop", "double", "blank"]))
            lines[i : i + 1] = {"drop": [], "double": [lines[i]] * 2, "blank": [b""]}[action]
            data = b"\n".join(lines)
        elif kind in ("token", "field"):
            text = data.decode("utf-8", "replace")
            spans = [m.span() for m in re.finditer(r"[^\s,\t\"]+", text)] or [(0, 0)]
            start, end = draw(st.sampled_from(spans))
            new = draw(st.sampled_from(ODD_TOKENS))
            if kind == "field":
                new = text[start:end] + draw(st.sampled_from(SEPARATORS)) + new
            data = (text[:start] + new + text[end:]).encode("utf-8", "surrogatepass")
        elif kind == "encode":
            codec = draw(st.sampled_from(["utf-8-sig", "utf-16", "utf-16-be", "latin-1", "cp1252"]))
            text = data.decode("utf-8", "replace")
            data = text.encode(codec, "replace")
            ending = draw(st.sampled_from([None, b"\r\n", b"\r"]))
            if ending:
                data = data.replace(b"\n", ending)
        elif kind == "empty":
            data = b""
    return data


# Yes.com files ----------------------------------------------------------------------------------

PLAYLISTS = st.integers(1, 12).flatmap(
    lambda n: st.tuples(
        st.just(n), st.lists(st.lists(st.integers(0, n - 1), max_size=8), min_size=1, max_size=6)
    )
)


def yes_text(num_songs: int, playlists: list[list[int]], ending: str = "\n") -> str:
    """A Yes.com playlist file: two header lines of `num_songs` numbers, then the playlists."""
    lines = [" ".join("7" * num_songs), " ".join("1" * num_songs)]
    lines += [" ".join(map(str, p)) + " " for p in playlists]
    return ending.join(lines) + ending


def reference_yes(text: str) -> list[list[int]]:
    """The playlists of a valid Yes.com file: tokens of lines 3.., plus one."""
    lines = re.split(r"\r\n|\r|\n", text)[:-1]  # the file ends with a line ending
    return [[int(t) + 1 for t in line.split()] for line in lines[2:]]


def mutate_and_read(data: st.DataObject, text: str, name: str, read: Callable[[str], object]):
    """Draws a mutation of `text`, writes it as `name` and checks `read(path)` with
    `read_or_refuse`."""
    raw = data.draw(mutated(text.encode()))
    with tempfile.TemporaryDirectory() as d:
        path = write(d, name, raw)
        read_or_refuse(lambda: read(path), path)


@FUZZ
@given(PLAYLISTS, st.sampled_from(["\n", "\r\n", "\r"]))
def test_yes_playlists_read_as_the_reference(case, ending):
    num_songs, playlists = case
    text = yes_text(num_songs, playlists, ending)
    with tempfile.TemporaryDirectory() as d:
        got = yes_reader.read_playlists(write(d, "train.txt", text.encode()), num_songs)
    assert [p.tolist() for p in got] == reference_yes(text)


@FUZZ
@given(PLAYLISTS, st.data())
def test_yes_playlists_mutated_are_read_or_refused(case, data):
    num_songs, playlists = case
    text = yes_text(num_songs, playlists)
    mutate_and_read(
        data, text, "train.txt", lambda path: yes_reader.read_playlists(path, num_songs)
    )


CSV_ROWS = st.lists(
    st.tuples(st.sampled_from(["a", "b b", "7", "é"]), st.integers(-3, 2**40), st.integers(0, 4)),
    min_size=1,
    max_size=12,
    unique_by=lambda r: r[:2],
)


def csv_text(rows: list[tuple]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(yes_reader.CSV_HEADER)
    writer.writerows(rows)
    return out.getvalue()


@FUZZ
@given(CSV_ROWS)
def test_playlist_csv_reads_as_the_reference(rows):
    reference = collections.defaultdict(dict)
    for name, position, song in rows:
        reference[name][position] = song + 1
    with tempfile.TemporaryDirectory() as d:
        got = yes_reader.read_playlists(write(d, "train.csv", csv_text(rows).encode()), 5)
    assert [p.tolist() for p in got] == [[r[k] for k in sorted(r)] for r in reference.values()]


@FUZZ
@given(CSV_ROWS, st.data())
def test_playlist_csv_mutated_is_read_or_refused(rows, data):
    mutate_and_read(
        data, csv_text(rows), "train.csv", lambda path: yes_reader.read_playlists(path, 5)
    )


SONGS = st.lists(st.tuples(NAME, NAME), min_size=1, max_size=8)


def catalog_text(songs: list[tuple[str, str]]) -> str:
    return "".join(f"{i}\t{title}\t{artist}\n" for i, (title, artist) in enumerate(songs))


@FUZZ
@given(SONGS)
def test_song_hash_reads_as_the_reference(songs):
    with tempfile.TemporaryDirectory() as d:
        got = yes_reader.read_catalog(write(d, "song_hash.txt", catalog_text(songs).encode()))
    assert got.titles == tuple(t.strip() for t, _ in songs)
    assert got.artists == tuple(a.strip() for _, a in songs)


@FUZZ
@given(SONGS, st.data())
def test_song_hash_mutated_is_read_or_refused(songs, data):
    mutate_and_read(data, catalog_text(songs), "song_hash.txt", yes_reader.read_catalog)


TAGS = st.integers(1, 5).flatmap(
    lambda n: st.lists(st.lists(st.integers(0, n - 1), max_size=4), min_size=1, max_size=6).map(
        lambda songs: (n, songs)
    )
)


def tag_files(num_tags: int, songs: list[list[int]]) -> tuple[str, str]:
    tag_hash = "".join(f"{t}, tag{t}\n" for t in range(num_tags))
    tags = "".join((" ".join(map(str, s)) or "#") + "\n" for s in songs)
    return tags, tag_hash


@FUZZ
@given(TAGS)
def test_tags_read_as_the_reference(case):
    num_tags, songs = case
    counts = collections.Counter(t for s in songs for t in s)
    best = [min(s, key=lambda t: (-counts[t], t)) if s else None for s in songs]
    with tempfile.TemporaryDirectory() as d:
        tags, tag_hash = tag_files(num_tags, songs)
        paths = write(d, "tags.txt", tags.encode()), write(d, "tag_hash.txt", tag_hash.encode())
        got = yes_reader.read_tags(*paths, len(songs))
    assert got == tuple("" if t is None else f"tag{t}" for t in best)


@FUZZ
@given(TAGS, st.data(), st.booleans())
def test_tags_mutated_are_read_or_refused(case, data, mutate_hash):
    num_tags, songs = case
    tags, tag_hash = (t.encode() for t in tag_files(num_tags, songs))
    if mutate_hash:
        tag_hash = data.draw(mutated(tag_hash))
    else:
        tags = data.draw(mutated(tags))
    with tempfile.TemporaryDirectory() as d:
        paths = write(d, "tags.txt", tags), write(d, "tag_hash.txt", tag_hash)
        read_or_refuse(lambda: yes_reader.read_tags(*paths, len(songs)), *paths)


TEN_SONGS = names.SongIndex([f"Song {i}" for i in range(10)], ["Artist"] * 10)


def parse_ids(line: str, where: str) -> list[int]:
    """A history line of the 10-song catalog, as `--history_file` reads it."""
    return TEN_SONGS.parse_history(line, where, errors.DataError)


HISTORIES = st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=5), min_size=1, max_size=5)


@FUZZ
@given(HISTORIES, st.sampled_from([" ", ",", ", "]))
def test_history_file_reads_as_the_reference(histories, separator):
    text = "".join(separator.join(map(str, h)) + "\n\n" for h in histories)
    with tempfile.TemporaryDirectory() as d:
        got = serving.read_history_lines(write(d, "h.txt", text.encode()), parse_ids)
    assert got == [(2 * i + 1, h) for i, h in enumerate(histories)]


@FUZZ
@given(HISTORIES, st.data())
def test_history_file_and_flag_mutated_are_read_or_refused(histories, data):
    raw = data.draw(mutated("".join(" ".join(map(str, h)) + "\n" for h in histories).encode()))
    with tempfile.TemporaryDirectory() as d:
        path = write(d, "h.txt", raw)
        read_or_refuse(lambda: serving.read_history_lines(path, parse_ids), path)
    flag = raw.decode("utf-8", "replace")
    where = f"--history={flag}"
    read_or_refuse(lambda: parse_ids(flag, where), where)


@FUZZ
@given(PLAYLISTS, SONGS, st.data())
def test_yes_directory_mutated_is_read_or_refused(case, songs, data):
    """`yes_reader.load` of a directory with one mutated file (the others valid)."""
    num_songs, playlists = case
    files = {
        "song_hash.txt": catalog_text((songs * num_songs)[:num_songs]).encode(),
        "train.txt": yes_text(num_songs, playlists).encode(),
        "test.txt": yes_text(num_songs, playlists).encode(),
    }
    name = data.draw(st.sampled_from(sorted(files)))
    files[name] = data.draw(mutated(files[name]))
    with tempfile.TemporaryDirectory() as d:
        paths = [write(d, n, raw) for n, raw in files.items()]
        read_or_refuse(lambda: yes_reader.load(d, 0.2, 0), *paths)


# Listening logs and feature tables ---------------------------------------------------------------

PLAYS = st.lists(
    st.tuples(
        st.datetimes(min_value=datetime.datetime(2000, 1, 1)).map(
            lambda t: t.strftime("%Y-%m-%d %H:%M")
        ),
        NAME,
        NAME,
        st.integers(0, 2**31),
    ),
    min_size=1,
    max_size=8,
)


def log_text(kind: str, plays: list[tuple]) -> str:
    """A Spotify JSON or CSV history, or a Last.fm TSV (newest first), of `plays`."""
    if kind == "json":
        keys = ("endTime", "artistName", "trackName", "msPlayed")
        return json.dumps([dict(zip(keys, p, strict=True)) for p in plays], indent=2)
    if kind == "csv":
        out = io.StringIO()
        csv.writer(out).writerows([("endTime", "artistName", "trackName", "msPlayed"), *plays])
        return out.getvalue()
    rows = [f"u1\t{t.replace(' ', 'T')}:00Z\taid\t{a}\ttid\t{n}\n" for t, a, n, _ in plays]
    return "".join(rows[::-1])


@FUZZ
@given(st.sampled_from(["json", "csv", "tsv"]), PLAYS)
def test_listening_logs_read_as_the_reference(kind, plays):
    with tempfile.TemporaryDirectory() as d:
        df = audio_reader.read_log(write(d, f"log.{kind}", log_text(kind, plays).encode()))
    assert [t.strftime("%Y-%m-%d %H:%M") for t in df.time] == [p[0] for p in plays]
    assert list(df.artist) == [p[1] for p in plays]
    assert list(df.title) == [p[2] for p in plays]
    if kind != "tsv":
        assert list(df.ms_played) == [float(p[3]) for p in plays]


@FUZZ
@given(st.sampled_from(["json", "csv", "tsv"]), PLAYS, st.data())
def test_listening_logs_mutated_are_read_or_refused(kind, plays, data):
    """Also through `audio_reader.load` with a feature table that has every song."""
    raw = data.draw(mutated(log_text(kind, plays).encode()))
    features = feature_text([(a, n, [0.5] * 11) for _, a, n, _ in plays])
    with tempfile.TemporaryDirectory() as d:
        path, table = write(d, f"log.{kind}", raw), write(d, "f.csv", features.encode())
        read_or_refuse(lambda: audio_reader.read_log(path), path)
        read_or_refuse(lambda: audio_reader.load(path, table, min_ms_played=0), path, table)


FEATURE_ROWS = st.lists(
    st.tuples(
        NAME,
        NAME,
        st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=11, max_size=11),
    ),
    min_size=1,
    max_size=6,
)


def feature_text(rows: list[tuple]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["artist_name", "track_name", *audio_reader.FEATURES])
    writer.writerows([(a, t, *map(repr, values)) for a, t, values in rows])
    return out.getvalue()


@FUZZ
@given(FEATURE_ROWS)
def test_feature_tables_read_as_the_reference(rows):
    with tempfile.TemporaryDirectory() as d:
        df = audio_reader.read_features(write(d, "f.csv", feature_text(rows).encode()))
    assert list(df.artist) == [a for a, _, _ in rows]
    assert list(df.title) == [t for _, t, _ in rows]
    assert df[list(audio_reader.FEATURES)].values.tolist() == [v for _, _, v in rows]


@FUZZ
@given(FEATURE_ROWS, st.data())
def test_feature_tables_mutated_are_read_or_refused(rows, data):
    mutate_and_read(data, feature_text(rows), "f.csv", audio_reader.read_features)


# Things that are not files -----------------------------------------------------------------------

READERS = {
    "train.txt": lambda p: yes_reader.read_playlists(p, 3),
    "train.csv": lambda p: yes_reader.read_playlists(p, 3),
    "song_hash.txt": yes_reader.read_catalog,
    "history.txt": lambda p: serving.read_history_lines(p, parse_ids),
    "tags.txt": lambda p: yes_reader.read_tags(
        p, os.path.join(os.path.dirname(p), "tag_hash.txt"), 3
    ),
    "log.json": audio_reader.read_log,
    "log.csv": audio_reader.read_log,
    "log.tsv": audio_reader.read_log,
    "features.csv": audio_reader.read_features,
}


@pytest.mark.parametrize("what", ["directory", "dangling link", "link loop", "link to directory"])
@pytest.mark.parametrize("name", sorted(READERS))
def test_a_non_file_where_a_file_belongs_is_refused(tmp_path: pathlib.Path, name, what):
    (tmp_path / "tag_hash.txt").write_text("0, rock\n")
    path = tmp_path / name
    if what == "directory":
        path.mkdir()
    elif what == "dangling link":
        path.symlink_to(tmp_path / "missing")
    elif what == "link loop":
        path.symlink_to(path)
    else:
        (tmp_path / "d").mkdir()
        path.symlink_to(tmp_path / "d")
    with pytest.raises(errors.DataError, match=f"^{re.escape(str(path))}: "):
        READERS[name](str(path))


@pytest.mark.parametrize("name", sorted(READERS))
def test_an_empty_file_is_read_or_refused(tmp_path: pathlib.Path, name):
    (tmp_path / "tag_hash.txt").write_text("0, rock\n")
    path = tmp_path / name
    path.write_bytes(b"")
    read_or_refuse(lambda: READERS[name](str(path)), str(path))


@pytest.mark.parametrize(
    "text", ["[]", "[\n]\n", "endTime,artistName,trackName\n"], ids=["[]", "[ ]", "csv"]
)
def test_a_log_without_plays_is_refused(tmp_path: pathlib.Path, text):
    path = tmp_path / ("log.json" if text.startswith("[") else "log.csv")
    path.write_text(text)
    with pytest.raises(errors.DataError, match=f"^{re.escape(str(path))}: no plays"):
        audio_reader.read_log(str(path))


# What the fuzzing found, one test each ----------------------------------------------------------

FOUND = [  # (id, file name, text, message after the path)
    (
        "2**70",
        "train.txt",
        yes_text(3, [[0, 1], [1, 2**70]]),
        ":4: song id 1180591620717411303424 is",
    ),
    ("--5", "train.txt", yes_text(3, [[0, 1], [1, "--5"]]), ":4: song id '--5' is not an integer"),
    ("superscript", "train.txt", yes_text(3, [[1, "²"]]), ":3: song id '²' is not an integer"),
    ("catalog", "song_hash.txt", "0\tA\tB\n²\tC\tD\n", ":2: expected 'id<TAB>title<TAB>artist'"),
    ("tag", "tags.txt", "0\n²\n1\n", ":2: a tag id is not in"),
    ("history --5", "history.txt", "1 2\n1 --5\n", ":2: no song '1 --5' in the catalog"),
    ("history 2**70", "history.txt", f"1 {2**70}\n", f":1: song id {2**70} is not in the catalog"),
    ("json []", "log.json", "[]", ": no plays in the log"),
    ("csv header", "log.csv", "endTime,artistName,trackName\n", ": no plays in the log"),
    (
        "artist 5",
        "log.json",
        '[{"endTime": "2020-01-01 10:00", "artistName": 5, "trackName": "T"}]',
        ":1: artistName 5 is not a string",
    ),
    ("nesting", "log.json", "[" + "[" * 5000, ":1: JSON nested too deeply"),
]


@pytest.mark.parametrize("name, text, message", [f[1:] for f in FOUND], ids=[f[0] for f in FOUND])
def test_what_the_fuzzing_found_is_refused_with_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    (tmp_path / "tag_hash.txt").write_text("0, rock\n1, pop\n")
    with pytest.raises(errors.DataError, match=f"^{re.escape(str(path) + message)}"):
        READERS[name](str(path))


@pytest.mark.parametrize(
    "text",
    [
        "endTime,artistName,trackName\r2020-01-01 10:00,A,T\r",  # CR-only line endings
        "endTime,artistName,trackName\n2020-01-01 10:00\n",  # a short row: no artist, no title
    ],
    ids=["CR", "short row"],
)
def test_odd_but_valid_csv_logs_are_read(tmp_path, text):
    path = tmp_path / "log.csv"
    path.write_text(text, newline="")
    df = audio_reader.read_log(str(path))
    assert list(df.time.dt.strftime("%H:%M")) == ["10:00"] and isinstance(df.artist[0], str)


@FUZZ
@given(PLAYLISTS, SONGS)
def test_files_with_a_utf8_bom_read_as_without(case, songs):
    num_songs, playlists = case
    songs = (songs * num_songs)[:num_songs]
    with tempfile.TemporaryDirectory() as d:
        bom = b"\xef\xbb\xbf"
        catalog = yes_reader.read_catalog(write(d, "s.txt", bom + catalog_text(songs).encode()))
        text = yes_text(num_songs, playlists)
        got = yes_reader.read_playlists(write(d, "t.txt", bom + text.encode()), num_songs)
    assert catalog.titles == tuple(t.strip() for t, _ in songs)
    assert [p.tolist() for p in got] == reference_yes(text)
