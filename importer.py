"""`--mode=import`: a file of plays (CSV or TSV, JSON Lines, or a JSON array such as a Spotify
StreamingHistory) becomes a deepcf data directory (`song_hash.txt`, `song_keys.txt`, `train.txt`,
`test.txt`, `import.json`; docs/data_format.md).

Steps, each counted in the printed summary: read rows → drop skips (`--min_ms_played`, if the
file has msPlayed) → key songs (the external id, else normalised "title - artist") → playlists
by their key column, else each listener's sessions cut at pauses over `--session_gap` minutes →
collapse immediate repeats (unless `--keep_repeats`) → drop playlists of fewer than 2 songs →
catalog ids in order of first appearance → test split (random by `--seed`, or the last
`--test_fraction` of the time span). The directory is written under a temporary name beside
`--data_dir` and renamed into place.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd

import config as config_lib
import flagspec
import names
import rundir
from audio_reader import json_array_objects, open_text
from errors import ConfigError, DataError

ROLES = ("playlist", "user", "order", "song", "title", "artist", "ms_played")


def _scalar(path: str, line: int, key: str, value: object) -> str:
    """A JSON field as text: strings as they are, numbers written out, null as ''."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{path}:{line}: {key} {value!r} is not a string or a number")


def _json_lines(path: str, text: str) -> Iterator[tuple[int, object]]:
    """JSON Lines: one value per non-blank line, with its line number."""
    for line, raw in enumerate(text.split("\n"), start=1):
        if raw.strip():
            try:
                yield line, json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line}: bad JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{path}:{line}: JSON nested too deeply") from None


def read_rows(
    path: str, names: Sequence[str] = ()
) -> tuple[list[str], list[dict[str, str]], list[int]]:
    """The rows of a `.csv` or `.tsv` (tab-separated), `.jsonl`/`.ndjson` or `.json` (array or JSON
    Lines) file of plays. A CSV/TSV file's columns are its header line, or `names` if given (the
    file has no header line: each line is a play).

    Returns:
      (column names in order of first appearance, rows {column: text}, each row's line number).
      A CSV row with fields missing reads them as ''; a JSON object without a field lacks it.

    Raises:
      DataError `file:line:` for a row with more fields than `names`; ConfigError naming
        --column_names for a JSON file.
    """
    text = open_text(path)
    rows, lines, columns = [], [], {}
    if path.endswith((".csv", ".tsv")):
        delimiter = "\t" if path.endswith(".tsv") else ","
        reader = csv.DictReader(io.StringIO(text), list(names) or None, delimiter=delimiter)
        columns = dict.fromkeys(reader.fieldnames or [])
        try:
            for r in reader:
                if names and None in r:
                    raise DataError(
                        f"{path}:{reader.line_num}: {len(names) + len(r[None])} fields, but "
                        f"--column_names gives {len(names)}"
                    )
                rows.append({k: v or "" for k, v in r.items() if k is not None})
                lines.append(reader.line_num)
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: {e}") from None
    elif path.endswith((".json", ".jsonl", ".ndjson")):
        if names:
            raise ConfigError(f"--column_names: {path} is JSON, whose plays name their fields")
        array = text.lstrip().startswith("[")
        for line, obj in (json_array_objects if array else _json_lines)(path, text):
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line}: expected a JSON object (one play), got {obj!r}")
            rows.append({k: _scalar(path, line, k, v) for k, v in obj.items()})
            lines.append(line)
            columns.update(dict.fromkeys(obj))
    else:
        raise DataError(f"{path}: unknown format (expected .csv, .tsv, .jsonl, .ndjson or .json)")
    if not rows:
        raise DataError(f"{path}: no plays")
    return list(columns), rows, lines


def read_inputs(config: config_lib.Config) -> tuple[list[str], list[dict], list[tuple[str, int]]]:
    """`read_rows` of every file of --input (comma-separated files or globs), in that order.

    Returns:
      (the columns of all files, rows, (file, line) of each row).
    """
    columns, rows, where = {}, [], []
    for pattern in config.paths("input"):
        paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not paths:
            raise DataError(f"--input={config.input}: no file matches {pattern}")
        for path in paths:
            file_columns, file_rows, lines = read_rows(path, config.paths("column_names"))
            columns.update(dict.fromkeys(file_columns))
            rows += file_rows
            where += [(path, line) for line in lines]
    return list(columns), rows, where


