"""The audio task's ranking head: monthly training through the shared trainer, its hit-rate
recommendations and `--mode=recommend` (the regression head lives in `audio_task.py`).

Month k trains on the samples of `audio_windows.dynamic_train`'s windows with the song features
z-scored on the plays before month k's test (`audio_windows.monthly_z`); the model carries over
from month k-1 (with a fresh Adam), as the regression head does. Each month has its own
directory `model_dir/ranking/<YYYY-MM>/` (checkpoints, TensorBoard, model.keras).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

import audio_reader
import audio_windows
import audiomodel
import config as config_lib
import hooks
import modeltrainer
import priors

RANKING_DIR = "ranking"
EVAL_BATCH = 128  # samples scored at once in evaluation


def ranking_dir(config: config_lib.Config, month: str) -> str:
    return os.path.join(config.model_dir, RANKING_DIR, month)


def play_days(data: audio_reader.AudioData) -> np.ndarray:
    """float64 [plays]: each play's time in days since the first play."""
    return (data.plays.time - data.plays.time.iloc[0]).dt.total_seconds().to_numpy() / 86400


def song_table(songs: np.ndarray, z: np.ndarray, num_songs: int) -> np.ndarray:
    """float32 [num_songs + 1, F]: row s + 1 holds song s's z-scored features (row 0: padding)."""
    table = np.zeros((num_songs + 1, z.shape[1]), np.float32)
    table[songs + 1] = z
    return table


def schedule(
    samples: dict, batch_size: int, num_epochs: int, seed: int, step: int
) -> tf.data.Dataset:
    """The batches from global step `step` on: each epoch a seeded permutation of the samples,
    filled up to whole batches with its first samples; (inputs, positives, weights), the weight
    of an output 1 where the sample has a positive there."""
    n = len(samples["x_ids"])
    steps = math.ceil(n / batch_size)
    rng = np.random.default_rng(seed)
    order = np.concatenate(
        [np.resize(rng.permutation(n), steps * batch_size) for _ in range(num_epochs)]
    )
    inputs = {key: samples[key][order] for key in audiomodel.INPUTS}
    positives = tuple(samples[key][order] for key in ("w_pos", "o_pos"))
    weights = tuple(p.max(axis=1) for p in positives)
    dataset = tf.data.Dataset.from_tensor_slices((inputs, positives, weights))
    return dataset.batch(batch_size).skip(step)


def train_months(
    model: keras.Model,
    config: config_lib.Config,
    splits: Sequence[audio_windows.MonthSplit],
    dynamic: Sequence[np.ndarray],
    *,
    directory: Callable[[str], str],
    num_epochs: int,
    batch_size: int,
    month_data: Callable[[int, np.ndarray], Callable[[int], tf.data.Dataset]],
    after_restore: Callable[[], None] = lambda: None,
) -> None:
    """The monthly dynamic training both heads share: month k trains `model` on the windows
    `dynamic[k]` through the shared `Trainer` in `directory(month)`, starting from the weights
    month k - 1 ended with and a fresh Adam; a rerun skips finished months and resumes the
    unfinished one.

    Args:
      month_data: (k, windows) -> step -> the month's batches from that global step on; called
        for every month in order before its training (also for a month without windows).
      after_restore: `Trainer.train`'s, called once a month's checkpoint (if any) has loaded.
    """
    fresh = [v.numpy() for v in model.optimizer.variables]  # as built: step 0, no moments
    for k, (split, rows) in enumerate(zip(splits, dynamic, strict=True)):
        model.optimizer.set_weights(fresh)  # the weights carry over, the optimizer does not
        make_dataset = month_data(k, rows)
        trainer = modeltrainer.Trainer(
            model,
            directory(split.month),
            num_epochs=num_epochs,
            steps_per_epoch=max(1, math.ceil(len(rows) / batch_size)),
            checkpoint_every_steps=config.checkpoint_every_steps,
            perplexity=False,
        )
        if not len(rows):
            logging.warning("month %s: no training window; model unchanged", split.month)
            trainer.save()
            continue
        logging.info("month %s: %d training windows", split.month, len(rows))
        trainer.train(make_dataset, [hooks.ProgressHook()], after_restore=after_restore)


