"""Training, evaluation and serving speed of deepcf next to a plain Keras reference.

    python benchmarks/bench.py [--quick] [--rounds 2] [--out bench.json]

Training: (a) "plain", the straightforward Keras `model.fit` of the same architecture (Embedding ->
2 x LSTM -> Dense softmax, batch 100, 20 steps, Adam, global clipnorm 5), written here, and (b)
"deepcf", `musicmodel.build_model` + `model.fit` over `yes_reader.to_dataset` windows, as
`--mode=train` runs it (defaults, so `--jit_compile=false`; carried state). Both read the same
synthetic windows: song ids drawn with a Zipf-like popularity skew, no padding (so deepcf's skipping
of padding does not help it here), a new playlist every 10 windows. Each configuration runs in its
own subprocess, so its peak RSS is its own (with --quick, all share one process and peak RSS is
cumulative); its speed is the lower quartile of the step times after warm-up (robust to other
processes on a shared machine); the configurations run in `--rounds` rounds in alternating order,
and each keeps its best round. The matmul ceilings are measured before and after them (the
better of the two counts).
GFLOP/s come from the analytic count of matrix-multiply work (forward + 2 x backward) and are
compared with a matmul ceiling measured in the same run, in float32 and in bfloat16: deepcf also
trains with `--precision=bfloat16` at 9,775 songs (3,168 with --quick), beside its float32 row.
`--time_to_quality` runs `time_to_quality.py` instead (seconds of training to a quality bar).

Evaluation: events/s of the full-catalog `model.evaluate` of `--mode=eval` over the test split
of data/yes_big (data/yes_small with --quick), after a first warm-up pass. Serving: top-20 after
one 20-song history through the concrete function of `serving.serving_function` (the export's
`serving_default` signature; history songs excluded as by default), one added song from carried
state through `serving.step_function`'s (the export's `next_step`), and batches of 1,000
histories.
Weights are untrained: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

import config as config_lib
import rundir
import serving

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATALOGS = (3168, 9775, 75262)  # yes_small, yes_big, the full Yes.com catalog
BATCH, STEPS, EMBED, HIDDEN, LAYERS = 100, 20, 100, 100, 2  # the UCL seed configuration
NUM_SAMPLED = 1024
SERVE_TOP_K, HISTORY = 20, 20


def train_flops(catalog: int, softmax: str) -> float:
    """Multiply-add FLOPs per transition of one training step: 3 x (2 x forward MACs)."""
    lstm = sum(
        2 * 4 * HIDDEN * (EMBED if i == 0 else HIDDEN) + 2 * 4 * HIDDEN * HIDDEN
        for i in range(LAYERS)
    )
    outputs = catalog if softmax == "full" else NUM_SAMPLED + 1
    return 3.0 * (lstm + 2 * HIDDEN * outputs)


def synthetic_windows(catalog: int, num_windows: int, seed: int = 0):
    """`yes_reader.Windows` of Zipf-skewed song ids (p ∝ 1 / rank^0.8), reset every 10 windows."""
    import yes_reader

    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, catalog + 1) ** 0.8
    ids = rng.permutation(catalog)[
        rng.choice(catalog, (BATCH, num_windows * STEPS + 1), p=popularity / popularity.sum())
    ]
    shape = (BATCH, num_windows, STEPS)
    reset = np.zeros((num_windows, BATCH), bool)
    reset[::10] = True
    return yes_reader.Windows(
        inputs=(ids[:, :-1] + 1).reshape(shape).transpose(1, 0, 2).astype(np.int32),
        targets=ids[:, 1:].reshape(shape).transpose(1, 0, 2).astype(np.int32),
        weights=np.ones((num_windows, BATCH, STEPS), np.float32),
        reset=reset,
        batch_starts=np.arange(0, num_windows + 1, 10),
        playlists=BATCH * num_windows // 10,
    )


def seed_model(catalog: int, song_counts: np.ndarray | None = None, **options):
    """deepcf's own model in the seed configuration (UCL: 2 x LSTM 100, batch 100, Adam, clip 5)."""
    import musicmodel

    sizes = dict(num_layers=LAYERS, embedding_size=EMBED, hidden_size=HIDDEN, batch_size=BATCH)
    config = config_lib.Config(
        cell="lstm", learning_rate=1e-3, max_grad_norm=5.0, **sizes, **options
    )
    return musicmodel.build_model(config, catalog, song_counts)


