"""Keras callbacks that report on training: loss, validation metrics, checkpoints.

List them before `keras.callbacks.TensorBoard` so TensorBoard sees the keys they add to `logs`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import tensorflow as tf
from absl import logging

VALIDATION_KEYS = ("loss", "perplexity", "recall@20", "mrr@20")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss is not finite)."""


class LossHook(keras.callbacks.Callback):
    """Adds the training perplexity to the epoch logs, logs a line, and stops on NaN/inf loss."""

    def __init__(self, last_checkpoint: Callable[[], str | None] = lambda: None):
        super().__init__()
        self._last_checkpoint = last_checkpoint

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            step = int(self.model.optimizer.iterations)
            saved = self._last_checkpoint() or "none yet"
            raise TrainingError(
                f"training loss became {loss} at step {step}; stopped without saving "
                f"(last good checkpoint: {saved}). Try a lower --learning_rate."
            )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None or "loss" not in logs:
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
    """

    def __init__(self, manager: tf.train.CheckpointManager, every_steps: int = 0):
        super().__init__()
        self._manager = manager
        self._every_steps = every_steps

    def _save(self) -> None:
        step = int(self.model.optimizer.iterations)
        if self._manager.latest_checkpoint and self._manager.latest_checkpoint.endswith(f"-{step}"):
            return
        logging.info("checkpoint %s", self._manager.save(checkpoint_number=step))

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._every_steps and int(self.model.optimizer.iterations) % self._every_steps == 0:
            self._save()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._save()
