"""Time to quality: seconds of training until a model reaches a test-quality bar.

    python benchmarks/bench.py --time_to_quality [--quick] [--out docs/time_to_quality.json]

Trains (a) deepcf with each flag file of `FLAG_FILES` on data/yes_big: `configs/best_rnn.flags` (the
best single model on validation) and `configs/fast_rnn.flags` (the same model from co-occurrence
song rows, batch 50, Adam 4e-3 decayed linearly to 0 over 4 epochs), each with its
`musicmodel.build_model`, data windows, validation hook and `validation_schedule`, as
`--mode=train` runs them, without checkpoints,
TensorBoard or projector files; and (b) in the same run a plain Keras `fit` of best_rnn.flags'
architecture (`plain_model`: Embedding -> Dropout -> GRU -> Dropout -> Dense softmax, same sizes,
dropout, Adam rate and clipping, batch and window length; untied output layer, each 20-step window
from a zero state, Keras' own loss) with best_rnn.flags' ReduceLROnPlateau and EarlyStopping on its
own validation MRR@20. At every epoch end each records validation and test Recall@20 / MRR@20
against the seconds of set-up and training so far; the test split is evaluated only for the
record (never for a decision) and its evaluation time is not counted. Writes the JSON and a plot
(test quality against seconds, all models) and reports the seconds each needed to reach the bar,
`BAR`, or that it never did, and the plain model's seconds over each deepcf model's.
`--quick`: a slice of data/yes_small, 2 epochs (a smoke run of the whole pipeline).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import flags

import coldstart
import config as config_lib
import hooks
import metrics
import musicmodel
import next_song_task
import rundir
import warmstart
import yes_reader

BAR = {"recall@20": 0.21, "mrr@20": 0.050}  # issue 18: test Recall@20 and MRR@20
KEYS = ("recall@20", "mrr@20")
QUICK_SLICE = {"train": 1500, "valid": 200, "test": 200}  # playlists of data/yes_small
FLAG_FILES = {"deepcf": "best_rnn.flags", "deepcf_fast": "fast_rnn.flags"}  # in configs/


def read_flags(path: str) -> dict:
    """An absl flag file as Config keyword arguments, read as `deepcf --flagfile` reads it:
    absl expands the file, each value is parsed by deepcf's own flag of that name (`--name`,
    `--name=false`, `--noname` for booleans)."""
    import deepcf  # noqa: F401  (defines one absl flag per Config field)

    given = {}
    for arg in flags.FLAGS.read_flags_from_files([f"--flagfile={path}"]):
        name, has_value, value = arg[2:].partition("=")
        if not has_value and name not in flags.FLAGS and name.startswith("no"):
            name, value = name[2:], "false"  # --noname
        given[name] = flags.FLAGS[name].parser.parse(value if has_value or value else "true")
    return given


class QualityRecord(keras.callbacks.Callback):
    """Records, at each epoch end, the validation metrics in `logs` and the test metrics of
    `evaluate_test()` against the seconds since the record was made (made before the model's
    set-up, so that building it, its tables and its song rows count), less the test
    evaluations."""

    def __init__(self, evaluate_test: Callable[[], dict], clock=time.perf_counter):
        super().__init__()
        self.evaluate_test, self.clock, self.rows = evaluate_test, clock, []
        self.start = self.clock()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = self.clock() - self.start
        test = self.evaluate_test()
        self.start += self.clock() - self.start - seconds  # the test is not training time
        row = {"epoch": epoch + 1, "seconds": seconds}
        row.update({f"val_{k}": float(logs[f"val_{k}"]) for k in KEYS})
        row.update({f"test_{k}": float(test[k]) for k in KEYS})
        self.rows.append(row)
        print(", ".join(f"{k} {v:.4g}" for k, v in row.items()), file=sys.stderr, flush=True)


def seconds_to_bar(rows: list[dict]) -> float | None:
    """The seconds of the first epoch end whose test metrics all reach `BAR` (None: never)."""
    for row in rows:
        if all(row[f"test_{k}"] >= bar for k, bar in BAR.items()):
            return row["seconds"]
    return None


def load_data(config: config_lib.Config, quick: bool) -> yes_reader.YesData:
    """The train/validation/test playlists; with `quick`, the first `QUICK_SLICE` of each."""
    data = yes_reader.load(config.data_dir, config.valid_fraction, config.seed, config.valid_split)
    if quick:
        data = yes_reader.YesData(
            data.catalog, *(getattr(data, s)[:n] for s, n in QUICK_SLICE.items())
        )
    return data


def train_deepcf(config: config_lib.Config, data: yes_reader.YesData) -> list[dict]:
    """deepcf's training of `config`, recording quality against seconds."""
    keras.utils.set_random_seed(config.seed)
    config = next_song_task.decide_auto(config, data)
    valid, test = (
        yes_reader.make_windows(p, config.batch_size, config.num_steps)
        for p in (data.valid, data.test)
    )
    record = QualityRecord(lambda: next_song_task.evaluate_windows(model, test))
    windows = yes_reader.make_windows(data.train, config.batch_size, config.num_steps)
    songs = data.catalog.size
    counts = np.bincount(windows.targets[windows.weights > 0], minlength=songs)
    tables = next_song_task.transition_tables(config, data)
    steps = config.num_epochs * windows.num_windows
    side = coldstart.side_features(config.data_dir, data.catalog, config.side_features)
    side_args = side and side.model_args()
    model = musicmodel.build_model(config, songs, counts, side_args, tables, train_steps=steps)
    warmstart.init_songs(model, config, data.train)
    callbacks = [
        hooks.ValidationHook(lambda: next_song_task.evaluate_windows(model, valid)),
        record,
        *next_song_task.validation_schedule(config),
    ]
    order = yes_reader.schedule(windows, config.num_epochs, config.seed)
    model.fit(
        yes_reader.to_dataset(windows, order),
        epochs=config.num_epochs,
        steps_per_epoch=windows.num_windows,
        callbacks=callbacks,
        verbose=0,
    )
    return record.rows


