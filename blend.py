"""The hybrid of the model and the baselines (`--blend`), and the `--baselines` comparison.

A blend scores each event with a weighted mixture of its components' next-song probability
distributions ("rnn": the model's softmax; the fitted baselines of `baselines.py`); weights are
given, or chosen on the validation split by `--mode=eval` and recorded in metrics.json, with
whether the components that rank the history last take the model's probabilities there
(`fill_history`).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator, Sequence

import numpy as np
from absl import logging
from keras import ops

import coldstart
import config as config_lib
import metrics
import serving
import yes_reader
from baselines import CHUNK, Events, evaluate, fit
from errors import ConfigError

BLEND_STEP = 0.1  # blend weights are searched on a simplex grid of this step
FULL_SUPPORT = ("rnn", "popularity", "markov")  # components giving every song a probability > 0


def simplex(names: Sequence[str], step: float = BLEND_STEP) -> list[dict[str, float]]:
    """Every weighting of `names` by multiples of `step` that sums to 1 (vertices included)."""
    n = round(1 / step)
    grid = [c for c in itertools.product(range(n + 1), repeat=len(names)) if sum(c) == n]
    return [{name: k / n for name, k in zip(names, c, strict=True)} for c in grid]


def model_probabilities(model, windows: yes_reader.Windows, w: int) -> np.ndarray:
    """float64 [events of window w, songs]: softmax of the model's logits at its real positions.

    Windows must be fed in order (w = 0, 1, ...): the model carries its state between them.
    """
    logits = np.asarray(model.predict_on_batch((windows.inputs[w], windows.reset[w])), np.float64)
    logits = logits[windows.weights[w] > 0]
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)


def component_chunks(
    names: Sequence[str], fitted: dict, model, windows: yes_reader.Windows
) -> Iterator[tuple[np.ndarray, list[np.ndarray], np.ndarray]]:
    """Yields (targets int64 [n], their n histories, probabilities float32 [components, n,
    songs]) for chunks of about `CHUNK` consecutive events of `windows`; components in the order
    of `names`."""
    events = Events.from_windows(windows)
    per_window = windows.weights.sum(axis=(1, 2)).astype(np.int64)
    ends = np.cumsum(per_window)
    start, pending = 0, []
    for w in range(windows.num_windows):
        if "rnn" in names:
            pending.append(model_probabilities(model, windows, w))
        if ends[w] - start < CHUNK and w + 1 < windows.num_windows:
            continue
        index = slice(start, ends[w])
        histories = events.histories(index)
        stack = [
            np.concatenate(pending) if name == "rnn" else fitted[name].probabilities(histories)
            for name in names
        ]
        yield events.targets[index], histories, np.stack(stack).astype(np.float32)
        start, pending = ends[w], []


def history_last(names: Sequence[str], fitted: dict) -> list[int]:
    """Positions in `names` of the fitted components that rank the history last; none without
    "rnn" in `names` (nothing to fill them with)."""
    if "rnn" not in names:
        return []
    return [c for c, name in enumerate(names) if getattr(fitted.get(name), "history_last", False)]


def fill_history(
    stack: np.ndarray, names: Sequence[str], fitted: dict, histories: list[np.ndarray]
) -> np.ndarray:
    """float32 [components, events, songs]: `stack` with the model's probabilities on the
    history songs of every component that ranks the history last (V-STAN, session-kNN).

    Such a component gives a song of the history probability 0: it has nothing to say about
    songs coming back, which the model scores (--repeat_window). Filled, it keeps its
    distribution over the other songs, scaled to 1 - m, and takes p_rnn on the history songs
    (m = p_rnn's mass there), so it stays a distribution and a blend does not dilute the model's
    repeats.
    """
    out = np.array(stack, np.float32)
    last = history_last(names, fitted)
    if not last:
        return out
    seen = np.zeros(out.shape[1:], bool)
    for row, history in enumerate(histories):
        seen[row, history] = True
    model = np.where(seen, out[list(names).index("rnn")], 0.0)
    mass = model.sum(axis=1, keepdims=True)
    for c in last:
        rest = np.where(seen, 0.0, out[c])
        out[c] = rest * ((1.0 - mass) / np.maximum(rest.sum(axis=1, keepdims=True), 1e-30)) + model
    return out


def evaluate_blends(
    blends: Sequence[dict[str, float]],
    fitted: dict,
    model,
    windows: yes_reader.Windows,
    exclude_history: bool = False,
    fill: Sequence[bool] | None = None,
) -> list[dict]:
    """`metrics.report` of each blend p = sum_c w_c p_c(song | history) over every event.

    Components are per-event probability distributions (softmax for "rnn", Markov and popularity
    as they are, session-kNN scores divided by their sum), so a blend is itself a distribution:
    its log-likelihood is defined, and no per-event min-max rescaling is needed. Weights are
    divided by their sum.

    Args:
      blends: weightings {component: weight} of the same components ("rnn" or names of `fitted`).
      fitted: fitted baselines by name; model: the trained model (used only if "rnn" is blended).
      exclude_history: rank each event without the songs of its history, as --mode=recommend
        serves (`metrics.exclude_history`); the log-likelihood stays the blend's own.
      fill: per blend, whether to `fill_history` first (default: none).
    """
    names = list(blends[0])
    fill = list(fill or [False] * len(blends))
    rankings = [metrics.RankingMetrics() for _ in blends]
    weights = np.array([[blend[name] for name in names] for blend in blends], np.float32)
    weights /= weights.sum(axis=1, keepdims=True)
    for targets, histories, stack in component_chunks(names, fitted, model, windows):
        stacks = {False: stack}
        if any(fill):
            stacks[True] = fill_history(stack, names, fitted, histories)
        stacks = {k: ops.convert_to_tensor(v) for k, v in stacks.items()}  # faster than numpy
        for ranking, row, filled in zip(rankings, weights, fill, strict=True):
            blended = ops.tensordot(row, stacks[filled], axes=1)
            ranked = blended
            if exclude_history:
                ranked = metrics.exclude_history(ops.convert_to_numpy(blended), histories)
            ranks = metrics.pessimistic_ranks(ranked, targets)
            target_p = ops.take_along_axis(blended, ops.expand_dims(targets, -1), axis=-1)
            ranking.update_state(ranks, ops.log(ops.squeeze(target_p, -1)))
    reports = [metrics.report(ranking.result()) for ranking in rankings]
    full_support = np.array([name in FULL_SUPPORT for name in names])
    for report, row in zip(reports, weights, strict=True):
        if not np.any(row[full_support] > 0):  # kNN probabilities alone have zeros
            report["log_likelihood"] = report["perplexity"] = None
    return reports


def choose_blend(
    names: Sequence[str], fitted: dict, model, valid: yes_reader.Windows, exclude: bool = False
) -> dict:
    """The `simplex` weighting, with and without `fill_history` where it changes the blend, with
    the best validation Recall@20 x MRR@20, and its metrics (ranked without each event's history if
    `exclude`): {"weights", "fill_history", "validation"}."""
    last = [names[c] for c in history_last(names, fitted)]
    grid = [(blend, False) for blend in simplex(names)]
    grid += [(blend, True) for blend, _ in grid if any(blend[name] > 0 for name in last)]
    blends, fill = [b for b, _ in grid], [f for _, f in grid]
    reports = evaluate_blends(blends, fitted, model, valid, exclude, fill)
    best = int(np.argmax([r["recall"]["20"] * r["mrr"]["20"] for r in reports]))
    for (blend, filled), report in zip(grid, reports, strict=True):
        logging.info(
            "blend %s%s: validation recall@20 %.4f, mrr@20 %.4f",
            blend,
            ", history filled" if filled else "",
            report["recall"]["20"],
            report["mrr"]["20"],
        )
    logging.info("chose blend %s (fill_history %s) on validation", *grid[best])
    return {"weights": blends[best], "fill_history": fill[best], "validation": reports[best]}


def compare(
    config: config_lib.Config, model, windows: yes_reader.Windows, cold: np.ndarray
) -> dict:
    """The `--baselines` and `--blend` entries of `metrics.json`, on the model's test `windows`.

    Baselines are fitted on the training playlists without the `cold` songs (bool [songs]).

    Returns:
      {"baselines": {name: report}} and, with --blend, "blend": report + "weights" +
      "fill_history" (+ the "validation" report of the chosen ones when they were tuned; given
      weights do not fill); if any song is cold,
      "cold": the same entries over the events whose target is cold.
    """
    data = coldstart.load(config)
    blend = config.blend_weights
    fitted = fit(sorted(set(config.baseline_names) | (set(blend) - {"rnn"})), data)
    events = Events.from_windows(windows)
    exclude = config.exclude_history
    out: dict = {
        "baselines": {
            name: evaluate(fitted[name], events, exclude) for name in config.baseline_names
        }
    }
    fill = [False]
    if blend:
        tuned = {}
        if None in blend.values():
            valid = yes_reader.make_windows(data.valid, windows.inputs.shape[1], config.num_steps)
            tuned = choose_blend(list(blend), fitted, model, valid, exclude)
            blend, fill = tuned["weights"], [tuned["fill_history"]]
        report = evaluate_blends([blend], fitted, model, windows, exclude, fill)[0]
        out["blend"] = {"weights": blend, "fill_history": fill[0], **report}
        if tuned:
            out["blend"]["validation"] = tuned["validation"]
    if cold.any():
        cold_windows = coldstart.cold_target_windows(windows, cold)
        cold_events = Events.from_windows(cold_windows)
        names = config.baseline_names
        out["cold"] = {"baselines": {n: evaluate(fitted[n], cold_events) for n in names}}
        if blend:
            (report,) = evaluate_blends([blend], fitted, model, cold_windows, False, fill)
            out["cold"]["blend"] = {"weights": blend, "fill_history": fill[0], **report}
    return out


def chosen_blend(config: config_lib.Config) -> tuple[dict[str, float], bool]:
    """--blend's weights and `fill_history`: as given (no fill), else the ones `--mode=eval`
    chose (model_dir/metrics.json).

    Raises:
      ConfigError naming --blend if no weights are given and eval has not chosen any for these
        components.
    """
    blend = config.blend_weights
    if None not in blend.values():
        return blend, False
    path = os.path.join(config.model_dir, "metrics.json")
    chosen = {}
    if os.path.exists(path):
        with open(path) as f:
            chosen = json.load(f).get("blend", {})
    weights = chosen.get("weights", {})
    if set(weights) != set(blend):
        raise ConfigError(
            f"--blend={config.blend}: no weights given and {path} holds none chosen for these "
            "components; run --mode=eval with this --blend first, or give the weights"
        )
    fill = bool(chosen.get("fill_history", False))
    logging.info("blend chosen by --mode=eval (%s): %s, fill_history %s", path, weights, fill)
    return weights, fill


def recommend_blend(
    config: config_lib.Config, model, histories: list[np.ndarray], top_k: int
) -> dict[str, np.ndarray]:
    """The --blend's top `top_k` next songs after each history, scored as in `evaluate_blends`.

    Args:
      model: the trained model; its probabilities come from the serving function (whole catalog).
      histories: 0-based song ids, oldest first.

    Returns:
      {"song_ids": int [histories, top_k] best first, "scores": float [histories, top_k] the
      blended probability}; with --exclude_history, songs of the history come last (score -1).
    """

    weights, fill = chosen_blend(config)
    data = coldstart.load(config)
    fitted = fit(sorted(set(weights) - {"rnn"}), data)
    names = list(weights)
    stack = []
    for name in names:
        if name != "rnn":
            stack.append(fitted[name].probabilities(histories))
            continue
        serve = serving.serving_function(model, model.num_songs, exclude_history=False)
        out = serve(*serving.pad_histories(histories))  # every song, best first: scatter back
        rnn = np.zeros((len(histories), model.num_songs))
        np.put_along_axis(rnn, out["song_ids"].numpy(), out["scores"].numpy(), axis=1)
        stack.append(rnn)
    stack = np.array(stack)
    if fill:
        stack = fill_history(stack, names, fitted, histories)
    mixture = np.array([weights[name] for name in names]) / sum(weights.values())
    probs = np.tensordot(mixture, stack, axes=1)
    if config.exclude_history:
        for row, history in enumerate(histories):
            probs[row, history] = -1.0
    song_ids = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    return {"song_ids": song_ids, "scores": np.take_along_axis(probs, song_ids, axis=1)}
