"""Where a training's song rows start: `--init_from` (another run's weights, catalog rows matched
by song key), `--song_init=cooccurrence` (the songs' co-occurrence in the training playlists) and
`--bias_init=popularity` (the songs' training counts)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from absl import logging

import config as config_lib
from errors import ConfigError
from musicmodel import MusicModel
from neighbours import song_pairs


def copy_matching_rows(new: np.ndarray, old: np.ndarray, rows: np.ndarray, axis: int) -> None:
    """Sets `new`'s song slices along `axis` to `old`'s: slice s of `new` takes slice `rows[s]`
    of `old`; `rows[s] < 0` (a song `old` did not have) keeps its own."""
    shared = np.flatnonzero(rows >= 0)
    index = [slice(None)] * new.ndim
    index[axis] = shared
    source = [slice(None)] * old.ndim
    source[axis] = rows[shared]
    new[tuple(index)] = old[tuple(source)]


def init_from(
    model: MusicModel, old: MusicModel, old_keys: list[str], keys: list[str], where: str
) -> int:
    """Starts `model` from `old`'s weights, matching catalog rows by song key.

    A song of `keys` that is in `old_keys` (the first such, if `old_keys` repeats one) gets its
    embedding row and output column and bias. A new song keeps `model`'s fresh embedding row; its
    output column is zero and its bias the lowest of `old` (it scores as the rarest known song
    until trained), so new songs take little probability from the known ones and the model
    starts where `old` ended. Every other trainable weight (recurrent layers, the tied model's
    projection) is copied as it is. The carried state and the optimizer start fresh.

    Returns:
      How many songs of `keys` kept their weights.

    Raises:
      ConfigError naming `where` (the flag) if a model setting differs or a shape does not fit.
    """
    settings = ("cell", "num_layers", "embedding_size", "hidden_size", "tie_embeddings")
    for name in (*settings, "side_features", "num_tags", "transition", "repeat_window"):  # weights
        if getattr(model, name) != getattr(old, name):
            raise ConfigError(
                f"{where}: that model has {name}={getattr(old, name)}, this run "
                f"{getattr(model, name)}; give the same settings"
            )
    index: dict[str, int] = {}
    for i, key in enumerate(old_keys):
        index.setdefault(key, i)
    rows = np.array([index.get(key, -1) for key in keys])
    song_axes = {id(model.embedding.embeddings): (0, 1)}  # (axis, offset): row 0 is padding
    if model.tie_embeddings:
        song_axes[id(model.output_bias)] = (0, 0)
    else:
        song_axes.update({id(model.head.kernel): (1, 0), id(model.head.bias): (0, 0)})
    for new_var, old_var in zip(model.trainable_weights, old.trainable_weights, strict=True):
        value, source = np.array(new_var.numpy()), old_var.numpy()
        if id(new_var) in song_axes:
            axis, offset = song_axes[id(new_var)]
            padding = np.arange(offset)  # the padding row maps to itself
            copy_matching_rows(value, source, np.r_[padding, rows + (rows >= 0) * offset], axis)
            if id(new_var) != id(model.embedding.embeddings):  # output column and bias
                new_songs = [slice(None)] * value.ndim
                new_songs[axis] = np.flatnonzero(rows < 0)
                value[tuple(new_songs)] = source.min() if value.ndim == 1 else 0.0
        elif value.shape == source.shape:
            value = source
        else:
            raise ConfigError(
                f"{where}: weight {old_var.path} has shape {source.shape} there, {value.shape} here"
            )
        new_var.assign(value)
    return int((rows >= 0).sum())


COOCCURRENCE_WINDOW = 2  # songs up to 2 positions apart in a playlist co-occur
COOCCURRENCE_STD = 0.05  # the rows' spread (Keras' uniform init of the table: 0.029)


def cooccurrence_rows(
    playlists: Sequence[np.ndarray], num_songs: int, dims: int, seed: int
) -> np.ndarray:
    """float32 [num_songs, dims]: song s's row of a rank-`dims` factorisation of the songs'
    positive PMI, so songs that occur near each other start near each other.

    Counts n_ab of songs a, b at most `COOCCURRENCE_WINDOW` positions apart in a token playlist
    (token = song id + 1), both ways; PPMI = max(0, log(n_ab n / (n_a c_b))), the context
    counts c smoothed to the power 0.75 (Levy, Goldberg and Dagan 2015, "Improving
    distributional similarity with lessons learned from word embeddings"). Rows: U sqrt(S) of a
    randomized truncated SVD (Halko, Martinsson and Tropp 2011; 2 power iterations), scaled to
    standard deviation `COOCCURRENCE_STD`. A song that co-occurs with none gets a zero row.
    """
    a, b, _ = song_pairs(playlists, COOCCURRENCE_WINDOW)
    counts = sp.coo_matrix(
        (np.ones(2 * len(a), np.float64), (np.r_[a, b], np.r_[b, a])), (num_songs, num_songs)
    ).tocsr()  # duplicates summed
    rows, columns = counts.nonzero()
    n_a = np.asarray(counts.sum(1)).ravel()
    context = n_a**0.75
    pmi = np.log(counts.data * context.sum() / (n_a[rows] * context[columns]))
    ppmi = sp.csr_matrix((np.maximum(pmi, 0.0), (rows, columns)), counts.shape)
    rng = np.random.default_rng(seed)
    basis = ppmi @ rng.standard_normal((num_songs, min(dims + 20, num_songs)))
    for _ in range(2):  # power iterations (PPMI is symmetric)
        basis = ppmi @ (ppmi @ np.linalg.qr(basis)[0])
    basis = np.linalg.qr(basis)[0]
    u, s, _ = np.linalg.svd((ppmi @ basis).T, full_matrices=False)
    out = np.zeros((num_songs, dims), np.float32)
    vectors = (basis @ u[:, :dims]) * np.sqrt(s[:dims])
    out[:, : vectors.shape[1]] = vectors
    spread = out.std()
    return out * (COOCCURRENCE_STD / spread) if spread > 0 else out


def init_songs(
    model: MusicModel, config: config_lib.Config, playlists: Sequence[np.ndarray]
) -> None:
    """With `--song_init=cooccurrence`, sets the song rows of `model`'s embedding table (rows 1...;
    with `--tie_embeddings` also its output rows) to `cooccurrence_rows` of the training token
    `playlists`; the padding row stays."""
    if config.song_init != "cooccurrence":
        return
    table = model.embedding.embeddings
    rows = cooccurrence_rows(playlists, model.num_songs, table.shape[1], config.seed)
    table.assign(np.concatenate([table.numpy()[:1], rows]))
    logging.info("song rows initialised from co-occurrence in the training playlists")


def init_bias(model: MusicModel, config: config_lib.Config, counts: np.ndarray) -> None:
    """With `--bias_init=popularity`, sets `model`'s output bias of song s to log(counts[s] + 1)
    less its mean over the songs (`counts`: training events per song): a query of zeros then
    scores the songs by their add-one popularity. A small log's few hundred updates move a bias
    about the learning rate each, far less than the spread of its songs' log counts."""
    if config.bias_init != "popularity":
        return
    bias = model.output_bias if model.tie_embeddings else model.head.bias
    log_counts = np.log(np.asarray(counts, np.float64) + 1.0)
    bias.assign((log_counts - log_counts.mean()).astype(np.float32))
    logging.info("song output biases initialised from the training popularity")
