"""Ctrl-C and SIGTERM: a real signal to a real training process saves a checkpoint of the current
step, prints how to resume and exits 130 / 143; the same command then goes on from that step."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
from test_resume import failure, flags, newest_checkpoint

import rundir
from conftest import ROOT, cli_command

TIMEOUT = 300  # seconds: a bound for waiting on the process, not a timing assumption


def wait_for(path, process: subprocess.Popen) -> None:
    """Polls until `path` exists; fails if the process ends first or after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert process.poll() is None, "the training ended before its first checkpoint"
        assert time.monotonic() < deadline, f"no {path} after {TIMEOUT} s"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_current_step_and_a_rerun_resumes_there(small_slice, tmp_path, signum):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    model_dir, log = tmp_path / "run", tmp_path / "run.log"
    with log.open("w") as stderr:
        run = subprocess.Popen(
            cli_command(*flags(small_slice, model_dir)),
            stderr=stderr,
            stdout=subprocess.DEVNULL,
            cwd=ROOT,
            env=env,
        )
        wait_for(model_dir / "checkpoints" / "checkpoint", run)
        run.send_signal(signum)
        code = run.wait(timeout=TIMEOUT)
    stderr = log.read_text()
    assert code == 128 + signum, failure(stderr)
    assert "Traceback" not in stderr, stderr[-3000:]
    line = [x for x in stderr.splitlines() if x.startswith("deepcf: ")][-1]
    match = re.fullmatch(
        rf"deepcf: interrupted by {signum.name} at step (\d+); saved checkpoint (\S+)\. "
        r"Run the same command again to resume from it\.",
        line,
    )
    assert match, line
    step = int(match.group(1))
    assert match.group(2) == str(model_dir / "checkpoints" / f"ckpt-{step}")
    assert newest_checkpoint(model_dir) == step
    assert not (model_dir / "model.keras").exists(), "finished before the signal: train longer"
    assert not (model_dir / rundir.LOCK_FILE).exists()  # the lock was released

    again = subprocess.run(
        cli_command(*flags(small_slice, model_dir)),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert again.returncode == 0, failure(again.stderr)
    assert f"resuming from {model_dir / 'checkpoints'}/ckpt-{step} at step {step}" in again.stderr
    assert (model_dir / "model.keras").exists()
