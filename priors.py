"""Listening priors of candidate songs and the ranking head's samples (pure numpy).

A prediction point p is the index of the first play to predict; every prior of a candidate song
at p is computed from plays[:p] only (`PriorState` walks the plays once, in time order). The
priors (float32 [C, NUM_PRIORS], `NAMES` order, log-compressed so one linear weight fits all):

  cnt_<h>   log1p(plays of the song among the last h plays), h in HORIZONS ("all": every play)
  decay_p   log1p(sum over its plays of 0.5 ** (age in plays / HALF_PLAYS))
  decay_t   log1p(sum over its plays of 0.5 ** (age in days / HALF_DAYS)), at the last play's time
  since     -log1p(plays since it was last heard)   (never heard: -log1p(p + 1))
  is_last   1 if it is the song of play p - 1
  co1       log1p(times it directly followed the song of play p - 1)
  co<k>     log1p(times it came within CO_SPAN plays after one of the last CO_LAST songs)
  seq_in    1 if it is among the last `seq_len` plays (the model's input)

The constants were chosen on the validation split of data/harry2687-spotify-2023
(`--holdout=validation`; README, "Audio-feature recommender").

Samples hold song ids + 1 (0 = padding, never a song), as the model reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HORIZONS = (10, 30, 100, 500, None)
HALF_PLAYS, HALF_DAYS = 25.0, 3.0
CO_LAST, CO_SPAN = 3, 3
NAMES = (*(f"cnt_{h or 'all'}" for h in HORIZONS), "decay_p", "decay_t", "since", "is_last")
NAMES += ("co1", f"co{CO_LAST}", "seq_in")
NUM_PRIORS = len(NAMES)


def _counts(successors: list[list[int]], rows: Sequence[int], cands: np.ndarray) -> np.ndarray:
    """How often each of `cands` occurs in the successor lists of the songs `rows`."""
    found = [successors[r] for r in rows if successors[r]]
    if not found:
        return np.zeros(len(cands), np.float32)
    ids, counts = np.unique(np.concatenate(found), return_counts=True)
    at = np.minimum(np.searchsorted(ids, cands), len(ids) - 1)
    return np.where(ids[at] == cands, counts[at], 0).astype(np.float32)


class PriorState:
    """Per-song state of the plays before a moving point; points must not decrease.

    Args:
      songs: int [plays], song ids in time order; days: float [plays], play times in days.
      num_songs: size of the id space; seq_len: the model's input length (for `seq_in`).
    """

    def __init__(self, songs: np.ndarray, days: np.ndarray, num_songs: int, seq_len: int):
        self.songs, self.days, self.seq_len = np.asarray(songs), np.asarray(days), seq_len
        self.done = 0
        self.count = np.zeros((len(HORIZONS), num_songs), np.float32)
        self.decay_p = np.zeros(num_songs)
        self.decay_t = np.zeros(num_songs)
        self.now = float(self.days[0]) if len(self.days) else 0.0
        self.last = np.full(num_songs, -1, np.int64)
        # successors[s]: songs that came 1 (next1) or up to CO_SPAN (next_k) plays after s
        self.next1: list[list[int]] = [[] for _ in range(num_songs)]
        self.next_k: list[list[int]] = [[] for _ in range(num_songs)]

    def _add(self, i: int) -> None:
        song = self.songs[i]
        for row, horizon in enumerate(HORIZONS):
            self.count[row, song] += 1
            if horizon is not None and i >= horizon:
                self.count[row, self.songs[i - horizon]] -= 1
        self.decay_p *= 0.5 ** (1.0 / HALF_PLAYS)
        self.decay_p[song] += 1.0
        if self.days[i] > self.now:
            self.decay_t *= 0.5 ** ((self.days[i] - self.now) / HALF_DAYS)
            self.now = float(self.days[i])
        self.decay_t[song] += 1.0
        self.last[song] = i
        for lag in range(1, min(CO_SPAN, i) + 1):
            self.next_k[self.songs[i - lag]].append(int(song))
        if i:
            self.next1[self.songs[i - 1]].append(int(song))

    def advance(self, point: int) -> None:
        """Takes in plays [done, point)."""
        if point < self.done:
            raise ValueError(f"prediction points must not decrease ({point} < {self.done})")
        for i in range(self.done, point):
            self._add(i)
        self.done = point

    def seen(self) -> np.ndarray:
        """int [S]: the songs played before the point, most recently played first."""
        seen = np.flatnonzero(self.last >= 0)
        return seen[np.argsort(-self.last[seen], kind="stable")]

    def priors(self, point: int, cands: np.ndarray) -> np.ndarray:
        """float32 [C, NUM_PRIORS]: the priors of `cands` (int [C]) from plays[:point] only."""
        self.advance(point)
        cands = np.asarray(cands, np.int64)
        gap = np.where(self.last[cands] >= 0, point - self.last[cands], point + 1)
        recent = self.songs[max(0, point - CO_LAST) : point]
        columns = [*np.log1p(self.count[:, cands]), np.log1p(self.decay_p[cands])]
        columns += [np.log1p(self.decay_t[cands]), -np.log1p(gap), gap == 1]
        columns.append(np.log1p(_counts(self.next1, recent[-1:], cands)))
        columns.append(np.log1p(_counts(self.next_k, recent, cands)))
        columns.append(gap <= self.seq_len)
        return np.stack(columns, axis=1).astype(np.float32)


def _distinct_recent_first(songs: np.ndarray) -> np.ndarray:
    """The distinct songs of `songs` (oldest first), most recently played first."""
    reverse = songs[::-1]
    _, first = np.unique(reverse, return_index=True)
    return reverse[np.sort(first)]


def _pad(rows: list[np.ndarray], width: int, shape: tuple = ()) -> np.ndarray:
    out = np.zeros((len(rows), width, *shape), rows[0].dtype if rows else np.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def negatives(
    seen: np.ndarray, counts: np.ndarray, positives: np.ndarray, num: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Open-catalog training candidates: the positives, then `num` negatives drawn with
    replacement from `seen` with q = 1/2 uniform + 1/2 proportional to sqrt(play count); a
    negative equal to a positive is dropped.

    Returns:
      (song ids int [C], log(num * q) float32 [C], the logQ correction of each).
    """
    weight = np.sqrt(counts[seen].astype(np.float64))
    q = 0.5 / len(seen) + 0.5 * weight / weight.sum()
    draw = rng.choice(len(seen), size=num, p=q)
    position = {song: j for j, song in enumerate(seen)}
    ids = np.concatenate([positives, seen[draw]])
    log_q = np.log(num * np.concatenate([q[[position[s] for s in positives]], q[draw]]))
    keep = np.concatenate([np.ones(len(positives), bool), ~np.isin(seen[draw], positives)])
    return ids[keep], log_q[keep].astype(np.float32)


