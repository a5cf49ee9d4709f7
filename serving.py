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


def ranking_function(
    model: MusicModel, exclude_history: bool
) -> tf.types.experimental.GenericFunction:
    """The next `k` songs after each history, `k` given per call, as a `tf.function`.

    The whole history runs through `model.features` from a zero state (no carried variables are
    read or written) and only the output after its last song is scored and ranked. That scoring
    is XLA-compiled (TF's graph executor pays a per-op cost that dominates a 20-step LSTM at
    batch 1; docs/results.md has the figures) and ranks the logits themselves: the songs of the
    history get -inf and only the top `k` become probabilities, exp(logit - logsumexp(all
    logits)), so no [batch, songs] softmax or mask is written. XLA compiles once per input
    shape, so requests are padded to a few shapes first: the batch to a power of two, the
    history width to a multiple of `SERVE_WIDTH_STEP`. Padding after a history's last song does
    not change its scores (the model reads left to right). The top `k` are taken after the
    compiled part, so any `k` costs no new compilation.

    Args of the returned function:
      history: int32 [batch, time], song ids (0-based, as in song_hash.txt), oldest first;
        entries at positions >= length are padding and ignored.
      length: int32 [batch], songs in each history, 1 <= length <= time.
      k: int32 [], songs returned per history, 1 <= k <= the catalog size.

    Returns of the returned function:
      {"song_ids": int32 [batch, k] best first, "scores": float32 [batch, k] the model's
      probability that the song comes next}; with `exclude_history`, songs of the history are
      never returned (unless fewer than `k` other songs exist; their score is then -1).
    """
    num_songs = model.num_songs

    @tf.function(jit_compile=True)
    def ranked_songs(tokens, length):
        queries, _ = model.features(tokens, model.zero_state(tf.shape(tokens)[0]))
        last = tf.gather(queries, length - 1, batch_dims=1)  # only the last song is scored
        last_songs = tf.gather(tokens, length - 1, batch_dims=1)
        logits = model.scores(last, last_songs)  # [batch, songs]; ranked as they are
        log_norm = tf.reduce_logsumexp(logits, -1, keepdims=True)
        if exclude_history:  # song t - 1 of token t gets -inf; padding (token 0) keeps column 0
            rows = tf.broadcast_to(tf.range(tf.shape(tokens)[0])[:, None], tf.shape(tokens))
            where = tf.stack([rows, tf.maximum(tokens - 1, 0)], -1)
            logits = tf.tensor_scatter_nd_min(logits, where, tf.where(tokens > 0, -np.inf, np.inf))
        return logits, log_norm

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.int32, name="history"),
            tf.TensorSpec([None], tf.int32, name="length"),
            tf.TensorSpec([], tf.int32, name="k"),
        ]
    )
    def recommend(history, length, k):
        batch, width = tf.shape(history)[0], tf.shape(history)[1]
        valid = tf.sequence_mask(length, width)
        songs = tf.boolean_mask(history, valid)
        checks = [
            tf.debugging.assert_positive(length, message="every length must be >= 1"),
            tf.debugging.assert_less_equal(
                length, width, message="a length exceeds the history width"
            ),
            tf.debugging.assert_non_negative(songs, message="song ids must be >= 0"),
            tf.debugging.assert_less(songs, num_songs, message="a song id is not in the catalog"),
            tf.debugging.assert_positive(k, message="k must be >= 1"),
            tf.debugging.assert_less_equal(k, num_songs, message="k exceeds the catalog size"),
        ]
        with tf.control_dependencies(checks):
            tokens = tf.where(valid, history + 1, yes_reader.PAD_ID)
        rows = next_power_of_two(batch) - batch
        columns = -width % SERVE_WIDTH_STEP
        tokens = tf.pad(tokens, [[0, rows], [0, columns]], constant_values=yes_reader.PAD_ID)
        length = tf.pad(length, [[0, rows]], constant_values=1)
        logits, log_norm = ranked_songs(tokens, length)
        top, song_ids = tf.math.top_k(logits[:batch], k)
        scores = tf.where(top > -np.inf, tf.exp(top - log_norm[:batch]), -1.0)
        return {"song_ids": song_ids, "scores": scores}

    return recommend


def serving_function(
    model: MusicModel, top_k: int, exclude_history: bool
) -> tf.types.experimental.GenericFunction:
    """`ranking_function` with `k` fixed at `top_k`: the signature takes `history` and `length`
    only and returns [batch, top_k] (the export's `serving_default`)."""
    ranked = ranking_function(model, exclude_history)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.int32, name="history"),
            tf.TensorSpec([None], tf.int32, name="length"),
        ]
    )
    def recommend(history, length):
        return ranked(history, length, tf.constant(top_k, tf.int32))

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
    def one_step(tokens, state):
        states = [tf.unstack(layer) for layer in tf.unstack(state)]
        logits, finals = model.forward(tokens, states)
        scores, song_ids = tf.math.top_k(tf.nn.softmax(logits[:, -1]), top_k)
        return {
            "song_ids": song_ids,
            "scores": scores,
            "state": tf.cast(tf.stack([tf.stack(f) for f in finals]), tf.float32),
        }

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 1], tf.int32, name="song"),
            tf.TensorSpec([model.num_layers, parts, None, model.hidden_size], tf.float32, "state"),
        ]
    )
    def step(song, state):
        checks = [
            tf.debugging.assert_non_negative(song, message="song ids must be >= 0"),
            tf.debugging.assert_less(
                song, model.num_songs, message="a song id is not in the catalog"
            ),
        ]
        with tf.control_dependencies(checks):
            tokens = song + 1
        return one_step(tokens, state)

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
