"""Using a trained model: recommend, export for serving, the TensorBoard projector, --help.

One tiny model is trained once for the module (one epoch on a yes_small slice); the commands run
for real (`deepcf.py` in a subprocess) and their outputs are checked against an independent
computation: `MusicModel.forward` on each unpadded history, then a plain numpy sort.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import config as config_lib
import errors
import hooks
import modeltrainer
import musicmodel
import next_song_task
import serving
import tasks
import yes_reader
from conftest import run_cli, run_python, train_small

HISTORIES = [[12, 845, 3001], [7], [100, 200, 12, 100]]  # different lengths: padding matters


@pytest.fixture(scope="module")
def trained(small_slice, tmp_path_factory) -> config_lib.Config:
    return train_small(small_slice, tmp_path_factory.mktemp("serving_run"), num_epochs=1)


def reference_top_k(model, history: list[int], k: int, exclude: bool = True):
    """Top-k (ids, probabilities) from the logits after the last song of the unpadded history."""
    tokens = np.array([history], np.int32) + 1
    logits, _ = model.forward(tokens, model.zero_state(1))
    probs = tf.nn.softmax(logits[0, -1]).numpy()
    order = [s for s in np.argsort(-probs, kind="stable") if not (exclude and s in history)]
    return np.array(order[:k]), probs[order[:k]]


def test_recommend_cli_prints_k_rows_with_titles(trained, model):
    result = run_cli(
        "--mode=recommend",
        f"--data_dir={trained.data_dir}",
        f"--model_dir={trained.model_dir}",
        "--history=12,845,3001",
        "--top_k=5",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    catalog = yes_reader.read_catalog(os.path.join(trained.data_dir, "song_hash.txt"))
    lines = result.stdout.splitlines()
    assert lines[0].startswith("--history: 3 songs, the last 3001: " + catalog.titles[3001])
    assert lines[1].split() == ["rank", "song_id", "probability", "title", "artist"]
    rows = lines[2:]
    assert len(rows) == 5
    ids, probs = reference_top_k(model, [12, 845, 3001], 5)
    for rank, (row, song, prob) in enumerate(zip(rows, ids, probs, strict=True), start=1):
        cells = row.split()
        assert cells[:3] == [str(rank), str(song), f"{prob:.5f}"], row
        assert catalog.titles[song] in row and row.rstrip().endswith(catalog.artists[song])


def test_recommend_history_file_pads_and_excludes_like_one_by_one(trained, model, tmp_path):
    # The last history ends with the songs the model likes most after song 5, so excluding the
    # history changes its top 7 (checked below with --noexclude_history).
    liked = [5, *reference_top_k(model, [5], 3, exclude=False)[0].tolist()]
    histories = [*HISTORIES, liked]
    path = tmp_path / "histories.txt"
    lines = [" , ".join(map(str, h)) for h in histories[:2]] + [""]
    lines += [" ".join(map(str, h)) for h in histories[2:]]
    path.write_text("\n".join(lines) + "\n")
    cfg = dataclasses.replace(trained, history_file=str(path), top_k=7)
    results = tasks.TASKS["next_song"].recommend(cfg)
    assert len(results) == len(histories)
    for history, out in zip(histories, results, strict=True):
        ids, probs = reference_top_k(model, history, 7)
        np.testing.assert_array_equal(out["song_ids"], ids)
        np.testing.assert_allclose(out["scores"], probs, rtol=1e-4)
        assert not set(history) & set(out["song_ids"].tolist())
    kept = tasks.TASKS["next_song"].recommend(dataclasses.replace(cfg, exclude_history=False))
    for history, out in zip(histories, kept, strict=True):
        ids, _ = reference_top_k(model, history, 7, exclude=False)
        np.testing.assert_array_equal(out["song_ids"], ids)
    assert set(liked) & set(kept[-1]["song_ids"].tolist())


def test_recommend_unknown_ids_name_the_flag_or_the_line(trained, tmp_path):
    result = run_cli(
        "--mode=recommend",
        f"--data_dir={trained.data_dir}",
        f"--model_dir={trained.model_dir}",
        "--history=12,99999",
    )
    assert result.returncode == 2
    assert "--history=12,99999: song id 99999 is not in the catalog (0..3167)" in result.stderr
    assert result.stdout == ""
    path = tmp_path / "bad.txt"
    path.write_text("1 2\n\n3, xqzw\n")
    cfg = dataclasses.replace(trained, history_file=str(path))
    with pytest.raises(errors.DataError, match=f"{path}:3: no song 'xqzw' in the catalog"):
        tasks.TASKS["next_song"].recommend(cfg)
    with pytest.raises(errors.ConfigError, match="--mode=recommend needs --history"):
        tasks.TASKS["next_song"].recommend(trained)
    with pytest.raises(errors.ConfigError, match="--top_k=4000: the model scores only 3168"):
        tasks.TASKS["next_song"].recommend(dataclasses.replace(trained, history="1", top_k=4000))


def blend_reference(model, data_dir, history: list[int], weights: dict, k: int, fill=False):
    """Top-k of sum_c w_c p_c / sum_c w_c over the model's softmax and fitted baselines, heard
    songs excluded: worked out from `MusicModel.forward` and the baselines' own probabilities.
    With `fill`, a history-last kNN's p_c is p_rnn on the history and its own p_c elsewhere,
    scaled to sum to 1 - (p_rnn's mass on the history)."""
    import baselines

    tokens = np.array([history], np.int32) + 1
    logits, _ = model.forward(tokens, model.zero_state(1))
    p = {"rnn": tf.nn.softmax(logits[0, -1]).numpy().astype(np.float64)}
    data = yes_reader.load(str(data_dir), 0.1, 0)
    heard = np.isin(np.arange(len(p["rnn"])), history)
    for name, fitted in baselines.fit([n for n in weights if n != "rnn"], data).items():
        p[name] = fitted.probabilities([np.array(history)])[0]
        if fill and name == "sknn_history_last":
            rest = np.where(heard, 0.0, p[name])
            p[name] = np.where(heard, p["rnn"], rest / rest.sum() * (1 - p["rnn"][heard].sum()))
    blended = sum(w * p[name] for name, w in weights.items()) / sum(weights.values())
    order = [s for s in np.argsort(-blended, kind="stable") if s not in history]
    return np.array(order[:k]), blended[order[:k]]


def test_recommend_blend_uses_given_or_eval_chosen_weights(trained, model, tmp_path):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(trained.model_dir, model_dir)
    cfg = dataclasses.replace(
        trained,
        model_dir=str(model_dir),
        history="12,845,3001",
        top_k=6,
        blend="rnn:0.3,markov:0.6,popularity:0.3",
    )
    out = tasks.TASKS["next_song"].recommend(cfg)[0]
    weights = {"rnn": 0.3, "markov": 0.6, "popularity": 0.3}
    ids, probs = blend_reference(model, trained.data_dir, [12, 845, 3001], weights, 6)
    np.testing.assert_array_equal(out["song_ids"], ids)
    np.testing.assert_allclose(out["scores"], probs, rtol=1e-4)
    # The blend is not the model alone: Markov moves the ranking (else this test shows nothing).
    assert out["song_ids"].tolist() != reference_top_k(model, [12, 845, 3001], 6)[0].tolist()

    unweighted = dataclasses.replace(cfg, blend="rnn,markov")
    with pytest.raises(errors.ConfigError, match="--blend=rnn,markov: no weights given"):
        tasks.TASKS["next_song"].recommend(unweighted)
    chosen = {"rnn": 0.1, "markov": 0.9}  # as --mode=eval records them
    (model_dir / "metrics.json").write_text(json.dumps({"blend": {"weights": chosen}}))
    out = tasks.TASKS["next_song"].recommend(unweighted)[0]
    ids, probs = blend_reference(model, trained.data_dir, [12, 845, 3001], chosen, 6)
    np.testing.assert_array_equal(out["song_ids"], ids)
    np.testing.assert_allclose(out["scores"], probs, rtol=1e-4)
    # The history fill that --mode=eval chose is applied (it changes the scores here).
    chosen = {"rnn": 0.5, "sknn_history_last": 0.5}
    ref = {}
    for fill in (False, True):
        record = {"blend": {"weights": chosen, "fill_history": fill}}
        (model_dir / "metrics.json").write_text(json.dumps(record))
        cfg = dataclasses.replace(unweighted, blend="rnn,sknn_history_last")
        out = tasks.TASKS["next_song"].recommend(cfg)[0]
        ref[fill] = blend_reference(model, trained.data_dir, [12, 845, 3001], chosen, 6, fill)
        np.testing.assert_array_equal(out["song_ids"], ref[fill][0])
        np.testing.assert_allclose(out["scores"], ref[fill][1], rtol=1e-4)
    assert not np.allclose(ref[False][1], ref[True][1], rtol=1e-3)


FRESH_PROCESS = """
import json, sys
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
history, length = (tf.constant(json.loads(arg)) for arg in sys.argv[2:])
out = serve(history=history, length=length)
print(json.dumps({k: v.numpy().tolist() for k, v in out.items()}))
ranked = tf.saved_model.load(sys.argv[1]).signatures["top_k"]
for k in (3, 9):
    out = ranked(history=history, length=length, k=tf.constant(k))
    print(json.dumps({k: v.numpy().tolist() for k, v in out.items()}))
"""


def test_export_reloads_in_a_fresh_process_and_matches(trained, model, tmp_path):
    result = run_cli("--mode=export", f"--model_dir={trained.model_dir}", "--top_k=6")
    assert result.returncode == 0, result.stderr[-2000:]
    path = result.stdout.strip()
    assert os.path.dirname(path) == os.path.join(trained.model_dir, "export")
    assert os.path.basename(path).isdigit()
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    # Padding past each length is junk on purpose: the signature must ignore it.
    width = max(map(len, HISTORIES))
    padded = [h + [99999] * (width - len(h)) for h in HISTORIES]
    lengths = [len(h) for h in HISTORIES]
    # -I: no project module is importable, only installed packages.
    fresh = run_python(
        "-I", "-c", FRESH_PROCESS, path, json.dumps(padded), json.dumps(lengths), cwd=tmp_path
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    answers = [json.loads(line) for line in fresh.stdout.splitlines()[-3:]]
    for served, k in zip(answers, (6, 3, 9), strict=True):  # --top_k, then k per call
        for row, history in enumerate(HISTORIES):
            ids, probs = reference_top_k(model, history, k)
            assert served["song_ids"][row] == ids.tolist()
            np.testing.assert_allclose(served["scores"][row], probs, rtol=1e-4)


def test_ranking_function_takes_k_per_call_and_checks_it(model):
    ranked = serving.ranking_function(model, exclude_history=True)
    padded, length = serving.pad_histories(HISTORIES)
    for k in (1, 4):
        out = ranked(padded, length, tf.constant(k))
        for row, history in enumerate(HISTORIES):
            ids, probs = reference_top_k(model, history, k)
            np.testing.assert_array_equal(out["song_ids"][row], ids)
    everything = ranked(padded, length, tf.constant(model.num_songs))["song_ids"]
    assert everything.shape == (len(HISTORIES), model.num_songs)
    for k, why in ((0, "k must be >= 1"), (model.num_songs + 1, "k exceeds the catalog size")):
        with pytest.raises(tf.errors.InvalidArgumentError, match=why):
            ranked(padded, length, tf.constant(k))


@pytest.mark.parametrize(
    "history, length, why, step_songs",
    [
        ([[5, 6]], [0], "every length must be >= 1", None),
        ([[5, 6]], [3], "a length exceeds the history width", None),
        ([[5, -1], [7, 8]], [2, 1], "song ids must be >= 0", [[-1], [8]]),
        ([[5, 6], [7, 3168]], [2, 2], "a song id is not in the catalog", [[5], [3168]]),
        ([[3168, -6]], [0], "every length must be >= 1", None),  # the first failed check
    ],
)
def test_every_serving_function_names_the_failed_check(model, history, length, why, step_songs):
    # The checks run inside the XLA program; a failed one raises with its own message, from the
    # k-per-call function, the fixed-k signature and (for song ids) the incremental step.
    assert model.num_songs == 3168 and model.cell == "lstm"
    history, length = tf.constant(history), tf.constant(length)
    calls = [
        lambda: serving.ranking_function(model, True)(history, length, tf.constant(3)),
        lambda: serving.serving_function(model, 3, False).get_concrete_function()(history, length),
    ]
    if step_songs:
        state = tf.zeros([model.num_layers, 2, len(step_songs), model.hidden_size])
        step = serving.step_function(model, 3)
        calls.append(lambda: step(tf.constant(step_songs), state))
    for call in calls:
        with pytest.raises(tf.errors.InvalidArgumentError, match=why):
            call()


def test_song_ids_past_the_length_are_padding_and_not_checked(model):
    out = serving.ranking_function(model, True)(tf.constant([[5, -1, 9999]]), tf.constant([1]), 3)
    assert out["song_ids"].shape == (1, 3) and 5 not in out["song_ids"].numpy()


def test_recommend_by_external_keys_of_song_keys_txt(trained, tmp_path):
    import shutil

    data_dir = tmp_path / "imported"
    shutil.copytree(trained.data_dir, data_dir)
    keys = {12: "spotify:track:aa12", 845: "spotify:track:bb845", 3001: "wonderwall - oasis"}
    (data_dir / "song_keys.txt").write_text("".join(f"{i}\t{k}\n" for i, k in keys.items()))
    cfg = dataclasses.replace(trained, data_dir=str(data_dir))
    by_keys = dataclasses.replace(cfg, history="SPOTIFY:TRACK:AA12, spotify:track:bb845, 3001")
    by_ids = dataclasses.replace(cfg, history="12,845,3001")
    assert [r["song_ids"].tolist() for r in tasks.TASKS["next_song"].recommend(by_keys)] == [
        r["song_ids"].tolist() for r in tasks.TASKS["next_song"].recommend(by_ids)
    ]
    (data_dir / "song_keys.txt").write_text("12\tspotify:track:aa12\n12\tother\n")
    with pytest.raises(errors.DataError, match="song_keys.txt:2: song id 12 is given twice"):
        tasks.TASKS["next_song"].recommend(by_keys)


def test_recommend_by_names_equals_recommend_by_ids(trained, tmp_path):
    catalog = yes_reader.read_catalog(os.path.join(trained.data_dir, "song_hash.txt"))
    index = serving.song_index(trained.data_dir, catalog)
    typed = []  # the title where it is unique, else "title - artist"; quoted (commas)
    for song in HISTORIES[0]:
        title, artist = catalog.titles[song], catalog.artists[song]
        name = title if index.matches(title) == [song] else f"{title} - {artist}"
        assert index.matches(name) == [song]
        typed.append(f'"{name.upper()}"')
    by_ids = tasks.TASKS["next_song"].recommend(dataclasses.replace(trained, history="12,845,3001"))
    by_names = tasks.TASKS["next_song"].recommend(
        dataclasses.replace(trained, history=", ".join(typed))
    )
    np.testing.assert_array_equal(by_names[0]["song_ids"], by_ids[0]["song_ids"])
    path = tmp_path / "histories.txt"
    path.write_text(", ".join(typed[:2]) + "\n" + typed[2] + "\n")
    lines = tasks.TASKS["next_song"].recommend(dataclasses.replace(trained, history_file=str(path)))
    expected = [HISTORIES[0][:2], HISTORIES[0][2:]]
    assert [r["song_ids"].tolist() for r in lines] == [
        tasks.TASKS["next_song"]
        .recommend(dataclasses.replace(trained, history=",".join(map(str, h))))[0]["song_ids"]
        .tolist()
        for h in expected
    ]


def test_export_versions_count_up_and_never_overwrite(trained, model, tmp_path):
    export_dir = str(tmp_path / "export")
    fn = serving.checked_serving_function(trained, model)
    first = modeltrainer.export_saved_model(model, {"serving_default": fn}, export_dir)
    second = modeltrainer.export_saved_model(model, {"serving_default": fn}, export_dir)
    assert [os.path.basename(first), os.path.basename(second)] == ["1", "2"]
    with pytest.raises(errors.ModelError, match="2: already exists"):
        modeltrainer.export_saved_model(model, {"serving_default": fn}, export_dir, version=2)
    assert sorted(os.listdir(export_dir)) == ["1", "2"]  # no temporary directory left behind


def test_projector_has_one_metadata_row_per_embedding_row(trained, model):
    run_dir = os.path.join(trained.model_dir, "tensorboard", "train")
    with open(os.path.join(run_dir, "metadata.tsv"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines.pop() == ""
    header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:]]
    assert header == ["title", "artist", "tag"]
    embeddings = model.embedding.embeddings.numpy()
    assert len(rows) == embeddings.shape[0] == 3169  # padding row + 3168 songs
    assert rows[0] == ["<padding>", "", ""]
    catalog = yes_reader.read_catalog(os.path.join(trained.data_dir, "song_hash.txt"))
    tags = yes_reader.read_tags(
        os.path.join(trained.data_dir, "tags.txt"),
        os.path.join(trained.data_dir, "tag_hash.txt"),
        catalog.size,
    )
    for song in (0, 1, 3001, 3167):  # row song + 1 is song `song`
        assert rows[song + 1] == [catalog.titles[song], catalog.artists[song], tags[song]]
    with open(os.path.join(run_dir, "projector_config.pbtxt")) as f:
        config = f.read()
    assert 'tensor_name: "embedding/.ATTRIBUTES/VARIABLE_VALUE"' in config
    assert 'metadata_path: "metadata.tsv"' in config
    checkpoint = tf.train.load_checkpoint(tf.train.latest_checkpoint(run_dir))
    np.testing.assert_array_equal(
        checkpoint.get_tensor("embedding/.ATTRIBUTES/VARIABLE_VALUE"), embeddings
    )


def test_progress_lines_have_rate_and_eta(trained, model, monkeypatch, caplog):
    monkeypatch.setattr(hooks, "PROGRESS_SECONDS", 0)  # every step; 30 s by default
    test = yes_reader.read_playlists(os.path.join(trained.data_dir, "test.txt"), model.num_songs)
    windows = yes_reader.make_windows(test, model.batch_size, trained.num_steps)
    musicmodel.compile_model(model, 0.01, 5.0)
    with caplog.at_level(logging.INFO, logger="absl"):
        next_song_task.evaluate_windows(model, windows)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluate:")]
    n = windows.num_windows
    assert [line.split(" (")[0] for line in lines] == [
        f"evaluate: step {i}/{n}" for i in range(1, n + 1)
    ]
    assert all("steps/s, ETA " in line for line in lines)


def test_help_lists_every_flag_by_group_from_the_console_script():
    # The console script's __main__ is a wrapper, not deepcf.py: absl's own --help would list
    # nothing there. Run it the way the installed `deepcf` command does.
    result = run_python("-c", "import sys, deepcf; sys.argv[0] = 'deepcf'; deepcf.run()", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    headers = [
        line for line in out.splitlines() if line.startswith("deepcf") and line.endswith(":")
    ]
    groups = list(config_lib.fields_by_group())
    assert headers == ["deepcf:"] + [f"deepcf.{g}:" for g in groups]
    assert groups[:4] == ["data", "model", "training", "evaluation"]
    for group, fields in config_lib.fields_by_group().items():
        section = out.split(f"\ndeepcf.{group}:\n")[1].split("\n\n")[0]
        for field in fields:
            flag = f"--[no]{field.name}:" if isinstance(field.default, bool) else f"--{field.name}:"
            assert flag in section, (group, field.name)
            first_words = " ".join(field.metadata["help"].split()[:3])
            assert first_words in " ".join(section.split()), (group, field.name)
    assert "--mode: <train|eval|recommend|export|search|serve|import>" in out
    assert "--verbosity" in out


def test_projector_hook_saves_the_final_weights_and_checks_rows(tmp_path):
    layer = keras.layers.Embedding(3, 2)
    layer.build((None,))
    with pytest.raises(ValueError, match="2 label rows of 1 columns for a 3-row embedding"):
        hooks.EmbeddingProjectorHook(str(tmp_path), layer, ["title"], [["<padding>"], ["a"]])
    hook = hooks.EmbeddingProjectorHook(
        str(tmp_path), layer, ["title", "tag"], [["<padding>", ""], ["a\tb", "x"], ["c", ""]]
    )
    hook.on_train_begin()
    hook.on_epoch_end(0)
    layer.embeddings.assign(np.arange(6, dtype="float32").reshape(3, 2))  # e.g. EarlyStopping
    hook.on_train_end()
    saved = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path)))
    np.testing.assert_array_equal(
        saved.get_tensor("embedding/.ATTRIBUTES/VARIABLE_VALUE"), np.arange(6).reshape(3, 2)
    )
    tsv = (tmp_path / "metadata.tsv").read_text()
    assert tsv == "title\ttag\n<padding>\t\na b\tx\nc\t\n"


