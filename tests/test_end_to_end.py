"""End to end on a slice of the shipped yes_small: train, TensorBoard scalars, eval, resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

import config as config_lib
import tasks
import yes_reader
from conftest import SMALL_MODEL, reference_events, run_cli, train_small


def scalars(run_dir: str, split: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of `run_dir/tensorboard/<split>` as {tag: [(step, value), ...]}."""
    acc = event_accumulator.EventAccumulator(
        os.path.join(run_dir, "tensorboard", split), size_guidance={"tensors": 0}
    )
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        events = acc.Tensors(tag)
        out[tag] = [(e.step, float(np.asarray(_value(e)))) for e in events]
    return out


def _value(event):
    return tf.make_ndarray(event.tensor_proto)


def ranking(ranks: np.ndarray, k: int) -> dict[str, float]:
    """Recall, MRR and NDCG@k of per-event ranks, by their definitions (mean over events)."""
    hit = ranks <= k
    return {
        "recall": float(np.mean(hit)),
        "mrr": float(np.mean(np.where(hit, 1 / ranks, 0))),
        "ndcg": float(np.mean(np.where(hit, 1 / np.log2(ranks + 1), 0))),
    }


@pytest.fixture(scope="module")
def trained(small_slice, tmp_path_factory) -> config_lib.Config:
    return train_small(small_slice, tmp_path_factory.mktemp("run"), num_epochs=3)


def test_training_writes_model_config_and_falling_loss(trained):
    assert os.path.exists(os.path.join(trained.model_dir, "model.keras"))
    run = json.load(open(os.path.join(trained.model_dir, "config.json")))
    assert run["config"]["hidden_size"] == 16 and run["num_songs"] == 3168
    assert set(run["data_md5"]) == {
        os.path.join(trained.data_dir, f) for f in ("song_hash.txt", "train.txt", "test.txt")
    }
    losses = [v for _, v in scalars(trained.model_dir, "train")["epoch_loss"]]
    assert len(losses) == 3 and losses[2] < losses[0]


def test_tensorboard_has_train_and_validation_scalars(trained, model):
    train = scalars(trained.model_dir, "train")
    valid = scalars(trained.model_dir, "validation")
    for tag in ("epoch_loss", "epoch_perplexity", "epoch_learning_rate"):
        assert [s for s, _ in train[tag]] == [0, 1, 2], tag
    for tag in ("epoch_loss", "epoch_perplexity", "epoch_recall@20", "epoch_mrr@20"):
        assert [s for s, _ in valid[tag]] == [0, 1, 2], tag
    # The last epoch's are those of the trained model on the validation split.
    data = yes_reader.load(trained.data_dir, trained.valid_fraction, trained.seed)
    _, ranks = reference_events(model, data.valid)
    expected = ranking(ranks, 20)
    assert valid["epoch_recall@20"][-1][1] == pytest.approx(expected["recall"], rel=1e-6)
    assert valid["epoch_mrr@20"][-1][1] == pytest.approx(expected["mrr"], rel=1e-6)


def test_eval_cli_writes_metrics_json(trained, model):
    result = run_cli(
        "--mode=eval", f"--data_dir={trained.data_dir}", f"--model_dir={trained.model_dir}"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "R@20" in result.stdout
    m = json.load(open(os.path.join(trained.model_dir, "metrics.json")))
    assert m["task"] == "next_song" and m["split"] == "test"
    test = yes_reader.read_playlists(os.path.join(trained.data_dir, "test.txt"), 3168)
    log_probs, ranks = reference_events(model, test)
    assert (m["events"], m["playlists"]) == (len(ranks), sum(len(p) >= 2 for p in test))
    for kind in ("recall", "mrr", "ndcg"):
        assert list(m[kind]) == ["1", "5", "10", "20", "100", "500"]
        for k, value in m[kind].items():
            assert value == pytest.approx(ranking(ranks, int(k))[kind], rel=1e-6), (kind, k)
    assert m["log_likelihood"] == pytest.approx(np.mean(log_probs), rel=1e-5)
    assert m["perplexity"] == pytest.approx(np.exp(-m["log_likelihood"]), rel=1e-4)


def test_resume_continues_at_the_next_epoch(small_slice, tmp_path):
    base = dict(data_dir=str(small_slice), model_dir=str(tmp_path), **SMALL_MODEL)
    tasks.TASKS["next_song"].train(config_lib.make_config(dict(base, num_epochs=1)))
    steps_per_epoch = int(
        sorted(os.listdir(tmp_path / "checkpoints"))[-1].split("-")[1].split(".")[0]
    )
    tasks.TASKS["next_song"].train(config_lib.make_config(dict(base, num_epochs=2)))
    ckpts = os.listdir(tmp_path / "checkpoints")
    assert f"ckpt-{2 * steps_per_epoch}.index" in ckpts
    # The rerun logged only epoch index 1 (epoch 2): its event file has a single step.
    steps = [s for s, _ in scalars(str(tmp_path), "train")["epoch_loss"]]
    assert steps == [0, 1]
