"""A write that fails at each write point in turn (a directory or file in the way, or disk full
simulated in-process): exit 2 with one line naming the path, earlier outputs and the newest
complete checkpoint intact, and the same command works again once the fault is gone.

(Tests run as root, so read-only directories would not stop a write: a path is put in the way.)
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pathlib
import re
import shutil

import pytest
import tensorflow as tf
from test_audio_task import harry_slice, trained  # noqa: F401 (fixtures)
from test_errors import NUM_SONGS, TEST, TINY, TRAIN, error_line
from test_resume import ckpt_steps, newest_checkpoint

import audio_task
import errors
import modeltrainer
import rundir
from conftest import run_cli, write_yes_dir

EVERY_STEP = "--checkpoint_every_steps=1"


@pytest.fixture
def data(tmp_path) -> pathlib.Path:
    return write_yes_dir(tmp_path / "data", TRAIN, TEST, NUM_SONGS)


def train(data: pathlib.Path, run: pathlib.Path, *extra: str):
    return run_cli(f"--data_dir={data}", f"--model_dir={run}", *TINY, EVERY_STEP, *extra)


def test_a_checkpoint_that_cannot_be_written_keeps_the_one_before(data, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "ckpt-2.index").mkdir(parents=True)  # in the way of step 2's save
    result = train(data, run)
    assert result.returncode == 2
    line = error_line(result)
    assert f"deepcf: error: {run / 'checkpoints'}: cannot write checkpoint ckpt-2 (" in line
    assert line.endswith(f"the newest complete one is {run / 'checkpoints' / 'ckpt-1'}")
    assert newest_checkpoint(run) == 1 and not (run / "model.keras").exists()
    (run / "checkpoints" / "ckpt-2.index").rmdir()
    again = train(data, run)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'ckpt-1'} at step 1" in again.stderr
    assert (run / "model.keras").exists()


def test_a_tensorboard_dir_that_cannot_be_created_stops_before_training(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tensorboard").write_text("in the way")
    result = train(data, run)
    assert result.returncode == 2
    assert f"deepcf: error: {run / 'tensorboard'}" in error_line(result)
    assert not (run / "checkpoints").exists()
    (run / "tensorboard").unlink()
    assert train(data, run).returncode == 0


def test_model_metrics_and_export_writes_that_fail_leave_what_was_there(data, tmp_path):
    run = tmp_path / "run"
    (run / "model.keras").mkdir(parents=True)
    result = train(data, run)
    assert result.returncode == 2
    assert f"deepcf: error: {run / 'model.keras'}: cannot write (" in error_line(result)
    steps = ckpt_steps(run)
    assert steps and not [p for p in run.iterdir() if p.name.startswith(".tmp-")]
    (run / "model.keras").rmdir()
    again = train(data, run)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already trained for 1 epochs" in again.stderr and ckpt_steps(run) == steps
    model = (run / "model.keras").read_bytes()

    flags = [f"--data_dir={data}", f"--model_dir={run}", "--num_steps=3"]
    (run / "metrics.json").mkdir()
    result = run_cli("--mode=eval", *flags)
    assert result.returncode == 2
    assert f"deepcf: error: {run / 'metrics.json'}: cannot write (" in error_line(result)
    (run / "metrics.json").rmdir()
    assert run_cli("--mode=eval", *flags).returncode == 0

    (run / "export").write_text("in the way")
    result = run_cli("--mode=export", *flags)
    assert result.returncode == 2
    assert f"deepcf: error: {run / 'export'}: cannot create the directory (" in error_line(result)
    (run / "export").unlink()
    assert run_cli("--mode=export", *flags).returncode == 0
    assert (run / "export" / "1" / "saved_model.pb").exists()
    assert (run / "model.keras").read_bytes() == model


def test_a_full_disk_during_an_export_leaves_no_partial_version(tmp_path, monkeypatch):
    """In-process: the SavedModel writer fails as with ENOSPC; no version and no temporary
    directory is left, and version 1 is written once the disk has room."""
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    endpoint = tf.function(lambda x: model(x), input_signature=[tf.TensorSpec([None, 3])])
    export_dir = tmp_path / "export"

    class FullDisk:  # keras.export.ExportArchive, but the disk fills up
        def track(self, model):
            pass

        def add_endpoint(self, name, fn):
            pass

        def write_out(self, path, **kwargs):  # half a SavedModel, then the disk is full
            os.makedirs(path, exist_ok=True)
            pathlib.Path(path, "saved_model.pb").write_bytes(b"half")
            raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(keras.export, "ExportArchive", FullDisk)
        with pytest.raises(errors.WriteError, match=f"^{export_dir / '1'}: cannot write the"):
            modeltrainer.export_saved_model(model, {"serving_default": endpoint}, str(export_dir))
    assert os.listdir(export_dir) == []
    modeltrainer.export_saved_model(model, {"serving_default": endpoint}, str(export_dir))
    assert (export_dir / "1" / "saved_model.pb").exists()


@pytest.mark.parametrize("fails", ["mkstemp", "write", "replace"])
def test_a_full_disk_at_any_step_of_an_atomic_write_names_the_path(tmp_path, monkeypatch, fails):
    """In-process ENOSPC while creating, writing or renaming `hit_rate.json` (every output goes
    through `rundir.atomic_path`): WriteError naming the file, the old file as it was."""
    path = tmp_path / "hit_rate.json"
    path.write_text('{"old": 1}\n')
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fail(*args, **kwargs):
        raise full

    with monkeypatch.context() as patch:
        if fails == "write":
            patch.setattr(rundir.json, "dumps", lambda *a, **k: "x" * 10)
            patch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(full))
        else:
            patch.setattr({"mkstemp": rundir.tempfile, "replace": rundir.os}[fails], fails, fail)
        with pytest.raises(errors.WriteError, match=f"^{path}: cannot write \\(No space left"):
            rundir.write_json_atomic(str(path), {"new": 2})
    assert path.read_text() == '{"old": 1}\n'
    assert sorted(os.listdir(tmp_path)) == ["hit_rate.json"]


@pytest.mark.parametrize("in_the_way", ["hit_rate.png", "tensorboard", "hit_rate.json"])
def test_hit_rate_outputs_that_cannot_be_written_name_the_path(trained, tmp_path, in_the_way):  # noqa: F811
    """Audio eval: a chart, the TensorBoard dir or hit_rate.json in the way → WriteError (exit 2)
    naming it; the months' models are untouched and eval works once the path is free."""
    config = dataclasses.replace(trained, model_dir=str(tmp_path / "run"))
    shutil.copytree(trained.model_dir, config.model_dir)
    models = {p: p.read_bytes() for p in pathlib.Path(config.model_dir).rglob("model.keras")}
    blocker = pathlib.Path(config.model_dir, in_the_way)
    if in_the_way == "tensorboard":
        shutil.rmtree(blocker, ignore_errors=True)
        blocker.write_text("in the way")
    else:
        blocker.mkdir()
    with pytest.raises(errors.WriteError, match=f"^{re.escape(str(blocker))}"):
        audio_task.AudioFeaturesTask().evaluate(config)
    assert {p: p.read_bytes() for p in models} == models
    blocker.unlink() if blocker.is_file() else blocker.rmdir()
    audio_task.AudioFeaturesTask().evaluate(config)
    assert pathlib.Path(config.model_dir, "hit_rate.json").is_file()
