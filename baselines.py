"""Popularity, Markov and session-kNN next-song baselines, scored like the model.

The baselines are fitted on the same training playlists as the model (train.txt minus the seeded
validation share); Markov's smoothing is tuned on that validation share. They are scored on
exactly the events `model.evaluate` sees: `Events.from_windows` lists
every real position of the model's own test windows, and ranks and metrics come from
`metrics.pessimistic_ranks` and `metrics.RankingMetrics`.

Histories are 0-based song-id arrays (oldest first); scores are float64 [events, num_songs].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
from absl import logging

import metrics
import yes_reader
from errors import DataError

SKNN_NEIGHBOURS = 100  # k of V-SKNN (Ludewig & Jannach 2018)
SKNN_CANDIDATES = 1000  # most recent playlists sharing a song with the history (their sample_size)
BETAS = np.logspace(-2, 4, 61)  # Markov smoothing grid, searched by validation log-likelihood
CHUNK = 2000  # events scored at once (2000 x 9775 float64 = 156 MB)


@dataclasses.dataclass(frozen=True)
class Events:
    """Every (history, next song) event of a split, in the order the model's windows hold them.

    Attributes:
      sequences: song ids of each window row (row = batch * batch_size + row in batch), without
        the row's last song, which is never part of a history.
      row: int64 [events], the sequence an event belongs to.
      length: int64 [events], history length t >= 1: the history is `sequences[row][:t]`.
      targets: int64 [events], the true next song id.
      window: int64 [events], the window holding the event (events of a window are contiguous).
    """

    sequences: list[np.ndarray]
    row: np.ndarray
    length: np.ndarray
    targets: np.ndarray
    window: np.ndarray

    @classmethod
    def from_windows(cls, windows: yes_reader.Windows) -> Events:
        """The events of `windows` in C order of `weights` [window, row, step]."""
        n_windows, batch_size, num_steps = windows.inputs.shape
        starts = windows.batch_starts
        sequences = []
        for b in range(len(starts) - 1):
            block = windows.inputs[starts[b] : starts[b + 1]].transpose(1, 0, 2)
            for tokens in block.reshape(batch_size, -1):
                sequences.append(tokens[tokens != yes_reader.PAD_ID].astype(np.int64) - 1)
        window, row_in_batch, step = np.nonzero(windows.weights)
        batch = np.searchsorted(starts, window, side="right") - 1
        return cls(
            sequences=sequences,
            row=batch * batch_size + row_in_batch,
            length=(window - starts[batch]) * num_steps + step + 1,
            targets=windows.targets[window, row_in_batch, step].astype(np.int64),
            window=window.astype(np.int64),
        )

    def __len__(self) -> int:
        return len(self.targets)

    def histories(self, index: slice | np.ndarray) -> list[np.ndarray]:
        return [
            self.sequences[r][:t] for r, t in zip(self.row[index], self.length[index], strict=True)
        ]


def song_counts(playlists: Sequence[np.ndarray], num_songs: int) -> np.ndarray:
    """int64 [num_songs]: occurrences of each song in token playlists (token = song id + 1)."""
    tokens = np.concatenate([np.asarray(p) for p in playlists] + [np.zeros(0, np.int32)])
    return np.bincount(tokens - 1, minlength=num_songs).astype(np.int64)


def popularity_probabilities(counts: np.ndarray) -> np.ndarray:
    """Add-one (Laplace) smoothed popularity, so unseen songs keep a finite log-likelihood."""
    return (counts + 1.0) / (counts.sum() + len(counts))


class Popularity:
    """Score = count of the song in the training playlists; probability add-one smoothed."""

    def __init__(self, train: Sequence[np.ndarray], num_songs: int):
        self.counts = song_counts(train, num_songs)
        self.p_pop = popularity_probabilities(self.counts)

    def scores(self, histories: list[np.ndarray]) -> np.ndarray:
        return np.tile(self.counts.astype(np.float64), (len(histories), 1))

    def probabilities(self, histories: list[np.ndarray]) -> np.ndarray:
        return np.tile(self.p_pop, (len(histories), 1))

    def log_likelihood(self, histories: list[np.ndarray], targets: np.ndarray) -> np.ndarray:
        return np.log(self.p_pop[targets])


def transition_counts(playlists: Sequence[np.ndarray], num_songs: int) -> sp.csr_matrix:
    """float64 [num_songs, num_songs] CSR: n_aj = times song j directly follows song a."""
    pairs = [np.stack([p[:-1], p[1:]]) for p in playlists if len(p) >= 2]
    a, j = np.concatenate(pairs + [np.zeros((2, 0), np.int32)], axis=1).astype(np.int64) - 1
    shape = (num_songs, num_songs)
    return sp.csr_matrix((np.ones(len(a)), (a, j)), shape=shape)  # duplicates are summed


class Markov:
    """p(j|a) = λ_a n_aj/n_a + (1-λ_a) p_pop(j), λ_a = n_a/(n_a+β), a = last song of the history.

    β is the `BETAS` value with the best mean log-likelihood on `valid` (train counts only),
    unless `beta` is given.
    """

    def __init__(
        self,
        train: Sequence[np.ndarray],
        valid: Sequence[np.ndarray],
        num_songs: int,
        beta: float | None = None,
    ):
        self.p_pop = popularity_probabilities(song_counts(train, num_songs))
        self.transitions = transition_counts(train, num_songs)
        self.n_a = np.asarray(self.transitions.sum(axis=1)).ravel()
        if beta is not None:
            self.beta = beta
            return
        pairs = transition_counts(valid, num_songs).tocoo()
        if not pairs.nnz:
            raise DataError("markov: the validation split has no events to tune β on")
        a, j, times = pairs.row, pairs.col, pairs.data
        n_aj = np.asarray(self.transitions[a, j]).ravel()
        lls = [np.sum(times * np.log(self._p(a, j, n_aj, b))) / times.sum() for b in BETAS]
        self.beta = float(BETAS[int(np.argmax(lls))])
        self.valid_log_likelihood = float(np.max(lls))
        logging.info("markov: β = %g, validation log-likelihood %.4f", self.beta, np.max(lls))

    def _p(self, a: np.ndarray, j: np.ndarray, n_aj: np.ndarray, beta: float) -> np.ndarray:
        denominator = self.n_a[a] + beta
        return n_aj / denominator + beta / denominator * self.p_pop[j]

    def probabilities(self, histories: list[np.ndarray]) -> np.ndarray:
        last = np.array([h[-1] for h in histories], np.int64)
        denominator = (self.n_a[last] + self.beta)[:, None]
        rows = self.transitions[last].toarray()
        return rows / denominator + self.beta / denominator * self.p_pop[None, :]

    scores = probabilities

    def log_likelihood(self, histories: list[np.ndarray], targets: np.ndarray) -> np.ndarray:
        last = np.array([h[-1] for h in histories], np.int64)
        n_aj = np.asarray(self.transitions[last, targets]).ravel()
        return np.log(self._p(last, targets, n_aj, self.beta))


def history_matrix(histories: list[np.ndarray], num_songs: int) -> sp.csr_matrix:
    """float64 [events, num_songs]: the song at position p of L gets weight p/L (latest: 1).

    A song heard twice keeps its most recent (largest) weight.
    """
    lengths = np.array([len(h) for h in histories], np.int64)
    rows = np.repeat(np.arange(len(histories)), lengths)
    songs = np.concatenate(histories).astype(np.int64)
    start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    weights = (np.arange(len(songs)) - start + 1) / np.repeat(lengths, lengths)
    last = np.lexsort((weights, songs, rows))  # per (row, song) the largest weight comes last
    rows, songs, weights = rows[last], songs[last], weights[last]
    keep = np.ones(len(rows), bool)
    keep[:-1] = (rows[:-1] != rows[1:]) | (songs[:-1] != songs[1:])
    return sp.csr_matrix(
        (weights[keep], (rows[keep], songs[keep])), shape=(len(histories), num_songs)
    )


def rank_within_rows(rows: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Position of each entry inside its row once entries are sorted by `order` (row-major)."""
    sorted_rows = rows[order]
    first = np.searchsorted(sorted_rows, sorted_rows, side="left")
    position = np.empty(len(rows), np.int64)
    position[order] = np.arange(len(rows)) - first
    return position


