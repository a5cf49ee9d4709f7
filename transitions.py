"""`--transition=markov`: a first-order transition component inside the next-song model.

The model's distribution becomes a per-event mixture, trained end to end (issue 17):

    p(j | history) = g p_rnn(j) + (1 - g) q(j | a),   a = the last song of the history,
    q(j | a) = (n_aj + β p_pop(j)) / (n_a + β),
    g = sigmoid(w · [query, log(1 + n_a)] + b),

p_rnn the model's softmax, n_aj the training transitions a -> j among the `width` most frequent
successors of a, n_a their sum, p_pop add-one smoothed popularity, β > 0 and the gate (w, b)
learned with the network. In training each event leaves itself out of the counts (n_aj - 1,
n_a - 1): the gate learns how far other playlists' transitions predict a next song, as they
must for a history the counts have never seen. The tables (`baselines.successor_table`) are
non-trainable weights of the model, so evaluation and serving need nothing else.

`--transition=markov_artist` smooths with the last song's artist as well (a catalog that moves:
new songs, often by the artist just played, have no transitions of their own):

    q(j | a) = (n_aj + β prior(j | a)) / (n_a + β),
    prior(j | a) = (1 - ρ) p_pop(j) + ρ [artist(j) = artist(a)] p_pop(j) / p_pop(artist(a)),

ρ = sigmoid(r) learned, p_pop(artist) the add-one popularity of the artist's songs summed
(`baselines.artist_ids` groups them). After a song with no transitions q is the prior itself.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

import kernels
from errors import ConfigError
from flagspec import TRANSITIONS

INITIAL_BETA = 10.0  # the Markov baseline's grid chooses β of the order 1-100 on the shipped data


def check_transition(transition: str) -> None:
    """Raises `ConfigError` naming --transition unless one of `TRANSITIONS`."""
    if transition not in TRANSITIONS:
        raise ConfigError(f"--transition={transition!r}: must be one of {', '.join(TRANSITIONS)}")


class TransitionMixture(keras.layers.Layer):
    """The transition counts, β and the gate of the mixture above (module docstring)."""

    def __init__(
        self, num_songs: int, width: int, dims: int, tables: dict | None = None,
        artists: bool = False, **kwargs,
    ):  # fmt: skip
        super().__init__(**kwargs)
        tables = tables or {}
        shape = (num_songs + 1, width)
        self.successors = kernels.fixed_weight(
            self, "successors", shape, "int32", tables.get("successors")
        )
        self.counts = kernels.fixed_weight(self, "counts", shape, "float32", tables.get("counts"))
        self.popularity = kernels.fixed_weight(
            self, "popularity", (num_songs,), "float32", tables.get("popularity")
        )
        self.log_beta = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(np.log(INITIAL_BETA)), name="log_beta"
        )
        self.gate = layers.Dense(1, kernel_initializer="zeros", name="gate", dtype="float32")
        self.gate.build((None, dims + 1))
        self.artists = None
        if artists:  # token-indexed: row 0, padding, is no artist's
            self.artists = kernels.fixed_weight(
                self, "artists", (num_songs + 1,), "int32", tables.get("artists")
            )
            self.artist_share = kernels.fixed_weight(
                self, "artist_share", (num_songs,), "float32", tables.get("artist_share")
            )
            self.artist_logit = self.add_weight(shape=(), initializer="zeros", name="artist_logit")
        self.built = True

    def _prior(self, tokens, songs=None):
        """prior(j | a) of the module docstring for the last songs `tokens` [...] and the songs
        `songs` [..., k] (default: every song, [..., songs]); p_pop after padding."""
        if songs is None:
            songs = ops.arange(self.popularity.shape[0], dtype="int32")
        songs = ops.cast(songs, "int32")
        popularity = ops.take(self.popularity, songs)
        if self.artists is None:
            return popularity
        tokens = ops.convert_to_tensor(tokens)
        rho = ops.sigmoid(self.artist_logit) * ops.cast(tokens > 0, "float32")
        last = ops.take(self.artists, tokens)
        same = ops.take(self.artists, songs + 1) == ops.expand_dims(last, -1)
        share = ops.take(self.artist_share, songs)
        rho = ops.expand_dims(rho, -1)
        return (1.0 - rho) * popularity + rho * ops.cast(same, "float32") * share

    def _successors(self, tokens) -> tuple:
        """(successors int32 [n, width], counts float32 [n, width], n_a [n]) of tokens [n]."""
        counts = ops.take(self.counts, tokens, axis=0)
        return ops.take(self.successors, tokens, axis=0), counts, ops.sum(counts, -1)

    def _log_q(self, n_aj, n_a, popularity):
        """log q = log(n_aj + β p_pop) - log(n_a + β), broadcast."""
        beta = ops.exp(self.log_beta)
        return ops.log(n_aj + beta * popularity) - ops.log(n_a + beta)

    def _mix(self, log_p_model, log_q, queries, n_a):
        """log(g p_model + (1 - g) q) with g from `queries` [..., dims] and n_a [...];
        log_p_model and log_q [..., k] (k songs of each event)."""
        log1p_n_a = ops.expand_dims(ops.log1p(n_a), -1)
        z = self.gate(ops.concatenate([ops.cast(queries, "float32"), log1p_n_a], -1))  # [..., 1]
        log_g, log_not_g = ops.log_sigmoid(z), ops.log_sigmoid(-z)
        return ops.logaddexp(log_g + log_p_model, log_not_g + log_q)

    def log_prob(self, log_p_model, queries, tokens, songs, targets=None):
        """float32 [..., k]: log p(song) of the mixture for k songs after each event [...].

        Args:
          log_p_model: float32 [..., k], the model's log-softmax at the songs (under the sampled
            softmax, its estimate from the target and the negatives); queries [..., dims];
          tokens: int32 [...], the last song of each history (token = song id + 1);
          songs: int32 [..., k] song ids; targets: int32 [...] song ids of the events, each
            itself one of the counts (training): its transition is left out of them.
        """
        songs = ops.cast(songs, "int32")
        successors, counts, n_a = self._successors(tokens)
        hit = ops.expand_dims(successors, -2) == ops.expand_dims(songs, -1)  # [..., k, width]
        n_aj = ops.sum(ops.expand_dims(counts, -2) * ops.cast(hit, "float32"), -1)
        if targets is not None:  # the event's own transition, unless cut by the width
            targets = ops.expand_dims(ops.cast(targets, "int32"), -1)
            n_at = ops.sum(counts * ops.cast(successors == targets, "float32"), -1)
            own = ops.cast(n_at > 0, "float32")
            n_aj = n_aj - ops.expand_dims(own, -1) * ops.cast(songs == targets, "float32")
            n_a = n_a - own
        log_q = self._log_q(n_aj, ops.expand_dims(n_a, -1), self._prior(tokens, songs))
        return self._mix(log_p_model, log_q, queries, n_a)

    def log_mixture(self, logits, queries, tokens):
        """float32 [..., songs]: log p(j | history) of the mixture for every song j.

        Args:
          logits: float32 [..., songs], the model's; queries [..., dims]; tokens: int [...],
            the last song of each history.
        """
        shape = ops.shape(logits)
        songs, dims = logits.shape[-1], queries.shape[-1]
        logits = ops.reshape(logits, (-1, songs))
        queries, tokens = ops.reshape(queries, (-1, dims)), ops.reshape(tokens, (-1,))
        successors, counts, n_a = self._successors(tokens)
        rows = ops.broadcast_to(ops.arange(ops.shape(tokens)[0])[:, None], ops.shape(successors))
        n_aj = tf.tensor_scatter_nd_add(
            ops.zeros_like(logits), ops.stack([rows, successors], -1), counts
        )
        log_q = self._log_q(n_aj, n_a[:, None], self._prior(tokens))
        log_p_model = ops.log_softmax(logits, axis=-1)
        return ops.reshape(self._mix(log_p_model, log_q, queries, n_a), shape)
