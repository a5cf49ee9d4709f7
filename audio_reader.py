"""Reads one listener's plays, joins Spotify audio features, splits by month and cuts windows.

Pipeline: `load` (read logs → sort by time → drop skips → optionally drop non-English titles →
join features → drop plays without features) → `split_months` (first 80 % of each month's plays
train, last 20 % test) → `standardize` (z-scores fitted on training plays, or on all plays as the
report did) → `window_index` / `dynamic_train` (index windows of `seq_len` inputs and
`pred_steps` targets, never crossing a month's train/test boundary).

Song identity is the matched feature row: its Spotify id if the table has one, else its normalised
artist + title. Every play of a song carries that song's one feature vector.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import io
import json
import math
import re
import unicodedata
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
from absl import logging

from errors import DataError

FEATURES = tuple(
    "danceability energy key loudness mode speechiness acousticness instrumentalness liveness "
    "valence tempo".split()
)
_ARTIST = ("artistName", "artist_name", "artist", "track_artist")
_ARTIST += ("master_metadata_album_artist_name",)  # extended streaming history
_TITLE = ("trackName", "track_name", "track", "song", "master_metadata_track_name")
_ID = ("track_uri", "trackID", "spotify_id", "track_id", "uri", "spotify_track_uri")
_TIME = ("endTime", "ts")
_MS = ("msPlayed", "ms_played")
_LASTFM_FIELDS = 6  # user, timestamp, artist-id, artist, track-id (MusicBrainz), track
COUNTS = ("read", "skipped", "non_english", "no_features", "joined")
_TEXT, _NUMBER = ((str, type(None)), "a string"), ((int, float, str, type(None)), "a number")
_JSON_TYPES = (((str,), "a string"), _TEXT, _TEXT, _NUMBER)  # time, artist, title, msPlayed


def _pick(columns: Sequence[str], names: Sequence[str]) -> str | None:
    return next((n for n in names if n in columns), None)


def _spotify_id(value: object) -> str:
    """'spotify:track:ID' or 'ID' → 'ID'; anything empty → ''."""
    return "" if value is None else str(value).strip().rsplit(":", 1)[-1]


def open_text(path: str) -> str:
    """The text of a UTF-8 file (a BOM dropped, CRLF and CR read as LF); DataError naming it."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # \r\n and \r read as \n
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _json_play(path: str, line: int, obj: object) -> tuple:
    keys = (
        [_pick(obj, names) for names in (_TIME, _ARTIST, _TITLE)] if isinstance(obj, dict) else []
    )
    if not keys or None in keys:
        raise DataError(f"{path}:{line}: expected an object with endTime, artistName, trackName")
    t, a, n = (obj[k] for k in keys)
    ms = obj.get(_pick(obj, _MS) or "")
    for key, value, (types, what) in zip(
        (*keys, "msPlayed"), (t, a, n, ms), _JSON_TYPES, strict=True
    ):
        if not isinstance(value, types) or isinstance(value, bool):
            raise DataError(f"{path}:{line}: {key} {value!r} is not {what}")
    return (t, a or "", n or "", _spotify_id(obj.get("spotify_track_uri")), ms, path, line)


def json_array_objects(path: str, text: str) -> Iterator[tuple[int, object]]:
    """The values of a JSON array (e.g. a Spotify StreamingHistory file), each with the line it
    starts on; one value is decoded at a time, so an error names its own line.

    Raises:
      DataError `path:line: ...` if `text` is not an array, a value is not valid JSON or is nested
        too deeply.
    """
    decoder, skip = json.JSONDecoder(), re.compile(r"[\s,]*")
    pos = skip.match(text).end()
    if text[pos : pos + 1] != "[":
        raise DataError(f"{path}:1: expected a JSON array of plays")
    line, seen = 1, 0
    pos = skip.match(text, pos + 1).end()
    while pos < len(text) and text[pos] != "]":
        line, seen = line + text.count("\n", seen, pos), pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: {e.msg}") from None
        except RecursionError:
            raise DataError(f"{path}:{line}: JSON nested too deeply") from None
        yield line, obj
        pos = skip.match(text, pos).end()


