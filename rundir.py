"""Run-directory I/O: atomic writes, the model directory and its `config.json`.

Every output of deepcf is written under a temporary name in its final directory and renamed into
place (`atomic_path`), so a crash or kill leaves the previous file (or none), never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from errors import ConfigError

LIBRARIES = ("tensorflow", "keras", "numpy", "pandas", "absl-py")


@contextlib.contextmanager
def atomic_path(path: str, directory: bool = False) -> Iterator[str]:
    """Yields a temporary path beside `path` (same suffix) to write to; renames it to `path`.

    On an exception the temporary file (or directory) is removed and `path` is left as it was.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if directory:
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    else:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-", suffix=os.path.splitext(path)[1])
        os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` (UTF-8) to `path` through `atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: str, payload: Any) -> None:
    """Writes `payload` as indented JSON to `path` through `atomic_path`."""
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


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
