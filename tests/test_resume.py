"""Recovery: a training run killed with SIGKILL resumes where its last checkpoint left off and ends
with the same weights as an uninterrupted run; a NaN loss stops training, names the step and keeps
the last good checkpoint and model.
"""

from __future__ import annotations

import pathlib
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import tensorflow as tf
from test_errors import NUM_SONGS, TEST, TINY, TRAIN, error_line

import config as config_lib
import modeltrainer
import tasks
from conftest import ROOT, cli_command, quiet_env, run_cli, write_yes_dir

EVERY = 5  # --checkpoint_every_steps of the killed run
SLICE_FLAGS = [
    "--num_epochs=3",
    "--batch_size=20",  # 720 training playlists of the slice: 41 windows per epoch
    "--num_steps=5",
    "--hidden_size=16",
    "--embedding_size=16",
    "--num_layers=1",
    "--dropout=0.2",  # its random state must be checkpointed too
    "--learning_rate=0.01",
    "--lr_decay=linear",  # a schedule of the step count: it must go on from the restored step
    f"--checkpoint_every_steps={EVERY}",
]


def flags(data_dir: pathlib.Path, model_dir: pathlib.Path) -> list[str]:
    return [f"--data_dir={data_dir}", f"--model_dir={model_dir}", *SLICE_FLAGS]


def failure(stderr: str) -> str:
    """The `deepcf:` lines and the end of a failed run's stderr."""
    return "\n".join([line for line in stderr.splitlines() if "deepcf:" in line] + [stderr[-2000:]])


def newest_checkpoint(model_dir: pathlib.Path) -> int:
    """The step of the newest complete checkpoint, as the `checkpoint` file names it (0: none)."""
    state = model_dir / "checkpoints" / "checkpoint"
    if not state.exists():  # TensorFlow writes it by renaming a complete temporary file
        return 0
    return int(re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', state.read_text(), re.M)[1])


def wait_for_checkpoint(
    run: subprocess.Popen, model_dir: pathlib.Path, step: int, timeout: float = 300
) -> None:
    """Polls until `run` has checkpointed step `step` or later; fails if it ends or times out."""
    deadline = time.monotonic() + timeout
    while newest_checkpoint(model_dir) < step:
        assert run.poll() is None, f"training ended (status {run.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"no checkpoint of step {step} after {timeout} s"
        time.sleep(0.01)


def test_kill_9_resumes_from_the_last_checkpoint_and_matches_an_uninterrupted_run(
    small_slice, tmp_path
):
    env = quiet_env()
    reference = subprocess.Popen(
        cli_command(*flags(small_slice, tmp_path / "reference")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
        text=True,
    )
    killed_dir = tmp_path / "killed"
    victim_log = tmp_path / "killed.log"
    victim = subprocess.Popen(
        cli_command(*flags(small_slice, killed_dir)),
        stdout=subprocess.DEVNULL,
        stderr=victim_log.open("w"),
        cwd=ROOT,
        env=env,
    )
    # Kill it once it has run on past its first checkpoint, into later steps.
    wait_for_checkpoint(victim, killed_dir, 2 * EVERY)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, failure(victim_log.read_text())
    assert not (killed_dir / "model.keras").exists(), "finished before the kill: train longer"
    saved = newest_checkpoint(killed_dir)
    # A save cut short leaves TensorFlow's `ckpt-N_temp` directory: those N steps are lost too.
    mid_save = any("_temp" in p.name for p in (killed_dir / "checkpoints").iterdir())
    assert saved >= 2 * EVERY

    resumed = run_cli(*flags(small_slice, killed_dir))
    assert resumed.returncode == 0, failure(resumed.stderr)
    assert f"resuming from {killed_dir / 'checkpoints'}/ckpt-{saved} at step {saved}" in (
        resumed.stderr
    )
    _, reference_log = reference.communicate(timeout=600)
    assert reference.returncode == 0, failure(reference_log)
    assert max(ckpt_steps(killed_dir)) == max(ckpt_steps(tmp_path / "reference"))

    # The steps done after the newest complete checkpoint are lost: there was no later one, so
    # fewer than EVERY, or EVERY if the kill hit a save (printed for the README).
    print(f"resumed at step {saved}; at most {EVERY if mid_save else EVERY - 1} steps lost")

    # Weights, carried state, optimizer moments, step counter and data order all continue: the
    # resumed run ends where the uninterrupted one does.
    ours = modeltrainer.load_model(str(killed_dir))
    theirs = modeltrainer.load_model(str(tmp_path / "reference"))
    for a, b in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=a.path
        )

    # And --mode=eval scores the resumed model as it scores the uninterrupted one.
    results = {}
    for run in ("killed", "reference"):
        config = config_lib.make_config(
            dict(data_dir=str(small_slice), model_dir=str(tmp_path / run), num_steps=5)
        )
        results[run] = tasks.TASKS["next_song"].evaluate(config)
        assert (tmp_path / run / "metrics.json").exists()
    killed, reference = results["killed"], results["reference"]
    assert killed["events"] == reference["events"]
    assert killed["log_likelihood"] == pytest.approx(reference["log_likelihood"], rel=1e-5)
    for kind in ("recall", "mrr", "ndcg"):
        assert killed[kind] == pytest.approx(reference[kind], rel=1e-5), kind


@pytest.fixture
def tiny_run(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """A tiny data dir and a 1-epoch run in it with a checkpoint after every step."""
    data = write_yes_dir(tmp_path / "data", TRAIN, TEST, NUM_SONGS)
    run = tmp_path / "run"
    result = run_cli(
        f"--data_dir={data}", f"--model_dir={run}", *TINY, "--checkpoint_every_steps=1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return data, run


def ckpt_steps(model_dir: pathlib.Path) -> list[int]:
    names = (p.name for p in (model_dir / "checkpoints").glob("ckpt-*.index"))
    return sorted(int(name[len("ckpt-") : -len(".index")]) for name in names)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_run):
    data, run = tiny_run
    trained_steps = max(ckpt_steps(run))
    model_before = (run / "model.keras").read_bytes()
    base = [f"--data_dir={data}", f"--model_dir={run}", *TINY, "--checkpoint_every_steps=1"]
    # A second epoch at a learning rate beyond float32 (inf): one step makes the weights
    # non-finite, and the next loss is NaN. (At 1e38 the weights stay finite, ~1e38, and since
    # padding gets no logits the loss of the real events can stay finite a step longer: the guard
    # only sees losses, so it would keep that checkpoint.)
    result = run_cli(*base, "--num_epochs=2", "--learning_rate=1e39")
    assert result.returncode == 3, result.stderr[-3000:]
    line = error_line(result)
    match = re.search(r"training loss became nan at step (\d+).*checkpoint: (\S+)\)", line)
    assert match, line
    nan_step, last_good = int(match.group(1)), match.group(2)
    assert nan_step > trained_steps + 1
    # The weights saved after step nan_step - 1 gave the NaN: that checkpoint is gone.
    assert last_good == str(run / "checkpoints" / f"ckpt-{nan_step - 2}")
    assert max(ckpt_steps(run)) == nan_step - 2
    reader = tf.train.load_checkpoint(last_good)
    for name, _ in tf.train.list_variables(last_good):
        value = reader.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.isfinite(value).all(), name
    assert (run / "model.keras").read_bytes() == model_before

    # With a sane learning rate the same command goes on from the last good checkpoint.
    again = run_cli(*base, "--num_epochs=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {last_good} at step {nan_step - 2}" in again.stderr