def _json_plays(path: str, text: str) -> list[tuple]:
    """Spotify StreamingHistory (or extended) JSON array → play tuples with line numbers."""
    return [_json_play(path, line, obj) for line, obj in json_array_objects(path, text)]


def _csv_plays(path: str, text: str) -> list[tuple]:
    """Spotify history as CSV (`endTime, artistName, trackName[, msPlayed]`) → play tuples."""
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    t, a, n, ms, tid = (_pick(columns, x) for x in (_TIME, _ARTIST, _TITLE, _MS, _ID))
    if None in (t, a, n):
        raise DataError(f"{path}:1: need columns endTime, artistName, trackName; got {columns}")
    rows = []
    with _csv_errors(path, reader):
        for r in reader:  # a short row has None for its missing fields
            ident = _spotify_id(r[tid]) if tid else ""
            play = (r[t] or "", r[a] or "", r[n] or "", ident, r[ms] if ms else None)
            rows.append((*play, path, reader.line_num))
    return rows


@contextlib.contextmanager
def _csv_errors(path: str, reader: csv.DictReader) -> Iterator[None]:
    """Turns the csv module's errors (e.g. a field over its size limit) into DataErrors."""
    try:
        yield
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: {e}") from None


def _lastfm_plays(path: str, text: str, user: str | None) -> list[tuple]:
    """Last.fm-1K TSV (newest first) → play tuples of one user, oldest first."""
    rows, users = [], set()
    for lineno, line in enumerate(text.rstrip("\r\n").split("\n"), 1):
        fields = line.rstrip("\r").split("\t")
        if len(fields) != _LASTFM_FIELDS:
            raise DataError(
                f"{path}:{lineno}: expected {_LASTFM_FIELDS} tab-separated fields "
                f"(user, timestamp, artist-id, artist, track-id, track)"
            )
        users.add(fields[0])
        if user is None or fields[0] == user:
            # The track id is a MusicBrainz id, not a Spotify one: join by artist + title.
            rows.append((fields[1], fields[3], fields[5], "", None, path, lineno))
    if user is None and len(users) > 1:
        raise DataError(
            f"{path}: {len(users)} users ({', '.join(sorted(users)[:3])}"
            f"{', ...' if len(users) > 3 else ''}); "
            "pick one with --user"
        )
    if not rows:
        raise DataError(f"{path}: no plays of user {user!r}")
    return rows[::-1]


def read_log(path: str, user: str | None = None) -> pd.DataFrame:
    """Reads one listening log: `.json` Spotify export, `.csv` Spotify history, `.tsv` Last.fm-1K.

    Args:
      path: the log file.
      user: Last.fm user id to keep (required if the TSV holds several users).

    Returns:
      One row per play in file order (oldest first): `time` (UTC datetime64), `artist`, `title`,
      `track_id` (Spotify id or ''), `ms_played` (float64, NaN if the log has none), `source`,
      `line`.
    """
    text = open_text(path)
    if path.endswith(".json"):
        rows = _json_plays(path, text)
    elif path.endswith(".csv"):
        rows = _csv_plays(path, text)
    elif path.endswith((".tsv", ".txt")):
        rows = _lastfm_plays(path, text, user)
    else:
        raise DataError(f"{path}: unknown log format (expected .json, .csv or .tsv)")
    if not rows:
        raise DataError(f"{path}: no plays in the log")
    cols = ["raw_time", "artist", "title", "track_id", "raw_ms", "source", "line"]
    df = pd.DataFrame(rows, columns=cols)
    df["time"] = pd.to_datetime(df.raw_time, utc=True, errors="coerce", format="ISO8601")
    df["ms_played"] = pd.to_numeric(df.raw_ms, errors="coerce").astype(np.float64)
    given = df.raw_ms.notna() & (df.raw_ms.astype(str).str.strip() != "")
    for bad, what, raw in (
        (df.time.isna(), "timestamp", "raw_time"),
        (df.ms_played.isna() & given, "msPlayed", "raw_ms"),
    ):
        if bad.any():
            r = df[bad].iloc[0]
            raise DataError(f"{path}:{r.line}: cannot parse {what} {r[raw]!r}")
    return df.drop(columns=["raw_time", "raw_ms"])