def plain_model(catalog: int):
    """The straightforward Keras model and `compile` a user would write (Keras' defaults)."""
    import keras

    model = keras.Sequential(
        [
            keras.Input((STEPS,), dtype="int32"),
            keras.layers.Embedding(catalog + 1, EMBED),
            *[keras.layers.LSTM(HIDDEN, return_sequences=True) for _ in range(LAYERS)],
            keras.layers.Dense(catalog),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3, global_clipnorm=5.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def step_seconds(fit, num_steps: int, warmup: int) -> float:
    """Runs `fit(callbacks)`; the lower quartile of the wall times of the steps after `warmup`.

    The machine may be shared: a step that other processes slowed is not the code's speed, so
    the fastest quarter of the steps is what is reported (for every implementation alike).
    """
    import keras

    times = []

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.start)

    fit([StepTimer()])
    if len(times) != num_steps:
        raise RuntimeError(f"expected {num_steps} timed steps, got {len(times)}")
    return float(np.percentile(times[warmup:], 25))


def train_setup(spec: dict) -> tuple:
    """(model, fit): `fit(callbacks)` trains the model of one configuration over its windows."""
    import keras

    import yes_reader

    keras.utils.set_random_seed(0)
    catalog = spec["catalog"]
    windows = synthetic_windows(catalog, spec["warmup"] + spec["steps"])
    if spec["impl"] == "plain":
        model = plain_model(catalog)
        x = windows.inputs.reshape(-1, STEPS)  # window-major rows: batch i = window i
        y, w = windows.targets.reshape(-1, STEPS), windows.weights.reshape(-1, STEPS)

        def fit(callbacks):
            model.fit(
                x,
                y,
                sample_weight=w,
                batch_size=BATCH,
                shuffle=False,
                verbose=0,
                callbacks=callbacks,
            )
    else:
        counts = np.bincount(windows.targets.ravel(), minlength=catalog)
        model = seed_model(
            catalog,
            softmax=spec["softmax"],
            num_sampled=NUM_SAMPLED,
            song_counts=counts,
            precision=spec.get("precision", "float32"),
        )

        def fit(callbacks):
            model.fit(yes_reader.to_dataset(windows), verbose=0, callbacks=callbacks)

    return model, fit


def run_train(spec: dict) -> dict:
    """One training configuration: transitions/s, GFLOP/s (RSS is added by the caller)."""
    _, fit = train_setup(spec)
    seconds = step_seconds(fit, spec["warmup"] + spec["steps"], spec["warmup"])
    rate = BATCH * STEPS / seconds
    flops = train_flops(spec["catalog"], spec["softmax"])
    return {"transitions_per_s": rate, "gflops": rate * flops / 1e9}


def run_ceiling(spec: dict) -> dict:
    """Best GFLOP/s of a float32 and of a bfloat16 matmul, 2000 x 100 x 9775 and 512^3, over
    short repeats; and the CPU's bf16 flags."""
    import tensorflow as tf

    import kernels

    out = {"cpu_bf16_flags": kernels.cpu_bf16_flags()}
    for key, dtype in (("ceiling_gflops", tf.float32), ("bf16_ceiling_gflops", tf.bfloat16)):
        best = 0.0
        for m, k, n in ((BATCH * STEPS, HIDDEN, 9775), (512, 512, 512)):
            a, b = (tf.cast(tf.random.normal(s), dtype) for s in ((m, k), (k, n)))
            matmul = tf.function(lambda a, b: tf.reduce_sum(tf.cast(tf.matmul(a, b), tf.float32)))
            matmul(a, b).numpy()
            calls = max(1, int(2e9 * spec["scale"] / (2 * m * k * n)))
            for _ in range(spec["repeats"]):
                start = time.perf_counter()
                for _ in range(calls):
                    matmul(a, b).numpy()
                best = max(best, 2 * m * k * n * calls / (time.perf_counter() - start) / 1e9)
        out[key] = best
    return out


def run_eval(spec: dict) -> dict:
    """Events/s of the full-catalog evaluation of `--mode=eval` over a test split."""
    import keras

    import yes_reader

    keras.utils.set_random_seed(0)
    catalog = yes_reader.read_catalog(os.path.join(spec["data_dir"], "song_hash.txt"))
    test = yes_reader.read_playlists(
        yes_reader.playlist_path(spec["data_dir"], "test"), catalog.size
    )[: spec["playlists"]]
    model = seed_model(catalog.size)
    windows = yes_reader.make_windows(test, BATCH, STEPS)
    model.evaluate(yes_reader.to_dataset(windows), verbose=0)  # warm-up: traces and compiles
    start = time.perf_counter()
    results = model.evaluate(yes_reader.to_dataset(windows), verbose=0, return_dict=True)
    seconds = time.perf_counter() - start
    return {
        "eval_events": int(results["events"]),
        "eval_seconds": seconds,
        "eval_events_per_s": float(results["events"]) / seconds,
    }


def percentiles_ms(call, requests: int) -> dict:
    """p50/p95 latency in ms of `call()` over `requests` calls after 10 warm-up calls."""
    for _ in range(10):
        call()
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"p50": 1e3 * float(np.median(times)), "p95": 1e3 * float(np.percentile(times, 95))}


