"""Serving: the `tf.function`s behind `--mode=recommend`, `--mode=serve` and the SavedModel export.

`ranking_function` scores whole histories (k per call), `serving_function` with a fixed k;
`step_function` one added song from carried state.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

import config as config_lib
import names
import yes_reader
from errors import ConfigError, DataError
from musicmodel import MusicModel


def next_power_of_two(n):
    """The smallest power of two >= n, for int32 n >= 1 (bit smearing of n - 1)."""
    n = n - 1
    for shift in (1, 2, 4, 8, 16):
        n = tf.bitwise.bitwise_or(n, tf.bitwise.right_shift(n, shift))
    return n + 1


SERVE_WIDTH_STEP = 4  # histories are padded to a multiple of 4 songs for XLA
CHECKS = (  # what `input_error` tests, in order; its code i > 0 names CHECKS[i - 1]
    "every length must be >= 1",
    "a length exceeds the history width",
    "song ids must be >= 0",
    "a song id is not in the catalog",
    "k must be >= 1",
    "k exceeds the catalog size",
)
HISTORY_SIGNATURE = [
    tf.TensorSpec([None, None], tf.int32, name="history"),
    tf.TensorSpec([None], tf.int32, name="length"),
]


def input_error(history, length, width, k, num_songs: int):
    """0 if a request is valid, else 1 + the index in `CHECKS` of its first failed check (int32
    []); `width` is the history's width before `padded_request`. Computed inside the XLA
    program: one TF op per check would cost more than the model."""
    songs = tf.where(tf.sequence_mask(length, tf.shape(history)[1]), history, 0)  # not padding
    failed = tf.stack(
        [
            tf.reduce_any(length < 1),
            tf.reduce_any(length > width),
            tf.reduce_any(songs < 0),
            tf.reduce_any(songs >= num_songs),
            k < 1,
            k > num_songs,
        ]
    )
    first = tf.argmax(tf.cast(failed, tf.int32), output_type=tf.int32)
    return tf.where(tf.reduce_any(failed), first + 1, 0)


def checked(error, outputs: dict) -> dict:
    """`outputs`, available only after an assertion that `error` (of `input_error`) is 0."""
    message = tf.gather(tf.constant(("",) + CHECKS), error)
    with tf.control_dependencies([tf.debugging.Assert(tf.equal(error, 0), [message])]):
        return {name: tf.identity(value) for name, value in outputs.items()}


def padded_request(history, length) -> tuple:
    """(history, length, width before padding), padded to the few shapes XLA compiles for: the
    batch to a power of two (rows of song 0, length 1), the width to a multiple of
    `SERVE_WIDTH_STEP`."""
    batch, width = tf.shape(history)[0], tf.shape(history)[1]
    rows, columns = next_power_of_two(batch) - batch, -width % SERVE_WIDTH_STEP
    history = tf.pad(history, [[0, rows], [0, columns]])
    return history, tf.pad(length, [[0, rows]], constant_values=1), width


def history_logits(model: MusicModel, exclude_history: bool, history, length) -> tuple:
    """(logits [batch, songs] after each history's last song, logsumexp [batch, 1]), traced
    inside XLA. The whole history runs from a zero state (no carried variables are read or
    written); with `exclude_history` its songs get -inf (only padding scatters into column 0,
    with +inf: a no-op)."""
    tokens = tf.where(
        tf.sequence_mask(length, tf.shape(history)[1]), history + 1, yes_reader.PAD_ID
    )
    queries, _ = model.features(tokens, model.zero_state(tf.shape(tokens)[0]))
    last = tf.gather(queries, length - 1, batch_dims=1)  # only the last song is scored
    repeat = None
    if model.repeat is not None:  # the bias of each history song at the last position
        repeat = (tokens, model.repeat.bias(tokens, (length - 1)[:, None])[:, 0])
    logits = model.scores(last, tf.gather(tokens, length - 1, batch_dims=1), repeat)
    log_norm = tf.reduce_logsumexp(logits, -1, keepdims=True)
    if exclude_history:  # song t - 1 of token t
        rows = tf.broadcast_to(tf.range(tf.shape(tokens)[0])[:, None], tf.shape(tokens))
        where = tf.stack([rows, tf.maximum(tokens - 1, 0)], -1)
        logits = tf.tensor_scatter_nd_min(logits, where, tf.where(tokens > 0, -np.inf, np.inf))
    return logits, log_norm


def probabilities(top, log_norm):
    """exp(logit - logsumexp) of the ranked logits; -1 for an excluded song (-inf)."""
    return tf.where(top > -np.inf, tf.exp(top - log_norm), -1.0)


def ranking_function(
    model: MusicModel, exclude_history: bool
) -> tf.types.experimental.GenericFunction:
    """The next `k` songs after each history, `k` given per call, as a `tf.function`.

    Validation, the recurrent pass and the scoring run as one XLA program (TF's graph executor
    pays a per-op cost that dominates a 20-step LSTM at batch 1; docs/results.md has the
    figures). The logits themselves are ranked: only the top `k` become probabilities, so no
    [batch, songs] softmax or mask is written. XLA compiles once per input shape, so requests
    are padded to a few shapes first (`padded_request`); padding after a history's last song
    does not change its scores (the model reads left to right). The top `k` are taken after the
    compiled part, so any `k` costs no new compilation. A hot loop calls its
    `get_concrete_function()`, which skips the Python-side matching of the signature (as the
    export's signatures do; docs/results.md).

    Args of the returned function:
      history: int32 [batch, time], song ids (0-based, as in song_hash.txt), oldest first;
        entries at positions >= length are padding and ignored.
      length: int32 [batch], songs in each history, 1 <= length <= time.
      k: int32 [], songs returned per history, 1 <= k <= the catalog size.

    Returns of the returned function:
      {"song_ids": int32 [batch, k] best first, "scores": float32 [batch, k] the model's
      probability that the song comes next}; with `exclude_history`, songs of the history are
      never returned (unless fewer than `k` other songs exist; their score is then -1). An
      invalid request raises `tf.errors.InvalidArgumentError` naming the check (`CHECKS`).
    """

    @tf.function(jit_compile=True)
    def ranked_logits(history, length, width, k):
        logits, log_norm = history_logits(model, exclude_history, history, length)
        return logits, log_norm, input_error(history, length, width, k, model.num_songs)

    @tf.function(input_signature=[*HISTORY_SIGNATURE, tf.TensorSpec([], tf.int32, name="k")])
    def recommend(history, length, k):
        batch = tf.shape(history)[0]
        logits, log_norm, error = ranked_logits(*padded_request(history, length), k)
        valid = checked(error, {"logits": logits[:batch]})
        top, song_ids = tf.math.top_k(valid["logits"], k)
        return {"song_ids": song_ids, "scores": probabilities(top, log_norm[:batch])}

    return recommend


def serving_function(
    model: MusicModel, top_k: int, exclude_history: bool
) -> tf.types.experimental.GenericFunction:
    """`ranking_function` with `k` fixed at `top_k`, the ranking inside the XLA program too:
    the signature takes `history` and `length` only and returns [batch, top_k] (the export's
    `serving_default`)."""

    @tf.function(jit_compile=True)
    def ranked(history, length, width):
        logits, log_norm = history_logits(model, exclude_history, history, length)
        top, song_ids = tf.math.top_k(logits, top_k)
        error = input_error(history, length, width, top_k, model.num_songs)
        return song_ids, probabilities(top, log_norm), error

    @tf.function(input_signature=HISTORY_SIGNATURE)
    def recommend(history, length):
        batch = tf.shape(history)[0]
        song_ids, scores, error = ranked(*padded_request(history, length))
        return checked(error, {"song_ids": song_ids[:batch], "scores": scores[:batch]})

    return recommend


def step_function(model: MusicModel, top_k: int) -> tf.types.experimental.GenericFunction:
    """Incremental scoring: the next `top_k` songs after one more song, from the carried state.

    A client keeps the returned `state` of a history and sends only the song the user adds, so a
    request costs one time step instead of the whole history. The step is XLA-compiled (once per
    batch size).

    Args of the returned function:
      song: int32 [batch, 1], the added song id (0-based, as in song_hash.txt).
      state: float32 [num_layers, parts, batch, hidden_size] (parts: LSTM h, c; GRU h), the state
        after the history so far: zeros for an empty history, else the `state` last returned.

    Returns of the returned function:
      {"song_ids": int32 [batch, top_k] best first, "scores": float32 [batch, top_k] next-song
      probabilities, "state": the new state, same shape as `state`}.
    """
    parts = 2 if model.cell == "lstm" else 1

    @tf.function(jit_compile=True)
    def one_step(song, state):
        states = [tf.unstack(layer) for layer in tf.unstack(state)]
        logits, finals = model.forward(song + 1, states)
        scores, song_ids = tf.math.top_k(tf.nn.softmax(logits[:, -1]), top_k)
        error = input_error(song, tf.ones_like(song[:, 0]), 1, top_k, model.num_songs)
        new_state = tf.cast(tf.stack([tf.stack(f) for f in finals]), tf.float32)
        return {"song_ids": song_ids, "scores": scores, "state": new_state}, error

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 1], tf.int32, name="song"),
            tf.TensorSpec([model.num_layers, parts, None, model.hidden_size], tf.float32, "state"),
        ]
    )
    def step(song, state):
        outputs, error = one_step(song, state)
        return checked(error, outputs)

    return step


def checked_serving_function(config: config_lib.Config, model: MusicModel):
    """The serving `tf.function` with --top_k (at most the catalog size) and --exclude_history."""
    if config.top_k > model.num_songs:
        raise ConfigError(f"--top_k={config.top_k}: the model scores only {model.num_songs} songs")
    return serving_function(model, config.top_k, config.exclude_history)


def song_index(data_dir: str, catalog: yes_reader.Catalog) -> names.SongIndex:
    """The catalog of `data_dir` by name, with the external keys of its song_keys.txt if any."""
    return names.SongIndex(catalog.titles, catalog.artists, names.read_keys(data_dir, catalog.size))


def pad_histories(histories: list) -> tuple[np.ndarray, np.ndarray]:
    """Song-id histories as (padded int32 [n, longest], lengths int32 [n]): the serving input."""
    length = np.array([len(h) for h in histories], np.int32)
    padded = np.zeros((len(histories), length.max()), np.int32)
    for row, history in enumerate(histories):
        padded[row, : len(history)] = history
    return padded, length


def read_history_lines(
    path: str, parse: Callable[[str, str], list[int]]
) -> list[tuple[int, list[int]]]:
    """One history per non-blank line of `path`, with its line number; `parse(line, "path:n")`
    turns a line into song ids (e.g. `names.SongIndex.parse_history`)."""
    histories = [
        (lineno, parse(line, f"{path}:{lineno}"))
        for lineno, line in enumerate(yes_reader.read_lines(path), start=1)
        if line.strip()
    ]
    if not histories:
        raise DataError(f"{path}: no histories (one per line: songs, oldest first)")
    return histories


def read_histories(
    config: config_lib.Config, index: names.SongIndex
) -> list[tuple[str, list[int]]]:
    """(label, song ids) of --history or of each line of --history_file: songs by title, "title
    - artist", catalog id or external key, comma-separated (`names.split_entries`)."""
    if config.history_file:
        lines = read_history_lines(
            config.history_file, lambda line, where: index.parse_history(line, where, DataError)
        )
        return [(f"{config.history_file}:{n}", ids) for n, ids in lines]
    if not config.history:
        raise ConfigError("--mode=recommend needs --history or --history_file")
    return [("--history", index.parse_history(config.history, f"--history={config.history}"))]


def print_recommendations(
    label: str,
    history: list[int],
    ids: np.ndarray,
    scores: np.ndarray,
    catalog: yes_reader.Catalog,
) -> None:
    """Prints the history's last song, then rank, song id, probability, title, artist per row."""
    last, titles = history[-1], catalog.titles
    print(
        f"{label}: {len(history)} songs, the last {last}: {titles[last]} ({catalog.artists[last]})"
    )
    width = max(len(catalog.titles[i]) for i in ids)
    print(f"{'rank':>4}  {'song_id':>7}  {'probability':>11}  {'title':<{width}}  artist")
    for rank, (song, score) in enumerate(zip(ids, scores, strict=True), start=1):
        title, artist = catalog.titles[song], catalog.artists[song]
        print(f"{rank:>4}  {song:>7}  {score:>11.5f}  {title:<{width}}  {artist}")


def print_songs(songs: list[int], catalog: yes_reader.Catalog) -> None:
    """Prints song id, title and artist per row (the `--mode=search` table)."""
    if not songs:
        print("no song matches")
        return
    width = max(len(catalog.titles[i]) for i in songs)
    print(f"{'song_id':>7}  {'title':<{width}}  artist")
    for song in songs:
        print(f"{song:>7}  {catalog.titles[song]:<{width}}  {catalog.artists[song]}")