def build_samples(
    state: PriorState,
    points: np.ndarray,
    window_plays: Sequence[np.ndarray],
    truth: np.ndarray,
    *,
    num_negatives: int = 0,
    rng: np.random.Generator | None = None,
    widths: tuple[int, int] = (1, 1),
) -> dict[str, np.ndarray]:
    """The ranking head's samples at `points` (int [N], non-decreasing).

    Args:
      window_plays: per sample, the play indices of its window candidates, oldest first.
      truth: int [N, pred_steps], the true next songs (-1: unknown, as for a recommendation).
      num_negatives: 0 (evaluation): the open candidates are every song played before the
        point; else (training) the positives plus this many sampled `negatives`.
      widths: at least this many (window, open) candidate columns (fixed training shapes).

    Returns:
      x_ids int32 [N, seq_len]; w_ids int32 [N, Cw], w_pri float32 [N, Cw, NUM_PRIORS],
      w_pos float32 [N, Cw]; o_ids, o_pri, o_pos likewise [N, Co, ...] and o_logq float32
      [N, Co]. Candidates are most recent first; ids are song id + 1 (0: padding).
    """
    columns: dict[str, list[np.ndarray]] = {name: [] for name in ("w", "o", "w_p", "o_p", "q")}
    for point, plays, next_songs in zip(points, window_plays, truth, strict=True):
        state.advance(int(point))
        seen = state.seen()
        if num_negatives:
            positives = np.unique(next_songs[np.isin(next_songs, seen)])
            ids, log_q = negatives(seen, state.count[-1], positives, num_negatives, rng)
        else:
            ids, log_q = seen, np.zeros(len(seen), np.float32)
        window = _distinct_recent_first(state.songs[plays])
        for key, row in (("w", window), ("o", ids)):
            columns[key].append(row + 1)
            columns[f"{key}_p"].append(state.priors(int(point), row))
        columns["q"].append(log_q)
    out = {"x_ids": (state.songs[points[:, None] - np.arange(state.seq_len, 0, -1)] + 1)}
    for key, width in (("w", widths[0]), ("o", widths[1])):
        width = max(width, *(len(row) for row in columns[key]))
        out[f"{key}_ids"] = _pad(columns[key], width).astype(np.int32)
        out[f"{key}_pri"] = _pad(columns[f"{key}_p"], width, (NUM_PRIORS,))
        found = (out[f"{key}_ids"][:, :, None] - 1 == truth[:, None, :]).any(-1)
        out[f"{key}_pos"] = (found & (out[f"{key}_ids"] > 0)).astype(np.float32)
    out["o_logq"] = _pad(columns["q"], out["o_ids"].shape[1])
    out["x_ids"] = out["x_ids"].astype(np.int32)
    return out


