"""Songs new to the catalog: the cold-start protocol and the songs' side features.

Protocol (`--cold_fraction`): a seeded share of the catalog's songs is removed from every
training and validation playlist, so no training ever sees them; `--mode=eval` then reports the
test events whose target is such a cold song beside all events. Test histories keep every song.

Side features (`--side_features`): each song's artist (song_hash.txt, matched by
`names.normalize`) and, with `artist_tags`, its tags (tags.txt + tag_hash.txt). The model adds
their embeddings to the song's own (`musicmodel.MusicModel`), so a song never seen in training
still scores through its artist and tags.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import logging

import config as config_lib
import names
import yes_reader
from errors import DataError

COLD_STREAM = 17  # the cold songs are drawn from np.random.default_rng([--seed, COLD_STREAM])
AUTO_COLD_SHARE = 0.05  # --side_features=auto: artist rows from this share of new val. targets


def cold_songs(num_songs: int, fraction: float, seed: int) -> np.ndarray:
    """bool [num_songs]: a seeded `fraction` of the songs (rounded), the same for every mode."""
    cold = np.zeros(num_songs, bool)
    order = np.random.default_rng([seed, COLD_STREAM]).permutation(num_songs)
    cold[order[: int(round(fraction * num_songs))]] = True
    return cold


def remove_cold(data: yes_reader.YesData, fraction: float, seed: int) -> tuple:
    """(data with the cold songs removed from its train and valid playlists, cold bool [songs]);
    `data` unchanged with fraction 0."""
    cold = cold_songs(data.catalog.size, fraction, seed)
    if not cold.any():
        return data, cold
    train, valid = ([p[~cold[p - 1]] for p in split] for split in (data.train, data.valid))
    removed = sum(len(p) for p in data.train + data.valid) - sum(len(p) for p in train + valid)
    logging.info(
        "cold start: %d of %d songs removed from the training and validation playlists "
        "(%d plays); test playlists keep them", cold.sum(), len(cold), removed,
    )  # fmt: skip
    if not yes_reader.count_events(train):
        raise DataError(f"--cold_fraction={fraction}: no training playlist keeps 2 songs")
    return dataclasses.replace(data, train=train, valid=valid), cold


def load(config: config_lib.Config) -> yes_reader.YesData:
    """`yes_reader.load` of --data_dir (--valid_fraction, --seed, --valid_split) with the
    --cold_fraction songs removed from its training and validation playlists (`remove_cold`):
    what every fit sees."""
    data = yes_reader.load(config.data_dir, config.valid_fraction, config.seed, config.valid_split)
    return remove_cold(data, config.cold_fraction, config.seed)[0]


def cold_target_windows(windows: yes_reader.Windows, cold: np.ndarray) -> yes_reader.Windows:
    """`windows` with only the events whose target is a cold song weighted (histories whole)."""
    weights = windows.weights * cold[windows.targets]
    return dataclasses.replace(windows, weights=weights.astype(np.float32))


@dataclasses.dataclass(frozen=True)
class SideFeatures:
    """Per-song side features.

    Attributes:
      artists: int32 [num_songs], the song's artist (index into `num_artists` artists).
      tags: float32 [num_songs, num_tags]: 1/n for each of the song's n tags (a mean), or None.
    """

    artists: np.ndarray
    num_artists: int
    tags: np.ndarray | None

    def model_args(self) -> dict:
        """The `musicmodel.MusicModel` arguments that carry these features."""
        num_tags = 0 if self.tags is None else self.tags.shape[1]
        return dict(num_artists=self.num_artists, num_tags=num_tags, song_artists=self.artists,
                    song_tags=self.tags)  # fmt: skip


def song_tags(data_dir: str, num_songs: int) -> np.ndarray:
    """float32 [num_songs, num_tags]: row s holds 1/n at the n tags of song s (tags.txt)."""
    tags_path, hash_path = (os.path.join(data_dir, f) for f in ("tags.txt", "tag_hash.txt"))
    for path in (tags_path, hash_path):
        if not os.path.exists(path):
            raise DataError(f"{path}: file not found (--side_features=artist_tags needs it)")
    _, ids = yes_reader.read_song_tags(tags_path, hash_path, num_songs)
    out = np.zeros((num_songs, 1 + max((max(t) for t in ids if t), default=0)), np.float32)
    for song, tags in enumerate(ids):
        out[song, tags] = 1.0 / max(len(tags), 1)
    return out


def resolve_side_features(config: config_lib.Config, data: yes_reader.YesData) -> config_lib.Config:
    """`config` with --side_features=auto decided on the validation split: "artist" if at least
    `AUTO_COLD_SHARE` of its events have a target that no training playlist holds (a catalog
    that moves, as in a log split by time), and the model has tied rows and the full softmax
    that side features need; else "none". Other values are kept."""
    if config.side_features != "auto":
        return config
    seen = np.zeros(data.catalog.size + 1, bool)
    seen[np.concatenate([*data.train, np.zeros(0, np.int64)])] = True
    targets = np.concatenate([p[1:] for p in data.valid] + [np.zeros(0, np.int64)])
    share = float(1.0 - seen[targets].mean()) if len(targets) else 0.0
    able = config.tie_embeddings and config.softmax == "full"
    kind = "artist" if share >= AUTO_COLD_SHARE and able else "none"
    logging.info(
        "--side_features=auto: %s (%.1f %% of %d validation targets are not in training)",
        kind, 100 * share, len(targets),
    )  # fmt: skip
    return dataclasses.replace(config, side_features=kind)


def side_features(data_dir: str, catalog: yes_reader.Catalog, kind: str) -> SideFeatures | None:
    """The `--side_features` of the songs of `catalog` (None for "none")."""
    if kind == "none":
        return None
    normal = [names.normalize(a) for a in catalog.artists]
    artist_names, artists = np.unique(normal, return_inverse=True)
    tags = song_tags(data_dir, catalog.size) if kind == "artist_tags" else None
    logging.info(
        "side features: %d artists%s", len(artist_names),
        "" if tags is None else f", {tags.shape[1]} tags",
    )  # fmt: skip
    return SideFeatures(artists.astype(np.int32), len(artist_names), tags)
