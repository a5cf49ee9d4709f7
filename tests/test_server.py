"""`--mode=serve` for real: `deepcf.py` in a subprocess on a free 127.0.0.1 port, a tiny model
(one epoch on a yes_small slice), real HTTP. Every endpoint must give the top-k that
`--mode=recommend` gives for the same history, every bad request a 4xx JSON error after which the
server still answers, concurrent clients their own answers, and the page (in headless Chromium)
what /recommend says.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import urllib.error
import urllib.request
import zipfile

import pytest

import config as config_lib
import serving
import tasks
import yes_reader
from conftest import ROOT, run_cli, running_server, train_small

HISTORY = [12, 845, 3001]


@pytest.fixture(scope="module")
def trained(small_slice, tmp_path_factory) -> config_lib.Config:
    return train_small(small_slice, tmp_path_factory.mktemp("server_run"), num_epochs=1)


@pytest.fixture(scope="module")
def url(trained):
    with running_server(trained.data_dir, trained.model_dir, "--top_k=5") as base:
        yield base


@pytest.fixture(scope="module")
def index(trained):
    catalog = yes_reader.read_catalog(os.path.join(trained.data_dir, "song_hash.txt"))
    return serving.song_index(trained.data_dir, catalog)


def call(url: str, path: str, body=None, method: str | None = None, raw: bytes | None = None):
    """(status, JSON answer) of one request; `body` is sent as JSON, `raw` as it is (with
    urllib's Content-Type application/x-www-form-urlencoded, as `curl -d` sends it)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {} if raw is not None else {"Content-Type": "application/json"}
    request = urllib.request.Request(url + path, data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def recommend_cli(trained, history: str, k: int, exclude: bool = True) -> list[int]:
    """The ids `--mode=recommend` prints for `history` (the task method the CLI runs)."""
    cfg = dataclasses.replace(trained, history=history, top_k=k, exclude_history=exclude)
    return tasks.TASKS["next_song"].recommend(cfg)[0]["song_ids"].tolist()


def unique_names(index, songs: list[int]) -> list[str]:
    """A name per song that only it matches: its title, else "title - artist"."""
    out = []
    for song in songs:
        title, artist = index.titles[song], index.artists[song]
        out.append(title if index.matches(title) == [song] else f"{title} - {artist}")
        assert index.matches(out[-1]) == [song]
    return out


def test_status_is_tf_servings(url):
    ok = {"error_code": "OK", "error_message": ""}
    expected = {"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": ok}]}
    assert call(url, "/v1/models/deepcf") == (200, expected)


def test_predict_row_and_columnar_equal_recommend(url, trained):
    other = [7, 100, 200]
    expected = [recommend_cli(trained, ",".join(map(str, h)), 5) for h in (HISTORY, other)]
    # padding past `length` is ignored, whatever it holds (as by the exported signature)
    rows = {
        "instances": [{"history": HISTORY, "length": 3}, {"history": other + [-7], "length": 3}]
    }
    status, answer = call(url, "/v1/models/deepcf:predict", rows)
    assert status == 200, answer
    assert [p["song_ids"] for p in answer["predictions"]] == expected
    assert all(len(p["scores"]) == 5 for p in answer["predictions"])
    columns = {"inputs": {"history": [HISTORY, other + [99999]], "length": [3, 3]}}
    status, answer = call(url, "/v1/models/deepcf:predict", columns)
    assert status == 200 and answer["outputs"]["song_ids"] == expected
    curl = json.dumps(columns).encode()  # no JSON Content-Type, as `curl -d` sends it
    assert call(url, "/v1/models/deepcf:predict", raw=curl)[1]["outputs"]["song_ids"] == expected
    for k in (1, 8):  # the top_k signature: k per request
        expected = [recommend_cli(trained, ",".join(map(str, HISTORY)), k)]
        body = {"signature_name": "top_k", "inputs": {"history": [HISTORY], "length": [3], "k": k}}
        assert call(url, "/v1/models/deepcf:predict", body)[1]["outputs"]["song_ids"] == expected
        body = {"signature_name": "top_k", "instances": [{"history": HISTORY, "k": k}]}
        assert (
            call(url, "/v1/models/deepcf:predict", body)[1]["predictions"][0]["song_ids"]
            == (expected[0])
        )


