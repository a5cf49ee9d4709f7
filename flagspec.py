"""The metadata of `config.Config` fields: bound, `--help` group and text, tasks that read them.

Each field of the Config is declared with `field`; `config.py` checks the bounds and choices in
`Config.__post_init__`, and `deepcf.py` shows them in `--help`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

TASK_NAMES = ("next_song", "audio_features")


@dataclasses.dataclass(frozen=True)
class Bound:
    """A numeric range: `low` (excluded if `low_open`) up to `high` (excluded), if given."""

    low: float
    low_open: bool = False
    high: float | None = None

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and (self.high is None or value < self.high)

    def __str__(self) -> str:
        if self.high is not None:
            return f"in [{self.low:g}, {self.high:g})"
        return f"{'>' if self.low_open else '>='} {self.low:g}"


POSITIVE, NON_NEGATIVE, FRACTION = Bound(0, low_open=True), Bound(0), Bound(0, high=1)
NEXT_SONG, AUDIO = ("next_song",), ("audio_features",)


def field(
    default: Any,
    group: str,
    help: str,
    *,
    tasks: tuple[str, ...] = TASK_NAMES,
    bound: Bound | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A Config field with its `--help` group and text, the tasks that read it, and its bound
    or choices (checked in `Config.__post_init__`, shown in `--help`)."""
    metadata = {"group": group, "help": help, "tasks": tasks, "bound": bound, "choices": choices}
    return dataclasses.field(default=default, metadata=metadata)


def audio(default: Any, help: str, **limits: Any) -> Any:
    """A field of the audio group, read by --task=audio_features only."""
    return field(default, "audio", help, tasks=AUDIO, **limits)


def evaluation(default: Any, help: str, **limits: Any) -> Any:
    """A field of the evaluation group, read by --task=next_song only."""
    return field(default, "evaluation", help, tasks=NEXT_SONG, **limits)


def import_field(default: Any, help: str, **limits: Any) -> Any:
    """A field of the import group, read by --mode=import (--task=next_song) only."""
    return field(default, "import", "--mode=import: " + help, tasks=NEXT_SONG, **limits)


SPLITS = ("auto", "random", "time")  # --mode=import, see importer.py
COLUMNS = {  # --mode=import: column names found without a --<role>_column flag, first wins
    "playlist": ("playlist_id", "playlist", "session_id", "session", "pid"),
    "user": ("user_id", "userid", "user", "username", "user_name", "listener_id", "listener"),
    "order": ("position", "pos", "timestamp", "ts", "endTime", "end_time", "time", "played_at"),
    "song": ("track_uri", "spotify_track_uri", "track_id", "song_id", "uri"),
    "title": ("trackName", "master_metadata_track_name", "title", "track_name", "track", "song"),
    "artist": ("artistName", "master_metadata_album_artist_name", "artist", "artist_name"),
    "ms_played": ("msPlayed", "ms_played"),
}


def column(role: str, what: str, without: str) -> Any:
    """An import flag naming the column of `role`; by default the first of `COLUMNS[role]`."""
    text = f"The column of {what} (default: the first of {', '.join(COLUMNS[role])}"
    return import_field("", text + (f"; none: {without})." if without else ")."))


def serving(default: Any, help: str, **limits: Any) -> Any:
    """A field of the serving group, read by --task=next_song only."""
    return field(default, "serving", help, tasks=NEXT_SONG, **limits)


def training(default: Any, help: str, **limits: Any) -> Any:
    """A field of the training group, read by --task=next_song only."""
    return field(default, "training", help, tasks=NEXT_SONG, **limits)


SIDE_FEATURES = ("none", "artist", "artist_tags", "auto")  # see coldstart.py


def side_features() -> Any:
    """`--side_features` (a model flag of --task=next_song; declared here, config.py is full)."""
    text = "Song side features added to each song's tied rows: none, artist, artist_tags; auto: "
    text += "artist if 5 %+ of the validation targets are not in training, else none. "
    text += "Needs --tie_embeddings and --softmax=full (coldstart.py, songrows.py)."
    return field("none", "model", text, choices=SIDE_FEATURES, tasks=NEXT_SONG)


def cold_fraction() -> Any:
    """`--cold_fraction` (a data flag of --task=next_song; declared here, config.py is full)."""
    text = "Cold-start protocol: share of the songs (seeded) removed from every training and "
    text += "validation playlist; eval also scores the test events with such a target."
    return field(0.0, "data", text, tasks=NEXT_SONG, bound=FRACTION)


TRANSITIONS = ("none", "markov", "markov_artist")  # see transitions.py


