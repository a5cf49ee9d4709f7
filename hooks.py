"""Keras callbacks that report on training: loss, validation metrics, checkpoints, progress and
the song embeddings for TensorBoard's projector.

List them before `keras.callbacks.TensorBoard` so TensorBoard sees the keys they add to `logs`.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf
from absl import logging
from google.protobuf import text_format
from tensorboard.plugins import projector

import rundir
from errors import Interrupted, TrainingError, WriteError

VALIDATION_KEYS = ("loss", "perplexity", "recall@20", "mrr@20")
PROGRESS_SECONDS = 30  # at most one progress line this often: a CI log stays short


def global_step(model: keras.Model) -> int:
    """The optimizer's step counter (`.numpy()`: under a strategy it is a mirrored variable)."""
    return int(model.optimizer.iterations.numpy())


class LossHook(keras.callbacks.Callback):
    """Adds the training perplexity to the epoch logs, logs a line, and stops on NaN/inf loss.

    Args:
      discard_from: called with step `s - 1` when the loss of step `s` is not finite (the weights
        saved after step `s - 1` gave that loss); drops those checkpoints and returns the newest
        one left, if any.
      perplexity: the loss is a cross-entropy in nats, so exp(loss) is the perplexity (False for
        regression losses).
    """

    def __init__(
        self,
        discard_from: Callable[[int], str | None] = lambda step: None,
        perplexity: bool = True,
    ):
        super().__init__()
        self._discard_from = discard_from
        self._perplexity = perplexity

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            step = global_step(self.model)
            saved = self._discard_from(step - 1) or "none"
            raise TrainingError(
                f"training loss became {loss} at step {step}; stopped without saving "
                f"(last good checkpoint: {saved}). Try a lower --learning_rate."
            )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None or "loss" not in logs:
            return
        if not self._perplexity:
            logging.info("epoch %d: train loss %.4f", epoch + 1, logs["loss"])
            return
        # float32 like the metrics: a diverged loss gives inf, which TensorBoard can log.
        logs["perplexity"] = float(keras.ops.exp(float(logs["loss"])))
        logging.info(
            "epoch %d: train loss %.4f per event, perplexity %.1f",
            epoch + 1,
            logs["loss"],
            logs["perplexity"],
        )


class ValidationHook(keras.callbacks.Callback):
    """Runs the task's own evaluation at each epoch end and adds `val_*` keys to the logs."""

    def __init__(self, evaluate: Callable[[], dict], keys: tuple[str, ...] = VALIDATION_KEYS):
        super().__init__()
        self._evaluate = evaluate
        self._keys = keys

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        results = self._evaluate()
        shown = {key: float(results[key]) for key in self._keys if key in results}
        if logs is not None:
            logs.update({f"val_{key}": value for key, value in shown.items()})
        logging.info(
            "epoch %d: validation %s",
            epoch + 1,
            ", ".join(f"{key} {value:.4f}" for key, value in shown.items()),
        )


class CheckpointHook(keras.callbacks.Callback):
    """Saves a `tf.train.CheckpointManager` checkpoint at epoch ends and every `every_steps`.

    TensorFlow writes the checkpoint files first and the `checkpoint` index last, so a run killed
    mid-write leaves the previous checkpoint as the latest complete one.

    Args:
      interrupted: the signal that asked training to stop (0: none); checked after every step
        and epoch: the hook then saves a checkpoint of that step and raises `Interrupted`.
    """

    def __init__(
        self,
        manager: tf.train.CheckpointManager,
        every_steps: int = 0,
        interrupted: Callable[[], int] = lambda: 0,
    ):
        super().__init__()
        self._manager = manager
        self._every_steps = every_steps
        self._interrupted = interrupted

    def _save(self) -> str:
        step = global_step(self.model)
        latest = self._manager.latest_checkpoint
        if latest and latest.endswith(f"-{step}"):
            return latest
        try:
            path = self._manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as e:
            raise WriteError(
                f"{self._manager.directory}: cannot write checkpoint ckpt-{step} "
                f"({getattr(e, 'message', e)}); the newest complete one is {latest or 'none'}"
            ) from None
        logging.info("checkpoint %s", path)
        return path

    def _stop_if_interrupted(self) -> None:
        signum = self._interrupted()
        if signum:
            path = self._save()
            raise Interrupted(
                f"interrupted by {signal.Signals(signum).name} at step "
                f"{global_step(self.model)}; saved checkpoint {path}. Run the same command "
                "again to resume from it.",
                signum,
            )

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._every_steps and global_step(self.model) % self._every_steps == 0:
            self._save()
        self._stop_if_interrupted()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._save()
        self._stop_if_interrupted()