class SessionKNN:
    """V-SKNN (Ludewig & Jannach 2018) over training playlists seen as sets of songs.

    Similarity = cosine(recency-weighted history, binary playlist); candidates = the `candidates`
    most recent playlists (later in train.txt = more recent) sharing a song with the history;
    score(song) = sum of the similarities of the `neighbours` most similar candidates that contain
    it (equal similarities: the more recent playlist wins); equal scores are ordered by
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
        sets = [np.unique(np.asarray(p, np.int64) - 1) for p in train]
        rows = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
        cols = np.concatenate(sets + [np.zeros(0, np.int64)])
        self.playlists = sp.csr_matrix(
            (np.ones(len(cols)), (rows, cols)), shape=(len(sets), num_songs)
        )
        self.playlist_norms = np.sqrt(np.diff(self.playlists.indptr)).astype(np.float64)
        self.counts = song_counts(train, num_songs)
        self.p_pop = popularity_probabilities(self.counts)
        # Exact float64 keys: quantised score, then popularity, then (optionally) history last.
        self.pop_base = float(self.counts.max() + 1)
        self.quantum = float(2**51 // (2 * (neighbours + 1) * int(self.pop_base)))

    def neighbour_scores(self, histories: list[np.ndarray]) -> np.ndarray:
        """float64 [events, num_songs]: sum of the similarities of the neighbours holding a song."""
        weighted = history_matrix(histories, self.num_songs)
        norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(axis=1)).ravel())
        dots = (weighted @ self.playlists.T).tocsr()
        dots.sort_indices()
        rows = np.repeat(np.arange(dots.shape[0]), np.diff(dots.indptr))
        cols, sims = dots.indices, dots.data / (norms[rows] * self.playlist_norms[dots.indices])
        recent = rank_within_rows(rows, np.lexsort((-cols, rows))) < self.candidates
        rows, cols, sims = rows[recent], cols[recent], sims[recent]
        nearest = rank_within_rows(rows, np.lexsort((-cols, -sims, rows))) < self.neighbours
        neighbours = sp.csr_matrix(
            (sims[nearest], (rows[nearest], cols[nearest])), shape=dots.shape
        )
        return (neighbours @ self.playlists).toarray()

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
        scores = self.neighbour_scores(histories)
        if self.history_last:
            scores[history_matrix(histories, self.num_songs).toarray() > 0] = 0.0
        total = scores.sum(axis=1, keepdims=True)
        return np.where(total > 0, scores / np.maximum(total, 1e-300), self.p_pop[None, :])

    def log_likelihood(self, histories: list[np.ndarray], targets: np.ndarray) -> None:
        return None  # a neighbourhood score is not a probability model


SR_STEPS = (1, 2, 3, 5, 10)  # SR rule windows searched on validation (Ludewig & Jannach: 10)
SR_UNIT = 2520  # the least common multiple of 1..10: rule weights 1/gap become integers


def rule_weights(playlists: Sequence[np.ndarray], num_songs: int, steps: int) -> sp.csr_matrix:
    """float64 [num_songs, num_songs] CSR: w_ab = SR_UNIT x the sum, over every time song b
    came d <= `steps` plays after song a in a playlist, of 1/d."""
    a, b, w = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0)]
    for gap in range(1, steps + 1):
        for p in (np.asarray(p, np.int64) - 1 for p in playlists if len(p) > gap):
            a.append(p[:-gap])
            b.append(p[gap:])
            w.append(np.full(len(p) - gap, SR_UNIT // gap, np.float64))
    data = (np.concatenate(w), (np.concatenate(a), np.concatenate(b)))
    return sp.csr_matrix(data, shape=(num_songs, num_songs))


class SequentialRules:
    """SR (Ludewig & Jannach 2018): score(b) = the weight of the rules last song -> b, a rule
    counting 1/d each time b came d <= `steps` plays after a in a training playlist; equal
    scores are ordered by popularity. `steps` is the `SR_STEPS` value with the best validation
    Recall@20 x MRR@20, unless given."""

    def __init__(
        self, train: Sequence[np.ndarray], valid: Sequence[np.ndarray], num_songs: int,
        steps: int | None = None,
    ):  # fmt: skip
        self.num_songs, self.counts = num_songs, song_counts(train, num_songs)
        self.p_pop = popularity_probabilities(self.counts)
        self.pop_base = float(self.counts.max() + 1)
        if steps is None:
            events = [(p[:t] - 1, p[t] - 1) for p in valid for t in range(1, len(p))]
            if not events:
                raise DataError("sr: the validation split has no events to tune the window on")
            histories, targets = [h for h, _ in events], np.array([t for _, t in events])
            quality = []
            for candidate in SR_STEPS:
                self.steps, self.rules = candidate, rule_weights(train, num_songs, candidate)
                ranks = np.concatenate(
                    [
                        np.asarray(metrics.pessimistic_ranks(
                            self.scores(histories[i : i + CHUNK]), targets[i : i + CHUNK]
                        ))
                        for i in range(0, len(targets), CHUNK)
                    ]
                )  # fmt: skip
                top = ranks <= 20
                quality.append(top.mean() * np.mean(np.where(top, 1.0 / ranks, 0.0)))
            steps = SR_STEPS[int(np.argmax(quality))]
            tried = ", ".join(f"{n}: {q:.5f}" for n, q in zip(SR_STEPS, quality, strict=True))
            logging.info("sr: window %d plays (validation recall@20 x mrr@20 %s)", steps, tried)
        self.steps, self.rules = steps, rule_weights(train, num_songs, steps)

    def scores(self, histories: list[np.ndarray]) -> np.ndarray:
        last = np.array([h[-1] for h in histories], np.int64)
        return self.rules[last].toarray() * self.pop_base + self.counts[None, :]

    def probabilities(self, histories: list[np.ndarray]) -> np.ndarray:
        """Rule weights divided by their sum; popularity where no rule fires (for blends)."""
        last = np.array([h[-1] for h in histories], np.int64)
        rows = self.rules[last].toarray()
        total = rows.sum(axis=1, keepdims=True)
        return np.where(total > 0, rows / np.maximum(total, 1e-300), self.p_pop[None, :])

    def log_likelihood(self, histories: list[np.ndarray], targets: np.ndarray) -> None:
        return None  # rule weights are not a probability model


BASELINES: dict[str, Callable] = {
    "popularity": lambda data: Popularity(data.train, data.catalog.size),
    "markov": lambda data: Markov(data.train, data.valid, data.catalog.size),
    "sknn": lambda data: SessionKNN(data.train, data.catalog.size),
    "sknn_history_last": lambda data: SessionKNN(data.train, data.catalog.size, True),
    "sr": lambda data: SequentialRules(data.train, data.valid, data.catalog.size),
}


def fit(names: Sequence[str], data: yes_reader.YesData) -> dict:
    """{name: fitted baseline} on `data.train` (Markov also tunes β on `data.valid`)."""
    return {name: BASELINES[name](data) for name in names}


def evaluate(baseline, events: Events) -> dict:
    """`metrics.report` of a baseline over `events`; log-likelihood None if it has none."""
    ranking = metrics.RankingMetrics()
    has_likelihood = True
    for start in range(0, len(events), CHUNK):
        index = slice(start, start + CHUNK)
        histories, targets = events.histories(index), events.targets[index]
        ranks = metrics.pessimistic_ranks(baseline.scores(histories), targets)
        log_likelihood = baseline.log_likelihood(histories, targets)
        has_likelihood = log_likelihood is not None
        ranking.update_state(
            ranks, np.zeros(len(targets)) if log_likelihood is None else log_likelihood
        )
    out = metrics.report(ranking.result())
    if not has_likelihood:
        out["log_likelihood"] = out["perplexity"] = None
    return out