def run_serving(spec: dict) -> dict:
    """Top-20 latency for one history, for one added song (carried state), batched throughput."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    catalog = spec["catalog"]
    model = seed_model(catalog)
    rng = np.random.default_rng(0)
    recommend = serving.serving_function(model, SERVE_TOP_K, True).get_concrete_function()
    one = tf.constant(rng.integers(0, catalog, (1, HISTORY)), tf.int32)
    length = tf.constant([HISTORY], tf.int32)
    latency = percentiles_ms(lambda: recommend(one, length)["song_ids"].numpy(), spec["requests"])

    step = serving.step_function(model, SERVE_TOP_K).get_concrete_function()
    state = step(one[:, :1], tf.zeros([LAYERS, 2, 1, HIDDEN]))["state"]
    song = tf.constant([[7]], tf.int32)
    incremental = percentiles_ms(lambda: step(song, state)["song_ids"].numpy(), spec["requests"])

    many = tf.constant(rng.integers(0, catalog, (spec["batch"], HISTORY)), tf.int32)
    lengths = tf.fill([spec["batch"]], HISTORY)
    recommend(many, lengths)["song_ids"].numpy()
    start = time.perf_counter()
    for _ in range(spec["batches"]):
        recommend(many, lengths)["song_ids"].numpy()
    per_s = spec["batch"] * spec["batches"] / (time.perf_counter() - start)
    return {
        "latency_ms": latency,
        "incremental_latency_ms": incremental,
        "batched_histories_per_s": per_s,
    }


WORKERS = {"train": run_train, "ceiling": run_ceiling, "eval": run_eval, "serving": run_serving}


def in_subprocess(specs: list[dict]) -> list[dict]:
    """Runs `WORKERS[spec["worker"]](spec)` for each spec in one fresh Python, in order.

    Each result gets `peak_rss_mb`: the process's peak so far, so it is per configuration only
    when the process runs one spec.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(specs)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench worker {specs} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_rounds(train: list[dict], rounds: int) -> list[dict]:
    """Each training spec's best result over `rounds` rounds, each spec in its own process; odd
    rounds run the specs in reverse, so a machine that speeds up or slows down during the run
    does not favour the configurations that come first. `rounds` lists every round's
    transitions/s (in round order)."""
    runs = [[] for _ in train]
    for r in range(rounds):
        for i in reversed(range(len(train))) if r % 2 else range(len(train)):
            runs[i] += in_subprocess([train[i]])
    return [
        {
            **max(outs, key=lambda o: o["transitions_per_s"]),
            "rounds": [o["transitions_per_s"] for o in outs],
        }
        for outs in runs
    ]


def plan(quick: bool) -> tuple[list[dict], dict, dict, dict]:
    """Training configurations and the ceiling, evaluation and serving specs."""
    catalogs = CATALOGS[:1] if quick else CATALOGS
    warmup, steps = (2, 4) if quick else (5, 20)
    train = [
        {
            "worker": "train",
            "catalog": v,
            "impl": impl,
            "softmax": "full",
            "warmup": warmup,
            "steps": steps // 2 if v > 10000 else steps,
        }
        for v in catalogs
        for impl in ("plain", "deepcf")
    ]
    train.append({**train[-1], "softmax": "sampled", "steps": steps})
    middle = [t for t in train if t["impl"] == "deepcf" and t["softmax"] == "full"][:2][-1]
    train.append({**middle, "precision": "bfloat16"})  # against float32 at 9,775 songs
    ceiling = {"worker": "ceiling", "scale": 0.2 if quick else 1.0, "repeats": 2 if quick else 5}
    data = "data/yes_small" if quick else "data/yes_big"
    evaluate = {
        "worker": "eval",
        "data_dir": os.path.join(ROOT, data),
        "playlists": 300 if quick else None,
    }
    serving = {
        "worker": "serving",
        "catalog": CATALOGS[0] if quick else CATALOGS[1],
        "requests": 30 if quick else 300,
        "batch": 1000,
        "batches": 2 if quick else 10,
    }
    return train, ceiling, evaluate, serving


