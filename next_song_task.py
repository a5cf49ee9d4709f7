"""The next-song task (`--task=next_song`): classification of the next song over a Yes.com
catalog, with its data, model, metrics, baselines, report, recommendations and export."""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np
from absl import logging

import baselines
import blend
import cluster
import coldstart
import config as config_lib
import hooks
import importer
import metrics
import modeltrainer
import musicmodel
import names
import rundir
import serving
import songrows
import warmstart
import yes_reader
from errors import ConfigError


def evaluate_windows(model: keras.Model, windows: yes_reader.Windows) -> dict:
    """Full-catalog metrics of the model over every event of `windows` (see `metrics.py`)."""
    dataset = cluster.distribute(model.distribute_strategy, windows)
    return model.evaluate(dataset, verbose=0, return_dict=True, callbacks=[hooks.ProgressHook()])


def print_table(rows: dict[str, dict], top_ks: tuple[int, ...] = (1, 5, 10, 20, 100, 500)) -> None:
    """Prints one row of metrics per method."""
    width = max([12, *map(len, rows)])
    head = ["method".ljust(width)] + [f"R@{k}".rjust(7) for k in top_ks]
    print("  ".join(head + [h.rjust(7) for h in ("MRR@20", "NDCG@20", "LL")]))
    for name, r in rows.items():
        cells = [f"{r['recall'][str(k)]:.4f}" for k in top_ks]
        cells += [f"{r['mrr']['20']:.4f}", f"{r['ndcg']['20']:.4f}"]
        cells.append("-" if r["log_likelihood"] is None else f"{r['log_likelihood']:.3f}")
        print("  ".join([name.ljust(width)] + [c.rjust(7) for c in cells]))


def validation_schedule(config: config_lib.Config) -> list[keras.callbacks.Callback]:
    """What validation decides: Keras' ReduceLROnPlateau and EarlyStopping (best weights kept)
    on validation MRR@20 (`--lr_decay` is the optimizer's schedule, `recurrent.learning_rate`)."""
    watch = dict(monitor="val_mrr@20", mode="max", verbose=1)
    out: list[keras.callbacks.Callback] = []
    if config.reduce_lr_patience:
        patience = config.reduce_lr_patience
        out.append(keras.callbacks.ReduceLROnPlateau(factor=0.5, patience=patience, **watch))
    if config.early_stopping_patience:
        out.append(
            keras.callbacks.EarlyStopping(
                patience=config.early_stopping_patience, restore_best_weights=True, **watch
            )
        )
    return out


def song_labels(data_dir: str, catalog: yes_reader.Catalog) -> tuple[tuple, list[tuple]]:
    """Projector metadata: (columns, one row per embedding row: padding token 0, then song s).

    Columns are title, artist and, if `data_dir` has tags.txt and tag_hash.txt, the song's most
    common tag (`yes_reader.read_tags`).
    """
    tags_path, hash_path = (os.path.join(data_dir, f) for f in ("tags.txt", "tag_hash.txt"))
    columns, songs = ("title", "artist"), [catalog.titles, catalog.artists]
    if os.path.exists(tags_path) and os.path.exists(hash_path):
        columns += ("tag",)
        songs.append(yes_reader.read_tags(tags_path, hash_path, catalog.size))
    return columns, [("<padding>",) + ("",) * (len(columns) - 1), *zip(*songs, strict=True)]


def load_init_source(config: config_lib.Config) -> tuple[musicmodel.MusicModel, list[str]] | None:
    """The model of --init_from and its catalog keys (`model_dir/song_keys.txt`), if given."""
    if not config.init_from:
        return None
    where = f"--init_from={config.init_from}"
    path = os.path.join(config.init_from, names.KEYS_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"{where}: no {path}; that run is older than --init_from, train it again")
    old = modeltrainer.load_model(config.init_from)
    return old, list(names.read_keys(config.init_from, old.num_songs))