def find_columns(config: config_lib.Config, path: str, columns: list[str]) -> dict[str, str]:
    """Role (playlist, order, song, title, artist, ms_played) -> column ('' if none): the
    `--<role>_column` flag, else the first of `config.COLUMNS[role]` that the file has.

    Raises:
      ConfigError naming a flag whose column the file lacks; DataError if no song key is found.
    """
    found = {}
    for role in ROLES:
        given = getattr(config, f"{role}_column", "")
        if given and given not in columns:
            raise ConfigError(f"--{role}_column={given}: {path} has no such column ({columns})")
        found[role] = given or next((c for c in flagspec.COLUMNS[role] if c in columns), "")
    if not found["song"] and not (found["title"] and found["artist"]):
        raise DataError(
            f"{path}:1: no song key: give --song_column, or --title_column and --artist_column "
            f"(columns: {', '.join(columns)})"
        )
    return found


def _first_bad(plays: pd.DataFrame, bad: pd.Series, what: Callable) -> None:
    """Raises `DataError("file:line: " + what(row))` for the first row where `bad` holds."""
    if bad.any():
        row = plays[bad].iloc[0]
        raise DataError(f"{row['source']}:{row['line']}: {what(row)}")


def parse_plays(
    rows: list[dict[str, str]], where: list[tuple[str, int]], cols: dict[str, str]
) -> tuple[pd.DataFrame, bool]:
    """One row per play: `line`, `playlist`, `order` (float, or UTC time), `key`, `title`,
    `artist`, `ms_played` (NaN if none); and whether `order` holds timestamps.

    Raises:
      DataError `file:line:` for a missing playlist, order or song key (the external id, else the
        title), an order that is neither a number nor a timestamp, a bad msPlayed.
    """
    plays = pd.DataFrame(where, columns=["source", "line"])
    for role, col in cols.items():
        plays[role] = [r.get(col) for r in rows] if col else ""
    needed = [r for r in ("playlist", "order") if cols[r]] + ["song" if cols["song"] else "title"]
    for role in needed:
        missing = plays[role].isna() | (plays[role].fillna("").str.strip() == "")
        _first_bad(plays, missing, lambda row, c=cols[role]: f"no {c} (empty or missing)")
    plays = plays.fillna("")
    is_time = False
    if cols["order"]:
        order = pd.to_numeric(plays["order"], errors="coerce")
        if pd.isna(order.iloc[0]):  # the first row decides: positions or timestamps
            order = pd.to_datetime(plays["order"], utc=True, errors="coerce", format="ISO8601")
            is_time = True
        _first_bad(
            plays,
            order.isna(),
            lambda row: f"cannot parse {cols['order']} {row['order']!r} as a position or a time",
        )
        plays["order"] = order
    else:
        plays["order"] = np.arange(len(plays), dtype=np.float64)  # file order
    ms = pd.to_numeric(plays["ms_played"], errors="coerce")
    bad_ms = ms.isna() & (plays["ms_played"].str.strip() != "")
    _first_bad(
        plays, bad_ms, lambda row: f"{cols['ms_played']} {row['ms_played']!r} is not a number"
    )
    plays["ms_played"] = ms
    for role in ("title", "artist", "song"):  # one line, single spaces: tabs would break the files
        plays[role] = [" ".join(v.split()) for v in plays[role]]
    if cols["song"]:
        plays["key"] = plays["song"]
        plays["title"] = plays["title"].where(plays["title"] != "", plays["song"])
    else:
        pairs = zip(plays["title"], plays["artist"], strict=True)
        plays["key"] = [names.song_key(t, a) for t, a in pairs]
    return plays.drop(columns="song"), is_time


def group_plays(
    plays: pd.DataFrame, is_time: bool, cols: dict[str, str], path: str, session_gap: float
) -> pd.DataFrame:
    """The plays sorted into playlists, with `group` = the playlist's number: playlists in the
    order of their first row, or sessions in the order of their first play, each listener's
    (user column) cut where the pause > `session_gap` minutes. Plays with the same order keep
    their file order."""
    if cols["playlist"]:
        plays["group"] = pd.factorize(plays["playlist"])[0]
        return plays.sort_values(["group", "order"], kind="stable")
    if not is_time:
        raise DataError(
            f"{path}: no playlist column and no timestamps to cut sessions at: give "
            "--playlist_column, or an --order_column of timestamps"
        )
    plays = plays.sort_values(["user", "order"], kind="stable")
    new = (plays["user"] != plays["user"].shift()) | (
        plays["order"].diff() > pd.Timedelta(minutes=session_gap)
    )
    session = new.cumsum()
    start = plays.groupby(session)["order"].transform("first")
    plays = plays.assign(start=start, session=session).sort_values(
        ["start", "session"], kind="stable"
    )
    plays["group"] = pd.factorize(plays["session"])[0]
    return plays.drop(columns=["start", "session"])