def transition() -> Any:
    """`--transition` (a model flag of --task=next_song)."""
    text = "markov: mix first-order transition counts of the training playlists into the "
    text += "softmax by a learned per-event gate, trained end to end (transitions.py); under "
    text += "--softmax=sampled the gate mixes the sampled estimate of the softmax at the target. "
    text += "markov_artist: markov smoothed also by the last song's artist's songs (a learned "
    text += "share), where the model has artist rows (--side_features); else markov."
    return field("none", "model", text, choices=TRANSITIONS, tasks=NEXT_SONG)


def transition_width() -> Any:
    """`--transition_width` (a model flag of --task=next_song)."""
    text = "With --transition: each song keeps its this many most frequent successors."
    return field(128, "model", text, bound=POSITIVE, tasks=NEXT_SONG)


def repeat_window() -> Any:
    """`--repeat_window` (a model flag of --task=next_song)."""
    text = "Songs of the history's last this many plays get a learned logit bias by how many "
    text += "plays ago they were last played and how often (repeats.py; 0: off; needs "
    text += "--softmax=full)."
    return field(0, "model", text, bound=NON_NEGATIVE, tasks=NEXT_SONG)


def min_updates_per_epoch() -> Any:
    """`--min_updates_per_epoch` (a training flag of --task=next_song)."""
    text = "If an epoch at --batch_size has fewer updates (windows) than this, train takes the "
    text += "largest of 50, 20 that has as many (else 20); decided at train, kept in config.json."
    return field(0, "training", text, bound=NON_NEGATIVE, tasks=NEXT_SONG)


SONG_INITS = ("random", "cooccurrence")  # see warmstart.py


def song_init() -> Any:
    """`--song_init` (a training flag of --task=next_song)."""
    text = "Where the song embedding table starts: random (Keras' uniform) or cooccurrence: a "
    text += "truncated SVD of the songs' positive PMI within 2 positions in the training "
    text += "playlists (warmstart.py), so songs heard together start close."
    return field("random", "training", text, choices=SONG_INITS, tasks=NEXT_SONG)


BIAS_INITS = ("zeros", "popularity")  # see warmstart.py


def bias_init() -> Any:
    """`--bias_init` (a training flag of --task=next_song)."""
    text = "Where the songs' output biases start: zeros, or popularity: log(training events + 1), "
    text += "centred, so the softmax starts at the songs' add-one popularity (warmstart.py)."
    return field("zeros", "training", text, choices=BIAS_INITS, tasks=NEXT_SONG)


VALID_SPLITS = ("auto", "random", "tail")  # see yes_reader.split_validation


def valid_split() -> Any:
    """`--valid_split` (a data flag of --task=next_song)."""
    text = "Which train.txt playlists --valid_fraction holds out: random (--seed), or tail: the "
    text += "last lines, for playlists in time order; auto: tail if --data_dir's import.json "
    text += "says test.txt was split by time (--mode=import --split=time), else random."
    return field("auto", "data", text, choices=VALID_SPLITS, tasks=NEXT_SONG)


def recency_half_life() -> Any:
    """`--recency_half_life` (a training flag of --task=next_song)."""
    text = "Weigh the training playlists by their line in train.txt (time order): the weight "
    text += "halves every this share of the lines, counted back from the last (0: all equal)."
    return field(0.0, "training", text, bound=NON_NEGATIVE, tasks=NEXT_SONG)


RECENCY_WEIGHTINGS = ("always", "time_split")


def recency_weighting() -> Any:
    """`--recency_weighting` (a training flag of --task=next_song)."""
    text = "Where --recency_half_life applies: always; or time_split: only where --data_dir's "
    text += "import.json says test.txt was split by time (lines in time order), elsewhere 0."
    return field("always", "training", text, choices=RECENCY_WEIGHTINGS, tasks=NEXT_SONG)


SAMPLED_STEPS = ("scaled", "plain")


def sampled_steps() -> Any:
    """`--sampled_steps` (a training flag of --task=next_song)."""
    text = "With --softmax=sampled: scaled multiplies the Adam step of each song's output row "
    text += "by pi^(-1/4), pi its chance to be sampled in a step; plain: Adam as for every weight."
    return field("scaled", "training", text, choices=SAMPLED_STEPS, tasks=NEXT_SONG)


LR_DECAYS = ("none", "linear")


def lr_decay() -> Any:
    """`--lr_decay` (a training flag of --task=next_song)."""
    text = "linear: step i of the run's T optimizer steps (--num_epochs x windows per epoch) "
    text += "trains at --learning_rate x (T - i) / T, a decay to 0 for a fixed budget of epochs; "
    text += "excludes --reduce_lr_patience."
    return field("none", "training", text, choices=LR_DECAYS, tasks=NEXT_SONG)
