"""Session-neighbourhood next-song baselines (V-SKNN, V-STAN) and the song statistics and
validation score every baseline shares.

Training playlists are token arrays (song id + 1) in the line order of train.txt, which stands in
for time: a later line is a more recent playlist (Yes.com playlists carry no timestamps). The
playlist being scored is taken to come right after the last training playlist.

Histories are 0-based song-id arrays (oldest first); scores are float64 [events, num_songs].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
from absl import logging

import metrics
from errors import DataError

SKNN_NEIGHBOURS = 100  # k of V-SKNN (Ludewig & Jannach 2018)
SKNN_CANDIDATES = 1000  # most recent playlists sharing a song with the history (their sample_size)
CHUNK = 2000  # events scored at once (2000 x 9775 float64 = 156 MB)


def song_counts(playlists: Sequence[np.ndarray], num_songs: int) -> np.ndarray:
    """int64 [num_songs]: occurrences of each song in token playlists (token = song id + 1)."""
    tokens = np.concatenate([np.asarray(p) for p in playlists] + [np.zeros(0, np.int32)])
    return np.bincount(tokens - 1, minlength=num_songs).astype(np.int64)


def song_pairs(playlists: Sequence[np.ndarray], steps: int) -> tuple[np.ndarray, ...]:
    """(a, b, gap) int64 [pairs]: every time song b came gap <= `steps` plays after song a in a
    token playlist (song ids, token - 1)."""
    a, b, gaps = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for gap in range(1, steps + 1):
        for p in (np.asarray(p, np.int64) - 1 for p in playlists if len(p) > gap):
            a.append(p[:-gap])
            b.append(p[gap:])
            gaps.append(np.full(len(p) - gap, gap, np.int64))
    return np.concatenate(a), np.concatenate(b), np.concatenate(gaps)


def popularity_probabilities(counts: np.ndarray) -> np.ndarray:
    """Add-one (Laplace) smoothed popularity, so unseen songs keep a finite log-likelihood."""
    return (counts + 1.0) / (counts.sum() + len(counts))


def validation_events(
    valid: Sequence[np.ndarray], name: str, limit: int | None = None
) -> tuple[list, np.ndarray]:
    """(histories, targets) of the validation playlists' events (at most `limit`, evenly spaced
    over the split); DataError if there are none."""
    events = [(p[:t] - 1, p[t] - 1) for p in valid for t in range(1, len(p))]
    if not events:
        raise DataError(f"{name}: the validation split has no events to tune its settings on")
    if limit is not None and len(events) > limit:
        events = [events[i] for i in np.linspace(0, len(events) - 1, limit).astype(np.int64)]
    return [h for h, _ in events], np.array([t for _, t in events], np.int64)


def ranking_quality(scores: Callable, histories: list, targets: np.ndarray) -> float:
    """Recall@20 x MRR@20 of `scores(histories)` (the criterion baselines are tuned by), with the
    pessimistic ranks of `metrics.pessimistic_ranks`."""
    ranks = []
    for i in range(0, len(targets), CHUNK):
        chunk = scores(histories[i : i + CHUNK])
        ranks.append(metrics.pessimistic_ranks(chunk, targets[i : i + CHUNK]))
    ranks = np.concatenate(ranks)
    top = ranks <= 20
    return float(top.mean() * np.mean(np.where(top, 1.0 / ranks, 0.0)))


def history_plays(histories: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """(rows, songs, positions, lengths): every play of every history with its 1-based
    position, in order; lengths = history lengths [events]."""
    lengths = np.array([len(h) for h in histories], np.int64)
    rows = np.repeat(np.arange(len(histories)), lengths)
    songs = np.concatenate([np.asarray(h, np.int64) for h in histories] + [np.zeros(0, np.int64)])
    positions = np.arange(len(songs)) - np.repeat(np.cumsum(lengths) - lengths, lengths) + 1
    return rows, songs, positions, lengths


def latest_positions(histories: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """(rows, songs, positions, lengths): each distinct song of each history with its latest
    1-based position, sorted by row then song; lengths = history lengths [events]."""
    rows, songs, positions, lengths = history_plays(histories)
    last = np.lexsort((positions, songs, rows))  # per (row, song) the latest position comes last
    rows, songs, positions = rows[last], songs[last], positions[last]
    keep = np.ones(len(rows), bool)
    keep[:-1] = (rows[:-1] != rows[1:]) | (songs[:-1] != songs[1:])
    return rows[keep], songs[keep], positions[keep], lengths


def history_matrix(
    histories: list[np.ndarray], num_songs: int, decay: float | None = None
) -> sp.csr_matrix:
    """float64 [events, num_songs]: the song at position p of L gets weight p/L (latest: 1), or
    exp((p - L) / decay) with `decay` (STAN's λ_spw). A song heard twice keeps its latest weight.
    """
    rows, songs, positions, lengths = latest_positions(histories)
    length = lengths[rows]
    weights = positions / length if decay is None else np.exp((positions - length) / decay)
    return sp.csr_matrix((weights, (rows, songs)), shape=(len(histories), num_songs))


def normalised(
    raw: np.ndarray, histories: list, history_last: bool, p_pop: np.ndarray
) -> np.ndarray:
    """float64 [events, songs]: `raw` scores divided by their sum (the history's songs 0 with
    `history_last`); popularity `p_pop` where nothing scored (for blends)."""
    if history_last:
        raw[history_matrix(histories, raw.shape[1]).toarray() > 0] = 0.0
    total = raw.sum(axis=1, keepdims=True)
    return np.where(total > 0, raw / np.maximum(total, 1e-300), p_pop[None, :])


def rank_within_rows(rows: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Position of each entry inside its row once entries are sorted by `order` (row-major)."""
    sorted_rows = rows[order]
    first = np.searchsorted(sorted_rows, sorted_rows, side="left")
    position = np.empty(len(rows), np.int64)
    position[order] = np.arange(len(rows)) - first
    return position


def song_sets(train: Sequence[np.ndarray], num_songs: int) -> sp.csr_matrix:
    """float64 [playlists, num_songs] CSR, sorted indices: 1 where the playlist holds the song."""
    sets = [np.unique(np.asarray(p, np.int64) - 1) for p in train]
    rows = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
    cols = np.concatenate(sets + [np.zeros(0, np.int64)])
    return sp.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(sets), num_songs))


