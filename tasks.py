"""The recommenders deepcf can run, each with its own data, model, metrics and report.

They share the trainer, hooks, config and CLI; `TASKS[name].train(config)` and
`TASKS[name].evaluate(config)` are what `deepcf.py` calls.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform

import keras
from absl import logging

import baselines
import config as config_lib
import hooks
import metrics
import modeltrainer
import musicmodel
import yes_reader

DATA_FILES = ("song_hash.txt", "train.txt", "test.txt")
LIBRARIES = ("tensorflow", "keras", "numpy", "pandas", "absl-py")


def _md5(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_run_config(config: config_lib.Config, data_files: list[str], extra: dict) -> None:
    """Writes `model_dir/config.json`: all settings, data md5s, library versions."""
    payload = {
        "config": config.to_json(),
        "data_md5": {path: _md5(path) for path in data_files},
        "versions": _versions(),
        **extra,
    }
    config_lib.write_json_atomic(os.path.join(config.model_dir, "config.json"), payload)


def make_model_dir(model_dir: str) -> None:
    """Creates `model_dir` or fails with a message naming it and the flag."""
    try:
        os.makedirs(model_dir, exist_ok=True)
        probe = os.path.join(model_dir, ".write-test")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise config_lib.ConfigError(
            f"--model_dir={model_dir}: not writable ({e.strerror})"
        ) from None


def evaluate_windows(model: keras.Model, windows: yes_reader.Windows) -> dict:
    """Full-catalog metrics of the model over every event of `windows` (see `metrics.py`)."""
    return model.evaluate(yes_reader.to_dataset(windows), verbose=0, return_dict=True)


def print_table(rows: dict[str, dict], top_ks: tuple[int, ...] = (1, 5, 10, 20, 100, 500)) -> None:
    """Prints one row of metrics per method."""
    width = max([12, *map(len, rows)])
    head = ["method".ljust(width)] + [f"R@{k}".rjust(7) for k in top_ks]
    print("  ".join(head + [h.rjust(7) for h in ("MRR@20", "NDCG@20", "LL")]))
    for name, r in rows.items():
        cells = [f"{r['recall'][str(k)]:.4f}" for k in top_ks]
        cells += [f"{r['mrr']['20']:.4f}", f"{r['ndcg']['20']:.4f}"]
        cells.append("-" if r["log_likelihood"] is None else f"{r['log_likelihood']:.3f}")
        print("  ".join([name.ljust(width)] + [c.rjust(7) for c in cells]))


def validation_schedule(config: config_lib.Config) -> list[keras.callbacks.Callback]:
    """Keras' ReduceLROnPlateau and EarlyStopping (best weights kept) on validation MRR@20."""
    watch = dict(monitor="val_mrr@20", mode="max", verbose=1)
    out: list[keras.callbacks.Callback] = []
    if config.reduce_lr_patience:
        patience = config.reduce_lr_patience
        out.append(keras.callbacks.ReduceLROnPlateau(factor=0.5, patience=patience, **watch))
    if config.early_stopping_patience:
        out.append(
            keras.callbacks.EarlyStopping(
                patience=config.early_stopping_patience, restore_best_weights=True, **watch
            )
        )
    return out


class NextSongTask:
    """Next-song classification over a Yes.com catalog."""

    name = "next_song"

    def train(self, config: config_lib.Config) -> None:
        keras.utils.set_random_seed(config.seed)
        data = yes_reader.load(config.data_dir, config.valid_fraction, config.seed)
        windows = yes_reader.make_windows(
            data.train, config.batch_size, config.num_steps, config.seed
        )
        make_model_dir(config.model_dir)
        write_run_config(
            config,
            [os.path.join(config.data_dir, f) for f in DATA_FILES],
            {"num_songs": data.catalog.size, "train_events": windows.events},
        )
        model = musicmodel.build_model(
            num_songs=data.catalog.size,
            cell=config.cell,
            num_layers=config.num_layers,
            embedding_size=config.embedding_size,
            hidden_size=config.hidden_size,
            dropout=config.dropout,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            max_grad_norm=config.max_grad_norm,
            tie_embeddings=config.tie_embeddings,
            loss_weighting=config.loss_weighting,
        )
        callbacks = []
        if yes_reader.count_events(data.valid):
            valid = yes_reader.make_windows(data.valid, config.batch_size, config.num_steps)
            callbacks.append(hooks.ValidationHook(lambda: evaluate_windows(model, valid)))
        callbacks += validation_schedule(config)
        order = yes_reader.schedule(windows, config.num_epochs, config.seed)
        trainer = modeltrainer.Trainer(
            model,
            config.model_dir,
            num_epochs=config.num_epochs,
            steps_per_epoch=windows.num_windows,
            checkpoint_every_steps=config.checkpoint_every_steps,
        )
        trainer.train(lambda step: yes_reader.to_dataset(windows, order[step:]), callbacks)

    def evaluate(self, config: config_lib.Config) -> dict:
        catalog = yes_reader.read_catalog(os.path.join(config.data_dir, "song_hash.txt"))
        test = yes_reader.read_playlists(os.path.join(config.data_dir, "test.txt"), catalog.size)
        model = modeltrainer.load_model(config.model_dir)
        if model.num_songs != catalog.size:
            raise config_lib.ConfigError(
                f"--model_dir={config.model_dir}: the model was trained on {model.num_songs} songs "
                f"but --data_dir={config.data_dir} has {catalog.size}; use the same catalog"
            )
        musicmodel.compile_model(model, config.learning_rate, config.max_grad_norm)
        windows = yes_reader.make_windows(test, model.batch_size, config.num_steps)
        results = {
            "task": self.name,
            "split": "test",
            "playlists": int(sum(len(p) >= 2 for p in test)),
            **metrics.report(evaluate_windows(model, windows)),
        }
        if config.baselines or config.blend:
            results.update(baselines.compare(config, model, windows))
        rows = {**results.get("baselines", {}), "model": results}
        if "blend" in results:
            rows["blend"] = results["blend"]
        print_table(rows)
        config_lib.write_json_atomic(os.path.join(config.model_dir, "metrics.json"), results)
        logging.info("wrote %s", os.path.join(config.model_dir, "metrics.json"))
        return results


TASKS = {"next_song": NextSongTask()}
