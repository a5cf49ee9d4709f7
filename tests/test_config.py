"""Config: bounds beside each field, flags scoped to the task that reads them, per-task defaults."""

from __future__ import annotations

import dataclasses

import pytest

import config as config_lib
import errors


@pytest.mark.parametrize(
    "given, message",
    [
        ({"task": "audio_features", "baselines": "markov"}, "--baselines: not used by"),
        ({"task": "audio_features", "strategy": "mirrored"}, "--strategy: not used by"),
        ({"task": "audio_features", "jit_compile": True}, "--jit_compile: not used by"),
        ({"task": "audio_features", "data_dir": "data/yes_big"}, "--data_dir: not used by"),
        ({"seq_len": 12}, "--seq_len: not used by --task=next_song"),
        ({"task": "next_song", "listening_log": "a.json"}, "--listening_log: not used by"),
    ],
)
def test_a_flag_the_task_does_not_read_is_refused(given, message):
    with pytest.raises(errors.ConfigError, match=message) as error:
        config_lib.make_config(given)
    task = given.get("task", "next_song")
    other = "audio_features" if task == "next_song" else "next_song"
    assert str(error.value).endswith(f"--task={task} (only by --task={other})")


def test_flags_both_tasks_read_are_accepted_by_each():
    shared = dict(hidden_size=7, num_layers=1, cell="lstm", seed=3, checkpoint_every_steps=2)
    for task in config_lib.TASK_NAMES:
        config = config_lib.make_config(dict(task=task, **shared))
        assert (config.task, config.hidden_size, config.cell) == (task, 7, "lstm")


def test_task_defaults_apply_only_where_not_given():
    config = config_lib.make_config({"task": "audio_features", "hidden_size": 64})
    assert (config.hidden_size, config.cell, config.batch_size) == (64, "gru", 1)
    assert config_lib.make_config({}).hidden_size == 100


@pytest.mark.parametrize(
    "given, message",
    [
        ({"hidden_size": 0}, "--hidden_size=0: must be > 0"),
        ({"learning_rate": -0.1}, "--learning_rate=-0.1: must be > 0"),
        ({"dropout": 1.0}, r"--dropout=1.0: must be in \[0, 1\)"),
        ({"valid_fraction": -0.01}, r"--valid_fraction=-0.01: must be in \[0, 1\)"),
        ({"checkpoint_every_steps": -1}, "--checkpoint_every_steps=-1: must be >= 0"),
        ({"task": "audio_features", "bar": 0}, "--bar=0: must be > 0"),
        ({"max_grad_norm": float("inf")}, "--max_grad_norm=inf: must be a finite number"),
        ({"task": "audio_features", "identity_embedding": True}, "needs --ranking_query=gru"),
    ],
)
def test_values_outside_the_bound_name_the_flag(given, message):
    with pytest.raises(errors.ConfigError, match=message):
        config_lib.make_config(given)


def test_values_on_the_closed_end_of_a_bound_are_accepted():
    config = config_lib.make_config({"dropout": 0.0, "checkpoint_every_steps": 0, "top_k": 1})
    assert (config.dropout, config.checkpoint_every_steps, config.top_k) == (0.0, 0, 1)


def test_help_text_shows_the_bound_and_the_task():
    fields = {f.name: f for f in dataclasses.fields(config_lib.Config)}
    assert config_lib.flag_help(fields["dropout"]).endswith("Must be in [0, 1).")
    assert config_lib.flag_help(fields["seq_len"]).endswith(
        "Must be > 0. Only for --task=audio_features."
    )
    assert config_lib.flag_help(fields["baselines"]).endswith("Only for --task=next_song.")
    assert config_lib.flag_help(fields["seed"]) == fields["seed"].metadata["help"]


def test_every_field_names_known_tasks():
    for field in dataclasses.fields(config_lib.Config):
        assert set(field.metadata["tasks"]) <= set(config_lib.TASK_NAMES), field.name


def test_registry_holds_one_task_per_name_each_with_every_mode():
    import tasks

    assert list(tasks.TASKS) == list(config_lib.TASK_NAMES)
    for name, task in tasks.TASKS.items():
        assert isinstance(task, tasks.Task) and task.name == name