def plain_model(config: config_lib.Config, songs: int) -> keras.Model:
    """The Keras model a user would write for `config`'s architecture, compiled (Keras' loss)."""
    rnn = {"gru": keras.layers.GRU, "lstm": keras.layers.LSTM}[config.cell]
    model = keras.Sequential(
        [
            keras.Input((config.num_steps,), dtype="int32"),
            keras.layers.Embedding(songs + 1, config.embedding_size),
            keras.layers.Dropout(config.dropout),
            *[
                rnn(config.hidden_size, return_sequences=True, dropout=config.dropout)
                for _ in range(config.num_layers)
            ],
            keras.layers.Dropout(config.dropout),
            keras.layers.Dense(songs),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate, global_clipnorm=config.max_grad_norm),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def window_rows(windows: yes_reader.Windows) -> tuple[np.ndarray, ...]:
    """(inputs, targets, weights) [rows, num_steps] of every window row with a real event."""
    steps = windows.inputs.shape[-1]
    rows = [a.reshape(-1, steps) for a in (windows.inputs, windows.targets, windows.weights)]
    real = rows[2].sum(-1) > 0
    return tuple(a[real] for a in rows)


def plain_evaluator(model: keras.Model, batch: int) -> Callable[[tuple], dict]:
    """rows -> full-catalog Recall/MRR of the plain model over the real events of `rows`."""
    ranking = metrics.RankingMetrics()
    spec = [tf.TensorSpec([None, None], t) for t in (tf.int32, tf.int32, tf.float32)]

    @tf.function(input_signature=spec)
    def update(x, y, w):
        logits = model(x, training=False)
        log_probs = -keras.ops.sparse_categorical_crossentropy(y, logits, from_logits=True)
        ranking.update_state(metrics.pessimistic_ranks(logits, y), log_probs, sample_weight=w)

    def evaluate(rows: tuple[np.ndarray, ...]) -> dict:
        ranking.reset_state()
        for first in range(0, len(rows[0]), batch):
            update(*(a[first : first + batch] for a in rows))
        return {k: float(v) for k, v in ranking.result().items()}

    return evaluate


class PlainValidation(keras.callbacks.Callback):
    """Adds `val_recall@20` and `val_mrr@20` of `evaluate(rows)` to the epoch's logs."""

    def __init__(self, evaluate: Callable[[tuple], dict], rows: tuple[np.ndarray, ...]):
        super().__init__()
        self.evaluate, self.rows = evaluate, rows

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        results = self.evaluate(self.rows)
        logs.update({f"val_{k}": results[k] for k in KEYS})


def train_plain(config: config_lib.Config, data: yes_reader.YesData) -> list[dict]:
    """The plain Keras `fit` of the same architecture, recording quality against seconds."""
    keras.utils.set_random_seed(config.seed)
    config = next_song_task.decide_auto(config, data)
    valid, test = (
        window_rows(yes_reader.make_windows(p, config.batch_size, config.num_steps))
        for p in (data.valid, data.test)
    )
    record = QualityRecord(lambda: evaluate(test))
    train = window_rows(yes_reader.make_windows(data.train, config.batch_size, config.num_steps))
    model = plain_model(config, data.catalog.size)
    evaluate = plain_evaluator(model, config.batch_size)
    model.fit(
        train[0],
        train[1],
        sample_weight=train[2],
        batch_size=config.batch_size,
        epochs=config.num_epochs,
        callbacks=[
            PlainValidation(evaluate, valid),
            record,
            *next_song_task.validation_schedule(config),
        ],
        verbose=0,
    )
    return record.rows


def plot(result: dict, path: str) -> None:
    """Test Recall@20 and MRR@20 against training seconds, one curve per model, the bar dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key in zip(axes, KEYS, strict=True):
        for name, run in result["runs"].items():
            seconds = [r["seconds"] for r in run["epochs"]]
            axis.plot(seconds, [r[f"test_{key}"] for r in run["epochs"]], "o-", label=name)
        axis.axhline(BAR[key], color="grey", linestyle="--", label=f"bar {BAR[key]}")
        axis.set(xlabel="training seconds", ylabel=f"test {key}", xscale="log")
        axis.legend()
    figure.suptitle(f"time to quality ({result['data_dir']}, load {result['load_average']})")
    figure.tight_layout()
    with rundir.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def load_config(root: str, flag_file: str, quick: bool) -> config_lib.Config:
    """`configs/<flag_file>` on data/yes_big (`quick`: data/yes_small, 2 epochs)."""
    cwd = os.getcwd()
    os.chdir(root)  # a nested --flagfile=configs/... is read from the checkout, as deepcf.py does
    try:
        given = read_flags(os.path.join("configs", flag_file))
    finally:
        os.chdir(cwd)
    given["data_dir"] = os.path.join(root, "data", "yes_small" if quick else "yes_big")
    if quick:
        given["num_epochs"] = 2
    return config_lib.Config(**given)


def run(root: str, out: str, quick: bool) -> dict:
    """Trains the models of `FLAG_FILES` and the plain reference, writes `out` (JSON) and the
    plot beside it; returns the result."""
    configs = {name: load_config(root, f, quick) for name, f in FLAG_FILES.items()}
    data = load_data(configs["deepcf"], quick)  # the same splits: seed and fraction of best_rnn
    trained = {name: train_deepcf(config, data) for name, config in configs.items()}
    trained["plain"] = train_plain(configs["deepcf"], data)
    runs = {n: {"epochs": e, "seconds_to_bar": seconds_to_bar(e)} for n, e in trained.items()}
    plain = runs["plain"]["seconds_to_bar"]
    result = {
        "data_dir": os.path.relpath(configs["deepcf"].data_dir, root),
        "flag_files": FLAG_FILES,
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "bar": BAR,
        "runs": runs,
        "plain_over": {
            n: plain / runs[n]["seconds_to_bar"]
            for n in FLAG_FILES
            if None not in (plain, runs[n]["seconds_to_bar"])
        },
    }
    rundir.write_json_atomic(out, result)
    plot(result, os.path.splitext(out)[0] + ".png")
    for name, r in runs.items():
        for row in r["epochs"]:
            print(
                f"{name:>11} epoch {row['epoch']:>2} {row['seconds']:7.1f} s  "
                + "  ".join(f"{k} {row[k]:.4f}" for k in row if k.startswith(("val_", "test_")))
            )
        found = r["seconds_to_bar"]
        print(f"{name}: bar reached after {'never' if found is None else f'{found:.0f} s'}")
    for name in FLAG_FILES:
        ratio = result["plain_over"].get(name)
        print(f"plain / {name} seconds to the bar: {'n/a' if ratio is None else f'{ratio:.1f}'}")
    return result
