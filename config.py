"""The one frozen run configuration, its per-task defaults and validation (no TensorFlow here).

Each field is also a command-line flag of the same name (`deepcf.py` builds the flags from the
field metadata), so `--hidden_size` = `Config.hidden_size` = `build_model(hidden_size=...)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import tempfile
from typing import Any

TASK_NAMES = ("next_song", "audio_features")
CELLS = ("lstm", "gru")
SOFTMAXES = ("full", "sampled")
STRATEGIES = ("default", "mirrored", "multi_worker")  # see cluster.py
AUDIO_LOSSES = ("mse", "smooth_l1")
STANDARDIZE = ("train", "global")
HOLDOUTS = ("test", "validation")
LIBRARIES = ("tensorflow", "keras", "numpy", "pandas", "absl-py")
_HARRY = "data/harry2687-spotify-2023"
# Per-task defaults; flags the user gives still override them (`make_config`). audio_features:
# the GRU report's chapter 3 settings (2 GRU layers of 512 units, Adam 0.01, batch 1, 5 epochs
# per month) on the shipped harry2687 history; its full feature table is listed first, so it wins.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "audio_features": dict(
        cell="gru",
        hidden_size=512,
        learning_rate=0.01,
        batch_size=1,
        num_epochs=5,
        model_dir="runs/audio_features",
        listening_log=f"{_HARRY}/StreamingHistory_music_*.json",
        features=f"{_HARRY}/full_track_features.csv,{_HARRY}/track_features.csv",
    ),
}
LOSS_WEIGHTINGS = ("window", "event")
BASELINES = ("popularity", "markov", "sknn", "sknn_history_last")  # see baselines.py
BLEND_COMPONENTS = ("rnn", *BASELINES)


class ConfigError(ValueError):
    """A setting is out of range; the message names the flag."""


def _field(default: Any, group: str, help: str, **choices: Any) -> Any:
    return dataclasses.field(default=default, metadata={"group": group, "help": help, **choices})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a run needs. Defaults are the UCL report's next-song settings."""

    task: str = _field(
        "next_song",
        "data",
        "Which recommender to run. audio_features has its own defaults (config.TASK_DEFAULTS: "
        "the GRU report's cell gru, hidden_size 512, learning_rate 0.01, batch_size 1, "
        "num_epochs 5, the harry2687 data, model_dir runs/audio_features).",
        choices=TASK_NAMES,
    )
    data_dir: str = _field(
        "data/yes_big",
        "data",
        "Directory with song_hash.txt and train/test playlists as Yes.com .txt or .csv files "
        "(docs/data_format.md).",
    )
    model_dir: str = _field(
        "runs/next_song", "data", "Where checkpoints, TensorBoard logs and results go."
    )
    valid_fraction: float = _field(
        0.1, "data", "Share of train.txt playlists held out for validation (seeded)."
    )
    cell: str = _field("lstm", "model", "Recurrent cell.", choices=CELLS)
    num_layers: int = _field(2, "model", "Stacked recurrent layers (UCL report: 2).")
    embedding_size: int = _field(100, "model", "Song embedding size (UCL report: 100).")
    hidden_size: int = _field(100, "model", "Recurrent state size (UCL report: 100).")
    dropout: float = _field(0.0, "model", "Dropout on embeddings and between layers.")
    tie_embeddings: bool = _field(
        False, "model", "Score songs with their input embeddings (weight tying, Press & Wolf 2017)."
    )
    batch_size: int = _field(100, "training", "Playlists per batch (UCL report: 100).")
    num_steps: int = _field(
        20, "training", "Unrolled steps per window; state is carried across windows (UCL: 20)."
    )
    learning_rate: float = _field(1e-3, "training", "Adam learning rate.")
    max_grad_norm: float = _field(5.0, "training", "Clip gradients to this global norm (UCL: 5).")
    num_epochs: int = _field(10, "training", "Passes over the training playlists.")
    softmax: str = _field(
        "full",
        "training",
        "Training loss over the catalog: full softmax, or sampled (--num_sampled negatives per "
        "window, drawn by training popularity, logQ-corrected); evaluation scores all songs.",
        choices=SOFTMAXES,
    )
    num_sampled: int = _field(1024, "training", "Negatives per window with --softmax=sampled.")
    jit_compile: bool = _field(
        False,
        "training",
        "XLA-compile the next-song training step (same loss). XLA needs static shapes, so it "
        "scores every position, padding too; without it only real events get logits, which is "
        "faster on real playlists (about half of a training window is padding).",
    )
    loss_weighting: str = _field(
        "window",
        "training",
        "window: mean loss of each window's real events; event: every event of an epoch weighs "
        "the same (sum / (batch_size x num_steps)).",
        choices=LOSS_WEIGHTINGS,
    )
    early_stopping_patience: int = _field(
        0,
        "training",
        "Stop after N epochs without a better validation MRR@20 and keep the best weights "
        "(0: off).",
    )
    reduce_lr_patience: int = _field(
        0, "training", "Halve the learning rate after N epochs without a better validation MRR@20."
    )
    checkpoint_every_steps: int = _field(
        0, "training", "Also checkpoint every N steps (0: only at epoch ends)."
    )
    seed: int = _field(0, "training", "Seed for the validation split, data order and weights.")
    strategy: str = _field(
        "default",
        "training",
        "tf.distribute strategy: default (one device), mirrored (all local devices) or "
        "multi_worker (the cluster in the TF_CONFIG environment variable); --batch_size is the "
        "global batch, split evenly over the replicas. See docs/scaling.md.",
        choices=STRATEGIES,
    )
    baselines: str = _field(
        "",
        "evaluation",
        f"Comma-separated baselines scored with the model in --mode=eval: {', '.join(BASELINES)}.",
    )
    blend: str = _field(
        "",
        "evaluation",
        "Hybrid scoring in --mode=eval and --mode=recommend, e.g. rnn:0.3,markov:0.5,sknn:0.2: "
        "a weighted sum of per-event probabilities; names without weights (rnn,markov,sknn): eval "
        "chooses the weights on the validation split and records them in metrics.json, where "
        "recommend reads them.",
    )
    top_k: int = _field(10, "serving", "Songs returned by --mode=recommend and the export.")
    history: str = _field(
        "", "serving", "--mode=recommend: comma-separated song ids (song_hash.txt), oldest first."
    )
    history_file: str = _field(
        "",
        "serving",
        "--mode=recommend: a file with one history per line (song ids separated by spaces or "
        "commas); recommends for each line.",
    )
    exclude_history: bool = _field(
        True, "serving", "Never recommend a song that is already in the history."
    )
    export_version: int = _field(
        0,
        "serving",
        "--mode=export writes model_dir/export/<version>/ (0: one more than the newest there).",
    )

    listening_log: str = _field(
        "",
        "audio",
        "Listening log file(s) or glob(s), comma-separated: Spotify .json or .csv history, "
        "Last.fm-1K .tsv.",
    )
    features: str = _field(
        "", "audio", "Spotify audio-feature CSV(s) or glob(s), comma-separated; first listed wins."
    )
    user: str = _field("", "audio", "Last.fm-1K user id to keep (needed if the log has several).")
    min_ms_played: int = _field(
        30_000, "audio", "Plays shorter than this (ms) are skips and dropped (logs with msPlayed)."
    )
    english_only: bool = _field(
        False, "audio", "Drop plays whose title has non-Latin letters (the GRU report's cleaning)."
    )
    standardize: str = _field(
        "train",
        "audio",
        "Fit the feature z-scores on the training plays only (train), or on all plays as the "
        "report did (global; test months leak into the scaling).",
        choices=STANDARDIZE,
    )
    seq_len: int = _field(10, "audio", "Feature vectors the model reads (GRU report: 10).")
    pred_steps: int = _field(
        5, "audio", "Feature vectors it predicts = songs recommended (GRU report: 5)."
    )
    loss: str = _field(
        "mse", "audio", "Regression loss (report: MSE, then Smooth L1).", choices=AUDIO_LOSSES
    )
    bar: int = _field(
        20, "audio", "Hit rate: the candidate window grows to the BAR most recent test plays."
    )
    holdout: str = _field(
        "test",
        "audio",
        "test: score each month's last 20 %; validation: leave those plays out and split each "
        "month's training plays 80/20 again, to choose settings without the test plays.",
        choices=HOLDOUTS,
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"--{f.name}={value!r}: must be one of {', '.join(choices)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name}={value}: must be a finite number")
        positive = ("num_layers", "embedding_size", "hidden_size", "batch_size", "num_steps")
        positive += ("learning_rate", "max_grad_norm", "num_epochs", "seq_len", "pred_steps", "bar")
        positive += ("num_sampled",)
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name}={getattr(self, name)}: must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout={self.dropout}: must be in [0, 1)")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError(f"--valid_fraction={self.valid_fraction}: must be in [0, 1)")
        for name in ("checkpoint_every_steps", "early_stopping_patience", "reduce_lr_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name}={getattr(self, name)}: must be >= 0")
        if (self.early_stopping_patience or self.reduce_lr_patience) and not self.valid_fraction:
            raise ConfigError(
                "--early_stopping_patience/--reduce_lr_patience need a validation split: "
                "set --valid_fraction > 0"
            )
        if self.min_ms_played < 0:
            raise ConfigError(f"--min_ms_played={self.min_ms_played}: must be >= 0")
        if self.task == "audio_features":
            for name in ("listening_log", "features"):
                if not self.paths(name):
                    raise ConfigError(f"--{name}: --task=audio_features needs at least one file")
        if self.top_k <= 0:
            raise ConfigError(f"--top_k={self.top_k}: must be > 0")
        if self.export_version < 0:
            raise ConfigError(f"--export_version={self.export_version}: must be >= 0")
        if self.history and self.history_file:
            raise ConfigError("--history and --history_file: give only one of them")
        for name in self.baseline_names:
            if name not in BASELINES:
                raise ConfigError(
                    f"--baselines={self.baselines}: unknown baseline {name!r}; "
                    f"choose from {', '.join(BASELINES)}"
                )
        parse_blend(self.blend)

    @property
    def baseline_names(self) -> tuple[str, ...]:
        """The --baselines names in the given order."""
        return tuple(name.strip() for name in self.baselines.split(",") if name.strip())

    @property
    def blend_weights(self) -> dict[str, float | None]:
        """--blend as {component: weight} (see `parse_blend`)."""
        return parse_blend(self.blend)

    def paths(self, name: str) -> list[str]:
        """The comma-separated files or globs of flag `name` (e.g. `listening_log`)."""
        return [p.strip() for p in getattr(self, name).split(",") if p.strip()]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_blend(spec: str) -> dict[str, float | None]:
    """`rnn:0.3,markov:0.7` -> {"rnn": 0.3, "markov": 0.7}; `rnn,markov` -> weights None (tune).

    Raises:
      ConfigError naming --blend: unknown or repeated names, weights < 0 or not numbers, some
        weights missing, all weights 0, or a single component.
    """
    out: dict[str, float | None] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = (s.strip() for s in part.partition(":"))
        if name not in BLEND_COMPONENTS or name in out:
            raise ConfigError(
                f"--blend={spec}: {name!r} is unknown or repeated; "
                f"choose from {', '.join(BLEND_COMPONENTS)}"
            )
        try:
            out[name] = float(weight) if weight else None
        except ValueError:
            raise ConfigError(f"--blend={spec}: weight {weight!r} is not a number") from None
        if out[name] is not None and not 0.0 <= out[name] < math.inf:
            raise ConfigError(f"--blend={spec}: the weight of {name} must be a number >= 0")
    given = [w is not None for w in out.values()]
    if any(given) and not all(given):
        raise ConfigError(f"--blend={spec}: give a weight for every name or for none")
    if out and all(given) and sum(w for w in out.values() if w) <= 0:
        raise ConfigError(f"--blend={spec}: the weights must not all be 0")
    if len(out) == 1:
        raise ConfigError(f"--blend={spec}: a blend needs at least two components")
    return out