class ProgressHook(keras.callbacks.Callback):
    """Logs `train|evaluate: step i/n (rate, ETA)` at most every PROGRESS_SECONDS.

    Works where Keras' live progress bar does not (logs that are not a terminal) and for
    `model.evaluate(verbose=0)`; the first step of a run is always logged.
    """

    def __init__(self):
        super().__init__()
        self._start = time.monotonic()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.monotonic()

    def on_test_begin(self, logs: dict | None = None) -> None:
        self._start = time.monotonic()

    def _log(self, what: str, done: int) -> None:
        total = self.params.get("steps")
        rate = done / max(time.monotonic() - self._start, 1e-9)
        eta = f"{(total - done) / rate:.0f} s" if total else "unknown"
        logging.log_every_n_seconds(
            logging.INFO,
            "%s: step %d/%s (%.1f steps/s, ETA %s)",
            PROGRESS_SECONDS,
            what,
            done,
            total or "?",
            rate,
            eta,
        )

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._log("train", batch + 1)

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._log("evaluate", batch + 1)


class EmbeddingProjectorHook(keras.callbacks.Callback):
    """Writes an embedding matrix with row labels for TensorBoard's Projector tab.

    Keras 3's `TensorBoard(embeddings_freq=...)` is broken (keras-team/keras#20210), so this
    writes what the projector plugin reads into `log_dir`, which must be a run directory with
    event files (e.g. `tensorboard/train`): `metadata.tsv` (a header of `columns`, then one row
    of labels per embedding row) and `projector_config.pbtxt` when training starts, and a
    checkpoint `embeddings-<epoch>` of the matrix after every epoch and at the end.

    Args:
      log_dir: the run directory.
      layer: a built `keras.layers.Embedding`; its `embeddings` are float32 [rows, size].
      columns: the metadata header, e.g. ("title", "artist", "tag").
      rows: one tuple of len(columns) labels per embedding row (tabs/newlines become spaces).
    """

    def __init__(
        self,
        log_dir: str,
        layer: keras.layers.Embedding,
        columns: Sequence[str],
        rows: Sequence[Sequence[str]],
    ):
        super().__init__()
        num_rows = layer.embeddings.shape[0]
        if len(rows) != num_rows or any(len(r) != len(columns) for r in rows):
            raise ValueError(
                f"{len(rows)} label rows of {len(columns)} columns for a {num_rows}-row embedding"
            )
        self._log_dir, self._columns, self._rows = log_dir, tuple(columns), rows
        self._epoch = 0
        self._manager = tf.train.CheckpointManager(
            tf.train.Checkpoint(embedding=layer.embeddings),
            log_dir,
            max_to_keep=1,
            checkpoint_name="embeddings",
        )

    def on_train_begin(self, logs: dict | None = None) -> None:
        def clean(label: str) -> str:
            return " ".join(str(label).split())

        lines = [self._columns, *self._rows]
        tsv = "".join("\t".join(map(clean, line)) + "\n" for line in lines)
        rundir.write_text_atomic(os.path.join(self._log_dir, "metadata.tsv"), tsv)
        config = projector.ProjectorConfig()
        embedding = config.embeddings.add()
        embedding.tensor_name = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
        embedding.metadata_path = "metadata.tsv"
        rundir.write_text_atomic(
            os.path.join(self._log_dir, "projector_config.pbtxt"),
            text_format.MessageToString(config),
        )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch + 1
        logging.info("projector embeddings %s", self._manager.save(checkpoint_number=self._epoch))

    def on_train_end(self, logs: dict | None = None) -> None:
        """Saves the final weights again: EarlyStopping may have restored an earlier epoch's."""
        self._manager.save(checkpoint_number=self._epoch)
