"""Time-aware training: recency-weighted playlists and the validation share from the end in time."""

from __future__ import annotations

import json
import os

import numpy as np

import musicmodel
import next_song_task
import yes_reader
from conftest import train_small, write_yes_dir

EARLY, LATE = [0, 1, 3], [0, 2, 4]  # the same start, then other songs: the taste moved


def loss(cfg, playlist: list[int]) -> float:
    """The trained model's mean loss on 20 copies of `playlist` (song ids)."""
    model = next_song_task.load_trained(cfg, 6)
    musicmodel.compile_model(model, cfg.learning_rate, cfg.max_grad_norm)
    tokens = [np.array(playlist, np.int32) + 1] * 20
    windows = yes_reader.make_windows(tokens, model.batch_size, cfg.num_steps)
    return float(next_song_task.evaluate_windows(model, windows)["loss"])


def test_recency_half_life_makes_the_model_learn_the_late_playlists(tmp_path):
    # 60 playlists of the early kind, then 60 of the late kind (line order = time). Equal weights
    # learn both alike; a half-life of 0.1 of the lines weighs the early ones 32x less or lower.
    data = write_yes_dir(tmp_path / "data", [EARLY] * 60 + [LATE] * 60, [LATE], num_songs=6)
    flags = dict(valid_fraction=0.0, seed=1)
    plain = train_small(data, tmp_path / "plain", num_epochs=4, **flags)
    recent = train_small(data, tmp_path / "recent", num_epochs=4, recency_half_life=0.1, **flags)
    gaps = {c.model_dir: loss(c, EARLY) - loss(c, LATE) for c in (plain, recent)}
    assert abs(gaps[plain.model_dir]) < 0.2
    assert gaps[recent.model_dir] > 1.0
    run = json.load(open(os.path.join(recent.model_dir, "config.json")))
    assert run["config"]["recency_half_life"] == 0.1


def test_recency_weighting_time_split_keeps_the_half_life_only_for_a_time_split(tmp_path):
    # The same lines twice: without import.json the half-life is dropped (every playlist weighs
    # 1, as config.json records); with {"split": "time"} it is kept.
    runs = {}
    for split in ("random", "time"):
        data = write_yes_dir(tmp_path / split, [EARLY] * 60 + [LATE] * 60, [LATE], num_songs=6)
        if split == "time":
            (data / "import.json").write_text(json.dumps({"split": "time"}))
        cfg = train_small(
            data, tmp_path / f"run_{split}", num_epochs=1, valid_fraction=0.0,
            recency_half_life=0.1, recency_weighting="time_split",
        )  # fmt: skip
        runs[split] = json.load(open(os.path.join(cfg.model_dir, "config.json")))["config"]
    assert runs["random"]["recency_half_life"] == 0.0
    assert runs["time"]["recency_half_life"] == 0.1


def test_valid_split_tail_trains_on_the_early_lines_only(tmp_path):
    # Half of the lines held out from the end: training sees only the early playlists.
    data = write_yes_dir(tmp_path / "data", [EARLY] * 60 + [LATE] * 60, [LATE], num_songs=6)
    cfg = train_small(data, tmp_path / "run", num_epochs=4, valid_fraction=0.5, valid_split="tail")
    assert loss(cfg, LATE) - loss(cfg, EARLY) > 1.0
