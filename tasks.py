"""The recommenders deepcf can run: the `Task` protocol and the `TASKS` registry.

Each task owns its data, model, metrics and report, and shares the trainer (`modeltrainer`),
hooks, config and CLI. `deepcf.py` runs `TASKS[--task]`'s method of `--mode`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import audio_task
import config as config_lib
import next_song_task


@runtime_checkable
class Task(Protocol):
    """What `deepcf.py` calls; a mode a task cannot run raises `errors.ConfigError`."""

    name: str

    def train(self, config: config_lib.Config) -> None:
        """--mode=train: fits the model and saves it (and its checkpoints) in --model_dir."""

    def evaluate(self, config: config_lib.Config) -> dict:
        """--mode=eval: scores the saved model on held-out data, prints and writes the results."""

    def recommend(self, config: config_lib.Config) -> list[dict]:
        """--mode=recommend: prints and returns the recommendations for the given histories."""

    def export(self, config: config_lib.Config) -> str:
        """--mode=export: writes a SavedModel for serving; returns its path."""

    def search(self, config: config_lib.Config) -> list[int]:
        """--mode=search: prints and returns the catalog songs matching --query."""

    def serve(self, config: config_lib.Config) -> None:
        """--mode=serve: answers HTTP requests with the saved model until stopped."""


TASKS: dict[str, Task] = {
    task.name: task for task in (next_song_task.NextSongTask(), audio_task.AudioFeaturesTask())
}