def train(
    config: config_lib.Config,
    data: audio_reader.AudioData,
    splits: Sequence[audio_windows.MonthSplit],
    dynamic: Sequence[np.ndarray],
    after_restore: Callable[[], None] = lambda: None,
) -> None:
    """Trains the ranking head month after month (see the module docstring); resumable.
    `after_restore` as in `train_months`."""
    keras.utils.set_random_seed(config.seed)
    songs, num_songs, days = data.songs, len(data.names), play_days(data)
    monthly_z = audio_windows.monthly_z(data.features, splits)
    model = audiomodel.build_ranking_model(config, num_songs, data.features.shape[1])
    batch_size, num_epochs = config.ranking_batch_size, config.ranking_epochs

    def month_data(k: int, rows: np.ndarray) -> Callable[[int], tf.data.Dataset]:
        model.song_z.assign(song_table(songs, monthly_z[k], num_songs))
        if not len(rows):
            return lambda step: tf.data.Dataset.range(0)
        samples = priors.train_samples(
            songs, days, num_songs, rows, seq_len=config.seq_len, bar=config.bar,
            num_negatives=config.num_negatives, rng=np.random.default_rng([config.seed, k]),
        )  # fmt: skip
        seed = config.seed * 1000 + k
        return lambda step: schedule(samples, batch_size, num_epochs, seed, step)

    train_months(
        model, config, splits, dynamic, directory=lambda month: ranking_dir(config, month),
        num_epochs=num_epochs, batch_size=batch_size, month_data=month_data,
        after_restore=after_restore,
    )  # fmt: skip


def load(config: config_lib.Config, month: str) -> audiomodel.AudioRankingModel:
    return modeltrainer.load_model(ranking_dir(config, month))


def scores(model: audiomodel.AudioRankingModel, samples: dict) -> tuple[np.ndarray, np.ndarray]:
    """(window logits float [N, Cw], open-catalog logits float [N, Co]) of `samples`."""
    out = [[], []]
    for start in range(0, len(samples["x_ids"]), EVAL_BATCH):
        batch = {key: samples[key][start : start + EVAL_BATCH] for key in audiomodel.INPUTS}
        for part, logits in zip(out, model(batch), strict=True):
            part.append(keras.ops.convert_to_numpy(logits))
    return np.concatenate(out[0]), np.concatenate(out[1])


def rank_fn(
    config: config_lib.Config,
    data: audio_reader.AudioData,
    splits: Sequence[audio_windows.MonthSplit],
):
    """`hitrate.evaluate`'s rank_fn: month → each protocol's `pred_steps` distinct songs, by
    that month's ranking model over the samples of its test part."""
    songs, num_songs, days = data.songs, len(data.names), play_days(data)
    tests = {split.month: split.test for split in splits}

    def rank(month: str) -> dict[str, np.ndarray]:
        samples = priors.eval_samples(
            songs, days, num_songs, tests[month], seq_len=config.seq_len,
            pred_steps=config.pred_steps, bar=config.bar,
        )  # fmt: skip
        window, open_ = scores(load(config, month), samples)
        k = config.pred_steps
        return {
            "window": priors.top_k_distinct(window, samples["w_ids"], k),
            "open_catalog": priors.top_k_distinct(open_, samples["o_ids"], k),
        }

    return rank


def recommend(
    config: config_lib.Config,
    data: audio_reader.AudioData,
    splits: Sequence[audio_windows.MonthSplit],
) -> list[dict]:
    """Prints and returns the `pred_steps` songs most likely next after the last plays of the
    log, by the last month's ranking model over every song heard (features z-scored on all
    plays); score = the model's probability among those songs."""
    model = load(config, splits[-1].month)
    songs, num_songs = data.songs, len(data.names)
    z, _, _ = audio_windows.standardize(data.features, splits, "global")  # every play is past
    model.song_z.assign(song_table(songs, z, num_songs))
    end = len(songs)
    state = priors.PriorState(songs, play_days(data), num_songs, config.seq_len)
    window = [np.arange(max(0, end - config.bar), end)]
    unknown = np.full((1, config.pred_steps), -1)
    samples = priors.build_samples(state, np.array([end]), window, unknown)
    _, logits = scores(model, samples)
    top = priors.top_k_distinct(logits, samples["o_ids"], config.pred_steps)[0]
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    by_song = dict(zip(samples["o_ids"][0] - 1, probs, strict=True))
    rows = [
        {"song_id": int(s), "name": data.names[s], "score": float(by_song[s])}
        for s in top
        if s >= 0
    ]
    print(f"after the last {config.seq_len} of {end} plays (the last: {data.names[songs[-1]]}):")
    print(f"{'rank':>4}  {'probability':>11}  artist – title")
    for rank, row in enumerate(rows, start=1):
        print(f"{rank:>4}  {row['score']:>11.5f}  {row['name']}")
    return rows
