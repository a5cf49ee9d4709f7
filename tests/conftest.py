"""Shared fixtures: tiny hand-made Yes.com directories, slices of the shipped data, the CLI run
in a subprocess, the model's view of every event worked out independently; the `smoke` and
`benchmark` markers."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEEPCF = ROOT / "deepcf.py"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-benchmark",
        action="store_true",
        help="also run the timed benchmark (bench.py --quick); it is not part of the unit suite",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "smoke: a cheap check of a tool beside the library (runs by default)"
    )
    config.addinivalue_line(
        "markers", "benchmark: timed work, deselected unless pytest is given --run-benchmark"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leaves the `benchmark` tests out of the suite (deselected) unless --run-benchmark."""
    if config.getoption("--run-benchmark"):
        return
    timed = [item for item in items if "benchmark" in item.keywords]
    if timed:
        config.hook.pytest_deselected(items=timed)
        items[:] = [item for item in items if "benchmark" not in item.keywords]


def quiet_env() -> dict[str, str]:
    """This process's environment with TensorFlow's C++ logging at warnings and up."""
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def cli_command(*args: str) -> list[str]:
    """The argv of `python deepcf.py args...`."""
    return [sys.executable, str(DEEPCF), *args]


def run_python(
    *args: str, cwd: pathlib.Path | str = ROOT, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Runs `python args...` in `cwd` (the repository root by default), output captured as text."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=quiet_env(),
        timeout=timeout,
    )


def run_cli(
    *args: str, cwd: pathlib.Path | str = ROOT, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Runs the CLI, `python deepcf.py args...`, as `run_python` does."""
    return run_python(str(DEEPCF), *args, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def model(trained):
    """The model of the test module's `trained` fixture (a next-song Config), loaded once."""
    import modeltrainer

    return modeltrainer.load_model(trained.model_dir)


def write_playlist_file(path: pathlib.Path, playlists: list[list[int]], num_songs: int) -> None:
    """Writes a Yes.com playlist file: two header lines of `num_songs` numbers, then playlists."""
    counts = [0] * num_songs
    for playlist in playlists:
        for song in playlist:
            if 0 <= song < num_songs:
                counts[song] += 1
    lines = [" ".join(str(1000 + i) for i in range(num_songs)) + " "]
    lines.append(" ".join(map(str, counts)) + " ")
    lines += [" ".join(map(str, p)) + " " for p in playlists]
    path.write_text("\n".join(lines) + "\n")


def write_yes_dir(
    directory: pathlib.Path,
    train: list[list[int]],
    test: list[list[int]],
    num_songs: int,
) -> pathlib.Path:
    """A complete tiny Yes.com directory (song_hash.txt, train.txt, test.txt)."""
    directory.mkdir(parents=True, exist_ok=True)
    titles = "".join(f"{i}\tSong {i}\tArtist {i % 3}\n" for i in range(num_songs))
    (directory / "song_hash.txt").write_text(titles)
    write_playlist_file(directory / "train.txt", train, num_songs)
    write_playlist_file(directory / "test.txt", test, num_songs)
    return directory


SMALL_MODEL = dict(
    embedding_size=16, hidden_size=16, batch_size=20, num_steps=5, learning_rate=0.01
)


def train_small(data_dir: pathlib.Path, model_dir: pathlib.Path, num_epochs: int, **settings):
    """Trains a tiny next-song model on `data_dir` (`settings`: more flags); returns its Config."""
    import config as config_lib
    import tasks

    cfg = config_lib.make_config(
        dict(
            data_dir=str(data_dir),
            model_dir=str(model_dir),
            num_epochs=num_epochs,
            **SMALL_MODEL,
            **settings,
        )
    )
    tasks.TASKS["next_song"].train(cfg)
    return cfg


@pytest.fixture(scope="session")
def small_slice(tmp_path_factory) -> pathlib.Path:
    """The first 800 train and 200 test playlists of the shipped data/yes_small."""
    out = tmp_path_factory.mktemp("yes_small_slice")
    source = ROOT / "data" / "yes_small"
    for name in ("song_hash.txt", "tags.txt", "tag_hash.txt"):
        shutil.copy(source / name, out / name)
    for name, keep in (("train.txt", 800), ("test.txt", 200)):
        with open(source / name) as f:
            lines = [next(f) for _ in range(keep + 2)]
        (out / name).write_text("".join(lines))
    return out


def reference_events(model, playlists: list) -> tuple:
    """The model's view of every event of `playlists`, worked out without the evaluation code.

    One `MusicModel.forward` from a zero state over all playlists at once, each from position 0
    (the padding after a playlist's end cannot reach its earlier positions): no windows, no
    carried state, no metrics code.

    Args:
      model: a `musicmodel.MusicModel`.
      playlists: int32 [length] token arrays (song id + 1); those shorter than 2 have no event.

    Returns:
      (log_probs float64 [events], ranks int64 [events]), events in playlist order: the natural
      log-probability of each next song, and its rank with ties counted against it (1 + the
      other songs whose logit is >= its own).
    """
    from scipy.special import log_softmax

    playlists = [p for p in playlists if len(p) >= 2]
    width = max(map(len, playlists))
    tokens = np.array([np.pad(p, (0, width - len(p))) for p in playlists], np.int32)
    logits, _ = model.forward(tokens, model.zero_state(len(playlists)))
    logits = np.asarray(logits)
    log_probs, ranks = [], []
    for row, playlist in enumerate(playlists):
        scores, targets = logits[row, : len(playlist) - 1], playlist[1:, None] - 1
        ranks.append((scores >= np.take_along_axis(scores, targets, -1)).sum(-1))
        log_p = log_softmax(scores.astype(np.float64), -1)
        log_probs.append(np.take_along_axis(log_p, targets, -1)[:, 0])
    return np.concatenate(log_probs), np.concatenate(ranks)


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(data_dir, model_dir, *flags: str, timeout: float = 600):
    """`deepcf.py --mode=serve` in a subprocess on a free 127.0.0.1 port; yields its base URL
    once it answers, and stops it (SIGTERM) afterwards."""
    port = free_port()
    argv = cli_command(
        "--mode=serve", f"--data_dir={data_dir}", f"--model_dir={model_dir}", f"--port={port}"
    )
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [*argv, *flags], stdout=log, stderr=subprocess.STDOUT, env=quiet_env(), cwd=ROOT
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"the server exited ({process.returncode}): {log.read()[-3000:]}")
                try:
                    urllib.request.urlopen(f"{url}/v1/models/deepcf", timeout=10).close()
                    break
                except (urllib.error.URLError, ConnectionError):
                    if time.monotonic() > deadline:
                        pytest.fail(f"the server did not answer within {timeout} s")
                    time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            process.wait(60)
