"""Run-directory I/O: atomic writes, the model directory and its `config.json`.

Every output of deepcf is written under a temporary name in its final directory and renamed into
place (`atomic_path`), so a crash or kill leaves the previous file (or none), never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

from absl import logging

from errors import ConfigError, WriteError

LIBRARIES = ("tensorflow", "keras", "numpy", "pandas", "absl-py")
LOCK_FILE = ".lock"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str, directory: bool = False) -> Iterator[str]:
    """Yields a temporary path beside `path` (same suffix) to write to; renames it to `path`.

    On an exception the temporary file (or directory) is removed and `path` is left as it was;
    an OSError (disk full, no permission, a directory in the way) becomes a `WriteError` naming
    `path`.
    """
    parent, tmp = os.path.dirname(os.path.abspath(path)), ""
    try:
        os.makedirs(parent, exist_ok=True)
        if directory:
            tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
        else:
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-", suffix=os.path.splitext(path)[1])
            os.close(fd)
        os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())  # mkstemp makes 0600
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(f"{path}: cannot write ({e.strerror or e})") from e
        raise


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` (UTF-8) to `path` through `atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: str, payload: Any) -> None:
    """Writes `payload` as indented JSON to `path` through `atomic_path`."""
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def make_dirs(path: str) -> None:
    """`os.makedirs(path, exist_ok=True)`; a failure is a `WriteError` naming `path`."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{path}: cannot create the directory ({e.strerror or e})") from None


def make_model_dir(model_dir: str) -> None:
    """Creates `model_dir` or fails with a message naming it and the flag."""
    try:
        os.makedirs(model_dir, exist_ok=True)
        probe = os.path.join(model_dir, ".write-test")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"--model_dir={model_dir}: not writable ({e.strerror})") from None


@contextlib.contextmanager
def lock_model_dir(model_dir: str) -> Iterator[None]:
    """Holds `model_dir/.lock` (an flock, and the holder's pid and host in the file) for one run;
    the file is removed at the end, however the run ends (a killed run leaves it: a stale lock).

    Raises:
      ConfigError naming the holder if another process holds it, or if it names a process on
        another host (which cannot be checked: delete the file if that run is gone). The lock of
        a process on this host that is gone (killed) is taken over, with a warning.
    """
    path = os.path.join(model_dir, LOCK_FILE)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            holder = _take_lock(fd, path, model_dir)
        except BaseException:
            os.close(fd)
            raise
        if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
            break
        os.close(fd)  # its holder removed that file after we opened it: lock the new one
    try:
        if holder:
            logging.warning("%s: taking over the stale lock of %s (that run is gone)", path, holder)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):  # a worker's temp dir may be gone
                os.unlink(path)  # while still locked: a process that opened it then retries
    finally:
        os.close(fd)  # also releases the flock


def _take_lock(fd: int, path: str, model_dir: str) -> str:
    """Flocks `fd`; returns the stale holder its file names ('' if none). Raises if held."""
    with os.fdopen(os.dup(fd), "rb") as f:
        text = f.read().decode("utf-8", "replace")
    try:
        holder = json.loads(text) if text.strip() else {}
        name = f"pid {int(holder['pid'])} on host {holder['host']}" if holder else ""
    except (ValueError, KeyError, TypeError):
        holder, name = {}, f"unreadable: {text[:80]!r}"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(
            f"--model_dir={model_dir}: another training is running there "
            f"({name or 'starting'}; {path}); wait for it to end or use another --model_dir"
        ) from None
    if holder and holder["host"] != socket.gethostname():
        raise ConfigError(
            f"--model_dir={model_dir}: {path} names a training of {name}, which cannot be "
            f"checked from here; if it has ended, delete {path}"
        )
    return name


def _md5(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_run_config(config: Any, data_files: list[str], extra: dict) -> None:
    """Writes `model_dir/config.json`: all settings of `config` (a `config.Config`), data md5s,
    library versions and `extra`."""
    payload = {
        "config": config.to_json(),
        "data_md5": {path: _md5(path) for path in data_files},
        "versions": _versions(),
        **extra,
    }
    write_json_atomic(os.path.join(config.model_dir, "config.json"), payload)
