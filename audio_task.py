"""The GRU report's audio-feature recommender (`--task=audio_features`): train and evaluate.

Training is the report's monthly dynamic training, month after month in time order: month k's
training windows (its first 80 % of plays, plus seeded samples of month k-1's test and train
windows, `audio_windows.dynamic_train`) go through the shared `modeltrainer.Trainer`, one call per
month with its own directory `model_dir/months/<YYYY-MM>/` (checkpoints, TensorBoard, model.keras).
The model carries over: month k starts from the weights month k-1 ended with (and a fresh Adam),
which is what the replayed samples of month k-1 are for; one model object serves all months, so
its XLA train step is compiled once. Rerunning after an interrupt skips the
finished months (their checkpoints say so) and resumes the interrupted one.

Evaluation predicts each month's test windows with that month's model and scores them with the
report's hit-rate protocol and baselines (`hitrate.evaluate`), writing `hit_rate.json`, the chart
`hit_rate.png` (window protocol) and `hit_rate_open_catalog.png`, and the same charts and
per-month scalars to TensorBoard (`model_dir/tensorboard/eval`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

import audio_ranking
import audio_reader
import audio_windows
import audiomodel
import config as config_lib
import hitrate
import modeltrainer
import rundir
from errors import ConfigError

MONTHS_DIR = "months"
PROTOCOLS = ("window", "open_catalog")
CHARTS = {"window": "hit_rate.png", "open_catalog": "hit_rate_open_catalog.png"}


def load_data(
    config: config_lib.Config,
) -> tuple[audio_reader.AudioData, list[audio_windows.MonthSplit], np.ndarray]:
    """Plays (summary logged), monthly splits and z-scored features float32 [plays, 11].

    With `--holdout=validation` the test plays are gone and each month's training plays are split
    80/20 again (train, validation), so settings can be chosen without the test plays.

    Raises:
      DataError: unreadable files, nothing joins, or no month's test part holds one window.
    """
    data = audio_reader.load(
        config.paths("listening_log"),
        config.paths("features"),
        user=config.user or None,
        min_ms_played=config.min_ms_played,
        english_only=config.english_only,
    )
    splits = audio_windows.split_months(data.months)
    if config.holdout == "validation":  # only the training plays, each month split 80/20 again
        keep = np.concatenate([s.train for s in splits])
        data = dataclasses.replace(
            data,
            plays=data.plays.iloc[keep].reset_index(drop=True),
            songs=data.songs[keep],
            features=data.features[keep],
        )
        splits = audio_windows.split_months(data.months)
    audio_windows.check_windows(data, splits, config.seq_len, config.pred_steps)
    z, _, _ = audio_windows.standardize(data.features, splits, config.standardize)
    return data, splits, z


def month_dir(config: config_lib.Config, month: str) -> str:
    return os.path.join(config.model_dir, MONTHS_DIR, month)


def schedule(x: np.ndarray, y: np.ndarray, batch_size: int, step: int) -> tf.data.Dataset:
    """The training batches from global step `step` on: the windows in time order (as the report,
    so the windows nearest the month's test come last), over and over. Batches run on across the
    end of the windows, so every batch is full and the XLA train step is compiled once.

    Args:
      x: float32 [N, seq_len, F], N >= 1; y: float32 [N, pred_steps, F].
    """
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat()
    return dataset.batch(batch_size, drop_remainder=True).skip(step)


class AudioFeaturesTask:
    """Audio-feature regression with a GRU, recommendations by nearest feature vectors."""

    name = "audio_features"

    def train(self, config: config_lib.Config) -> None:
        """Trains the `--audio_head`(s), each from `--seed` (so a head trains the same alone)."""
        keras.utils.set_random_seed(config.seed)
        data, splits, z = load_data(config)
        seq_len, pred_steps = config.seq_len, config.pred_steps
        dynamic = audio_windows.dynamic_train(splits, seq_len, pred_steps, config.seed)
        rundir.make_model_dir(config.model_dir)
        with rundir.lock_model_dir(config.model_dir):
            self._train(config, data, splits, z, dynamic)

    def _train(
        self,
        config: config_lib.Config,
        data: audio_reader.AudioData,
        splits: list[audio_windows.MonthSplit],
        z: np.ndarray,
        dynamic: list[np.ndarray],
    ) -> None:
        """Trains month after month in the locked `--model_dir`."""
        files = audio_reader.expand(config.paths("listening_log"))
        files += audio_reader.expand(config.paths("features"))
        windows = {s.month: len(w) for s, w in zip(splits, dynamic, strict=True)}
        extra = {"plays": len(data.songs), "songs": len(data.names), "train_windows": windows}
        written = []  # config.json, once a month's checkpoint (if any) is known to fit

        def write_run_config() -> None:
            if not written:
                rundir.write_run_config(config, files, extra)
                written.append(True)

        if "regression" in config.audio_heads:
            self._train_regression(config, splits, z, dynamic, write_run_config)
        if "ranking" in config.audio_heads:
            audio_ranking.train(config, data, splits, dynamic, write_run_config)
        write_run_config()  # no month had a training window

    def _train_regression(
        self,
        config: config_lib.Config,
        splits: list[audio_windows.MonthSplit],
        z: np.ndarray,
        dynamic: list[np.ndarray],
        after_restore: Callable[[], None],
    ) -> None:
        """The GRU report's monthly dynamic training of the feature regression."""
        keras.utils.set_random_seed(config.seed)
        model = audiomodel.build_audio_model(config, z.shape[1])

        def month_data(k: int, rows: np.ndarray) -> Callable[[int], tf.data.Dataset]:
            x, y = audio_windows.to_arrays(z, rows, config.seq_len)
            return lambda step: schedule(x, y, config.batch_size, step)

        audio_ranking.train_months(
            model, config, splits, dynamic, directory=lambda month: month_dir(config, month),
            num_epochs=config.num_epochs, batch_size=config.batch_size, month_data=month_data,
            after_restore=after_restore,
        )  # fmt: skip

    def _load(self, config: config_lib.Config, month: str, num_features: int) -> keras.Model:
        """Month `month`'s saved model, checked against the flags."""
        model = modeltrainer.load_model(month_dir(config, month))
        shape = (model.seq_len, model.pred_steps, model.num_features)
        if shape != (config.seq_len, config.pred_steps, num_features):
            raise ConfigError(
                f"--model_dir={config.model_dir}: the models read {model.seq_len} and predict "
                f"{model.pred_steps} vectors of {model.num_features} features; give the "
                f"--seq_len and --pred_steps they were trained with"
            )
        return model

    def evaluate(self, config: config_lib.Config) -> dict:
        data, splits, z = load_data(config)
        width = config.seq_len + config.pred_steps
        months = iter([s.month for s in splits if len(s.test) >= width])

        def predict(x: np.ndarray) -> np.ndarray:
            model = self._load(config, next(months), z.shape[1])
            return keras.ops.convert_to_numpy(model(x))

        regression, ranking = (head in config.audio_heads for head in ("regression", "ranking"))
        results = hitrate.evaluate(
            [(s.month, s.test) for s in splits],
            data.songs,
            z,
            predict if regression else None,
            audio_ranking.rank_fn(config, data, splits) if ranking else None,
            seq_len=config.seq_len,
            pred_steps=config.pred_steps,
            bar=config.bar,
            k=config.pred_steps,
        )
        payload = {
            "task": self.name,
            "plays": len(data.songs),
            "songs": len(data.names),
            "seq_len": config.seq_len,
            "pred_steps": config.pred_steps,
            "bar": config.bar,
            "k": config.pred_steps,
            **results,
        }
        for protocol in PROTOCOLS:
            print(hitrate.format_table(results, protocol))
            hitrate.plot_hit_rate(
                results,
                os.path.join(config.model_dir, CHARTS[protocol]),
                protocol,
                f"{os.path.basename(os.path.normpath(config.model_dir))}: hit rate ({protocol})",
            )
        write_summaries(
            os.path.join(config.model_dir, modeltrainer.TENSORBOARD_DIR, "eval"),
            results,
            {p: os.path.join(config.model_dir, CHARTS[p]) for p in PROTOCOLS},
        )
        path = os.path.join(config.model_dir, "hit_rate.json")
        rundir.write_json_atomic(path, payload)
        logging.info("wrote %s", path)
        return payload

    def recommend(self, config: config_lib.Config) -> list[dict]:
        """The next `--pred_steps` songs after the log's last plays, by the ranking head."""
        if "ranking" not in config.audio_heads:
            raise ConfigError(
                "--audio_head=regression: --mode=recommend needs the ranking head "
                "(--audio_head=ranking or both)"
            )
        data, splits, _ = load_data(config)
        return audio_ranking.recommend(config, data, splits)

    def export(self, config: config_lib.Config) -> str:
        raise ConfigError(f"--mode=export: not available for --task={self.name}")

    def search(self, config: config_lib.Config) -> list[int]:
        raise ConfigError(f"--mode=search: not available for --task={self.name}")

    def serve(self, config: config_lib.Config) -> None:
        raise ConfigError(f"--mode=serve: not available for --task={self.name}")


def write_summaries(log_dir: str, results: dict, charts: dict[str, str]) -> None:
    """TensorBoard: per-month hit rates of every method as scalars `<protocol>/<method>` (step =
    month index), the month labels as text, and each protocol's chart (a PNG path) as an image."""
    rundir.make_dirs(log_dir)  # a failure names the path (TensorFlow's writer would not)
    with tf.summary.create_file_writer(log_dir).as_default():
        for protocol in PROTOCOLS:
            for method, summary in results[protocol].items():
                for step, row in enumerate(summary["months"].values()):
                    tf.summary.scalar(f"{protocol}/{method}", row["hit_rate"], step=step)
            months = list(results[protocol]["ceiling"]["months"])
            text = "\n".join(f"{i}: {m}" for i, m in enumerate(months))
            tf.summary.text(f"{protocol}/months", text, step=0)
            with open(charts[protocol], "rb") as f:
                image = tf.image.decode_png(f.read(), channels=4)
            tf.summary.image(f"{protocol}/chart", image[None], step=0)