def test_recommend_by_names_equals_recommend_cli(url, trained, index):
    typed = unique_names(index, HISTORY)
    for k, exclude in ((7, True), (3, False)):
        body = {"history": [n.upper() for n in typed], "k": k, "exclude_history": exclude}
        status, answer = call(url, "/recommend", body)
        assert status == 200, answer
        expected = recommend_cli(trained, ",".join(map(str, HISTORY)), k, exclude)
        assert [r["id"] for r in answer["recommendations"]] == expected
        assert [r["rank"] for r in answer["recommendations"]] == list(range(1, k + 1))
        first = answer["recommendations"][0]
        assert (first["title"], first["artist"]) == (
            index.titles[expected[0]],
            index.artists[expected[0]],
        )
        assert [s["id"] for s in answer["history"]] == HISTORY
    # ids, a digit string, and one string typed as for --history give the same answer
    by_ids = call(url, "/recommend", {"history": [12, "845", typed[2]], "k": 7})[1]
    quoted = ", ".join(f'"{n}"' for n in typed)
    by_text = call(url, "/recommend", {"history": quoted, "k": 7})[1]
    assert by_ids == by_text == call(url, "/recommend", {"history": HISTORY, "k": 7})[1]
    # A history that ends with the songs the model likes most after its first: leaving the
    # history out must change the answer (else the flag is not shown to work).
    liked = [5, *recommend_cli(trained, "5", 3, exclude=False)]
    for exclude in (True, False):
        body = {"history": liked, "k": 6, "exclude_history": exclude}
        served = [r["id"] for r in call(url, "/recommend", body)[1]["recommendations"]]
        assert served == recommend_cli(trained, ",".join(map(str, liked)), 6, exclude)
        assert bool(set(served) & set(liked)) is not exclude
    probabilities = [r["probability"] for r in by_ids["recommendations"]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < probabilities[0] < 1


def test_search_is_the_index_search(url, index):
    status, answer = call(url, "/search?q=" + urllib.request.quote(index.titles[3001][:5]))
    assert status == 200
    assert [s["id"] for s in answer["songs"]] == index.search(index.titles[3001][:5], 10)
    assert call(url, "/search?q=")[1] == {"songs": []}


def ambiguous_title(index) -> str:
    return next(t for t in index.titles if len(index.matches(t)) > 1)


BAD = [  # (path, body or raw bytes, method, status, start of the error)
    ("/v1/models/deepcf:predict", b"{not json", None, 400, "the body is not JSON"),
    ("/v1/models/deepcf:predict", [1, 2], None, 400, "the body must be a JSON object, got list"),
    ("/recommend", b"\xff", None, 400, "the body is not JSON"),
    ("/v1/models/deepcf:predict", {}, None, 400, "give either 'instances'"),
    ("/v1/models/deepcf:predict", {"instances": []}, None, 400, "instances: expected a non-empty"),
    ("/v1/models/deepcf:predict", {"instances": [5]}, None, 400, "instances: each instance"),
    ("/v1/models/deepcf:predict", {"inputs": [5]}, None, 400, "inputs: expected an object"),
    (
        "/v1/models/deepcf:predict",
        {"instances": [{"history": [1, 2], "length": 3}]},
        None,
        400,
        "length[0]: 3 is not in 1..2",
    ),
    (
        "/v1/models/deepcf:predict",
        {"instances": [{"history": [1, 99999]}]},
        None,
        400,
        "history[0][1]: 99999 is not in 0..3167",
    ),
    ("/v1/models/deepcf:predict", {"inputs": {"history": [["a"]]}}, None, 400, "history[0][0]"),
    (
        "/v1/models/deepcf:predict",
        {"inputs": {"history": [[1], [2]], "length": [1]}},
        None,
        400,
        "length: 1 values for 2 histories",
    ),
    (
        "/v1/models/deepcf:predict",
        {"signature_name": "nope", "inputs": {"history": [[1]]}},
        None,
        400,
        "signature_name 'nope'",
    ),
    (
        "/v1/models/deepcf:predict",
        {"signature_name": "top_k", "inputs": {"history": [[1]], "k": 0}},
        None,
        400,
        "k: 0 is not in 1..3168",
    ),
    (
        "/v1/models/deepcf:predict",
        {"signature_name": "top_k", "instances": [{"history": [1], "k": 2}, {"history": [1]}]},
        None,
        400,
        "k: every instance must give the same k",
    ),
    ("/v1/models/other:predict", {"instances": [{"history": [1]}]}, None, 404, "Servable not"),
    ("/v1/models/other", None, None, 404, "Servable not found for request: Latest(other)"),
    ("/recommend", {}, None, 400, "history: expected a non-empty list"),
    ("/recommend", {"history": ["qqqqzzzz"]}, None, 400, "history[0]: no song 'qqqqzzzz'"),
    ("/recommend", {"history": [1.5]}, None, 400, "history[0]: expected a name or an id"),
    ("/recommend", {"history": [-1]}, None, 400, "history[0]: -1 is not in 0..3167"),
    ("/recommend", {"history": "a,,b"}, None, 400, "history: an empty entry"),
    ("/recommend", {"history": [1], "k": 0}, None, 400, "k: 0 is not in"),
    ("/recommend", {"history": [1], "k": "5"}, None, 400, "k: expected an integer"),
    ("/recommend", {"history": [1], "exclude_history": "yes"}, None, 400, "exclude_history"),
    ("/recommend", None, "DELETE", 405, "Method Not Allowed"),
    ("/search?q=a&k=abc", None, None, 400, "query.k"),
    ("/search?q=a&k=0", None, None, 400, "k: 0 is not in 1..50"),
    ("/nothing", None, None, 404, "Not Found"),
]


@pytest.mark.parametrize("path, body, method, status, error", BAD, ids=[str(b[4]) for b in BAD])
def test_bad_requests_get_a_4xx_json_error_and_the_server_goes_on(
    url, path, body, method, status, error
):
    raw = body if isinstance(body, bytes) else None
    got, answer = call(url, path, None if raw else body, method, raw)
    assert (got, list(answer)) == (status, ["error"]), answer
    assert answer["error"].startswith(error), answer
    assert call(url, "/v1/models/deepcf")[0] == 200


def test_ambiguous_name_lists_the_songs(url, index):
    title = ambiguous_title(index)
    status, answer = call(url, "/recommend", {"history": [title]})
    assert status == 400
    assert answer["error"].startswith(f"history[0]: {title!r} is ambiguous")
    for song in index.matches(title)[:3]:
        assert index.describe(song) in answer["error"]


def test_concurrent_clients_get_their_own_answers(url):
    histories = [[i, 3 * i + 1, 7 * i + 2] for i in range(16)]
    alone = [call(url, "/recommend", {"history": h, "k": 4})[1] for h in histories]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(lambda h: call(url, "/recommend", {"history": h, "k": 4})[1], histories * 3)
        )
    assert together == alone * 3


