"""`--repeat_window`: a learned bias for the songs a playlist has already played, by how long ago.

Radio playlists come back to songs: on yes_big 8-10 % of next songs were played earlier in the
same playlist, most of them 15-60 plays before and almost none in the last few; a song played
twice already comes back more often than one played once. The model adds to the logit of each
song among the history's last `window` plays a weight for its gap (plays since its latest play;
the last song has gap 1) and its plays in that window, one weight per gap bucket (`GAP_EDGES`)
and play count (1, 2, 3 or more), learned with the network and zero at the start:

    logit'(j) = logit(j) + w[bucket(gap_j), min(plays_j, 3)]   for j played in the window,

logit the model's log-probability: its softmax's, or with --transition the mixture's, so the bias
also governs how often the transition component's songs come back (a log that never repeats a
song within a session learns to rank the session's songs last).

The recent songs are carried across training windows like the recurrent state (reset at a new
playlist), so the first step of a window sees the plays of the windows before it; every step
sees gaps up to `window`, in training, evaluation and serving alike.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from errors import ConfigError

GAP_EDGES = (1, 2, 3, 5, 8, 12, 16, 24, 32, 48, 64, 96)  # bucket i: gaps in [edge i, edge i+1)
PLAY_COUNTS = 3  # plays in the window: 1, 2, 3 or more
# w = BIAS_STEP x the stored weight: an Adam step, about the learning rate, moves w 10 times as
# far, so the few hundred updates of a small log reach the -2 to -4 that a log without repeats
# within a session needs (chosen on validation over 1 and 10; docs/results.md).
BIAS_STEP = 10.0


def check_repeat_window(window: int, softmax: str, step: float = BIAS_STEP) -> None:
    """Raises `ConfigError` naming --repeat_window if it is negative, or set with a sampled
    softmax (whose training loss never sees the songs of the history); `ValueError` for a saved
    model whose weights were stored at another `step` (0: saved before `BIAS_STEP` existed)."""
    if window < 0:
        raise ConfigError(f"--repeat_window={window}: must be >= 0 (0: off)")
    if window and softmax != "full":
        raise ConfigError(f"--repeat_window={window} needs --softmax=full, not {softmax}")
    if window and step != BIAS_STEP:
        raise ValueError(
            "its repeat bias was saved by an earlier deepcf (weights stored at step "
            f"{step or 1:g}, not {BIAS_STEP:g}, and added before the transitions): train it again"
        )


class RepeatBias(keras.layers.Layer):
    """The weights w of the module docstring, by gap and plays, and the logits they change."""

    def __init__(self, window: int, **kwargs):
        super().__init__(**kwargs)
        self.window = window
        self.stored = self.add_weight(
            shape=(len(GAP_EDGES), PLAY_COUNTS), initializer="zeros", name="gap_bias_stored"
        )
        self.built = True

    @property
    def gap_bias(self):
        """float32 [buckets, PLAY_COUNTS]: the weights w."""
        return self.stored * BIAS_STEP

    def bias(self, history, positions):
        """float32 [batch, steps, length]: each play's bias for each step.

        Args:
          history: int32 [batch, length] tokens (song id + 1; 0: no play), oldest first.
          positions: int32 [batch, steps], the index in `history` of each step's last song.
        Returns w[bucket(gap), plays] at a song's latest play at or before the step's position
        within `window` plays of it, 0 at every other play (so a song is biased once).
        """
        length = ops.shape(history)[1]
        index = ops.arange(length, dtype="int32")
        same = ops.equal(history[:, :, None], history[:, None, :])  # [batch, play, play]
        later_same = ops.logical_and(same, index[:, None] < index[None, :])
        next_play = ops.min(ops.where(later_same, index, length + self.window + 1), axis=-1)
        position = ops.cast(positions, "int32")[:, :, None]
        gap = position - index + 1  # [batch, steps, length]
        seen = (gap >= 1) & (gap <= self.window) & (history[:, None, :] > 0)
        latest = seen & (next_play[:, None, :] > position)
        plays = ops.einsum("bjk,bsk->bsj", ops.cast(same, "float32"), ops.cast(seen, "float32"))
        plays = ops.clip(ops.cast(plays, "int32"), 1, PLAY_COUNTS) - 1
        bucket = ops.sum(ops.cast(gap[..., None] >= np.array(GAP_EDGES), "int32"), -1) - 1
        bucket = ops.clip(bucket, 0, len(GAP_EDGES) - 1)
        weights = ops.take(ops.reshape(self.gap_bias, (-1,)), bucket * PLAY_COUNTS + plays)
        return ops.where(latest, weights, 0.0)

    def window_bias(self, history, steps: int):
        """`bias` of the last `steps` plays of `history` [batch, length] as the steps."""
        length = ops.shape(history)[1]
        positions = ops.arange(steps, dtype="int32") + ops.cast(length - steps, "int32")
        return self.bias(history, ops.broadcast_to(positions, (ops.shape(history)[0], steps)))

    def loss_terms(self, queries, rows, row_bias, first: int, history, targets) -> tuple:
        """The [batch, steps, ...] terms of `biased_cross_entropy` for a training window.

        Args:
          queries: float32 [batch, steps, dims]; rows [columns, dims] and row_bias [columns] of
            the training softmax, song s in column s + `first`; history: int32 [batch, length]
            tokens whose last `steps` are the window's; targets: int32 [batch, steps] song ids.
        Returns (target_logit [b, s], history_logits [b, s, length], the plays' song ids
        [b, s, length] (padding: song 0), bias, target_hit).
        """
        songs = ops.maximum(ops.cast(history, "int32") - 1, 0)
        history_rows = ops.take(rows, songs + first, axis=0)  # [batch, length, dims]
        history_logits = ops.einsum("bsd,bld->bsl", queries, history_rows)
        history_logits += ops.take(row_bias, songs + first)[:, None, :]
        target_rows = ops.take(rows, targets + first, axis=0)
        target_logit = ops.sum(queries * target_rows, -1) + ops.take(row_bias, targets + first)
        hit = ops.cast(ops.equal(history[:, None, :] - 1, targets[..., None]), "float32")
        bias = self.window_bias(history, ops.shape(targets)[1])
        songs = ops.broadcast_to(songs[:, None, :], ops.shape(bias))
        return target_logit, history_logits, songs, bias, hit


def with_plays(log_p, songs, target_logit, history_logits, plays, bias, target_hit) -> tuple:
    """(log p [n, 1 + length], songs [n, 1 + length], (bias, target_hit)) of the softmax: `log_p`
    and `songs` [n, 1] at each event's target, then at its history's plays (`loss_terms` of the
    events: a play's log p is its logit less the target's, plus the target's log p)."""
    log_p_plays = history_logits + (log_p - target_logit[:, None])
    log_p = ops.concatenate([log_p, log_p_plays], -1)
    return log_p, ops.concatenate([songs, plays], -1), (bias, target_hit)


def add_bias(logits, songs, bias):
    """logits float32 [..., num_songs] plus `bias` [..., length] at the columns of `songs`
    (tokens int [..., length]; padding adds its 0 bias to column 0)."""
    shape, num_songs = ops.shape(logits), logits.shape[-1]
    length = ops.shape(songs)[-1]
    logits = ops.reshape(logits, (-1, num_songs))
    songs = ops.reshape(ops.maximum(ops.cast(songs, "int32") - 1, 0), (-1, length))
    rows = ops.arange(ops.shape(songs)[0], dtype="int32")[:, None]
    where = ops.stack([ops.broadcast_to(rows, ops.shape(songs)), songs], -1)
    bias = ops.cast(ops.reshape(bias, (-1, length)), logits.dtype)
    added = tf.tensor_scatter_nd_add(logits, where, bias)  # no keras.ops form
    return ops.reshape(added, shape)


def biased_cross_entropy(cross_entropy, log_p_history, bias, target_hit):
    """-log p'(target) per event, p' the distribution p with the repeat bias:
    p'(j) = p(j) e^bias(j) / (1 + sum_plays p (e^bias - 1)).

    Args:
      cross_entropy: float32 [n], -log p(target); log_p_history [n, length], log p of the
        history's plays; bias [n, length] theirs (`RepeatBias.bias`, 0 but at a song's latest
        play); target_hit [n, length]: 1 where the play is the target's song.
    """
    total = 1.0 + ops.sum(ops.exp(log_p_history) * (ops.exp(bias) - 1.0), -1)
    target_bias = ops.sum(bias * target_hit, -1)
    return cross_entropy - target_bias + ops.log(ops.maximum(total, 1e-12))