def load_trained(config: config_lib.Config, num_songs: int) -> musicmodel.MusicModel:
    """The model saved in --model_dir, checked to score the `num_songs` songs of --data_dir."""
    model = modeltrainer.load_model(config.model_dir)
    if model.num_songs != num_songs:
        raise ConfigError(
            f"--model_dir={config.model_dir}: the model was trained on {model.num_songs} songs "
            f"but --data_dir={config.data_dir} has {num_songs}; use the same catalog"
        )
    return model


def transition_tables(config: config_lib.Config, data: yes_reader.YesData) -> dict | None:
    """With --transition, the tables of the training playlists (those the windows are cut from,
    so that each training event can leave itself out of the counts); else None."""
    if config.transition == "none":
        return None
    tables = baselines.successor_table(data.train, data.catalog.size, config.transition_width)
    if config.transition == "markov_artist":  # token-indexed artists, padding -1
        artists = baselines.artist_ids(data.catalog.artists)
        share = baselines.within_artist(tables["popularity"], artists)
        tables |= {"artists": np.concatenate([[-1], artists]), "artist_share": share}
    return tables


SMALLER_BATCHES = (50, 20)  # --min_updates_per_epoch tries these below --batch_size


def decide_auto(config: config_lib.Config, data: yes_reader.YesData) -> config_lib.Config:
    """`config` with what training decides from the data: --side_features=auto
    (`coldstart.resolve_side_features`), --transition=markov_artist markov without artist rows,
    --recency_half_life 0 under
    --recency_weighting=time_split where --data_dir is not split by time, and, under
    --min_updates_per_epoch, a smaller batch for a small training split (the largest of
    `SMALLER_BATCHES` below --batch_size whose epoch has that many windows, else the smallest)."""
    config = coldstart.resolve_side_features(config, data)
    if config.transition == "markov_artist" and config.side_features == "none":
        logging.info("--transition=markov_artist: no artist rows (--side_features=none), markov")
        config = dataclasses.replace(config, transition="markov")
    weighted = config.recency_half_life and config.recency_weighting == "time_split"
    if weighted and not yes_reader.split_by_time(config.data_dir):
        logging.info("--recency_weighting=time_split: not split by time, every playlist weighs 1")
        config = dataclasses.replace(config, recency_half_life=0.0)
    minimum, size = config.min_updates_per_epoch, config.batch_size
    if not minimum:
        return config
    updates = {}  # batch size -> windows an epoch, each counted once
    for batch in (size, *(b for b in SMALLER_BATCHES if b < size)):
        updates[batch] = yes_reader.make_windows(data.train, batch, config.num_steps).num_windows
        if updates[batch] >= minimum:
            break
    if batch != size:
        logging.info(
            "--min_updates_per_epoch=%d: batch %d (%d updates an epoch; --batch_size=%d has %d)",
            minimum, batch, updates[batch], size, updates[size],
        )  # fmt: skip
    return dataclasses.replace(config, batch_size=batch)