def split_playlists(
    config: config_lib.Config, starts: pd.Series, span: tuple, is_time: bool
) -> tuple[str, np.ndarray, str]:
    """(method, bool [playlists] True for test, what the split was) by `--split`.

    `time` puts in test the playlists that start in the last `--test_fraction` of `span`
    (first, last play); `random` a seeded random `--test_fraction` of them.
    """
    method = config.split if config.split != "auto" else ("time" if is_time else "random")
    if method == "time":
        if not is_time:
            raise ConfigError(f"--split=time: {config.input} has no timestamps to split by")
        cutoff = span[1] - (span[1] - span[0]) * config.test_fraction
        return method, (starts >= cutoff).to_numpy(), f"those starting at or after {cutoff}"
    test = np.zeros(len(starts), bool)
    order = np.random.default_rng(config.seed).permutation(len(starts))
    test[order[: round(config.test_fraction * len(starts))]] = True
    return method, test, f"a random {config.test_fraction:g} (--seed={config.seed})"


def playlist_file(playlists: list[np.ndarray], num_songs: int) -> str:
    """A Yes.com playlist file: the song ids, their play counts here, then one playlist a line."""
    counts = np.bincount(np.concatenate(playlists), minlength=num_songs)
    lines = [" ".join(map(str, range(num_songs))), " ".join(map(str, counts))]
    return "\n".join(lines + [" ".join(map(str, p)) for p in playlists]) + "\n"


def check_data_dir(config: config_lib.Config) -> None:
    """Refuses a --data_dir that is a file, or not empty without --overwrite, or holds --input."""
    path = config.data_dir
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--data_dir={path}: not a directory")
    if os.path.isdir(path) and os.listdir(path):
        if not config.overwrite:
            raise ConfigError(f"--data_dir={path}: not empty; pass --overwrite to replace it")
        for source in config.paths("input"):
            if not os.path.relpath(os.path.abspath(source), path).startswith(os.pardir):
                raise ConfigError(f"--overwrite: --input={source} is inside --data_dir={path}")


def write_data_dir(data_dir: str, files: dict[str, str]) -> None:
    """Writes `files` (name -> text) into a temporary directory beside `data_dir`, then renames
    it to `data_dir`; an old `data_dir` (--overwrite) is moved aside first and deleted after."""
    aside = ""
    try:
        with rundir.atomic_path(data_dir, directory=True) as tmp:
            for name, text in files.items():
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    f.write(text)
            if os.path.isdir(data_dir) and os.listdir(data_dir):
                parent = os.path.dirname(os.path.abspath(data_dir))
                aside = tempfile.mkdtemp(dir=parent, prefix=".old-")
                os.replace(data_dir, aside)
    except BaseException:
        if aside and not os.path.exists(data_dir):
            os.replace(aside, data_dir)  # the old directory comes back
        raise
    if aside:
        shutil.rmtree(aside)


def clean(
    config: config_lib.Config, plays: pd.DataFrame, is_time: bool, cols: dict[str, str]
) -> tuple[pd.DataFrame, str, list[str]]:
    """Drops skips, groups the plays into playlists, collapses immediate repeats (unless
    --keep_repeats), drops playlists of one song.

    Returns:
      (the plays left, sorted, with `group`; "playlists" or "sessions"; summary lines).
    """
    report = []
    if cols["ms_played"]:
        skip = plays["ms_played"] < config.min_ms_played
        plays = plays[~skip]
        limit = f"--min_ms_played={config.min_ms_played}"
        report.append(f"dropped {int(skip.sum())} skips ({cols['ms_played']} < {limit})")
    plays = group_plays(plays, is_time, cols, config.input, config.session_gap)
    unit = "playlists" if cols["playlist"] else "sessions"
    if unit == "sessions":
        report.append(
            f"sessions cut at pauses of more than --session_gap={config.session_gap:g} min"
        )
    repeat = (plays["key"] == plays["key"].shift()) & (plays["group"] == plays["group"].shift())
    if not config.keep_repeats:
        plays = plays[~repeat]
    verb = "kept" if config.keep_repeats else "collapsed"
    report.append(f"{verb} {int(repeat.sum())} immediate repeats (the same song again at once)")
    sizes = plays.groupby("group")["key"].transform("size")
    songs = plays["key"].nunique()
    short = plays[sizes < 2]
    plays = plays[sizes >= 2]
    report.append(f"dropped {short['group'].nunique()} {unit} of 1 song ({len(short)} plays)")
    if plays.empty:
        raise DataError(f"{config.input}: no {unit} of 2 or more songs: nothing to learn")
    left_out = songs - plays["key"].nunique()
    report.append(
        f"kept {plays['group'].nunique()} {unit}, {len(plays)} plays, "
        f"{songs - left_out} songs ({left_out} only in dropped {unit}, left out)"
    )
    return plays, unit, report


