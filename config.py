"""The one frozen run configuration, its per-task defaults and validation (no TensorFlow here).

Each field is also a command-line flag of the same name (`deepcf.py` builds the flags from the
field metadata), so `--hidden_size` = `Config.hidden_size` = `build_model(hidden_size=...)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from typing import Any

TASK_NAMES = ("next_song", "audio_features")
CELLS = ("lstm", "gru")
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

    task: str = _field("next_song", "data", "Which recommender to run.", choices=TASK_NAMES)
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
    baselines: str = _field(
        "",
        "evaluation",
        f"Comma-separated baselines scored with the model in --mode=eval: {', '.join(BASELINES)}.",
    )
    blend: str = _field(
        "",
        "evaluation",
        "Hybrid scoring in --mode=eval, e.g. rnn:0.3,markov:0.5,sknn:0.2: a weighted sum of "
        "per-event probabilities; names without weights (rnn,markov,sknn) choose the weights on "
        "the validation split.",
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

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"--{f.name}={value!r}: must be one of {', '.join(choices)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name}={value}: must be a finite number")
        positive = ("num_layers", "embedding_size", "hidden_size", "batch_size", "num_steps")
        positive += ("learning_rate", "max_grad_norm", "num_epochs")
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
    """The defaults, overridden only by the settings the user actually gave."""
    return dataclasses.replace(Config(), **given)


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