class NextSongTask:
    """Next-song classification over a Yes.com catalog."""

    name = "next_song"

    def train(self, config: config_lib.Config) -> None:
        strategy = cluster.make_strategy(config.strategy)  # before any other TensorFlow op
        keras.utils.set_random_seed(config.seed)
        data = coldstart.load(config)
        config = decide_auto(config, data)
        cluster.check_batch_size(strategy, config.batch_size)
        windows = yes_reader.make_windows(
            data.train, config.batch_size, config.num_steps, config.seed, config.recency_half_life
        )
        if config.softmax == "sampled":  # before anything is written
            musicmodel.check_num_sampled(config.num_sampled, data.catalog.size)
        songrows.check_side_features(config.side_features, config.softmax, config.tie_embeddings)
        side = coldstart.side_features(config.data_dir, data.catalog, config.side_features)
        keys = importer.catalog_keys(config.data_dir, data.catalog.titles, data.catalog.artists)
        source = load_init_source(config)
        write_dir = cluster.write_dir(strategy, config.model_dir)  # model_dir on the chief
        rundir.make_model_dir(write_dir)
        with rundir.lock_model_dir(write_dir):
            self._train(config, strategy, data, windows, write_dir, keys, source, side)

    def _train(
        self,
        config: config_lib.Config,
        strategy,
        data: yes_reader.YesData,
        windows: yes_reader.Windows,
        write_dir: str,
        keys: list[str],
        source: tuple[musicmodel.MusicModel, list[str]] | None,
        side: coldstart.SideFeatures | None,
    ) -> None:
        """Builds the model (from --init_from's `source` if given and nothing is to resume; with
        the songs' `side` features) and hooks and trains in `write_dir` (locked); the catalog's
        song `keys` go to model_dir."""

        def write_run_config() -> None:  # once the checkpoint to resume is known to fit
            if cluster.is_chief(strategy):
                files = [os.path.join(config.data_dir, "song_hash.txt")]
                files += [yes_reader.playlist_path(config.data_dir, s) for s in ("train", "test")]
                extra = {"num_songs": data.catalog.size, "train_events": windows.events}
                rundir.write_run_config(config, files, extra)
                importer.write_song_keys(os.path.join(config.model_dir, names.KEYS_FILE), keys)

        songs = data.catalog.size
        counts = np.bincount(windows.targets[windows.weights > 0], minlength=songs)
        with strategy.scope():
            model = musicmodel.build_model(
                config,
                songs,
                counts,
                side and side.model_args(),
                transition_tables(config, data),
                train_steps=config.num_epochs * windows.num_windows,
            )
        warmstart.init_songs(model, config, data.train)
        warmstart.init_bias(model, config, counts)
        callbacks = []
        if yes_reader.count_events(data.valid):
            valid = yes_reader.make_windows(data.valid, config.batch_size, config.num_steps)
            callbacks.append(hooks.ValidationHook(lambda: evaluate_windows(model, valid)))
        callbacks += validation_schedule(config)
        callbacks.append(hooks.ProgressHook())
        callbacks.append(
            hooks.EmbeddingProjectorHook(
                os.path.join(write_dir, modeltrainer.TENSORBOARD_DIR, "train"),
                model.embedding,
                *song_labels(config.data_dir, data.catalog),
            )
        )
        order = yes_reader.schedule(windows, config.num_epochs, config.seed)
        trainer = modeltrainer.Trainer(
            model,
            config.model_dir,
            num_epochs=config.num_epochs,
            steps_per_epoch=windows.num_windows,
            checkpoint_every_steps=config.checkpoint_every_steps,
        )
        if source and trainer.manager.checkpoints:
            logging.warning(
                "--init_from=%s ignored: resuming this run's checkpoint", config.init_from
            )
        elif source:
            kept = warmstart.init_from(model, *source, keys, f"--init_from={config.init_from}")
            logging.info(
                "initialised from %s: %d of %d songs kept their weights, %d are new",
                config.init_from,
                kept,
                len(keys),
                len(keys) - kept,
            )
        trainer.train(
            lambda step: cluster.distribute(strategy, windows, order[step:]),
            callbacks,
            after_restore=write_run_config,
        )

    def evaluate(self, config: config_lib.Config) -> dict:
        catalog = yes_reader.read_catalog(os.path.join(config.data_dir, "song_hash.txt"))
        test_path = yes_reader.playlist_path(config.data_dir, "test")
        test = yes_reader.read_playlists(test_path, catalog.size)
        model = load_trained(config, catalog.size)
        musicmodel.compile_model(model, config.learning_rate, config.max_grad_norm)
        windows = yes_reader.make_windows(test, model.batch_size, config.num_steps)
        results = {
            "task": self.name,
            "split": "test",
            "playlists": int(sum(len(p) >= 2 for p in test)),
            "exclude_history": config.exclude_history,
            **metrics.report(evaluate_windows(model, windows)),
        }
        if config.exclude_history:  # the ranks as recommend serves; the model's own likelihood
            served = blend.evaluate_blends([{"rnn": 1.0}], {}, model, windows, True)[0]
            results.update({kind: served[kind] for kind in metrics.KINDS})
        cold = coldstart.cold_songs(catalog.size, config.cold_fraction, config.seed)
        if cold.any():
            cold_windows = coldstart.cold_target_windows(windows, cold)
            results["cold"] = metrics.report(evaluate_windows(model, cold_windows))
        if config.baselines or config.blend:
            compared = blend.compare(config, model, windows, cold)
            if "cold" in compared:  # only with --cold_fraction, like the model's "cold"
                results["cold"].update(compared.pop("cold"))
            results.update(compared)
        for report in (results, results.get("cold")):
            if report:
                rows = {**report.get("baselines", {}), "model": report}
                print_table(rows | ({"blend": report["blend"]} if "blend" in report else {}))
        if cold.any():
            print(f"(second table: the {results['cold']['events']} events with a cold target)")
        rundir.write_json_atomic(os.path.join(config.model_dir, "metrics.json"), results)
        logging.info("wrote %s", os.path.join(config.model_dir, "metrics.json"))
        return results

    def recommend(self, config: config_lib.Config) -> list[dict]:
        """Prints the --top_k next songs for --history or each line of --history_file (by the
        model, or with --blend by the blend of the model and baselines that --mode=eval scores).

        Returns:
          Per history: {"song_ids": int32 [top_k], "scores": float32 [top_k]} (best first).
        """
        catalog = yes_reader.read_catalog(os.path.join(config.data_dir, "song_hash.txt"))
        histories = serving.read_histories(config, serving.song_index(config.data_dir, catalog))
        model = load_trained(config, catalog.size)
        recommend = serving.checked_serving_function(config, model)
        if config.blend:  # the hybrid of --mode=eval's blend, same components and weights
            songs = [np.asarray(ids) for _, ids in histories]
            out = blend.recommend_blend(config, model, songs, config.top_k)
        else:
            padded, length = serving.pad_histories([ids for _, ids in histories])
            out = {k: v.numpy() for k, v in recommend(padded, length).items()}
        for row, (label, ids) in enumerate(histories):
            serving.print_recommendations(
                label, ids, out["song_ids"][row], out["scores"][row], catalog
            )
        return [{k: v[row] for k, v in out.items()} for row in range(len(histories))]

    def search(self, config: config_lib.Config) -> list[int]:
        """Prints the songs of --data_dir that match --query (id, title, artist), best first, at
        most --top_k (`names.SongIndex.search`); returns their ids."""
        if not config.query.strip():
            raise ConfigError("--mode=search needs --query, e.g. --query=firework")
        catalog = yes_reader.read_catalog(os.path.join(config.data_dir, "song_hash.txt"))
        found = serving.song_index(config.data_dir, catalog).search(config.query, config.top_k)
        serving.print_songs(found, catalog)
        return found

    def serve(self, config: config_lib.Config) -> None:
        """Answers HTTP on --host:--port with the model of --model_dir (see server.py) until
        stopped (Ctrl-C)."""
        import server  # FastAPI and uvicorn only for this mode

        server.check_port(config.host, config.port)
        catalog = yes_reader.read_catalog(os.path.join(config.data_dir, "song_hash.txt"))
        index = serving.song_index(config.data_dir, catalog)
        model = load_trained(config, catalog.size)
        serving.checked_serving_function(config, model)  # --top_k fits the catalog
        server.run(server.make_app(model, index, config), config.host, config.port)

    def export(self, config: config_lib.Config) -> str:
        """Writes the serving SavedModel to model_dir/export/<version>/ and prints its path."""
        model = modeltrainer.load_model(config.model_dir)
        signatures = {
            "serving_default": serving.checked_serving_function(config, model),
            "top_k": serving.ranking_function(model, config.exclude_history),  # k per call
        }
        if model.repeat is None:  # its carried state has no recent songs for the repeat bias
            signatures["next_step"] = serving.step_function(model, config.top_k)
        path = modeltrainer.export_saved_model(
            model,
            signatures,
            os.path.join(config.model_dir, modeltrainer.EXPORT_DIR),
            config.export_version,
        )
        print(path)
        return path
