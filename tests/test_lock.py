"""One run per --model_dir (the lock), outputs with the user's umask, config.json written only
once the checkpoint to resume is known to fit, and a consistent model.keras while training writes.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_errors import NUM_SONGS, TEST, TINY, TRAIN, error_line

import errors
import modeltrainer
import rundir
from conftest import ROOT, run_cli, train_small, write_yes_dir

HOST = socket.gethostname()


def dead_pid() -> int:
    """The pid of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize(
    "umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_outputs_get_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        rundir.write_json_atomic(str(tmp_path / "metrics.json"), {"a": 1})
        with rundir.atomic_path(str(tmp_path / "export"), directory=True) as tmp:
            pathlib.Path(tmp, "saved_model.pb").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "export").stat().st_mode & 0o777 == dir_mode


def test_a_held_lock_is_refused_naming_the_holder(tmp_path):
    with rundir.lock_model_dir(str(tmp_path)):
        holder = json.loads((tmp_path / rundir.LOCK_FILE).read_text())
        assert holder == {"pid": os.getpid(), "host": HOST}
        with pytest.raises(errors.ConfigError, match=f"pid {os.getpid()} on host {HOST}"):
            with rundir.lock_model_dir(str(tmp_path)):
                pass
    with rundir.lock_model_dir(str(tmp_path)):  # released at the end of the first
        pass


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(errors.TrainingError):
        with rundir.lock_model_dir(str(tmp_path)):
            raise errors.TrainingError("loss became nan")
    assert not (tmp_path / rundir.LOCK_FILE).exists()


def test_the_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, monkeypatch):
    pid = dead_pid()
    (tmp_path / rundir.LOCK_FILE).write_text(json.dumps({"pid": pid, "host": HOST}))
    warnings = []
    monkeypatch.setattr(rundir.logging, "warning", lambda *a: warnings.append(a[0] % a[1:]))
    with rundir.lock_model_dir(str(tmp_path)):
        assert json.loads((tmp_path / rundir.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert len(warnings) == 1 and f"stale lock of pid {pid} on host {HOST}" in warnings[0]


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    (tmp_path / rundir.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(errors.ConfigError, match="pid 1 on host elsewhere.*delete"):
        with rundir.lock_model_dir(str(tmp_path)):
            pass


def test_a_second_train_is_refused_then_takes_over_once_the_first_is_killed(tmp_path):
    """The holder is a real process holding the lock (as a training does); the second
    `--mode=train` exits 2 naming it; after a SIGKILL of the holder, training takes over."""
    data, model_dir = write_yes_dir(tmp_path / "data", TRAIN, TEST, NUM_SONGS), tmp_path / "m"
    model_dir.mkdir()
    hold = "import rundir, sys\nwith rundir.lock_model_dir(sys.argv[1]):\n print(1, flush=True)\n"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold + " sys.stdin.read()", str(model_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert holder.stdout.readline().strip() == b"1"
        flags = [f"--data_dir={data}", f"--model_dir={model_dir}", *TINY]
        refused = run_cli(*flags)
        assert refused.returncode == 2
        line = error_line(refused)
        assert f"another training is running there (pid {holder.pid} on host {HOST}" in line
        assert sorted(os.listdir(model_dir)) == [rundir.LOCK_FILE]  # no config.json either
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    done = run_cli(*flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"taking over the stale lock of pid {holder.pid} on host {HOST}" in done.stderr
    assert (model_dir / "model.keras").exists()
    assert not (model_dir / rundir.LOCK_FILE).exists()  # released


def test_an_incompatible_rerun_leaves_config_json_as_it_was(tmp_path):
    data = write_yes_dir(tmp_path / "data", TRAIN, TEST, NUM_SONGS)
    train_small(data, tmp_path / "m", num_epochs=1)
    before = (tmp_path / "m" / "config.json").read_bytes()
    import config as config_lib
    import tasks

    flags = dict(data_dir=str(data), model_dir=str(tmp_path / "m"), num_epochs=2)
    bigger = config_lib.make_config(dict(flags, embedding_size=16, hidden_size=24, batch_size=20))
    with pytest.raises(errors.ModelError, match="no checkpoint could be restored"):
        tasks.TASKS["next_song"].train(bigger)
    assert (tmp_path / "m" / "config.json").read_bytes() == before


WRITER = """
import sys, numpy as np, keras, rundir
path = sys.argv[1]
models = []
for value in (1.0, 2.0):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4096)])
    model.set_weights([np.full(w.shape, value, np.float32) for w in model.get_weights()])
    models.append(model)
for i in range(10**6):
    with rundir.atomic_path(path) as tmp:
        models[i % 2].save(tmp)
    if i == 1:
        print(1, flush=True)
"""


def test_model_keras_loads_whole_while_it_is_being_replaced(tmp_path):
    """A writer replaces model.keras in a loop (as `Trainer.save` does, alternating weights 1
    and 2); every load meanwhile gets one whole model, never a mix or a torn file."""
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path / modeltrainer.MODEL_FILE)],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2"),
    )
    try:
        assert writer.stdout.readline().strip() == b"1"
        seen = set()
        for _ in range(20):
            kernel, bias = modeltrainer.load_model(str(tmp_path)).get_weights()
            assert np.unique(kernel).size == 1 and np.unique(bias).tolist() == [kernel[0, 0]]
            seen.add(float(kernel[0, 0]))
    finally:
        writer.kill()
        writer.wait()
    assert seen <= {1.0, 2.0}


def test_a_lock_file_removed_by_its_holder_after_it_was_opened_is_not_held(tmp_path, monkeypatch):
    """The holder removes .lock at its end; a process that opened the old file just before then
    locks it: it must see that the path now names another file and lock that one instead."""
    path = tmp_path / rundir.LOCK_FILE
    take_lock = rundir._take_lock
    swapped = []

    def late(fd, *args):  # the first holder ends between our open() and flock()
        if not swapped:
            path.unlink()
            path.write_text("")
            swapped.append(os.fstat(fd).st_ino)
        return take_lock(fd, *args)

    path.write_text("")
    monkeypatch.setattr(rundir, "_take_lock", late)
    with rundir.lock_model_dir(str(tmp_path)):
        assert path.stat().st_ino != swapped[0]
        assert json.loads(path.read_text())["pid"] == os.getpid()