def ceiling_key(spec: dict) -> str:
    """The result key of the matmul ceiling of a training spec's precision."""
    bf16 = spec.get("precision") == "bfloat16"
    return "bf16_ceiling_gflops" if bf16 else "ceiling_gflops"


def print_table(result: dict) -> None:
    """The training rows, then the single figures."""
    print(
        f"matmul ceiling: float32 {result['ceiling_gflops']:.1f} GFLOP/s, bfloat16 "
        f"{result['bf16_ceiling_gflops']:.1f} GFLOP/s (CPU bf16 flags: "
        f"{', '.join(result['cpu_bf16_flags']) or 'none'})"
    )
    print(
        f"{'catalog':>8} {'impl':>7} {'softmax':>8} {'dtype':>8} {'trans/s':>9} {'GFLOP/s':>8} "
        f"{'ceiling':>8} {'RSS MB':>7} {'vs plain':>8}"
    )
    plain = {r["catalog"]: r["transitions_per_s"] for r in result["train"] if r["impl"] == "plain"}
    for r in result["train"]:
        print(
            f"{r['catalog']:>8} {r['impl']:>7} {r['softmax']:>8} {r['precision']:>8} "
            f"{r['transitions_per_s']:>9.0f} "
            f"{r['gflops']:>8.1f} {r['ceiling_fraction']:>8.0%} {r['peak_rss_mb']:>7.0f} "
            f"{r['transitions_per_s'] / plain[r['catalog']]:>7.2f}x"
        )
    print(f"evaluation: {result['eval_events_per_s']:.0f} events/s")
    for key in ("latency_ms", "incremental_latency_ms"):
        print(f"{key}: p50 {result[key]['p50']:.2f}, p95 {result[key]['p95']:.2f}")
    print(f"batched: {result['batched_histories_per_s']:.0f} histories/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smallest catalog, few steps (CI)")
    parser.add_argument(
        "--out", help="where to write the JSON (bench.json; docs/time_to_quality.json)"
    )
    parser.add_argument(
        "--time_to_quality",
        action="store_true",
        help="seconds of training to a test-quality bar, deepcf vs plain Keras (see its module)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="training rounds (alternating order); each config keeps its best",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        outs = []
        for spec in json.loads(args.worker):
            outs.append(WORKERS[spec["worker"]](spec))
            outs[-1]["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(outs))
        return 0
    if args.time_to_quality:
        import time_to_quality

        out = args.out or os.path.join(ROOT, "docs", "time_to_quality.json")
        time_to_quality.run(ROOT, out, args.quick)
        print(f"wrote {out}")
        return 0
    args.out = args.out or "bench.json"
    train, ceiling, evaluate, serving = plan(args.quick)
    if args.quick:  # one process: faster start, but peak RSS is cumulative
        outs = in_subprocess([ceiling, *train, evaluate, serving])
    else:  # one process per configuration: its own peak RSS
        before = in_subprocess([ceiling])[0]
        trained = train_rounds(train, args.rounds)
        after = in_subprocess([ceiling])[0]  # the ceiling is the better of before and after
        best = {k: max(before[k], after[k]) for k in ("ceiling_gflops", "bf16_ceiling_gflops")}
        outs = [{**before, **best}, *trained]
        outs += [*in_subprocess([evaluate]), *in_subprocess([serving])]
    result = {k: v for k, v in outs[0].items() if k != "peak_rss_mb"}
    result["train"] = []
    for spec, out in zip(train, outs[1:], strict=False):
        row = {k: spec[k] for k in ("catalog", "impl", "softmax")}
        row["precision"] = spec.get("precision", "float32")
        row.update({k: out[k] for k in ("transitions_per_s", "gflops", "peak_rss_mb")})
        row["rounds"] = out.get("rounds", [out["transitions_per_s"]])  # --quick: its one run
        row["ceiling_fraction"] = out["gflops"] / result[ceiling_key(spec)]
        result["train"].append(row)
    result["eval_events_per_s"] = outs[-2]["eval_events_per_s"]
    result.update({k: v for k, v in outs[-1].items() if k != "peak_rss_mb"})
    print_table(result)
    rundir.write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