def softmax_path_top_k(model, histories: list[list[int]], k: int):
    """The scoring as it was before logits were ranked directly: the softmax of the last
    position of each unpadded history, history songs set to -1, a stable sort (ties: lower id)."""
    ids, scores = [], []
    for history in histories:
        logits, _ = model.forward(np.array([history], np.int32) + 1, model.zero_state(1))
        probs = tf.nn.softmax(logits[0, -1]).numpy()
        probs[history] = -1.0
        order = np.argsort(-probs, kind="stable")[:k]
        ids.append(order)
        scores.append(probs[order])
    return np.array(ids), np.array(scores)


def test_batched_scoring_equals_the_softmax_path(trained, model):
    # 40 histories of 1 to 20 songs (with repeats) in one padded batch of width 20: the ids must
    # be exactly those of the softmax path and the probabilities equal to a relative 1e-6.
    rng = np.random.default_rng(3)
    histories = [rng.integers(0, model.num_songs, rng.integers(1, 21)).tolist() for _ in range(40)]
    histories[0] = [9, 9, 9]
    recommend = serving.serving_function(model, 20, exclude_history=True)
    padded = [h + [0] * (20 - len(h)) for h in histories]
    out = recommend(tf.constant(padded), tf.constant([len(h) for h in histories]))
    ids, probs = softmax_path_top_k(model, histories, 20)
    np.testing.assert_array_equal(out["song_ids"].numpy(), ids)
    np.testing.assert_allclose(out["scores"].numpy(), probs, rtol=1e-6, atol=0)


def test_excluded_songs_come_last_by_id_with_score_minus_one():
    # A 6-song catalog, top 6 after the history [4, 1, 4]: the 4 other songs by probability,
    # then the history's songs 1 and 4 with score -1, lower id first (as the softmax path does).
    cfg = config_lib.Config(num_layers=1, embedding_size=4, hidden_size=4, batch_size=1)
    model = musicmodel.build_model(cfg, 6)
    rng = np.random.default_rng(0)
    for variable in model.trainable_variables:
        variable.assign(rng.normal(0, 1.0, variable.shape).astype(np.float32))
    out = serving.serving_function(model, 6, exclude_history=True)(
        tf.constant([[4, 1, 4]]), tf.constant([3])
    )
    ids, probs = softmax_path_top_k(model, [[4, 1, 4]], 6)
    assert ids[0, 4:].tolist() == [1, 4] and probs[0, 4:].tolist() == [-1.0, -1.0]
    np.testing.assert_array_equal(out["song_ids"].numpy(), ids)
    np.testing.assert_allclose(out["scores"].numpy(), probs, rtol=1e-6, atol=0)