def build(config: config_lib.Config) -> tuple[dict[str, str], list[str]]:
    """The files of the data directory (name -> text) and the summary lines, from `--input`."""
    path = config.input
    columns, rows, where = read_inputs(config)
    cols = find_columns(config, path, columns)
    plays, is_time = parse_plays(rows, where, cols)
    found = ", ".join(f"{role}={col}" for role, col in cols.items() if col)
    plays, unit, report = clean(config, plays, is_time, cols)
    report.insert(0, f"read {len(rows)} plays from {path} (columns: {found})")
    ids, keys = pd.factorize(plays["key"])  # ids in order of first appearance
    bounds = np.flatnonzero(np.diff(plays["group"].to_numpy())) + 1
    playlists = np.split(ids, bounds)
    starts = plays["order"].iloc[np.r_[0, bounds]].reset_index(drop=True)
    span = (plays["order"].min(), plays["order"].max())
    method, test, how = split_playlists(config, starts, span, is_time)
    splits = [[p for p, t in zip(playlists, test, strict=True) if t == side] for side in (0, 1)]
    if not all(splits):
        raise DataError(
            f"{path}: --split={method} --test_fraction={config.test_fraction:g} leaves "
            f"{len(splits[0])} training and {len(splits[1])} test {unit}; both need one"
        )
    events = [sum(len(p) - 1 for p in lists) for lists in splits]
    unseen = len(set(np.concatenate(splits[1])) - set(np.concatenate(splits[0])))
    report.append(
        f"split by {method}, test = {how}: train {len(splits[0])} {unit} ({events[0]} events), "
        f"test {len(splits[1])} {unit} ({events[1]} events); {unseen} songs of test are not in "
        "train (kept in the catalog)"
    )
    first = plays.drop_duplicates("key")  # the first spelling seen, in id order
    titles = zip(range(len(keys)), first["title"], first["artist"], strict=True)
    summary = {"input": path, "columns": cols, "split": method, "test": how, "report": report}
    files = {
        "song_hash.txt": "".join(f"{i}\t{title}\t{artist}\n" for i, title, artist in titles),
        names.KEYS_FILE: names.keys_text(keys),
        "train.txt": playlist_file(splits[0], len(keys)),
        "test.txt": playlist_file(splits[1], len(keys)),
        "import.json": json.dumps(summary, indent=2) + "\n",
    }
    return files, report


def run(config: config_lib.Config) -> list[str]:
    """--mode=import: reads --input, prints what it kept and dropped, writes --data_dir.

    Returns:
      The summary lines printed.
    """
    if not config.input:
        raise ConfigError("--input: --mode=import needs a file of plays")
    check_data_dir(config)  # before the work
    files, report = build(config)
    write_data_dir(config.data_dir, files)
    report.append(f"wrote {config.data_dir}: {', '.join(files)}")
    print("\n".join(report))
    return report


def catalog_keys(data_dir: str, titles: Sequence[str], artists: Sequence[str]) -> list[str]:
    """The key of each catalog song: its key in `data_dir/song_keys.txt` (from an import), else
    its normalised "title - artist" (`names.song_key`)."""
    keys = names.read_keys(data_dir, len(titles)) or [""] * len(titles)
    pairs = zip(keys, titles, artists, strict=True)
    return [key or names.song_key(title, artist) for key, title, artist in pairs]


def write_song_keys(path: str, keys: Sequence[str]) -> None:
    """Writes `keys` as `song_keys.txt` (atomically)."""
    rundir.write_text_atomic(path, names.keys_text(keys))