def _feature_row(path: str, line: int, row: dict) -> list[float] | None:
    """The 11 features of a table row; None if all are empty (the API had none)."""
    raw = [(row.get(f) or "").strip() for f in FEATURES]
    if not any(raw):
        return None
    values = []
    for name, value in zip(FEATURES, raw, strict=True):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise DataError(f"{path}:{line}: {name}={value!r} is not a finite number")
        values.append(number)
    return values


def read_features(path: str) -> pd.DataFrame:
    """Reads a Spotify audio-feature CSV (any of the shipped layouts).

    Needs the 11 `FEATURES` columns and artist + title (a Spotify id column is optional). Rows whose
    11 features are all empty are dropped and counted in the log; any other missing, NaN or
    non-numeric feature value is an error.

    Returns:
      Columns `track_id`, `artist`, `title`, the 11 features (float64), `source`, `line`.
    """
    text = open_text(path)
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [f for f in FEATURES if f not in header]
    artist, title, tid = _pick(header, _ARTIST), _pick(header, _TITLE), _pick(header, _ID)
    if missing or artist is None or title is None:
        need = missing + [n for n, c in (("artist", artist), ("title", title)) if c is None]
        raise DataError(f"{path}:1: missing column(s) {', '.join(need)}")
    rows, empty = [], 0
    with _csv_errors(path, reader):
        for r in reader:
            values = _feature_row(path, reader.line_num, r)
            if values is None:
                empty += 1
                continue
            ident = _spotify_id(r[tid]) if tid else ""
            rows.append([ident, r[artist] or "", r[title] or "", *values, path, reader.line_num])
    if empty:
        logging.info("%s: %d row(s) without audio features dropped", path, empty)
    return pd.DataFrame(rows, columns=["track_id", "artist", "title", *FEATURES, "source", "line"])


def normalise(artist: str, title: str, loose: bool = False) -> str:
    """Join key: NFKC, case-folded, ’→', whitespace collapsed; `loose` also drops bracketed
    parts, a ' - ...' suffix and punctuation ("Song - 2011 Remaster (Live)" → "song")."""
    parts = []
    for s in (artist, title):
        s = unicodedata.normalize("NFKC", s).casefold().replace("’", "'")
        if loose:
            s = re.sub(r"\s+-\s+.*$", "", re.sub(r"[(\[].*?[)\]]", " ", s))
            s = re.sub(r"[^\w]+", " ", s)
        parts.append(" ".join(s.split()))
    return "\x1f".join(parts) if any(parts) else ""


def is_english(title: str) -> bool:
    """True if every letter of `title` is Latin script (the report dropped CJK etc. titles)."""
    return all(unicodedata.name(c, "").startswith("LATIN") for c in title if c.isalpha())


def _match(plays: pd.DataFrame, table: pd.DataFrame) -> np.ndarray:
    """Row of `table` for each play (-1: none): by Spotify id, else exact key, else loose key.

    Earlier rows win, so list the preferred table first.
    """
    lookups = [{}, {}, {}]  # id, exact key, loose key → first row
    for i, (tid, a, t) in enumerate(table[["track_id", "artist", "title"]].values):
        for lookup, key in zip(lookups, (tid, normalise(a, t), normalise(a, t, True)), strict=True):
            if key:
                lookup.setdefault(key, i)
    out = np.full(len(plays), -1, np.int64)
    for j, (tid, a, t) in enumerate(plays[["track_id", "artist", "title"]].values):
        for lookup, key in zip(lookups, (tid, normalise(a, t), normalise(a, t, True)), strict=True):
            if key and key in lookup:
                out[j] = lookup[key]
                break
    return out


@dataclasses.dataclass(frozen=True)
class AudioData:
    """One listener's cleaned plays with audio features, in time order.

    Attributes:
      plays: one row per kept play: `time`, `month` ('YYYY-MM', UTC), `artist`, `title`, `source`,
        `line`.
      songs: int64 [plays], song id of each play (0-based index into `names`).
      features: float64 [plays, 11], raw (unscaled) audio features in `FEATURES` order.
      names: 'artist – title' of each song id.
      summary: one row per month (index 'YYYY-MM'), columns `COUNTS`; plays read, skips dropped,
        non-English titles dropped, plays without features dropped, plays kept.
      sources: the log files read.
    """

    plays: pd.DataFrame
    songs: np.ndarray
    features: np.ndarray
    names: tuple[str, ...]
    summary: pd.DataFrame
    sources: tuple[str, ...]

    @property
    def months(self) -> np.ndarray:
        return self.plays.month.to_numpy(str)