def test_load_test_script_runs_without_errors(url, trained, tmp_path):
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "benchmarks" / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    out = tmp_path / "load.json"
    argv = [f"--url={url}", f"--data_dir={trained.data_dir}", "--clients=2", "--requests=5"]
    assert load_test.main([*argv, f"--out={out}"]) == 0
    report = json.loads(out.read_text())
    assert (report["sent"], report["errors"], report["clients"]) == (10, 0, 2)
    assert 0 < report["p50_ms"] <= report["p99_ms"]


def test_serve_refuses_a_port_in_use_and_a_task_without_serving(url, trained):
    port = url.rsplit(":", 1)[1]
    result = run_cli(
        "--mode=serve",
        f"--data_dir={trained.data_dir}",
        f"--model_dir={trained.model_dir}",
        f"--port={port}",
    )
    assert result.returncode == 2
    assert f"--host=127.0.0.1 --port={port}: cannot listen there" in result.stderr
    result = run_cli("--mode=serve", "--task=audio_features")
    assert result.returncode == 2
    assert "--mode=serve: not available for --task=audio_features" in result.stderr


def test_page_recommends_what_recommend_says(url, trained, index):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    wait = WebDriverWait(driver, 60)

    def shown() -> list[tuple[int, str]]:
        rows = driver.find_elements(By.CSS_SELECTOR, "#recommendations tr")
        return [
            (int(r.get_attribute("data-id")), r.find_element(By.CLASS_NAME, "p").text) for r in rows
        ]

    def expected(history: list[int]) -> list[tuple[int, str]]:
        answer = call(url, "/recommend", {"history": history, "k": 10})[1]["recommendations"]
        return [(r["id"], f"{r['probability']:.4f}") for r in answer]

    try:
        driver.get(url + "/")
        song = HISTORY[2]
        driver.find_element(By.ID, "song").send_keys(index.titles[song][:-1])
        pick = f'#suggestions li[data-id="{song}"]'
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, pick))
        driver.find_element(By.CSS_SELECTOR, pick).click()
        wait.until(lambda d: shown() == expected([song]))
        first = shown()[0][0]
        driver.find_element(By.CSS_SELECTOR, f'#recommendations tr[data-id="{first}"] .add').click()
        playlist = "#playlist li"
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, playlist)) == 2)
        ids = [
            int(li.get_attribute("data-id"))
            for li in driver.find_elements(By.CSS_SELECTOR, playlist)
        ]
        assert ids == [song, first]
        wait.until(lambda d: shown() == expected([song, first]))
        assert first not in [i for i, _ in shown()]  # the history is left out
        assert driver.find_element(By.ID, "error").text == ""
    finally:
        driver.quit()


def test_page_is_found_beside_the_module_or_where_setup_installs_it(tmp_path):
    import server  # the server's imports (fastapi, uvicorn) load only for the serving tests

    first, second = tmp_path / "checkout", tmp_path / "installed"
    second.mkdir()
    (second / "index.html").write_text("<html></html>")
    assert server.page_path((str(first), str(second))) == str(second / "index.html")
    with pytest.raises(server.HTTPException, match="not in .*checkout or .*nowhere"):
        server.page_path((str(first), str(tmp_path / "nowhere")))
    # A wheel (what `pip install .` installs) carries the page as data: <prefix>/share/deepcf/web.
    # It is built from a copy: setuptools writes build/ into the source tree.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "web", source / "web")
    for module in ROOT.glob("*.py"):
        shutil.copy(module, source)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "wheel"), str(source)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = (tmp_path / "wheel").glob("deepcf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "deepcf-0.1.0.data/data/share/deepcf/web/index.html" in names
    assert os.path.join(sysconfig.get_path("data"), "share", "deepcf", "web") in server.PAGE_DIRS
