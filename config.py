"""The one frozen run configuration, its per-task defaults and validation (no TensorFlow here).

Each field is also a command-line flag of the same name (`deepcf.py` builds the flags from the
field metadata: `--hidden_size` = `Config.hidden_size` = `MusicModel(hidden_size=...)`), with its
`--help` group, bound or choices and the tasks that read it (`make_config` refuses the others)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flagspec
from errors import ConfigError
from flagspec import FRACTION, NEXT_SONG, NON_NEGATIVE, POSITIVE, SPLITS, TASK_NAMES, Bound
from flagspec import audio as _audio
from flagspec import column as _column
from flagspec import evaluation as _evaluation
from flagspec import field as _field
from flagspec import import_field as _import
from flagspec import serving as _serving
from flagspec import training as _training

CELLS = ("lstm", "gru")
SOFTMAXES = ("full", "sampled")
STRATEGIES = ("default", "mirrored", "multi_worker")  # see cluster.py
AUDIO_LOSSES = ("mse", "smooth_l1")
STANDARDIZE = ("train", "global")
HOLDOUTS = ("test", "validation")
AUDIO_HEADS = ("both", "ranking", "regression")
RANKING_QUERIES = ("none", "gru")
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
# eval ranks history songs unless --exclude_history is given: numbers comparable with published ones
MODE_DEFAULTS: dict[str, dict[str, Any]] = {"eval": {"exclude_history": False}}
LOSS_WEIGHTINGS = ("window", "event")
BASELINES = ("popularity", "markov", "sknn", "sknn_history_last", "sr", "vstan", "repeat", "artist")
BLEND_COMPONENTS = ("rnn", *BASELINES)


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
        tasks=NEXT_SONG,
    )
    model_dir: str = _field(
        "runs/next_song", "data", "Where checkpoints, TensorBoard logs and results go."
    )
    valid_fraction: float = _field(
        0.1,
        "data",
        "Share of train.txt playlists held out for validation (seeded).",
        tasks=NEXT_SONG,
        bound=FRACTION,
    )
    valid_split: str = flagspec.valid_split()
    cell: str = _field("lstm", "model", "Recurrent cell.", choices=CELLS)
    num_layers: int = _field(
        2, "model", "Stacked recurrent layers (UCL report: 2).", bound=POSITIVE
    )
    embedding_size: int = _field(
        100, "model", "Song embedding size (UCL report: 100).", tasks=NEXT_SONG, bound=POSITIVE
    )
    hidden_size: int = _field(
        100, "model", "Recurrent state size (UCL report: 100).", bound=POSITIVE
    )
    dropout: float = _field(0.0, "model", "Dropout on embeddings, between layers.", bound=FRACTION)
    tie_embeddings: bool = _field(
        False,
        "model",
        "Score songs with their input embeddings (weight tying, Press & Wolf 2017).",
        tasks=NEXT_SONG,
    )
    side_features: str = flagspec.side_features()
    transition: str = flagspec.transition()
    transition_width: int = flagspec.transition_width()
    repeat_window: int = flagspec.repeat_window()
    cold_fraction: float = flagspec.cold_fraction()
    batch_size: int = _field(
        100, "training", "Playlists per batch (UCL report: 100).", bound=POSITIVE
    )
    min_updates_per_epoch: int = flagspec.min_updates_per_epoch()
    num_steps: int = _field(
        20,
        "training",
        "Unrolled steps per window; state is carried across windows (UCL: 20).",
        tasks=NEXT_SONG,
        bound=POSITIVE,
    )
    learning_rate: float = _field(1e-3, "training", "Adam learning rate.", bound=POSITIVE)
    max_grad_norm: float = _field(
        5.0, "training", "Clip gradients to this global norm (UCL: 5).", bound=POSITIVE
    )
    num_epochs: int = _field(10, "training", "Passes over the training playlists.", bound=POSITIVE)
    softmax: str = _field(
        "full",
        "training",
        "Training loss over the catalog: full softmax, or sampled (--num_sampled negatives per "
        "window, drawn by training popularity, logQ-corrected); evaluation scores all songs.",
        choices=SOFTMAXES,
        tasks=NEXT_SONG,
    )
    num_sampled: int = _field(
        1024,
        "training",
        "Negatives per window with --softmax=sampled.",
        tasks=NEXT_SONG,
        bound=POSITIVE,
    )
    sampled_steps: str = flagspec.sampled_steps()
    jit_compile: bool = _training(
        False,
        "XLA-compile the next-song training step (same loss). XLA needs static shapes, so it "
        "scores every position, padding too; without it only real events get logits, which is "
        "faster on real playlists (about half of a training window is padding).",
    )
    precision: str = _training(
        "float32",
        "bfloat16: mixed precision (float32 weights, loss, scores); warns if the CPU lacks bf16.",
        choices=("float32", "bfloat16"),
    )
    loss_weighting: str = _field(
        "window",
        "training",
        "window: mean loss of each window's real events; event: every event of an epoch weighs "
        "the same (sum / (batch_size x num_steps)).",
        choices=LOSS_WEIGHTINGS,
        tasks=NEXT_SONG,
    )
    recency_half_life: float = flagspec.recency_half_life()
    recency_weighting: str = flagspec.recency_weighting()
    early_stopping_patience: int = _training(
        0,
        "Stop after N epochs without a better validation MRR@20, keep the best weights (0: off).",
        bound=NON_NEGATIVE,
    )
    reduce_lr_patience: int = _training(
        0,
        "Halve the learning rate after N epochs without a better validation MRR@20.",
        bound=NON_NEGATIVE,
    )
    lr_decay: str = flagspec.lr_decay()
    checkpoint_every_steps: int = _field(
        0,
        "training",
        "Also checkpoint every N steps (0: only at epoch ends).",
        bound=NON_NEGATIVE,
    )
    seed: int = _field(0, "training", "Seed for the validation split, data order and weights.")
    init_from: str = _field(
        "",
        "training",
        "Start from the weights of another run's model_dir, rows matched by song key (a new "
        "song starts as the rarest known one); ignored, with a warning, if --model_dir has a "
        "checkpoint to resume.",
        tasks=NEXT_SONG,
    )
    song_init: str = flagspec.song_init()
    bias_init: str = flagspec.bias_init()
    strategy: str = _field(
        "default",
        "training",
        "tf.distribute strategy: default (one device), mirrored (all local devices) or "
        "multi_worker (the cluster in the TF_CONFIG environment variable); --batch_size is the "
        "global batch, split evenly over the replicas. See docs/scaling.md.",
        choices=STRATEGIES,
        tasks=NEXT_SONG,
    )
    baselines: str = _evaluation(
        "",
        f"Comma-separated baselines scored with the model in --mode=eval: {', '.join(BASELINES)}.",
    )
    blend: str = _evaluation(
        "",
        "Hybrid scoring in --mode=eval and --mode=recommend, e.g. rnn:0.3,markov:0.5,sknn:0.2: "
        "a weighted sum of per-event probabilities; names without weights (rnn,markov,sknn): eval "
        "chooses the weights on the validation split and records them in metrics.json, where "
        "recommend reads them.",
    )
    top_k: int = _serving(10, "Songs returned by --mode=recommend and the export.", bound=POSITIVE)
    history: str = _serving(
        "",
        "--mode=recommend: songs oldest first, comma-separated: titles, 'title - artist', ids "
        '(song_hash.txt) or external keys; "quote" a name with a comma.',
    )
    history_file: str = _serving(
        "", "--mode=recommend: a file with one history per line (as --history); one answer each."
    )
    exclude_history: bool = _serving(
        True,
        "Never recommend a song of the history; eval (default false there): rank without them.",
    )
    query: str = _serving("", "--mode=search: the songs whose name matches, best first.")
    host: str = _serving("127.0.0.1", "--mode=serve: the address to listen on.")
    port: int = _serving(8501, "--mode=serve: the TCP port.", bound=Bound(1, high=65536))
    export_version: int = _serving(
        0,
        "--mode=export writes model_dir/export/<version>/ (0: one more than the newest there).",
        bound=NON_NEGATIVE,
    )

    input: str = _import("", "CSV, TSV, JSON Lines or Spotify JSON files of plays; commas, globs.")
    column_names: str = _import(
        "", "The columns of CSV/TSV --input files without a header line, comma-separated."
    )
    playlist_column: str = _column("playlist", "the playlist or session key", "sessions cut")
    user_column: str = _column("user", "the listener; sessions are cut per listener", "one")
    order_column: str = _column("order", "integer positions or timestamps", "file order")
    song_column: str = _column("song", "an external song key", "title + artist")
    title_column: str = _column("title", "the song title", "")
    artist_column: str = _column("artist", "the artist", "")
    session_gap: float = _import(
        30.0, "No playlist column: a pause over this many minutes starts a session.", bound=POSITIVE
    )
    keep_repeats: bool = _import(False, "Keep a song played twice in a row (default: once).")
    split: str = _import(
        "auto",
        "test.txt: random playlists (--seed), or time: those starting in the last --test_fraction "
        "of the time span; auto: time if the order column holds timestamps, else random.",
        choices=SPLITS,
    )
    test_fraction: float = _import(
        0.1, "Share of the playlists or time span for test.txt.", bound=Bound(0, True, 1)
    )
    overwrite: bool = _import(False, "Replace a --data_dir that is not empty (default: refuse).")

    listening_log: str = _audio(
        "",
        "Listening log file(s) or glob(s), comma-separated: Spotify .json or .csv history, "
        "Last.fm-1K .tsv.",
    )
    features: str = _audio(
        "", "Spotify audio-feature CSV(s) or glob(s), comma-separated; first listed wins."
    )
    user: str = _audio("", "Last.fm-1K user id to keep (needed if the log has several).")
    min_ms_played: int = _field(
        30_000,
        "audio",
        "Plays shorter than this (ms) are skips and dropped (logs with msPlayed; also "
        "--mode=import).",
        bound=NON_NEGATIVE,
    )
    english_only: bool = _audio(
        False, "Drop plays whose title has non-Latin letters (the GRU report's cleaning)."
    )
    standardize: str = _audio(
        "train",
        "Fit the feature z-scores on the training plays only (train), or on all plays as the "
        "report did (global; test months leak into the scaling).",
        choices=STANDARDIZE,
    )
    seq_len: int = _audio(10, "Feature vectors the model reads (GRU report: 10).", bound=POSITIVE)
    pred_steps: int = _audio(
        5, "Feature vectors it predicts = songs recommended (GRU report: 5).", bound=POSITIVE
    )
    loss: str = _audio(
        "mse", "Regression loss (report: MSE, then Smooth L1).", choices=AUDIO_LOSSES
    )
    bar: int = _audio(
        20,
        "Hit rate: the candidate window grows to the BAR most recent test plays.",
        bound=POSITIVE,
    )
    holdout: str = _audio(
        "test",
        "test: score each month's last 20 %; validation: leave those plays out and split each "
        "month's training plays 80/20 again, to choose settings without the test plays.",
        choices=HOLDOUTS,
    )
    audio_head: str = _audio(
        "both",
        "ranking: candidates ranked by listening priors and audio similarity (the default "
        "recommender); regression: the GRU report's feature regression and nearest-feature "
        "matching, as the report did it; both: train and score both.",
        choices=AUDIO_HEADS,
    )
    ranking_query: str = _audio(
        "none",
        "Ranking head: none scores candidates by priors and audio similarities only; gru adds a "
        "learned similarity between a GRU query over the plays read and each candidate (lower "
        "on harry2687's validation split, see README).",
        choices=RANKING_QUERIES,
    )
    identity_embedding: bool = _audio(
        False, "Ranking head with --ranking_query=gru: songs also carry a learned embedding."
    )
    ranking_batch_size: int = _audio(32, "Ranking head: samples per batch.", bound=POSITIVE)
    ranking_learning_rate: float = _audio(
        0.005, "Ranking head: Adam learning rate.", bound=POSITIVE
    )
    ranking_epochs: int = _audio(10, "Ranking head: epochs per month.", bound=POSITIVE)
    num_negatives: int = _audio(
        256,
        "Ranking head, open catalog: negatives sampled per training sample from the songs "
        "heard before (half uniform, half by sqrt(play count); logQ-corrected).",
        bound=POSITIVE,
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, choices, bound = (
                getattr(self, f.name),
                f.metadata["choices"],
                f.metadata["bound"],
            )
            if choices and value not in choices:
                raise ConfigError(f"--{f.name}={value!r}: must be one of {', '.join(choices)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name}={value}: must be a finite number")
            if bound and not bound.holds(value):
                raise ConfigError(f"--{f.name}={value}: must be {bound}")
        if (self.early_stopping_patience or self.reduce_lr_patience) and not self.valid_fraction:
            raise ConfigError(
                "--early_stopping_patience/--reduce_lr_patience need a validation split: "
                "set --valid_fraction > 0"
            )
        if self.lr_decay != "none" and self.reduce_lr_patience:
            raise ConfigError(f"--lr_decay={self.lr_decay}: excludes --reduce_lr_patience")
        if self.task == "audio_features":
            for name in ("listening_log", "features"):
                if not self.paths(name):
                    raise ConfigError(f"--{name}: --task=audio_features needs at least one file")
        if self.identity_embedding and self.ranking_query != "gru":
            raise ConfigError("--identity_embedding: needs --ranking_query=gru")
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
    def audio_heads(self) -> tuple[str, ...]:
        """The heads `--audio_head` trains and scores ("both": regression and ranking)."""
        return ("regression", "ranking") if self.audio_head == "both" else (self.audio_head,)

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


def flag_help(field: dataclasses.Field) -> str:
    """The `--help` text of a field's flag: its help, bound and (if not all) the tasks using it."""
    text = field.metadata["help"]
    if field.metadata["bound"]:
        text += f" Must be {field.metadata['bound']}."
    if field.metadata["tasks"] != TASK_NAMES:
        text += f" Only for --task={'|'.join(field.metadata['tasks'])}."
    return text


def make_config(given: dict[str, Any], mode: str = "train") -> Config:
    """The defaults of the task (`TASK_DEFAULTS`) and `mode` (`MODE_DEFAULTS`), overridden only by
    the settings given.

    Raises:
      ConfigError naming the flag and the task if a setting is given that the task does not read
        (e.g. `--baselines` for audio_features), or if a value is out of bounds.
    """
    task = given.get("task", Config.task)
    defaults = Config(task=task, **TASK_DEFAULTS.get(task, {}), **MODE_DEFAULTS.get(mode, {}))
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for name in given:
        if task not in fields[name].metadata["tasks"]:
            users = ", ".join(fields[name].metadata["tasks"])
            raise ConfigError(f"--{name}: not used by --task={task} (only by --task={users})")
    return dataclasses.replace(defaults, **given)
