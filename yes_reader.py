"""Reads Cornell Yes.com playlist files into padded, windowed `tf.data` pipelines.

Token convention: `PAD_ID = 0` is padding and never a song; song id `s` (0-based, as in
`song_hash.txt`) is input token `s + 1`. Targets are plain song ids, paired with a weight that is
1 for a real event and 0 for padding.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
import re
import time

import numpy as np
import tensorflow as tf
from absl import logging

from errors import DataError

PAD_ID = 0
CSV_HEADER = ("playlist_id", "position", "song_id")
PROGRESS_SECONDS = 10  # at most one "parsed N of M lines" log line this often
PROGRESS_LINES = 4096  # look at the clock only every this many lines
MIN_EVENTS_NOTE = "a playlist of one song has no next song to predict"
_ID = re.compile(r"[0-9]{1,18}")  # ASCII (str.isdigit takes '²'); more digits: past int64


@dataclasses.dataclass(frozen=True)
class Catalog:
    """Song titles and artists, indexed by 0-based song id."""

    titles: tuple[str, ...]
    artists: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.titles)


def read_lines(path: str) -> list[str]:
    """Returns the lines of a text file; LF, CRLF and CR-only endings all work.

    Bytes that are not UTF-8 are replaced by U+FFFD (a warning names the first such line), not
    rejected: titles are only shown to people, ids must still parse.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    text = raw.decode("utf-8-sig", errors="replace")  # a BOM (Windows editors) is dropped
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if "\ufffd" in text:
        bad = [lineno for lineno, line in enumerate(lines, start=1) if "\ufffd" in line]
        note = "%s:%d: bytes that are not UTF-8 are shown as U+FFFD (%d line(s) like this)"
        logging.warning(note, path, bad[0], len(bad))
    return lines


def read_catalog(path: str) -> Catalog:
    """Reads `song_hash.txt`: `id<TAB>title<TAB>artist`, ids 0..N-1 in order.

    Stray spaces around fields are ignored and `\\/` is unescaped to `/`.
    """
    titles, artists = [], []
    for lineno, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) < 2 or not _ID.fullmatch(fields[0]):
            raise DataError(f"{path}:{lineno}: expected 'id<TAB>title<TAB>artist', got {line!r}")
        if int(fields[0]) != len(titles):
            raise DataError(f"{path}:{lineno}: expected song id {len(titles)}, got {fields[0]}")
        titles.append(fields[1].replace("\\/", "/"))
        artists.append(fields[2].replace("\\/", "/") if len(fields) > 2 else "")
    if not titles:
        raise DataError(f"{path}: no songs")
    return Catalog(tuple(titles), tuple(artists))


def _song_id(where: str, token: str, num_songs: int, name: str = "song id") -> int:
    """`token` as a song id of the catalog, or a DataError starting with `where`."""
    if _ID.fullmatch(token) and int(token) < num_songs:
        return int(token)
    if not re.fullmatch(r"-?[0-9]+", token):
        raise DataError(f"{where}: {name} {token!r} is not an integer")
    raise DataError(f"{where}: song id {token} is outside the catalog (0..{num_songs - 1})")


def _parse_playlist(path: str, lineno: int, line: str, num_songs: int) -> np.ndarray:
    tokens = line.split()
    try:  # fast, but takes '+3' and not 2**70
        ids = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):  # below, name a token that is not an integer first
        tokens = sorted(tokens, key=lambda t: bool(re.fullmatch(r"-?[0-9]+", t)))
        ids = np.array([-1], np.int64)
    if ((ids < 0) | (ids >= num_songs)).any():  # `_song_id` is stricter and names the token
        ids = np.array([_song_id(f"{path}:{lineno}", t, num_songs) for t in tokens], np.int64)
    return (ids + 1).astype(np.int32)


def _log_progress(path: str, done: int, total: int, start: float) -> None:
    """Logs `done` of `total` lines with rate and ETA, at most every PROGRESS_SECONDS."""
    if done % PROGRESS_LINES == 0:
        rate = done / max(time.monotonic() - start, 1e-9)
        args = (path, done, total, rate, (total - done) / rate)
        message = "%s: parsed %d of %d lines (%.0f lines/s, ETA %.0f s)"
        logging.log_every_n_seconds(logging.INFO, message, PROGRESS_SECONDS, *args)


def playlist_path(data_dir: str, split: str) -> str:
    """`data_dir/<split>.txt` (Yes.com format), else `data_dir/<split>.csv` if only that exists."""
    txt, csv_path = (os.path.join(data_dir, f"{split}{ext}") for ext in (".txt", ".csv"))
    return csv_path if os.path.exists(csv_path) and not os.path.exists(txt) else txt


