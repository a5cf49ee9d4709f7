"""Hit rate of audio-feature recommendations under the GRU report's protocol (pure numpy).

For each month's test plays t[0..n) and each sample i in [0, N), N = n - seq_len - pred_steps + 1:
the input is t[i : i+seq_len], the truth the songs of t[i+seq_len : i+seq_len+pred_steps].

- window protocol: candidates are the test records t[max(0, e - bar) : e], e = i + seq_len, i.e.
  the 10 most recent records at first, growing to the `bar` = 20 most recent.
- open catalog: candidates are all songs played before the prediction point (any month).

Methods, each recommending up to k = 5 songs:
- `ranking`: the ranking head's k distinct best-scored candidates (`audiomodel.AudioRankingModel`).
- `model` (the regression head): multi-step; each of the pred_steps predicted vectors picks its
  nearest candidate (Euclidean); repeats allowed.
- `model_single` (the regression head): single-step; the first predicted vector ranks candidates
  by cosine similarity; songs already in the list are skipped; top k distinct songs.
- `recent`: the k most recently played distinct candidate songs.
- `frequent`: the k most played candidate songs (ties: most recently played first).
- `random`: k distinct candidate songs drawn uniformly; the exact expected hits, or the mean of
  `random_draws` seeded draws.
- `ceiling`: 1 if any candidate song is among the truth; no method over these candidates beats it.

A sample is a hit if any recommended song is among the true next pred_steps songs. Hit rates are
per month and micro-averaged (total hits / total samples). Ties in distance or similarity go to
the most recent candidate, which does not look at the truth.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

import rundir

PredictFn = Callable[[np.ndarray], np.ndarray]
METHODS = ("ranking", "model", "model_single", "recent", "frequent", "random", "ceiling")
RankFn = Callable[[str], dict[str, np.ndarray]]


def nearest_songs(preds: np.ndarray, feats: np.ndarray, songs: np.ndarray) -> np.ndarray:
    """Multi-step choice: the candidate nearest (Euclidean) to each predicted vector.

    Args:
      preds: float [P, F], predicted feature vectors.
      feats: float [C, F], candidate feature vectors, oldest first.
      songs: int [C], candidate song ids.

    Returns:
      int [P], one song per predicted vector (ties: the most recent candidate).
    """
    dist = np.linalg.norm(preds[:, None, :] - feats[None, ::-1, :], axis=-1)
    return songs[::-1][np.argmin(dist, axis=1)]


def cosine_songs(pred: np.ndarray, feats: np.ndarray, songs: np.ndarray, k: int) -> np.ndarray:
    """Single-step choice: candidates ranked by cosine similarity, excluding repeats.

    Args:
      pred: float [F], one predicted feature vector.
      feats: float [C, F], candidate feature vectors, oldest first.
      songs: int [C], candidate song ids.
      k: list length.

    Returns:
      int [min(k, distinct songs)], distinct songs by descending similarity (ties: most recent).
    """
    feats, songs = feats[::-1], songs[::-1]
    norms = np.linalg.norm(feats, axis=1) * np.linalg.norm(pred)
    sim = np.divide(feats @ pred, norms, out=np.zeros(len(feats)), where=norms > 0)
    ranked = songs[np.argsort(-sim, kind="stable")]
    _, first = np.unique(ranked, return_index=True)  # drop songs already recommended
    return ranked[np.sort(first)][:k]


def recent_songs(songs: np.ndarray, k: int) -> np.ndarray:
    """The k most recent distinct songs of `songs` (int [C], oldest first), newest first."""
    rev = songs[::-1]
    _, first = np.unique(rev, return_index=True)
    return rev[np.sort(first)][:k]


def frequent_songs(songs: np.ndarray, k: int) -> np.ndarray:
    """The k most played songs of `songs` (int [C], oldest first); ties: most recently played."""
    ids, counts = np.unique(songs, return_counts=True)
    last = np.array([np.flatnonzero(songs == s)[-1] for s in ids])
    return ids[np.lexsort((-last, -counts))][:k]


def is_hit(recommended: np.ndarray, truth: np.ndarray) -> bool:
    """True if any recommended song is among the true next songs."""
    return bool(np.isin(recommended, truth).any())


def random_hit_chance(num_candidates: int, num_good: int, k: int) -> float:
    """P(hit) when k of `num_candidates` distinct songs are drawn without replacement and
    `num_good` of them are in the truth: 1 - C(D - g, k) / C(D, k) (all are taken if D <= k)."""
    if num_good == 0:
        return 0.0
    if num_candidates <= k:
        return 1.0
    return 1.0 - math.comb(num_candidates - num_good, k) / math.comb(num_candidates, k)


class _Tally:
    """Samples and hits per (protocol, method, month); scores one sample for every method."""

    def __init__(self, k: int, random_draws: int, seed: int) -> None:
        self.k, self.draws, self.rng = k, random_draws, np.random.default_rng(seed)
        self.counts: dict[tuple[str, str], dict[str, list[float]]] = {}

    def add(self, protocol: str, method: str, month: str, hit: float) -> None:
        cell = self.counts.setdefault((protocol, method), {}).setdefault(month, [0, 0.0])
        cell[0] += 1
        cell[1] += float(hit)

    def random(self, distinct: np.ndarray, truth: np.ndarray) -> float:
        """`random`: exact expectation (no draws) or the mean of the seeded draws."""
        if not self.draws:
            return random_hit_chance(len(distinct), int(np.isin(distinct, truth).sum()), self.k)
        size = min(self.k, len(distinct))
        picks = [self.rng.choice(distinct, size, replace=False) for _ in range(self.draws)]
        return float(np.mean([is_hit(p, truth) for p in picks]))

    def score(
        self,
        key: tuple[str, str],
        sample: tuple,
        cands: np.ndarray,
        feats: np.ndarray,
        recent: np.ndarray,
        frequent: np.ndarray,
    ) -> None:
        """Adds one sample's outcome for every method.

        Args:
          key: (protocol, month).
          sample: (truth int [pred_steps], pred float [pred_steps, F] or None).
          cands, feats: candidate songs int [C] and their features float [C, F], oldest first.
          recent, frequent: the two baselines' lists.
        """
        (truth, pred), (protocol, month) = sample, key
        if pred is not None:
            hit = is_hit(nearest_songs(pred, feats, cands), truth)
            self.add(protocol, "model", month, hit)
            hit = is_hit(cosine_songs(pred[0], feats, cands, self.k), truth)
            self.add(protocol, "model_single", month, hit)
        distinct = np.unique(cands)
        self.add(protocol, "recent", month, is_hit(recent, truth))
        self.add(protocol, "frequent", month, is_hit(frequent, truth))
        self.add(protocol, "random", month, self.random(distinct, truth))
        self.add(protocol, "ceiling", month, is_hit(distinct, truth))

    def report(self) -> dict:
        out: dict = {}
        cells = sorted(self.counts.items(), key=lambda cell: METHODS.index(cell[0][1]))
        for (protocol, method), months in cells:
            rows = {m: {"samples": n, "hits": h, "hit_rate": h / n} for m, (n, h) in months.items()}
            n = sum(r["samples"] for r in rows.values())
            h = sum(r["hits"] for r in rows.values())
            summary = {"samples": n, "hits": h, "hit_rate": h / n if n else 0.0}
            out.setdefault(protocol, {})[method] = {**summary, "months": rows}
        return out


class _History:
    """Play counts and last-play positions of every song before a moving prediction point."""

    def __init__(self, songs: np.ndarray) -> None:
        self.songs, self.done = songs, 0
        self.counts = np.zeros(int(songs.max()) + 1, np.int64)
        self.last = np.full(len(self.counts), -1, np.int64)

    def advance(self, point: int) -> np.ndarray:
        """Counts plays [done, point); returns the songs seen so far, oldest last play first."""
        new = np.arange(self.done, max(self.done, point))
        np.add.at(self.counts, self.songs[new], 1)
        self.last[self.songs[new]] = new
        self.done = max(self.done, point)
        seen = np.flatnonzero(self.counts)
        return seen[np.argsort(self.last[seen])]

    def frequent(self, order: np.ndarray, k: int) -> np.ndarray:
        return order[np.lexsort((-self.last[order], -self.counts[order]))][:k]


def evaluate(
    segments: Sequence[tuple[str, np.ndarray]],
    songs: np.ndarray,
    z: np.ndarray,
    predict_fn: PredictFn | None = None,
    rank_fn: RankFn | None = None,
    *,
    seq_len: int = 10,
    pred_steps: int = 5,
    bar: int = 20,
    k: int = 5,
    random_draws: int = 0,
    seed: int = 0,
) -> dict:
    """Hit rates of the model and the baselines, window protocol and open catalog.

    Args:
      segments: per month, (label, int [n] play indices of its test part in time order).
      songs: int [plays], song id of every play (all months, time order).
      z: float [plays, F], the (scaled) features the model sees; a song's plays share one vector.
      predict_fn: x float32 [N, seq_len, F] → float [N, pred_steps, F] (or [N, pred_steps * F]);
        called once per month with that month's N windows in order. None: no `model` rows.
      rank_fn: month label → {"window": int [N, k], "open_catalog": int [N, k]}, the ranking
        head's k distinct songs (-1: none) for that month's N samples in order, over these same
        candidates; called once per month. None: no `ranking` rows.
      seq_len, pred_steps, bar, k: protocol sizes (report: 10, 5, 20, 5).
      random_draws: 0 for the exact expectation of `random`, else the mean of this many draws.
      seed: seed of the random draws.

    Returns:
      {"window": {method: summary}, "open_catalog": {method: summary}}, where summary is
      {"samples", "hits", "hit_rate", "months": {label: {"samples", "hits", "hit_rate"}}}
      (`random` hits are expected values).
    """
    tally, history = _Tally(k, random_draws, seed), _History(songs)
    song_z = np.zeros((len(history.counts), z.shape[1]), z.dtype)
    song_z[songs] = z
    for month, test in segments:
        test = np.asarray(test)
        n = len(test) - seq_len - pred_steps + 1
        if n <= 0:
            continue
        rows = test[np.arange(n)[:, None] + np.arange(seq_len + pred_steps)]
        preds, ranked = [None] * n, rank_fn(month) if rank_fn is not None else None
        if predict_fn is not None:
            out = np.asarray(predict_fn(z[rows[:, :seq_len]].astype(np.float32)))
            preds = out.reshape(n, pred_steps, z.shape[1])
        for i, row in enumerate(rows):
            sample = (songs[row[seq_len:]], preds[i])
            window = test[max(0, i + seq_len - bar) : i + seq_len]
            cands = songs[window]
            recent, frequent = recent_songs(cands, k), frequent_songs(cands, k)
            tally.score(("window", month), sample, cands, z[window], recent, frequent)
            seen = history.advance(row[seq_len])
            for protocol in ranked or ():
                tally.add(protocol, "ranking", month, is_hit(ranked[protocol][i], sample[0]))
            recent, frequent = seen[::-1][:k], history.frequent(seen, k)
            tally.score(("open_catalog", month), sample, seen, song_z[seen], recent, frequent)
    return tally.report()


def oracle(
    segments: Sequence[tuple[str, np.ndarray]],
    z: np.ndarray,
    seq_len: int = 10,
    pred_steps: int = 5,
) -> PredictFn:
    """A `predict_fn` that returns the TRUE next feature vectors (a check of the protocol).

    It replays the months of `segments` in order, so pass it to `evaluate` with the same arguments.
    """
    truths = []
    for _, test in segments:
        n = len(test) - seq_len - pred_steps + 1
        if n > 0:
            steps = np.arange(n)[:, None] + np.arange(seq_len, seq_len + pred_steps)
            truths.append(z[np.asarray(test)[steps]])
    replay = iter(truths)

    def predict(x: np.ndarray) -> np.ndarray:
        y = next(replay, None)
        if y is None or len(y) != len(x):
            raise ValueError("oracle called with windows that do not match its segments")
        return y

    return predict


def format_table(results: dict, protocol: str = "window") -> str:
    """Per-month samples, model hits and hit rates of every method, plus the overall row."""
    methods = [m for m in METHODS if m in results[protocol]]
    first = results[protocol][methods[0]]
    head = f"{'month':8} {'samples':>7} " + " ".join(f"{m:>12}" for m in methods)
    lines = [f"[{protocol}] hit rate", head]
    for month in first["months"]:
        cells = [f"{results[protocol][m]['months'][month]['hit_rate']:12.3f}" for m in methods]
        lines.append(f"{month:8} {first['months'][month]['samples']:7d} " + " ".join(cells))
    cells = [f"{results[protocol][m]['hit_rate']:12.3f}" for m in methods]
    lines.append(f"{'overall':8} {first['samples']:7d} " + " ".join(cells))
    return "\n".join(lines)


def plot_hit_rate(results: dict, path: str, protocol: str = "window", title: str = "") -> None:
    """The report's chart, written atomically as PNG: bars of samples and hits per month (the
    model's, else the ceiling's), hit-rate line(s), and each baseline's hit rate as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = results[protocol]
    main = next(m for m in ("ranking", "model", "ceiling") if m in res)
    months = list(res[main]["months"])
    x = np.arange(len(months))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(months) + 2), 4.5))
    samples = [res[main]["months"][m]["samples"] for m in months]
    hits = [res[main]["months"][m]["hits"] for m in months]
    ax.bar(x - 0.2, samples, 0.4, label="samples", color="tab:blue")
    ax.bar(x + 0.2, hits, 0.4, label=f"hits ({main})", color="tab:orange")
    ax.set_xticks(x, months, rotation=45, ha="right")
    ax.set_ylabel("samples per month")
    rate = ax.twinx()
    styles = {"ranking": "D-", "model": "o-", "model_single": "s-", "ceiling": "--"}
    colors = {"ranking": "tab:red", "model": "tab:green", "model_single": "tab:brown"}
    colors["ceiling"] = "black"
    for method in (m for m in METHODS if m in res):
        values = [res[method]["months"][m]["hit_rate"] for m in months]
        label = f"{method} ({res[method]['hit_rate']:.3f})"
        rate.plot(x, values, styles.get(method, ".:"), color=colors.get(method), label=label)
    rate.set_ylim(0, 1)
    rate.set_ylabel("hit rate")
    handles = ax.get_legend_handles_labels()[0] + rate.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + rate.get_legend_handles_labels()[1]
    rate.legend(handles, labels, loc="upper left", fontsize="small", ncol=2)
    ax.set_title(title or f"hit rate per month ({protocol})")
    fig.tight_layout()
    try:
        with rundir.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
