"""--task=audio_features: model, task defaults, a tiny train + eval, resume, a clear error."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator
from test_end_to_end import scalars

import audio_reader
import audio_task
import audio_windows
import audiomodel
import config as config_lib
import errors
import hitrate
import kernels
import modeltrainer
from conftest import ROOT, run_cli
from errors import DataError

HARRY = ROOT / "data" / "harry2687-spotify-2023"
MONTHS = ("2023-02", "2023-03", "2023-04")
PLAYS_PER_MONTH = 150  # before cleaning; about half are >= 30 s and join


def tiny_model(loss: str = "mse", num_features: int = 2, **sizes) -> audiomodel.AudioFeatureModel:
    sizes = {**dict(seq_len=3, pred_steps=2, num_layers=1, hidden_size=4), **sizes}
    config = config_lib.make_config(dict(task="audio_features", loss=loss, **sizes))
    return audiomodel.build_audio_model(config, num_features)


def test_model_output_shape():
    model = tiny_model(num_features=11, seq_len=10, pred_steps=5, num_layers=2, hidden_size=8)
    x = np.random.default_rng(0).normal(size=(3, 10, 11)).astype(np.float32)
    assert tuple(model(x).shape) == (3, 5, 11)
    assert [layer.name for layer in model.rnns] == ["gru_0", "gru_1"]
    # The fixed-length GRU (one input projection, hand-written BPTT), not Keras' time loop: at
    # batch 1 the loop made the report's default training ~7x slower.
    assert all(isinstance(layer, kernels.FixedLengthGRU) for layer in model.rnns)


@pytest.mark.parametrize(
    "loss, expected",
    # errors 0.5, 2, -3, 0: squared 0.25, 4, 9, 0 -> mean 3.3125; smooth L1 (beta 1):
    # 0.5 * 0.25 = 0.125, 2 - 0.5 = 1.5, 3 - 0.5 = 2.5, 0 -> mean 1.03125.
    [("mse", 3.3125), ("smooth_l1", 1.03125)],
)
def test_loss_choice(loss, expected):
    model = tiny_model(loss)
    y_pred = np.array([[[0.5, 2.0], [-3.0, 0.0]]], np.float32)
    assert float(model.loss(np.zeros_like(y_pred), y_pred)) == pytest.approx(expected)


def test_schedule_runs_over_the_windows_in_full_batches_from_any_step():
    x = np.arange(5, dtype=np.float32).reshape(5, 1, 1)  # windows 0..4; y = 10 * x
    batches = audio_task.schedule(x, 10 * x, batch_size=2, step=3).take(3)
    # steps 0, 1, 2 are [0 1] [2 3] [4 0]; from step 3: [1 2] [3 4] [0 1]
    got = [(bx.numpy().ravel().tolist(), by.numpy().ravel().tolist()) for bx, by in batches]
    assert got == [([1, 2], [10, 20]), ([3, 4], [30, 40]), ([0, 1], [0, 10])]


def test_task_defaults_are_the_reports_and_given_flags_win(monkeypatch):
    monkeypatch.chdir(ROOT)  # the default data paths are relative to the checkout
    audio = config_lib.make_config({"task": "audio_features"})
    report = (audio.cell, audio.num_layers, audio.hidden_size, audio.learning_rate)
    assert report == ("gru", 2, 512, 0.01)
    assert (audio.batch_size, audio.num_epochs, audio.loss) == (1, 5, "mse")
    assert (audio.seq_len, audio.pred_steps, audio.bar) == (10, 5, 20)
    assert audio.model_dir == "runs/audio_features"
    harry = "data/harry2687-spotify-2023"
    assert audio_reader.expand(audio.paths("listening_log")) == [
        f"{harry}/StreamingHistory_music_{i}.json" for i in range(3)
    ]
    features = audio_reader.expand(audio.paths("features"))
    assert features == [f"{harry}/full_track_features.csv", f"{harry}/track_features.csv"]
    given = config_lib.make_config({"task": "audio_features", "hidden_size": 8, "cell": "lstm"})
    assert (given.hidden_size, given.cell, given.learning_rate) == (8, "lstm", 0.01)
    song = config_lib.make_config({})
    assert (song.cell, song.hidden_size, song.batch_size, song.model_dir) == (
        "lstm",
        100,
        100,
        "runs/next_song",
    )
    with pytest.raises(errors.ConfigError, match="--listening_log"):
        config_lib.make_config({"task": "audio_features", "listening_log": ""})


@pytest.fixture(scope="module")
def harry_slice(tmp_path_factory) -> str:
    """The first PLAYS_PER_MONTH plays of each of MONTHS from the shipped harry2687 history."""
    plays = json.loads((HARRY / "StreamingHistory_music_0.json").read_text())
    kept = [
        p for m in MONTHS for p in [q for q in plays if q["endTime"][:7] == m][:PLAYS_PER_MONTH]
    ]
    path = tmp_path_factory.mktemp("harry") / "history.json"
    path.write_text(json.dumps(kept))
    return str(path)


def small_config(log: str, model_dir: str) -> config_lib.Config:
    return config_lib.make_config(
        dict(
            task="audio_features",
            listening_log=log,
            features=f"{HARRY}/full_track_features.csv,{HARRY}/track_features.csv",
            model_dir=model_dir,
            hidden_size=8,
            num_layers=1,
            num_epochs=1,
        )
    )


@pytest.fixture(scope="module")
def trained(harry_slice, tmp_path_factory) -> config_lib.Config:
    config = small_config(harry_slice, str(tmp_path_factory.mktemp("run")))
    audio_task.AudioFeaturesTask().train(config)
    return config


def month_model(config: config_lib.Config, month: str):
    return modeltrainer.load_model(audio_task.month_dir(config, month))


def test_train_writes_one_model_per_month(trained):
    data, splits, _ = audio_task.load_data(trained)
    assert [s.month for s in splits] == list(MONTHS)
    run = json.loads(pathlib.Path(trained.model_dir, "config.json").read_text())
    windows = audio_windows.dynamic_train(splits, 10, 5, trained.seed)
    assert run["train_windows"] == {s.month: len(w) for s, w in zip(splits, windows, strict=True)}
    assert run["plays"] == len(data.songs) and run["config"]["hidden_size"] == 8
    for month in MONTHS:
        model = month_model(trained, month)
        assert isinstance(model, audiomodel.AudioFeatureModel) and model.hidden_size == 8
        losses = scalars(audio_task.month_dir(trained, month), "train")["epoch_loss"]
        assert len(losses) == 1 and np.isfinite(losses[0][1])
    first, last = (month_model(trained, m).get_weights()[0] for m in (MONTHS[0], MONTHS[-1]))
    assert not np.allclose(first, last)  # later months go on training


def test_eval_cli_writes_hit_rate_json_chart_and_tensorboard(trained):
    result = run_cli(
        "--mode=eval",
        "--task=audio_features",
        f"--listening_log={trained.listening_log}",
        f"--features={trained.features}",
        f"--model_dir={trained.model_dir}",
        "--hidden_size=8",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[window] hit rate" in result.stdout and "[open_catalog] hit rate" in result.stdout
    out = json.loads(pathlib.Path(trained.model_dir, "hit_rate.json").read_text())
    assert out["task"] == "audio_features" and (out["seq_len"], out["pred_steps"]) == (10, 5)
    data, splits, z = audio_task.load_data(trained)
    samples = {s.month: len(s.test) - 14 for s in splits if len(s.test) >= 15}
    # What needs no model comes out as hitrate gives it with the report's settings.
    segments = [(s.month, s.test) for s in splits]
    direct = hitrate.evaluate(segments, data.songs, z, None, seq_len=10, pred_steps=5, bar=20, k=5)
    methods = ["ranking", "model", "model_single", "recent", "frequent", "random", "ceiling"]
    for protocol in audio_task.PROTOCOLS:
        assert list(out[protocol]) == methods
        for method in methods:
            summary = out[protocol][method]
            assert {m: r["samples"] for m, r in summary["months"].items()} == samples
            assert summary["samples"] == sum(samples.values())
            assert summary["hit_rate"] == pytest.approx(summary["hits"] / summary["samples"])
            if method in direct[protocol]:
                assert summary == direct[protocol][method], (protocol, method)
    window = out["window"]
    for method in ("model", "recent", "frequent"):  # nothing over the window beats its ceiling
        assert window[method]["hits"] <= window["ceiling"]["hits"]
    for name in audio_task.CHARTS.values():
        assert pathlib.Path(trained.model_dir, name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    board = event_accumulator.EventAccumulator(
        os.path.join(trained.model_dir, "tensorboard", "eval"), size_guidance={"tensors": 0}
    )
    board.Reload()
    model_rates = board.Tensors("window/model")
    assert [e.step for e in model_rates] == list(range(len(samples)))
    expected = [r["hit_rate"] for r in window["model"]["months"].values()]
    assert [float(tf.make_ndarray(e.tensor_proto)) for e in model_rates] == pytest.approx(expected)
    for protocol in audio_task.PROTOCOLS:  # the chart (width, height, PNG) and the month labels
        assert tf.make_ndarray(board.Tensors(f"{protocol}/chart")[0].tensor_proto)[2][:4] == (
            b"\x89PNG"
        )
        labels = tf.make_ndarray(board.Tensors(f"{protocol}/months")[0].tensor_proto)
        assert labels.item().decode() == "\n".join(f"{i}: {m}" for i, m in enumerate(samples))


def test_resume_trains_only_the_unfinished_month(trained, tmp_path):
    config = dataclasses.replace(trained, model_dir=str(tmp_path / "run"))
    shutil.copytree(trained.model_dir, config.model_dir)
    last = audio_task.month_dir(config, MONTHS[-1])
    x = np.random.default_rng(0).normal(size=(4, 10, 11)).astype(np.float32)
    before = month_model(config, MONTHS[-1])(x)
    shutil.rmtree(last)  # as if killed before the last month started
    events = {
        m: os.listdir(audio_task.month_dir(config, m) + "/tensorboard/train") for m in MONTHS[:-1]
    }
    audio_task.AudioFeaturesTask().train(config)
    for month, files in events.items():  # finished months were restored, not trained again
        assert os.listdir(audio_task.month_dir(config, month) + "/tensorboard/train") == files
    np.testing.assert_allclose(month_model(config, MONTHS[-1])(x), before, atol=1e-5)


def test_lastfm_slice_fails_clearly_before_writing(tmp_path):
    config = config_lib.make_config(
        dict(
            task="audio_features",
            listening_log=str(
                ROOT / "data/lastfm-1k/userid-timestamp-artid-artname-traid-traname.tsv"
            ),
            user="user_000001",
            features=str(ROOT / "data/spotify-audio-features/*/*.csv"),
            model_dir=str(tmp_path / "run"),
        )
    )
    with pytest.raises(DataError, match="23 plays left after cleaning; no month's test part"):
        audio_task.AudioFeaturesTask().train(config)
    assert not os.path.exists(config.model_dir)


def test_each_month_is_predicted_by_its_own_model(trained, monkeypatch, tmp_path):
    load, used = audio_task.AudioFeaturesTask._load, []

    def recording(self, config, month, num_features):
        used.append(month)
        return load(self, config, month, num_features)

    monkeypatch.setattr(audio_task.AudioFeaturesTask, "_load", recording)
    config = dataclasses.replace(trained, model_dir=str(tmp_path), audio_head="regression")
    shutil.copytree(trained.model_dir + "/months", tmp_path / "months")
    out = audio_task.AudioFeaturesTask().evaluate(config)
    assert used == list(out["window"]["model"]["months"]) == ["2023-02", "2023-04"]


def test_weights_carry_over_between_months(harry_slice, tmp_path):
    # With a vanishing learning rate training changes nothing, so every month ends with the
    # weights it started from: all months equal if (and only if) each starts from the last.
    config = dataclasses.replace(small_config(harry_slice, str(tmp_path)), learning_rate=1e-12)
    audio_task.AudioFeaturesTask().train(config)
    first, *later = (month_model(config, m).get_weights() for m in MONTHS)
    for weights in later:
        for a, b in zip(first, weights, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)