def read_playlists(path: str, num_songs: int) -> list[np.ndarray]:
    """Reads a Yes.com `train.txt`/`test.txt`: two header lines, then one playlist per line (a
    path ending in `.csv`: `read_playlists_csv`).

    Returns:
      One int32 array of tokens (song id + 1) per playlist, in file order.
    """
    if path.endswith(".csv"):
        return read_playlists_csv(path, num_songs)
    lines = read_lines(path)
    if not lines:
        raise DataError(f"{path}: file is empty")
    for lineno in (1, 2):
        width = len(lines[lineno - 1].split()) if len(lines) >= lineno else 0
        if width != num_songs:
            raise DataError(
                f"{path}:{lineno}: expected header line {lineno} of {num_songs} numbers (one per "
                f"song in song_hash.txt), got {width}; Yes.com files start with two header lines"
            )
    playlists, start = [], time.monotonic()
    for lineno, line in enumerate(lines[2:], start=3):
        playlists.append(_parse_playlist(path, lineno, line, num_songs))
        _log_progress(path, lineno, len(lines), start)
    if not playlists:
        raise DataError(f"{path}: no playlists after the two header lines")
    return playlists


def _csv_int(path: str, lineno: int, name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{path}:{lineno}: {name} {value!r} is not an integer") from None


def read_playlists_csv(path: str, num_songs: int) -> list[np.ndarray]:
    """Reads `playlist_id,position,song_id` rows (after that header line) into playlists.

    A playlist is all rows with its `playlist_id` (any text), ordered by `position` (integers;
    gaps are fine, repeats are an error); its rows need not be adjacent. Playlists come in the
    order of their first row.

    Returns:
      One int32 array of tokens (song id + 1) per playlist.
    """
    lines = read_lines(path)
    rows = csv.reader(lines)
    header = [h.strip() for h in next(rows, [])]
    if header != list(CSV_HEADER):
        raise DataError(f"{path}:1: expected the header {','.join(CSV_HEADER)}, got {header}")
    playlists: dict[str, dict[int, tuple[int, int]]] = {}  # id -> position -> (song, line)
    start = time.monotonic()
    for fields in rows:
        lineno = rows.line_num
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != 3:
            raise DataError(f"{path}:{lineno}: expected 3 fields {CSV_HEADER}, got {fields}")
        name, position, song = (f.strip() for f in fields)
        position = _csv_int(path, lineno, "position", position)
        song = _song_id(f"{path}:{lineno}", song, num_songs, "song_id")
        rows_of = playlists.setdefault(name, {})
        if position in rows_of:
            raise DataError(
                f"{path}:{lineno}: playlist {name!r} already has position {position} "
                f"(line {rows_of[position][1]})"
            )
        rows_of[position] = (song, lineno)
        _log_progress(path, lineno, len(lines), start)
    if not playlists:
        raise DataError(f"{path}: no playlist rows after the header")
    return [
        np.array([rows_of[p][0] + 1 for p in sorted(rows_of)], np.int32)
        for rows_of in playlists.values()
    ]


def read_song_tags(
    tags_path: str, tag_hash_path: str, num_songs: int
) -> tuple[dict[int, str], list[list[int]]]:
    """(tag id -> name, each song's tag ids): `tags.txt` has one line per song id (tag ids, or
    `#` for none); `tag_hash.txt` has lines `id, name`. DataError naming path:line."""
    names = {}
    for lineno, line in enumerate(read_lines(tag_hash_path), start=1):
        tag_id, sep, name = line.partition(",")
        if not sep or not _ID.fullmatch(tag_id.strip()):
            raise DataError(f"{tag_hash_path}:{lineno}: expected 'id, name', got {line!r}")
        names[int(tag_id)] = name.strip()
    lines = read_lines(tags_path)
    if len(lines) != num_songs:
        expected = f"expected one line per song ({num_songs}, as song_hash.txt)"
        raise DataError(f"{tags_path}: {expected}, got {len(lines)}")
    song_tags = []
    for lineno, line in enumerate(lines, start=1):
        tags = [] if line.strip() == "#" else line.split()
        if not all(_ID.fullmatch(t) and int(t) in names for t in tags):
            raise DataError(f"{tags_path}:{lineno}: a tag id is not in {tag_hash_path}: {line!r}")
        song_tags.append([int(t) for t in tags])
    return names, song_tags


def read_tags(tags_path: str, tag_hash_path: str, num_songs: int) -> tuple[str, ...]:
    """Each song's most common tag (`read_song_tags`): of its tags, the one most songs carry;
    ties go to the lower tag id. Returns one tag name per song id ("" for none)."""
    names, song_tags = read_song_tags(tags_path, tag_hash_path, num_songs)
    counts = collections.Counter(t for tags in song_tags for t in tags)
    return tuple(
        names[min(tags, key=lambda t: (-counts[t], t))] if tags else "" for tags in song_tags
    )


def split_validation(
    playlists: list[np.ndarray], fraction: float, seed: int, tail: bool = False
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Holds out `fraction` of whole playlists for validation: seeded random ones, or with `tail`
    the last ones (for playlists in time order)."""
    n = len(playlists)
    order = np.arange(n)[::-1] if tail else np.random.default_rng(seed).permutation(n)
    n_valid = int(round(fraction * n))
    valid = sorted(order[:n_valid])
    train = sorted(order[n_valid:])
    logging.info("split train.txt: %d train, %d validation playlists", len(train), len(valid))
    return [playlists[i] for i in train], [playlists[i] for i in valid]


def split_by_time(data_dir: str) -> bool:
    """Whether `data_dir/import.json` (written by --mode=import) says test.txt is split by time."""
    path = os.path.join(data_dir, "import.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("split") == "time"
    except FileNotFoundError:
        return False
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: not the JSON object --mode=import writes ({e})") from None


def count_events(playlists: list[np.ndarray]) -> int:
    """Number of (history, next song) events: sum of max(len - 1, 0)."""
    return int(sum(max(len(p) - 1, 0) for p in playlists))


@dataclasses.dataclass(frozen=True)
class Windows:
    """Playlists cut into `num_steps` windows for truncated back-propagation.

    Playlists are sorted by length and grouped into batches of `batch_size` rows (the last batch is
    filled with empty rows); each batch is cut into consecutive windows. The recurrent state is
    carried from one window of a batch to the next and reset where `reset` is true (the first
    window of every batch, i.e. wherever a row starts a new playlist).

    Attributes:
      inputs: int32 [windows, batch, num_steps], tokens (PAD_ID = 0 is padding).
      targets: int32 [windows, batch, num_steps], next song id (0 where padded).
      weights: float32 [windows, batch, num_steps], 0 for padding, else 1 or the playlist's
        recency weight (`make_windows`).
      reset: bool [windows, batch], start every row from a zero state.
      batch_starts: int64 [batches + 1], first window of each batch.
      playlists: number of playlists read, including those without events.
    """

    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    reset: np.ndarray
    batch_starts: np.ndarray
    playlists: int

    @property
    def events(self) -> int:
        return int(np.count_nonzero(self.weights))

    @property
    def num_windows(self) -> int:
        return len(self.inputs)


def make_windows(
    playlists: list[np.ndarray],
    batch_size: int,
    num_steps: int,
    seed: int = 0,
    recency_half_life: float = 0.0,
) -> Windows:
    """Sorts playlists by length (seeded tie-break), batches them and cuts the batches into windows.

    Nothing is dropped: the last partial batch and each row's last partial window are kept and
    padded. Playlists with fewer than two songs give no event and are counted in the log. With a
    `recency_half_life` h > 0, playlist i of n (in time order) weighs 0.5 ** ((n - 1 - i) / (h n)),
    scaled so that the weights of all events still sum to their number.
    """
    age = np.arange(len(playlists))[::-1] / max(len(playlists), 1)
    recency = 0.5 ** (age / recency_half_life) if recency_half_life else np.ones(len(playlists))
    kept = [i for i, p in enumerate(playlists) if len(p) >= 2]
    usable, recency = [playlists[i] for i in kept], recency[kept]
    if len(usable) < len(playlists):
        logging.info("%d playlist(s) with < 2 songs give no events", len(playlists) - len(usable))
    if not usable:
        raise DataError(f"no playlist has 2 or more songs: nothing to learn ({MIN_EVENTS_NOTE})")
    sizes = np.array([len(p) - 1 for p in usable])
    recency *= sizes.sum() / (recency * sizes).sum()
    tiebreak = np.random.default_rng(seed).random(len(usable))
    order = np.lexsort((tiebreak, [len(p) for p in usable]))
    parts, starts = [], [0]
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        n_windows = -(-(max(len(usable[i]) for i in rows) - 1) // num_steps)
        grid = np.zeros((batch_size, n_windows * num_steps + 1), np.int32)
        row_weight = np.zeros((batch_size, 1), np.float32)
        for r, i in enumerate(rows):
            grid[r, : len(usable[i])], row_weight[r] = usable[i], recency[i]
        parts.append((grid, row_weight))
        starts.append(starts[-1] + n_windows)
    inputs, targets, weights = [], [], []
    for grid, row_weight in parts:
        shape = (batch_size, -1, num_steps)
        inputs.append(grid[:, :-1].reshape(shape).transpose(1, 0, 2))
        targets.append(grid[:, 1:].reshape(shape).transpose(1, 0, 2))
        weights.append(((grid[:, 1:] != PAD_ID) * row_weight).reshape(shape).transpose(1, 0, 2))
    inputs, targets = np.concatenate(inputs), np.concatenate(targets)
    reset = np.zeros(inputs.shape[:2], bool)
    reset[starts[:-1]] = True
    return Windows(
        inputs=inputs,
        targets=np.maximum(targets - 1, 0),
        weights=np.concatenate(weights).astype(np.float32),
        reset=reset,
        batch_starts=np.asarray(starts, np.int64),
        playlists=len(playlists),
    )


def schedule(windows: Windows, num_epochs: int, seed: int) -> np.ndarray:
    """Window order for a whole run: per epoch, batches in a seeded shuffled order.

    Windows of one batch stay consecutive and in order so the state can be carried. Epoch `e`
    depends only on (`seed`, `e`), so a resumed run continues with the same data order.
    """
    starts = windows.batch_starts
    epochs = []
    for epoch in range(num_epochs):
        batches = np.random.default_rng([seed, epoch]).permutation(len(starts) - 1)
        epochs.append(np.concatenate([np.arange(starts[b], starts[b + 1]) for b in batches]))
    return np.concatenate(epochs)


TRIM_STEPS = 5  # windows are cut to a multiple of this many steps: few distinct XLA shapes


def used_steps(windows: Windows) -> np.ndarray:
    """int32 [windows]: steps up to each window's last real event, rounded up to `TRIM_STEPS`.
    Only a batch's last window ends early, and what it loses is padding in every row."""
    num_steps = windows.inputs.shape[-1]
    real = (windows.weights > 0).any(axis=1)  # [windows, num_steps]
    last = num_steps - np.argmax(real[:, ::-1], axis=-1)
    return np.minimum(-(-last // TRIM_STEPS) * TRIM_STEPS, num_steps).astype(np.int32)


def to_dataset(
    windows: Windows,
    order: np.ndarray | None = None,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """A `tf.data` pipeline of `((inputs, reset), targets, weights)` windows in `order`.

    With the `input_context` of `tf.distribute.Strategy.distribute_datasets_from_function`, the
    pipeline of worker `p` with `L` local replicas yields, for every window in `order`, one element
    per local replica `r = p * L + j` (j = 0..L-1): rows `[r * b, (r + 1) * b)` of the window, with
    `b = batch / replicas`. Replica `r` thus always gets the same rows (playlists), whose carried
    state it keeps (see `MusicModel.call`), and every worker walks through the same windows.
    """
    order = np.arange(windows.num_windows) if order is None else order
    arrays = (windows.inputs, windows.reset, windows.targets, windows.weights)
    tensors = tuple(tf.constant(a) for a in arrays)
    lengths = tf.constant(used_steps(windows))
    rows, local = windows.inputs.shape[1], np.zeros(1, np.int64)
    if input_context is not None:
        per_worker = input_context.num_replicas_in_sync // input_context.num_input_pipelines
        local = input_context.input_pipeline_id * per_worker + np.arange(per_worker)
        rows = input_context.get_per_replica_batch_size(rows)

    def pick(i, replica):
        first, steps = replica * rows, tf.gather(lengths, i)
        inputs, reset, targets, weights = (tf.gather(t, i)[first : first + rows] for t in tensors)
        inputs, targets, weights = (t[:, :steps] for t in (inputs, targets, weights))
        if input_context is not None:  # Keras averages a first batch over replicas: no bools
            reset = tf.cast(reset, tf.float32)
        return (inputs, reset), targets, weights

    indices = (np.repeat(order, len(local)), np.tile(local, len(order)))
    return (
        tf.data.Dataset.from_tensor_slices(tuple(a.astype(np.int64) for a in indices))
        .map(pick, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


@dataclasses.dataclass(frozen=True)
class YesData:
    """A Yes.com directory read and split: catalog plus train/validation/test playlists."""

    catalog: Catalog
    train: list[np.ndarray]
    valid: list[np.ndarray]
    test: list[np.ndarray]


def load(data_dir: str, valid_fraction: float, seed: int, valid_split: str = "auto") -> YesData:
    """Reads song_hash.txt, train and test (.txt or .csv) of `data_dir`; splits off validation
    (`--valid_split`: random, tail, or auto = tail if `split_by_time(data_dir)`)."""
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: data directory not found")
    catalog = read_catalog(os.path.join(data_dir, "song_hash.txt"))
    train_path = playlist_path(data_dir, "train")
    train = read_playlists(train_path, catalog.size)
    if not count_events(train):
        raise DataError(
            f"{train_path}: no playlist has 2 or more songs: nothing to learn ({MIN_EVENTS_NOTE})"
        )
    test = read_playlists(playlist_path(data_dir, "test"), catalog.size)
    tail = valid_split == "tail" or (valid_split == "auto" and split_by_time(data_dir))
    train, valid = split_validation(train, valid_fraction, seed, tail)
    for name, split in (("train", train), ("validation", valid), ("test", test)):
        logging.info("%s: %d playlists, %d events", name, len(split), count_events(split))
    return YesData(catalog, train, valid, test)