def train_samples(
    songs: np.ndarray,
    days: np.ndarray,
    num_songs: int,
    rows: np.ndarray,
    *,
    seq_len: int,
    bar: int,
    num_negatives: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Samples of training windows `rows` (int [N, seq_len + pred_steps] play indices, from
    `audio_windows.dynamic_train`): the window candidates are the `bar` plays before the point;
    fixed widths (`bar`, `num_negatives` + pred_steps) so the train step is traced once."""
    rows = rows[np.argsort(rows[:, seq_len], kind="stable")]
    points = rows[:, seq_len]
    return build_samples(
        PriorState(songs, days, num_songs, seq_len),
        points,
        [np.arange(max(0, p - bar), p) for p in points],
        songs[rows[:, seq_len:]],
        num_negatives=num_negatives,
        rng=rng,
        widths=(bar, num_negatives + rows.shape[1] - seq_len),
    )


def eval_samples(
    songs: np.ndarray, days: np.ndarray, num_songs: int, test: np.ndarray, *, seq_len: int,
    pred_steps: int, bar: int,
) -> dict[str, np.ndarray] | None:  # fmt: skip
    """Samples of one month's test plays `test` (int [n] play indices), the candidates exactly
    those of `hitrate.evaluate`: window = the test plays [max(0, i + seq_len - bar), i +
    seq_len), open catalog = every song played before the point. None if no window fits."""
    n = len(test) - seq_len - pred_steps + 1
    if n <= 0:
        return None
    rows = np.asarray(test)[np.arange(n)[:, None] + np.arange(seq_len + pred_steps)]
    windows = [test[max(0, i + seq_len - bar) : i + seq_len] for i in range(n)]
    state = PriorState(songs, days, num_songs, seq_len)
    return build_samples(state, rows[:, seq_len], windows, songs[rows[:, seq_len:]])


def top_k_distinct(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Per row, the `k` best candidates (ids unique per row; ties: the earlier column, i.e.
    the more recently played song), as song ids; -1 where a row has fewer than `k`.

    Args:
      scores: float [N, C]; ids: int [N, C], song id + 1 (0: padding).
    """
    scores = np.where(ids > 0, scores, -np.inf)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    real = np.take_along_axis(scores, top, 1) > -np.inf
    return np.where(real, np.take_along_axis(ids, top, 1) - 1, -1)
