"""Load test of a running `--mode=serve` server: concurrent clients, errors and latency.

    python benchmarks/load_test.py [--url http://127.0.0.1:8501] [--clients 8] [--requests 200]

Each client is a thread with its own keep-alive HTTP connection that sends `--requests`
requests one after another, alternating `POST /recommend` (ids, k 10) and TF Serving's
`POST /v1/models/deepcf:predict` (one instance), each with a history from `--data_dir`'s test
split (the first up to 20 songs of a playlist, drawn with a fixed seed). A request counts as an
error unless it answers 200 with the expected JSON and `k` songs. The run is bounded: each
request has `--timeout` seconds, and clients stop sending after `--max_seconds`. It prints the
counts, errors (the first few), p50/p99 latency and requests per second, writes them as JSON to
`--out` if given (atomically), and exits 1 if any request failed or was not sent.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sys
import threading
import time
import urllib.parse

import rundir

K = 10
MAX_HISTORY = 20


def test_histories(data_dir: str, seed: int, count: int) -> list[list[int]]:
    """`count` histories: first songs of the test playlists with at least 2 songs (Yes.com
    test.txt: two header lines, then song ids separated by spaces)."""
    with open(os.path.join(data_dir, "test.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()[2:]
    playlists = [list(map(int, line.split()))[:MAX_HISTORY] for line in lines]
    playlists = [p for p in playlists if len(p) >= 2]
    rng = random.Random(seed)
    return [rng.choice(playlists) for _ in range(count)]


def one_request(connection: http.client.HTTPConnection, n: int, history: list[int]) -> None:
    """Request `n` of a client (even: /recommend, odd: predict); raises on a bad answer."""
    if n % 2 == 0:
        path, body = "/recommend", {"history": history, "k": K}
    else:
        path, body = "/v1/models/deepcf:predict", {"instances": [{"history": history}]}
    headers = {"Content-Type": "application/json"}
    connection.request("POST", path, json.dumps(body), headers)
    response = connection.getresponse()
    answer = json.loads(response.read())
    if response.status != 200:
        raise RuntimeError(f"{path}: {response.status} {answer}")
    songs = answer["recommendations"] if n % 2 == 0 else answer["predictions"][0]["song_ids"]
    if not songs or (n % 2 == 0 and len(songs) != K):
        raise RuntimeError(f"{path}: {len(songs)} songs")


def client(args, histories: list[list[int]], deadline: float, out: dict) -> None:
    """Sends this client's requests; appends latencies (s) and errors to `out` under a lock."""
    url = urllib.parse.urlsplit(args.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=args.timeout)
    for n, history in enumerate(histories):
        if time.monotonic() > deadline:
            break
        start = time.perf_counter()
        try:
            one_request(connection, n, history)
            error = None
        except (OSError, http.client.HTTPException, ValueError, KeyError, RuntimeError) as e:
            error = f"{type(e).__name__}: {e}"
            connection.close()  # a fresh connection for the next request
        with out["lock"]:
            out["latencies"].append(time.perf_counter() - start)
            if error:
                out["errors"].append(error)
    connection.close()


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by the nearest-rank method."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8501")
    parser.add_argument("--data_dir", default="data/yes_big")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="per client")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--max_seconds", type=float, default=600.0, help="for the whole run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    planned = args.clients * args.requests
    histories = test_histories(args.data_dir, args.seed, planned)
    out: dict = {"lock": threading.Lock(), "latencies": [], "errors": []}
    start = time.monotonic()
    threads = [
        threading.Thread(
            target=client,
            args=(
                args,
                histories[c * args.requests : (c + 1) * args.requests],
                start + args.max_seconds,
                out,
            ),
        )
        for c in range(args.clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - start
    latencies = out["latencies"]
    report = {
        "clients": args.clients,
        "planned": planned,
        "sent": len(latencies),
        "errors": len(out["errors"]),
        "p50_ms": round(1000 * percentile(latencies, 0.5), 2) if latencies else None,
        "p99_ms": round(1000 * percentile(latencies, 0.99), 2) if latencies else None,
        "requests_per_s": round(len(latencies) / seconds, 1),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(report))
    for error in out["errors"][:5]:
        print("error:", error, file=sys.stderr)
    if args.out:
        rundir.write_json_atomic(args.out, report)
    return 0 if report["errors"] == 0 and report["sent"] == planned else 1


if __name__ == "__main__":
    sys.exit(main())
