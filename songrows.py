"""`SideRows`: the artist and tag rows that `musicmodel.MusicModel` adds to a song's own rows
(`--side_features`), so that a song never seen in training still has a vector and a bias."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

import kernels
from errors import ConfigError

UNSEEN_LOGIT = -1e9  # added in training to the logits of songs that are never a training target
OWN_ROW_DROPOUT = 0.5  # a song's own rows are dropped in a training step this often


def check_side_features(side_features: str, softmax: str, tie_embeddings: bool) -> None:
    """Raises `ConfigError` naming --side_features unless "none" or with tied rows, full softmax;
    "auto" must have been decided on the data first (`coldstart.resolve_side_features`)."""
    if side_features == "auto":
        raise ConfigError("--side_features=auto: decided by --mode=train on the data; not here")
    if side_features != "none" and (softmax != "full" or not tie_embeddings):
        raise ConfigError(
            f"--side_features={side_features}: needs --tie_embeddings and --softmax=full"
        )


class SideRows(keras.layers.Layer):
    """Song rows built from side features: own row + artist row (+ the mean of the tag rows).

    The song -> artist table (int32 [songs]), the song -> tag means (float32 [songs, tags]: 1/n at
    a song's n tags) and the unseen mask (1 for songs with no training events, left out of the
    training softmax) are non-trainable weights: given at construction, or loaded with the model.
    """

    def __init__(
        self, num_songs: int, num_artists: int, num_tags: int, dims: int,
        artists: np.ndarray | None = None, tags: np.ndarray | None = None,
        counts: np.ndarray | None = None, **kwargs,
    ):  # fmt: skip
        super().__init__(**kwargs)
        self.num_songs, self.num_tags = num_songs, num_tags
        self.seed = keras.random.SeedGenerator(0)
        self.artist = kernels.fixed_weight(self, "song_artist", (num_songs,), "int32", artists)
        unseen = None if counts is None else np.asarray(counts) == 0
        self.unseen = kernels.fixed_weight(self, "unseen", (num_songs,), "float32", unseen)
        self.artist_vectors = self.rows("artist_vectors", (num_artists, dims), "uniform")
        self.artist_bias = self.rows("artist_bias", (num_artists,))
        if num_tags:
            self.tags = kernels.fixed_weight(
                self, "song_tags", (num_songs, num_tags), "float32", tags
            )
            self.tag_vectors = self.rows("tag_vectors", (num_tags, dims), "uniform")
            self.tag_bias = self.rows("tag_bias", (num_tags, 1))
        self.built = True

    def rows(self, name: str, shape: tuple, initializer: str = "zeros") -> keras.Variable:
        """Trainable rows (vectors: "uniform" in ±0.05, as `keras.layers.Embedding`)."""
        return self.add_weight(shape=shape, initializer=initializer, name=name)

    def combine(self, vectors, bias, training: bool = False) -> tuple:
        """(vectors float32 [songs, dims], bias float32 [songs]): the songs' own rows plus their
        side rows; in training each song's own rows are dropped with `OWN_ROW_DROPOUT`, so the
        side rows learn to score a song alone, as they must for a song new to the catalog."""
        if training:
            draw = keras.random.uniform((self.num_songs,), seed=self.seed)
            keep = ops.cast(draw >= OWN_ROW_DROPOUT, "float32")
            vectors, bias = vectors * keep[:, None], bias * keep
        vectors = vectors + ops.take(self.artist_vectors, self.artist, axis=0)
        bias = bias + ops.take(self.artist_bias, self.artist, axis=0)
        if self.num_tags:
            vectors = vectors + ops.matmul(self.tags, self.tag_vectors)
            bias = bias + ops.matmul(self.tags, self.tag_bias)[:, 0]
        return vectors, bias
