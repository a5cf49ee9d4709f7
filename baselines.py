"""Next-song baselines (popularity, Markov, sequential rules; the neighbourhood ones of
`neighbours.py`), scored like the model.

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
from names import normalize
from neighbours import (
    CHUNK,
    VSTAN,
    SessionKNN,
    history_matrix,
    history_plays,
    latest_positions,
    normalised,
    popularity_probabilities,
    ranking_quality,
    song_counts,
    song_pairs,
    validation_events,
)

BETAS = np.logspace(-2, 4, 61)  # Markov smoothing grid, searched by validation log-likelihood


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


def successor_table(
    playlists: Sequence[np.ndarray], num_songs: int, width: int
) -> dict[str, np.ndarray]:
    """The `transitions.TransitionMixture` tables of token `playlists` (token = song id + 1).

    Returns:
      {"successors": int32 [num_songs + 1, width] song ids (row t: the successors of token t,
      most frequent first; row 0, padding, is empty), "counts": float32 of the same shape (0 in
      unused slots), "popularity": float32 [num_songs], add-one smoothed}.
    """
    matrix = transition_counts(playlists, num_songs)
    successors = np.zeros((num_songs + 1, width), np.int32)
    counts = np.zeros((num_songs + 1, width), np.float32)
    for song in range(num_songs):
        lo, hi = matrix.indptr[song], matrix.indptr[song + 1]
        top = np.argsort(-matrix.data[lo:hi], kind="stable")[:width]
        successors[song + 1, : len(top)] = matrix.indices[lo:hi][top]
        counts[song + 1, : len(top)] = matrix.data[lo:hi][top]
    popularity = popularity_probabilities(song_counts(playlists, num_songs)).astype(np.float32)
    return {"successors": successors, "counts": counts, "popularity": popularity}


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


SR_STEPS = (1, 2, 3, 5, 10)  # SR rule windows searched on validation (Ludewig & Jannach: 10)
SR_UNIT = 2520  # the least common multiple of 1..10: rule weights 1/gap become integers


def rule_weights(playlists: Sequence[np.ndarray], num_songs: int, steps: int) -> sp.csr_matrix:
    """float64 [num_songs, num_songs] CSR: w_ab = SR_UNIT x the sum, over every time song b
    came d <= `steps` plays after song a in a playlist, of 1/d."""
    a, b, gaps = song_pairs(playlists, steps)
    weights = (SR_UNIT // gaps).astype(np.float64)
    return sp.csr_matrix((weights, (a, b)), shape=(num_songs, num_songs))


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
            histories, targets = validation_events(valid, "sr")
            quality = []
            for candidate in SR_STEPS:
                self.steps, self.rules = candidate, rule_weights(train, num_songs, candidate)
                quality.append(ranking_quality(self.scores, histories, targets))
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
        return normalised(self.rules[last].toarray(), histories, False, self.p_pop)

    def log_likelihood(self, histories: list[np.ndarray], targets: np.ndarray) -> None:
        return None  # rule weights are not a probability model


REPEAT_DECAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 1e9)  # repeat's λ, searched on validation


class Repeat:
    """The session's own songs again: score(j) = e^((p - L) / λ) for a song j of the history
    (p its latest 1-based position, L the history's length), 0 for any other; equal scores are
    ordered by popularity. The one baseline that ranks a song never heard in training, once the
    session has played it. λ is the `REPEAT_DECAYS` value with the best validation
    log-likelihood over the events whose target is in their history, unless given."""

    def __init__(
        self, train: Sequence[np.ndarray], valid: Sequence[np.ndarray], num_songs: int,
        decay: float | None = None,
    ):  # fmt: skip
        self.num_songs, self.counts = num_songs, song_counts(train, num_songs)
        self.p_pop = popularity_probabilities(self.counts)
        self.pop_base = float(self.counts.max() + 1)
        if decay is None:
            histories, targets = validation_events(valid, "repeat")
            repeats = [i for i, (h, t) in enumerate(zip(histories, targets, strict=True)) if t in h]
            histories, targets = [histories[i] for i in repeats], targets[repeats]
            fits = []
            for candidate in REPEAT_DECAYS:
                self.decay = candidate
                p = self.probabilities(histories) if repeats else np.ones((0, 1))
                fits.append(float(np.log(p[np.arange(len(targets)), targets]).sum()))
            decay = REPEAT_DECAYS[int(np.argmax(fits))]
            logging.info(
                "repeat: λ %g (validation log-likelihood of %d repeats)", decay, len(targets)
            )
        self.decay = decay

    def _weights(self, histories: list[np.ndarray]) -> np.ndarray:
        return history_matrix(histories, self.num_songs, self.decay).toarray()

    def scores(self, histories: list[np.ndarray]) -> np.ndarray:
        """Exact keys: a history song's latest position x (1 + the largest count), plus the
        count; the weights fall with the distance, so the order is theirs for any λ."""
        rows, songs, positions, _ = latest_positions(histories)
        key = np.tile(self.counts.astype(np.float64), (len(histories), 1))
        key[rows, songs] += positions * self.pop_base
        return key

    def probabilities(self, histories: list[np.ndarray]) -> np.ndarray:
        """The weights divided by their sum: 0 for songs outside the history (for blends)."""
        return normalised(self._weights(histories), histories, False, self.p_pop)

    def log_likelihood(self, histories: list[np.ndarray], targets: np.ndarray) -> None:
        return None  # 0 for every song outside the history


def artist_ids(artists: Sequence[str]) -> np.ndarray:
    """int64 [songs]: one id per artist name (`names.normalize`d); a song whose artist is unknown
    ("") is an artist of its own."""
    keys = [normalize(a) or f"\0{song}" for song, a in enumerate(artists)]
    return np.unique(keys, return_inverse=True)[1].astype(np.int64).ravel()


def within_artist(weights: np.ndarray, artists: np.ndarray) -> np.ndarray:
    """`weights` [songs] divided by their sum over each song's artist (`artist_ids`)."""
    return weights / np.bincount(artists, weights=weights)[artists]


class Artist:
    """The session's artists again, any of their songs: p(j | h) = sum_a P(a | h) P(j | a), with
    P(a | h) proportional to e^((p - L) / λ) summed over the history's plays of artist a (p a
    play's 1-based position, L the history's length) and P(j | a) to j's training count + 1 among
    a's songs. So a song no training playlist holds gets a share once the session plays its
    artist: what a catalog that moves needs. Other artists' songs get 0 and rank below by
    popularity. λ is the `REPEAT_DECAYS` value with the best validation log-likelihood over the
    events whose target's artist is in their history, unless given."""

    def __init__(
        self, train: Sequence[np.ndarray], valid: Sequence[np.ndarray],
        catalog: yes_reader.Catalog, decay: float | None = None,
    ):  # fmt: skip
        self.artists = artist_ids(catalog.artists)
        self.counts = song_counts(train, catalog.size)
        self.popularity_key = self.counts / (self.counts.max() + 1.0) - 1.0  # below any p > 0
        share = within_artist(self.counts + 1.0, self.artists)
        shape = (int(self.artists.max()) + 1, catalog.size)
        self.songs = sp.csr_matrix((share, (self.artists, np.arange(catalog.size))), shape=shape)
        if decay is None:
            histories, targets = validation_events(valid, "artist")
            fits = []
            for candidate in REPEAT_DECAYS:
                self.decay = candidate
                weights = self._artist_weights(histories)
                p = np.asarray(weights[np.arange(len(targets)), self.artists[targets]]).ravel()
                fits.append(float(np.log(p[p > 0] * share[targets[p > 0]]).sum()))
            decay = REPEAT_DECAYS[int(np.argmax(fits))]
            logging.info("artist: λ %g (validation log-likelihood)", decay)
        self.decay = decay

    def _artist_weights(self, histories: list[np.ndarray]) -> sp.csr_matrix:
        """float64 [events, artists]: P(a | h), each row summing to 1."""
        rows, songs, positions, lengths = history_plays(histories)
        weights = np.exp((positions - lengths[rows]) / self.decay)
        matrix = sp.csr_matrix(
            (weights, (rows, self.artists[songs])), shape=(len(histories), self.songs.shape[0])
        )
        return sp.diags(1.0 / np.maximum(np.asarray(matrix.sum(axis=1)).ravel(), 1e-300)) @ matrix

    def probabilities(self, histories: list[np.ndarray]) -> np.ndarray:
        return (self._artist_weights(histories) @ self.songs).toarray()

    def scores(self, histories: list[np.ndarray]) -> np.ndarray:
        p = self.probabilities(histories)
        return np.where(p > 0, p, self.popularity_key[None, :])

    def log_likelihood(self, histories: list[np.ndarray], targets: np.ndarray) -> None:
        return None  # 0 for every song of an artist the session has not played


BASELINES: dict[str, Callable] = {
    "popularity": lambda data: Popularity(data.train, data.catalog.size),
    "markov": lambda data: Markov(data.train, data.valid, data.catalog.size),
    "sknn": lambda data: SessionKNN(data.train, data.catalog.size),
    "sknn_history_last": lambda data: SessionKNN(data.train, data.catalog.size, True),
    "sr": lambda data: SequentialRules(data.train, data.valid, data.catalog.size),
    "vstan": lambda data: VSTAN(data.train, data.valid, data.catalog.size),
    "repeat": lambda data: Repeat(data.train, data.valid, data.catalog.size),
    "artist": lambda data: Artist(data.train, data.valid, data.catalog),
}


def fit(names: Sequence[str], data: yes_reader.YesData) -> dict:
    """{name: fitted baseline} on `data.train` (Markov also tunes β on `data.valid`)."""
    return {name: BASELINES[name](data) for name in names}


def evaluate(baseline, events: Events, exclude_history: bool = False) -> dict:
    """`metrics.report` of a baseline over `events`; log-likelihood None if it has none.

    `exclude_history` ranks each event without the songs of its history
    (`metrics.exclude_history`); the log-likelihood is the baseline's own, unchanged.
    """
    ranking = metrics.RankingMetrics()
    has_likelihood = True
    for start in range(0, len(events), CHUNK):
        index = slice(start, start + CHUNK)
        histories, targets = events.histories(index), events.targets[index]
        scores = baseline.scores(histories)
        if exclude_history:
            scores = metrics.exclude_history(scores, histories)
        ranks = metrics.pessimistic_ranks(scores, targets)
        log_likelihood = baseline.log_likelihood(histories, targets)
        has_likelihood = log_likelihood is not None
        ranking.update_state(
            ranks, np.zeros(len(targets)) if log_likelihood is None else log_likelihood
        )
    out = metrics.report(ranking.result())
    if not has_likelihood:
        out["log_likelihood"] = out["perplexity"] = None
    return out