def nearest(
    weighted: sp.csr_matrix, playlists: sp.csr_matrix, candidates: int, neighbours: int,
    recency: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(rows, playlist ids, similarities) of each history's nearest training playlists.

    Similarity = cosine(weighted history, binary playlist) (x `recency` of the playlist);
    candidates = the `candidates` most recent playlists sharing a song with the history; of those
    the `neighbours` most similar are kept (equal similarities: the more recent playlist wins).
    """
    norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(axis=1)).ravel())
    dots = (weighted @ playlists.T).tocsr()
    dots.sort_indices()
    rows = np.repeat(np.arange(dots.shape[0]), np.diff(dots.indptr))
    playlist_norms = np.sqrt(np.diff(playlists.indptr))
    cols, sims = dots.indices, dots.data / (norms[rows] * playlist_norms[dots.indices])
    if recency is not None:
        sims = sims * recency[cols]
    recent = rank_within_rows(rows, np.lexsort((-cols, rows))) < candidates
    rows, cols, sims = rows[recent], cols[recent], sims[recent]
    keep = rank_within_rows(rows, np.lexsort((-cols, -sims, rows))) < neighbours
    return rows[keep], cols[keep], sims[keep]


class SessionKNN:
    """V-SKNN (Ludewig & Jannach 2018) over training playlists seen as sets of songs.

    Similarity = cosine(recency-weighted history (`history_matrix`), binary playlist); score(song)
    = sum of the similarities of the `neighbours` nearest of the `candidates` most recent
    playlists sharing a song (`nearest`) that contain it; equal scores are ordered by
    popularity. With `history_last`, songs already in the history are ranked below all others.
    """

    def __init__(
        self,
        train: Sequence[np.ndarray],
        num_songs: int,
        history_last: bool = False,
        neighbours: int = SKNN_NEIGHBOURS,
        candidates: int = SKNN_CANDIDATES,
    ):
        self.num_songs, self.history_last = num_songs, history_last
        self.neighbours, self.candidates = neighbours, candidates
        self.playlists = song_sets(train, num_songs)
        self.counts = song_counts(train, num_songs)
        self.p_pop = popularity_probabilities(self.counts)
        # Exact float64 keys: quantised score, then popularity, then (optionally) history last.
        self.pop_base = float(self.counts.max() + 1)
        self.quantum = float(2**51 // (2 * (neighbours + 1) * int(self.pop_base)))

    def neighbour_scores(self, histories: list[np.ndarray]) -> np.ndarray:
        """float64 [events, num_songs]: sum of the similarities of the neighbours holding a song."""
        weighted = history_matrix(histories, self.num_songs)
        rows, cols, sims = nearest(weighted, self.playlists, self.candidates, self.neighbours)
        shape = (len(histories), self.playlists.shape[0])
        return (sp.csr_matrix((sims, (rows, cols)), shape=shape) @ self.playlists).toarray()

    def scores(self, histories: list[np.ndarray]) -> np.ndarray:
        key = np.round(self.neighbour_scores(histories) * self.quantum) * self.pop_base
        key += self.counts[None, :]
        if self.history_last:
            seen = history_matrix(histories, self.num_songs).toarray() > 0
            key -= seen * (self.neighbours + 1) * self.quantum * self.pop_base
        return key

    def probabilities(self, histories: list[np.ndarray]) -> np.ndarray:
        """Scores divided by their sum; popularity where no neighbour was found (for blends).

        With `history_last`, songs of the history get probability 0 unless nothing else scored.
        """
        raw = self.neighbour_scores(histories)
        return normalised(raw, histories, self.history_last, self.p_pop)

    def log_likelihood(self, histories: list[np.ndarray], targets: np.ndarray) -> None:
        return None  # a neighbourhood score is not a probability model


@dataclasses.dataclass(frozen=True)
class StanSettings:
    """V-STAN's decays; positions count plays, `recency` counts training playlists / their number.

    Attributes:
      position: λ_spw: the history song at position p of L weighs exp((p - L) / λ) in the cosine.
      recency: λ_snh: training playlist i of N (line order) weighs exp(-(N - i) / (λ N)); inf: off.
      neighbour_position: λ_inh: a neighbour's song at position q weighs exp(-|q - q*| / λ),
        q* = the latest position in the neighbour of a song of the history.
      match_position: λ_ipw: a neighbour weighs exp((p* - L) / λ), p* = the latest position in
        the history of a song the neighbour holds (V-SKNN's weighting of matches).
      idf: λ_idf: a song's weight x (1 + λ idf), idf = log(playlists / playlists holding it).
      history_last: songs of the history are ranked below all others.
    """

    position: float = 4.0
    recency: float = np.inf
    neighbour_position: float = 4.0
    match_position: float = np.inf
    idf: float = 0.0
    history_last: bool = True


# Searched one setting at a time in this order, from the defaults (coordinate ascent, one pass).
STAN_GRID = {
    "history_last": (True, False),
    "position": (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, np.inf),
    "neighbour_position": (2.0, 4.0, 8.0, 16.0, np.inf),
    "match_position": (np.inf, 4.0, 0.01),
    "recency": (np.inf, 1.0, 0.25),
    "idf": (0.0, 1.0),
}
STAN_TUNING_EVENTS = 4000  # validation events the grid is searched on (evenly spaced)
STAN_QUANTUM = 2.0**30  # scores within 2^-30 of each other (relative) tie, ordered by popularity


def expand(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, index): for each entry of CSR rows `rows` (in turn), which of `rows` holds it and
    its index into the CSR's indices/data."""
    counts = indptr[rows + 1] - indptr[rows]
    owner = np.repeat(np.arange(len(rows)), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, np.repeat(indptr[rows], counts) + within


class VSTAN:
    """V-STAN (Ludewig et al. 2021): STAN (Garg et al. 2019) with V-SKNN's match weighting.

    score(song) = sum over the `neighbours` nearest of the `candidates` most recent playlists
    sharing a song with the history (`nearest`: cosine of the position-decayed history and the
    binary playlist, x the playlist's recency) of similarity x match weight x the decay of the
    song's distance to q* in that playlist x (1 + λ_idf idf); see `StanSettings`. Equal scores
    (to 2^-30 of the event's best) are ordered by popularity. The settings are the
    coordinate-ascent pick of `STAN_GRID` by validation Recall@20 x MRR@20, unless given.
    """

    def __init__(
        self, train: Sequence[np.ndarray], valid: Sequence[np.ndarray], num_songs: int,
        settings: StanSettings | None = None, neighbours: int = SKNN_NEIGHBOURS,
        candidates: int = SKNN_CANDIDATES,
    ):  # fmt: skip
        self.num_songs, self.neighbours, self.candidates = num_songs, neighbours, candidates
        rows, songs, positions, _ = latest_positions([np.asarray(p, np.int64) - 1 for p in train])
        shape = (len(train), num_songs)
        self.positions = sp.csr_matrix((positions.astype(np.float64), (rows, songs)), shape=shape)
        self.playlists = sp.csr_matrix((np.ones(len(rows)), (rows, songs)), shape=shape)
        self.keys = rows * num_songs + songs  # sorted: (playlist, song) -> its CSR entry
        self.age = len(train) - np.arange(len(train), dtype=np.float64)
        self.idf = np.log(len(train) / np.maximum(np.bincount(songs, minlength=num_songs), 1))
        self.counts = song_counts(train, num_songs)
        self.p_pop = popularity_probabilities(self.counts)
        self.settings = settings or StanSettings()
        if settings is None:
            self.settings = self.tune(*validation_events(valid, "vstan", STAN_TUNING_EVENTS))

    def tune(self, histories: list[np.ndarray], targets: np.ndarray) -> StanSettings:
        """The coordinate-ascent pick of `STAN_GRID` by Recall@20 x MRR@20 on the events."""
        best = ranking_quality(self.scores, histories, targets)
        for name, values in STAN_GRID.items():
            start = self.settings
            for value in values:
                self.settings = dataclasses.replace(start, **{name: value})
                if self.settings == start:
                    continue
                quality = ranking_quality(self.scores, histories, targets)
                if quality > best:
                    best, start = quality, self.settings
            self.settings = start
        logging.info("vstan: %s (validation recall@20 x mrr@20 %.5f)", self.settings, best)
        return self.settings

    @property
    def history_last(self) -> bool:
        """Whether songs of the history are ranked below all others (probability 0)."""
        return self.settings.history_last

    def neighbour_scores(self, histories: list[np.ndarray]) -> np.ndarray:
        """float64 [events, num_songs]: the V-STAN score of every song (0: in no neighbour)."""
        s, num_songs = self.settings, self.num_songs
        h_rows, h_songs, h_positions, lengths = latest_positions(histories)
        weights = np.exp((h_positions - lengths[h_rows]) / s.position)
        weighted = sp.csr_matrix((weights, (h_rows, h_songs)), shape=(len(histories), num_songs))
        recency = np.exp(-self.age / (s.recency * len(self.age)))
        rows, cols, sims = nearest(
            weighted, self.playlists, self.candidates, self.neighbours, recency
        )
        out = np.zeros(len(histories) * num_songs)
        if not len(rows):
            return out.reshape(len(histories), num_songs)
        # p* and q* of each (history, neighbour) pair, from the songs they share.
        pair, index = expand(np.searchsorted(h_rows, np.arange(len(histories) + 1)), rows)
        keys = cols[pair] * num_songs + h_songs[index]
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        shared = self.keys[at] == keys
        starts = np.searchsorted(pair[shared], np.arange(len(rows)))
        p_star = np.maximum.reduceat(h_positions[index[shared]], starts)
        q_star = np.maximum.reduceat(self.positions.data[at[shared]], starts)
        pair_weight = sims * np.exp((p_star - lengths[rows]) / s.match_position)
        pair, index = expand(self.positions.indptr, cols)
        song = self.positions.indices[index]
        distance = np.abs(self.positions.data[index] - q_star[pair])
        weight = pair_weight[pair] * np.exp(-distance / s.neighbour_position)
        weight *= 1.0 + s.idf * self.idf[song]
        out += np.bincount(rows[pair] * num_songs + song, weight, minlength=len(out))
        return out.reshape(len(histories), num_songs)

    def scores(self, histories: list[np.ndarray]) -> np.ndarray:
        """Exact float64 keys: the score relative to the event's best quantised to 2^-30, then
        popularity, then (with `history_last`) the history below everything else."""
        raw = self.neighbour_scores(histories)
        top = np.maximum(raw.max(axis=1, keepdims=True), 1e-300)
        pop_base = float(self.counts.max() + 1)
        key = np.round(raw / top * STAN_QUANTUM) * pop_base + self.counts[None, :]
        if self.settings.history_last:
            seen = history_matrix(histories, self.num_songs).toarray() > 0
            key -= seen * (STAN_QUANTUM + 1) * pop_base
        return key

    def probabilities(self, histories: list[np.ndarray]) -> np.ndarray:
        """Scores divided by their sum (history songs 0 with `history_last`); popularity where
        no neighbour was found (for blends)."""
        raw = self.neighbour_scores(histories)
        return normalised(raw, histories, self.settings.history_last, self.p_pop)

    def log_likelihood(self, histories: list[np.ndarray], targets: np.ndarray) -> None:
        return None  # a neighbourhood score is not a probability model
