"""The one training loop of deepcf: `model.fit` with hooks, checkpoints, resume and final save.

Rerunning the same command after an interrupt restores the newest complete checkpoint (weights,
carried state, optimizer moments and step counter) and continues from that step, with the same
data order, because the data schedule is a function of the step.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator, Sequence

import keras
import tensorflow as tf
from absl import logging

import cluster
import hooks
import rundir
from errors import Interrupted, ModelError, WriteError

MODEL_FILE = "model.keras"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
EXPORT_DIR = "export"


class Trainer:
    """Trains a compiled Keras model for `num_epochs` epochs of `steps_per_epoch` steps.

    Args:
      model: built and compiled, with its optimizer built (see `musicmodel.compile_model`).
      model_dir: checkpoints go to `model_dir/checkpoints`, TensorBoard logs to
        `model_dir/tensorboard`, the final model to `model_dir/model.keras`. Under a
        multi-worker strategy only the chief writes there; the other workers restore from it but
        write to a temporary directory (`cluster.write_dir`) that they delete at the end.
      checkpoint_every_steps: also checkpoint every N steps (0: only at epoch ends).
      perplexity: log exp(loss) as the perplexity (the loss is a cross-entropy in nats).
    """

    def __init__(
        self,
        model: keras.Model,
        model_dir: str,
        *,
        num_epochs: int,
        steps_per_epoch: int,
        checkpoint_every_steps: int = 0,
        model_file: str = MODEL_FILE,
        perplexity: bool = True,
    ):
        self.model = model
        self.perplexity = perplexity
        self.model_dir = model_dir
        self.num_epochs = num_epochs
        self.steps_per_epoch = steps_per_epoch
        self.checkpoint_every_steps = checkpoint_every_steps
        self.model_file = model_file
        self.write_dir = cluster.write_dir(model.distribute_strategy, model_dir)
        # Keras 3 tracks layers and variables kept in Python lists (the recurrent stack, the carried
        # state) but tf.train.Checkpoint does not see them there: name every variable explicitly.
        # Keys are position + short name: paths hold auto-numbered names (`music_model_1`,
        # `seed_generator_2`) that differ between models, and the dropout RNG states would
        # all be `seed_generator_state` below their generator.
        checkpoint = tf.train.Checkpoint(
            model=model,
            optimizer=model.optimizer,
            variables={f"{i:03d}_{v.name}": v for i, v in enumerate(model.variables)},
        )
        directory = os.path.join(model_dir, CHECKPOINT_DIR)
        try:
            self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=3)
        except ValueError as e:  # the `checkpoint` list file itself is corrupt
            raise ModelError(
                f"{directory}/checkpoint: unreadable ({e}); move {directory} away to start over"
            ) from None
        self.saver = self.manager  # restore from `manager`, save (and discard) with `saver`
        if self.write_dir != model_dir:
            self.saver = tf.train.CheckpointManager(
                checkpoint, os.path.join(self.write_dir, CHECKPOINT_DIR), max_to_keep=1
            )

    @property
    def step(self) -> int:
        return hooks.global_step(self.model)

    def restore(self) -> int:
        """Restores the newest checkpoint that loads; returns the global step (0 if none).

        The learning rate stays the compiled one (`--learning_rate`), not the checkpoint's, so a
        run stopped by a NaN loss can go on from its last checkpoint with a lower rate; a compiled
        schedule (`--lr_decay`) goes on from the restored step count.
        """
        learning_rate = self.model.optimizer.get_config()["learning_rate"]  # a schedule: a dict
        error = None
        for path in reversed(self.manager.checkpoints):
            try:
                self.manager.checkpoint.restore(path).assert_existing_objects_matched()
            # A truncated .data file raises IndexError ("Read less bytes than requested").
            except (tf.errors.OpError, ValueError, AssertionError, IndexError) as e:
                logging.warning("checkpoint %s is unreadable (%s); trying an older one", path, e)
                error = error or e
                continue
            if not isinstance(learning_rate, dict):
                self.model.optimizer.learning_rate = learning_rate
            logging.info("resuming from %s at step %d", path, self.step)
            return self.step
        if error:
            raise ModelError(
                f"{self.manager.directory}: no checkpoint could be restored (newest: {error}); "
                "use another --model_dir, or move this one away to start over"
            )
        return 0

    def discard_from(self, step: int) -> str | None:
        """Deletes the checkpoints of global step `step` and later; returns the newest one left.

        The weights saved after step `s` first meet data at step `s + 1`: when that loss is NaN,
        resuming from them would fail the same way, so they go.
        """
        kept = []
        for path in self.saver.checkpoints:
            if int(path.rsplit("-", 1)[1]) < step:
                kept.append(path)
                continue
            for name in tf.io.gfile.glob(f"{path}.*"):
                tf.io.gfile.remove(name)
            logging.warning("deleted checkpoint %s: its weights give a non-finite loss", path)
        if not kept and tf.io.gfile.exists(os.path.join(self.saver.directory, "checkpoint")):
            tf.io.gfile.remove(os.path.join(self.saver.directory, "checkpoint"))
        return kept[-1] if kept else None

    def train(
        self,
        make_dataset: Callable[[int], tf.data.Dataset],
        callbacks: Sequence[keras.callbacks.Callback] = (),
        verbose: int | None = None,
        after_restore: Callable[[], None] = lambda: None,
    ) -> None:
        """Fits from the restored step to the end, then saves the final model.

        Args:
          make_dataset: step -> dataset of the training batches from that global step on.
          callbacks: task hooks (e.g. `hooks.ValidationHook`), run after the `LossHook` and
            before the checkpoint and TensorBoard callbacks.
          after_restore: called once the checkpoint to resume (if any) has loaded, i.e. the
            settings are known to fit it; writes `config.json`.
          verbose: Keras verbosity; default: a live progress bar on a terminal, one line per
            epoch otherwise (so CI logs stay short).
        """
        if verbose is None:
            verbose = 1 if sys.stdout.isatty() else 2
        step = self.restore()
        after_restore()
        rundir.make_dirs(os.path.join(self.write_dir, TENSORBOARD_DIR))
        received: list[int] = []  # the signal that asked to stop
        all_callbacks = [
            hooks.LossHook(self.discard_from, self.perplexity),
            *callbacks,
            hooks.CheckpointHook(
                self.saver, self.checkpoint_every_steps, lambda: received[0] if received else 0
            ),
            keras.callbacks.TensorBoard(
                os.path.join(self.write_dir, TENSORBOARD_DIR), write_graph=False, profile_batch=0
            ),
        ]
        epoch, offset = divmod(step, self.steps_per_epoch)
        with stop_on_signals(received):
            if offset:  # finish the interrupted epoch first
                steps = self.steps_per_epoch - offset
                self._fit(make_dataset(step), epoch, steps, all_callbacks, verbose)
                epoch += 1
            if epoch < self.num_epochs:
                dataset = make_dataset(epoch * self.steps_per_epoch)
                self._fit(dataset, epoch, None, all_callbacks, verbose)
            else:
                logging.info("already trained for %d epochs", self.num_epochs)
        self.save()
        if self.write_dir != self.model_dir:
            shutil.rmtree(self.write_dir)

    def _fit(self, dataset, epoch: int, steps: int | None, callbacks, verbose) -> None:
        self.model.fit(
            dataset,
            initial_epoch=epoch,
            epochs=epoch + 1 if steps else self.num_epochs,
            steps_per_epoch=steps or self.steps_per_epoch,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,
        )

    def save(self) -> str:
        """Saves the model to `model_dir/model.keras` via a temporary file and a rename."""
        path = os.path.join(self.write_dir, self.model_file)
        with rundir.atomic_path(path) as tmp:
            self.model.save(tmp)
        logging.info("saved %s", path)
        return path


@contextlib.contextmanager
def stop_on_signals(received: list[int]) -> Iterator[None]:
    """While training: SIGINT (Ctrl-C) or SIGTERM appends its number to `received`, and the
    `CheckpointHook` saves a checkpoint at the end of that step and stops; a second signal stops
    at once (the newest checkpoint stays). The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python runs signal handlers only in the main thread
        return

    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if received:
            raise Interrupted(
                f"interrupted again by {name}; stopped at once, the newest checkpoint stays. "
                "Run the same command again to resume from it.",
                signum,
            )
        received.append(signum)
        logging.warning("%s: saving a checkpoint after this step, then stopping", name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def load_model(model_dir: str, model_file: str = MODEL_FILE) -> keras.Model:
    """Loads a saved model with Keras safe mode on (no code is unpickled)."""
    path = os.path.join(model_dir, model_file)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no trained model; run --mode=train first")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path}: not a complete .keras file (truncated?); train it again")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as e:
        raise ModelError(f"{path}: cannot load the model ({e})") from None


def export_saved_model(
    model: keras.Model, endpoints: dict[str, Callable], export_dir: str, version: int = 0
) -> str:
    """Writes a SavedModel to `export_dir/<version>/`, the layout TensorFlow Serving watches.

    It is written under a temporary name in `export_dir` (which Serving ignores) and renamed into
    place, so Serving never loads a half-written version.

    Args:
      endpoints: signature name -> `tf.function` with an input signature; `serving_default` is
        the one Serving calls by default.
      version: a positive number; 0 takes one more than the newest version in `export_dir`.

    Returns:
      The version directory.
    """
    rundir.make_dirs(export_dir)
    existing = [int(name) for name in os.listdir(export_dir) if name.isdigit()]
    path = os.path.join(export_dir, str(version or max(existing, default=0) + 1))
    if os.path.exists(path):
        raise ModelError(f"{path}: already exists; pick a new --export_version (or 0: the next)")
    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, fn in endpoints.items():
        archive.add_endpoint(name, fn)
    with rundir.atomic_path(path, directory=True) as tmp:
        try:
            archive.write_out(tmp, verbose=False)
        except tf.errors.OpError as e:
            raise WriteError(f"{path}: cannot write the SavedModel ({e.message})") from None
    logging.info("exported %s", path)
    return path