def fields_by_group() -> dict[str, list[dataclasses.Field]]:
    """Config fields grouped as they appear in `--help` (data, model, training, ...)."""
    groups: dict[str, list[dataclasses.Field]] = {}
    for f in dataclasses.fields(Config):
        groups.setdefault(f.metadata["group"], []).append(f)
    return groups


def make_config(given: dict[str, Any]) -> Config:
    """The defaults of the task (`TASK_DEFAULTS`), overridden only by the settings given."""
    task = given.get("task", Config.task)
    return dataclasses.replace(Config(task=task, **TASK_DEFAULTS.get(task, {})), **given)


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


def write_run_config(config: Config, data_files: list[str], extra: dict) -> None:
    """Writes `model_dir/config.json`: all settings, data md5s, library versions."""
    payload = {
        "config": config.to_json(),
        "data_md5": {path: _md5(path) for path in data_files},
        "versions": _versions(),
        **extra,
    }
    write_json_atomic(os.path.join(config.model_dir, "config.json"), payload)


def make_model_dir(model_dir: str) -> None:
    """Creates `model_dir` or fails with a message naming it and the flag."""
    try:
        os.makedirs(model_dir, exist_ok=True)
        probe = os.path.join(model_dir, ".write-test")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"--model_dir={model_dir}: not writable ({e.strerror})") from None


def write_json_atomic(path: str, payload: Any) -> None:
    """Writes JSON to a temporary file in the same directory, then renames it over `path`."""
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` to a temporary file in the same directory, then renames it over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
