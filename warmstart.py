"""`--init_from`: a training that starts from another run's weights, catalog rows matched by
song key (moved here from `musicmodel.py`, which was at its line limit)."""

from __future__ import annotations

import numpy as np

from errors import ConfigError
from musicmodel import MusicModel


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
    for name in (*settings, "side_features", "num_tags", "transition"):  # the last 3 add weights
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