def expand(patterns: str | Sequence[str]) -> list[str]:
    """The files named or matched (sorted) by each pattern; a pattern matching none is an error."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    paths = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found:
            raise DataError(f"{pattern}: no file matches")
        paths += found
    return paths


def _clean(plays: pd.DataFrame, table: pd.DataFrame, min_ms_played: float, english_only: bool):
    """Per play: its fate (one of `COUNTS[1:]`) and its feature row (-1 if not joined)."""
    stage = pd.Series("joined", index=plays.index)
    stage[plays.ms_played < min_ms_played] = "skipped"  # NaN (no msPlayed) is never a skip
    if english_only:
        stage[(stage == "joined") & ~plays.title.map(is_english)] = "non_english"
    row = np.full(len(plays), -1, np.int64)
    keep = (stage == "joined").to_numpy()
    row[keep] = _match(plays[keep], table)
    stage[keep & (row < 0)] = "no_features"
    if not (row >= 0).any():
        first = plays[keep].iloc[0] if keep.any() else plays.iloc[0]
        raise DataError(
            f"{first.source}:{first.line}: none of the {keep.sum()} plays left after cleaning "
            f"matches a feature row in {', '.join(table.source.unique())}"
        )
    return stage, row


def _songs(table: pd.DataFrame, rows: np.ndarray):
    """Song ids (by Spotify id, else normalised artist + title), names and one feature vector
    per song (its first matched row) for the joined plays' feature rows `rows`."""
    ident = [i or normalise(a, t) for i, a, t in table[["track_id", "artist", "title"]].values]
    codes, _ = pd.factorize(np.asarray(ident, dtype=object)[rows])
    first_row = rows[np.unique(codes, return_index=True)[1]]
    names = tuple(f"{a} – {t}" for a, t in table.loc[first_row, ["artist", "title"]].values)
    feats = table.loc[first_row, list(FEATURES)].to_numpy(np.float64)[codes]
    return codes.astype(np.int64), names, feats


def load(
    listening_log: str | Sequence[str],
    features: str | Sequence[str],
    *,
    user: str | None = None,
    min_ms_played: float = 30_000,
    english_only: bool = False,
) -> AudioData:
    """Reads, cleans and joins one listener's plays (see the module docstring).

    Args:
      listening_log: log file(s) or glob(s); `.json`, `.csv` or Last.fm `.tsv`.
      features: feature CSV(s) or glob(s); for a key in several rows, the first listed wins.
      user: Last.fm user to keep.
      min_ms_played: plays shorter than this are skips (logs without msPlayed keep all).
      english_only: drop plays whose title has non-Latin letters (the report's cleaning).
    """
    logs, tables = expand(listening_log), expand(features)
    plays = pd.concat([read_log(p, user) for p in logs], ignore_index=True)
    plays = plays.sort_values("time", kind="stable", ignore_index=True)
    plays["month"] = plays.time.dt.strftime("%Y-%m")
    table = pd.concat([read_features(p) for p in tables], ignore_index=True)
    stage, row = _clean(plays, table, min_ms_played, english_only)
    summary = pd.crosstab(plays.month, stage).reindex(columns=COUNTS[1:], fill_value=0)
    summary.insert(0, "read", plays.groupby("month").size())
    summary.index.name, summary.columns.name = "month", None
    songs, names, feats = _songs(table, row[row >= 0])
    logging.info("%s", format_summary(summary))
    kept = plays.loc[row >= 0, ["time", "month", "artist", "title", "source", "line"]]
    return AudioData(kept.reset_index(drop=True), songs, feats, names, summary, tuple(logs))


def format_summary(summary: pd.DataFrame) -> str:
    """The per-month summary as a plain-text table with a total row."""
    table = pd.concat([summary, summary.sum().to_frame("total").T])
    return "plays per month\n" + table.to_string()
