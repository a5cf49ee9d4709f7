"""Bad input, one test per case of issue 7: the real command exits != 0 with a one-line message
naming the file:line or the flag, and no output file is created or damaged.

The `deepcf.py` runs are subprocesses (each pays the TensorFlow import, ~5 s); flag errors are
reported before that import. Fixtures are tiny Yes.com directories written in `tmp_path`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess

import keras
import pytest

import audio_reader
import errors
import modeltrainer
import yes_reader
from conftest import run_cli, write_yes_dir

NUM_SONGS = 10
TRAIN = [[0, 1, 2, 3], [4, 5, 6], [1, 3, 5, 7, 9], [2, 4, 6, 8]] * 3
TEST = [[0, 1, 2], [3, 4, 5]]
TINY = [
    "--num_epochs=1",
    "--batch_size=4",
    "--num_steps=3",
    "--hidden_size=8",
    "--embedding_size=8",
    "--num_layers=1",
]


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `deepcf: error: ...` line of a failed run (fails the test if there is none)."""
    assert result.returncode != 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("deepcf: ")]
    assert lines, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[-1]


def snapshot(directory: pathlib.Path) -> dict[str, str]:
    """relative path -> md5 of every file under `directory` (to show nothing was touched)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(directory))] = hashlib.md5(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def yes_dir(tmp_path) -> pathlib.Path:
    return write_yes_dir(tmp_path / "data", TRAIN, TEST, NUM_SONGS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
    """A tiny model trained once by the CLI, with checkpoints every 2 steps (copy it to damage)."""
    root = tmp_path_factory.mktemp("trained")
    data = write_yes_dir(root / "data", TRAIN, TEST, NUM_SONGS)
    result = run_cli(
        f"--data_dir={data}", f"--model_dir={root / 'run'}", "--checkpoint_every_steps=2", *TINY
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def copy_run(trained: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(trained / "run", tmp_path / "run"))


def train_fails(data_dir: pathlib.Path, model_dir: pathlib.Path) -> str:
    """Runs a tiny training that must fail; returns its error line; checks model_dir is absent."""
    line = error_line(run_cli(f"--data_dir={data_dir}", f"--model_dir={model_dir}", *TINY))
    assert not model_dir.exists()
    return line


# 1-4: missing or empty files.


def test_missing_data_dir(tmp_path):
    line = train_fails(tmp_path / "nowhere", tmp_path / "out")
    assert f"{tmp_path / 'nowhere'}: data directory not found" in line


def test_missing_train_file(yes_dir, tmp_path):
    (yes_dir / "train.txt").unlink()
    assert f"{yes_dir / 'train.txt'}: file not found" in train_fails(yes_dir, tmp_path / "out")


def test_empty_test_file(yes_dir, tmp_path):
    (yes_dir / "test.txt").write_text("")
    assert f"{yes_dir / 'test.txt'}: file is empty" in train_fails(yes_dir, tmp_path / "out")


def test_missing_song_hash(yes_dir, tmp_path):
    (yes_dir / "song_hash.txt").unlink()
    line = train_fails(yes_dir, tmp_path / "out")
    assert f"{yes_dir / 'song_hash.txt'}: file not found" in line


# 5-8: bad playlist lines, reported with their line number.


def replace_line(path: pathlib.Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_token_not_an_integer(yes_dir, tmp_path):
    replace_line(yes_dir / "train.txt", 4, "1 x3 7")
    line = train_fails(yes_dir, tmp_path / "out")
    assert f"{yes_dir / 'train.txt'}:4: song id 'x3' is not an integer" in line


def test_song_id_outside_catalog(yes_dir, tmp_path):
    replace_line(yes_dir / "train.txt", 5, f"1 2 {NUM_SONGS}")
    line = train_fails(yes_dir, tmp_path / "out")
    assert f"{yes_dir / 'train.txt'}:5: song id {NUM_SONGS} is outside the catalog" in line


def test_negative_song_id(yes_dir, tmp_path):
    replace_line(yes_dir / "test.txt", 3, "1 -2 3")
    line = train_fails(yes_dir, tmp_path / "out")
    assert f"{yes_dir / 'test.txt'}:3: song id -2 is outside the catalog" in line


def test_header_lines_missing(yes_dir, tmp_path):
    path = yes_dir / "train.txt"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[2:]))
    line = train_fails(yes_dir, tmp_path / "out")
    assert f"{path}:1: expected header line 1 of {NUM_SONGS} numbers" in line


# 9-10: line endings and encodings are read, not rejected.


@pytest.mark.parametrize("newline", ["\r", "\r\n"], ids=["cr", "crlf"])
def test_cr_and_crlf_line_endings_read_like_lf(yes_dir, tmp_path, newline):
    other = tmp_path / "other"
    other.mkdir()
    for name in ("song_hash.txt", "train.txt"):
        text = (yes_dir / name).read_text()
        (other / name).write_bytes(text.replace("\n", newline).encode())
    catalog = yes_reader.read_catalog(str(other / "song_hash.txt"))
    assert catalog == yes_reader.read_catalog(str(yes_dir / "song_hash.txt"))
    got = yes_reader.read_playlists(str(other / "train.txt"), catalog.size)
    assert [p.tolist() for p in got] == [[s + 1 for s in p] for p in TRAIN]


def test_non_utf8_song_title_is_replaced_and_logged(yes_dir, caplog):
    path = yes_dir / "song_hash.txt"
    lines = path.read_bytes().split(b"\n")
    lines[3] = b"3\tCaf\xe9 \xff\tArtist 0"
    path.write_bytes(b"\n".join(lines))
    with caplog.at_level(logging.WARNING):
        catalog = yes_reader.read_catalog(str(path))
    assert catalog.size == NUM_SONGS
    assert catalog.titles[3] == "Caf\ufffd \ufffd" and catalog.titles[4] == "Song 4"
    assert f"{path}:4: bytes that are not UTF-8" in caplog.text


# 11: nothing to learn.


def test_all_playlists_shorter_than_two(tmp_path):
    data = write_yes_dir(tmp_path / "data", [[1], [2], [], [3]], TEST, NUM_SONGS)
    line = train_fails(data, tmp_path / "out")
    assert f"{data / 'train.txt'}: no playlist has 2 or more songs" in line


# 12: flags, checked by Config (or absl for enum flags) before anything is read or written.


@pytest.mark.parametrize(
    "flag", ["--num_steps=0", "--batch_size=-1", "--learning_rate=nan", "--cell=rnn"]
)
def test_bad_flag_names_the_flag(yes_dir, tmp_path, flag):
    model_dir = tmp_path / "out"
    result = run_cli(f"--data_dir={yes_dir}", f"--model_dir={model_dir}", flag)
    assert result.returncode != 0
    assert flag in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not model_dir.exists()


IGNORED = [("audio_features", "--baselines=markov"), ("audio_features", "--strategy=mirrored")]
IGNORED.append(("next_song", "--seq_len=12"))


@pytest.mark.parametrize("task, flag", IGNORED)
def test_a_flag_the_task_ignores_is_refused_before_anything_is_written(tmp_path, task, flag):
    model_dir = tmp_path / "out"
    result = run_cli(f"--task={task}", f"--model_dir={model_dir}", flag)
    assert result.returncode == 2
    name, other = flag.split("=")[0], "next_song" if task == "audio_features" else "audio_features"
    expected = f"deepcf: error: {name}: not used by --task={task} (only by --task={other})"
    assert error_line(result) == expected
    assert not model_dir.exists()


# 13-15: eval and resume with a missing, foreign or damaged model.


def test_eval_without_trained_model(yes_dir, tmp_path):
    model_dir = tmp_path / "empty"
    model_dir.mkdir()
    line = error_line(run_cli("--mode=eval", f"--data_dir={yes_dir}", f"--model_dir={model_dir}"))
    assert f"{model_dir / 'model.keras'}: no trained model; run --mode=train first" in line
    assert list(model_dir.iterdir()) == []


def test_eval_on_a_different_catalog(trained, tmp_path):
    other = write_yes_dir(tmp_path / "data12", TRAIN, TEST, NUM_SONGS + 2)
    before = snapshot(trained / "run")
    line = error_line(
        run_cli("--mode=eval", f"--data_dir={other}", f"--model_dir={trained / 'run'}")
    )
    assert f"--model_dir={trained / 'run'}: the model was trained on {NUM_SONGS} songs" in line
    assert f"--data_dir={other} has {NUM_SONGS + 2}" in line
    assert snapshot(trained / "run") == before


def checkpoint_steps(run: pathlib.Path) -> list[int]:
    names = (p.name for p in (run / "checkpoints").glob("ckpt-*.index"))
    return sorted(int(name[len("ckpt-") : -len(".index")]) for name in names)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    *_, older, newest = checkpoint_steps(run)
    os.truncate(run / "checkpoints" / f"ckpt-{newest}.data-00000-of-00001", 100)
    result = run_cli(
        f"--data_dir={trained / 'data'}", f"--model_dir={run}", *TINY, "--num_epochs=2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ckpt-{newest} is unreadable" in result.stderr
    assert f"resuming from {run / 'checkpoints'}/ckpt-{older} at step {older}" in result.stderr


def test_all_checkpoints_corrupt_is_an_error_and_keeps_the_model(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    for data in (run / "checkpoints").glob("ckpt-*.data-*"):
        data.write_bytes(b"\0" * 10)
    model_before = (run / "model.keras").read_bytes()
    line = error_line(
        run_cli(f"--data_dir={trained / 'data'}", f"--model_dir={run}", *TINY, "--num_epochs=2")
    )
    assert f"{run / 'checkpoints'}: no checkpoint could be restored" in line
    assert (run / "model.keras").read_bytes() == model_before


def test_truncated_model_file(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    os.truncate(run / "model.keras", 1000)
    before = snapshot(run)
    line = error_line(
        run_cli("--mode=eval", f"--data_dir={trained / 'data'}", f"--model_dir={run}")
    )
    assert f"{run / 'model.keras'}: not a complete .keras file" in line
    assert snapshot(run) == before


# 16: outputs that cannot be written.


def test_model_dir_not_writable(yes_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    line = error_line(run_cli(f"--data_dir={yes_dir}", f"--model_dir={blocker / 'run'}", *TINY))
    assert f"--model_dir={blocker / 'run'}: not writable" in line
    assert blocker.read_text() == "not a directory\n"


def test_unwritable_output_leaves_no_temp_file(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    (run / "metrics.json").mkdir()  # os.replace onto a directory fails like a full disk would
    before = snapshot(run)
    line = error_line(
        run_cli("--mode=eval", f"--data_dir={trained / 'data'}", f"--model_dir={run}")
    )
    assert str(run / "metrics.json") in line
    assert snapshot(run) == before and not list(run.glob(".tmp-*"))


# Safe loading: a model file carrying code is refused, and the code never runs.


def test_model_with_python_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "code_ran"
    touch = eval(f"lambda x: [open({str(marker)!r}, 'w').close(), x][1]")  # noqa: S307
    inputs = keras.Input((3,))
    keras.Model(inputs, keras.layers.Lambda(touch)(inputs)).save(tmp_path / "model.keras")
    marker.unlink()
    with pytest.raises(errors.ModelError, match="model.keras: cannot load the model"):
        modeltrainer.load_model(str(tmp_path))
    assert not marker.exists()


# 17: the audio-feature mode's listening log and feature table.

FEATURE_HEADER = "artistName,trackName,trackID," + ",".join(audio_reader.FEATURES)
FEATURE_ROW = "0.5,0.6,1,-5.0,1,0.05,0.1,0.0,0.1,0.4,120.0"  # 11 valid features
GOOD_TABLE = [FEATURE_HEADER, f"A,Song1,id1,{FEATURE_ROW}", f"B,Song2,id2,{FEATURE_ROW}"]
GOOD_LOG = [("2023-03-01 10:00", "A", "Song1"), ("2023-03-02 10:00", "B", "Song2")]


@pytest.mark.parametrize(
    "table, log, where, message",
    [
        (
            [FEATURE_HEADER.replace(",tempo", ""), f"A,Song1,id1,{FEATURE_ROW.rsplit(',', 1)[0]}"],
            GOOD_LOG,
            "t.csv:1",
            "missing column(s) tempo",
        ),
        (
            [*GOOD_TABLE, "C,Song3,id3,0.5,nan" + ",1" * 9],
            GOOD_LOG,
            "t.csv:4",
            "energy='nan' is not a finite number",
        ),
        (
            [FEATURE_HEADER, f"A,Song1,id1,{FEATURE_ROW.replace('120.0', 'fast')}"],
            GOOD_LOG,
            "t.csv:2",
            "tempo='fast' is not a finite number",
        ),
        (
            GOOD_TABLE,
            [GOOD_LOG[0], ("01/03/2023 25:00", "B", "Song2")],
            "log.json:8",  # json.dumps(indent=2): play k starts on line 2 + 6k
            "cannot parse timestamp '01/03/2023 25:00'",
        ),
        (GOOD_TABLE, [("2023-03-01 10:00", "X", "Nope")], "log.json:2", "none of the 1 plays"),
    ],
    ids=["missing_column", "nan_feature", "text_feature", "bad_timestamp", "no_join"],
)
def test_audio_features_bad_input(tmp_path, table, log, where, message):
    """`table`: feature CSV lines (header first); `log`: (endTime, artist, title) plays."""
    (tmp_path / "t.csv").write_text("\n".join(table) + "\n")
    plays = [{"endTime": t, "artistName": a, "trackName": s, "msPlayed": 60_000} for t, a, s in log]
    (tmp_path / "log.json").write_text(json.dumps(plays, indent=2))
    model_dir = tmp_path / "out"
    line = error_line(
        run_cli(
            "--task=audio_features",
            f"--listening_log={tmp_path / 'log.json'}",
            f"--features={tmp_path / 't.csv'}",
            f"--model_dir={model_dir}",
        )
    )
    assert f"{tmp_path / where}: {message}" in line
    assert not model_dir.exists()
