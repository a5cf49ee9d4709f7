"""`--mode=serve`: a trained model over HTTP (FastAPI, run by uvicorn).

Endpoints (every error is a 4xx with a JSON `{"error": ...}`; the server keeps serving):
- `POST /v1/models/deepcf:predict`: TensorFlow Serving's REST predict call, so its clients work
  unchanged: the export's signatures `serving_default` (`history`, `length`; --top_k songs) and
  `top_k` (also `k`), in row (`instances`) or columnar (`inputs`) format.
- `GET /v1/models/deepcf`: TF Serving's model status.
- `POST /recommend`: `{"history": [names or ids], "k", "exclude_history"}` -> titles, artists,
  ids and probabilities.
- `GET /search?q=...`: catalog songs for an autocomplete box.
- `GET /`: the page (web/index.html).

Every answer comes from `serving.ranking_function`, the code behind `--mode=recommend` and the
export. The model runs in Starlette's thread pool (TF functions may be called from several
threads at once), so the event loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import json
import os
import socket
import sysconfig
from typing import Any

import fastapi
import numpy as np
import tensorflow as tf
import uvicorn
from absl import logging
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

import config as config_lib
import names
import serving
from errors import ConfigError
from musicmodel import MusicModel

MODEL_NAME = "deepcf"
PAGE_DIRS = (  # a checkout or editable install, then setup.py's data_files of an installed one
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "web"),
    os.path.join(sysconfig.get_path("data"), "share", "deepcf", "web"),
)
SIGNATURES = ("serving_default", "top_k")  # as `--mode=export` names them
MAX_BATCH = 1000  # histories per predict call
MAX_HISTORY = 1000  # songs per history
SEARCH_LIMIT = 50


class BadRequest(Exception):
    """A request the server refuses: answered with 400 and `{"error": message}`."""


def _int(value: Any, where: str, low: int, high: int) -> int:
    """`value` if it is a JSON integer in [low, high], else BadRequest naming `where`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{where}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise BadRequest(f"{where}: {value} is not in {low}..{high}")
    return value


def _list(value: Any, where: str, high: int) -> list:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"{where}: expected a non-empty list, got {value!r}")
    if len(value) > high:
        raise BadRequest(f"{where}: {len(value)} entries, at most {high} per request")
    return value


class Recommender:
    """The model, its catalog and the ranking functions the endpoints share."""

    def __init__(self, model: MusicModel, index: names.SongIndex, config: config_lib.Config):
        self.index, self.top_k, self.exclude = index, config.top_k, config.exclude_history
        self.num_songs = model.num_songs
        self.rank = {  # concrete: a call skips the Python-side signature matching
            e: serving.ranking_function(model, e).get_concrete_function() for e in (True, False)
        }
        for rank in self.rank.values():  # compile the common shape before the first request
            rank(tf.constant([[0]]), tf.constant([1]), tf.constant(1))

    def top(self, histories: list[list[int]], k: int, exclude: bool) -> dict[str, np.ndarray]:
        """{"song_ids": int32 [n, k], "scores": float32 [n, k]} after each history."""
        padded, length = serving.pad_histories(histories)
        out = self.rank[exclude](padded, length, tf.constant(k, tf.int32))
        return {name: value.numpy() for name, value in out.items()}

    def history(self, value: Any, length: Any, where: str) -> list[int]:
        """The first `length` (default: all) entries of one predict history, each a song id.
        Entries past `length` are padding: integers, but not checked against the catalog (as
        the exported signature ignores them)."""
        row = _list(value, f"history{where}", MAX_HISTORY)
        padding = 2**31 - 1
        row = [_int(s, f"history{where}[{i}]", -padding, padding) for i, s in enumerate(row)]
        n = len(row) if length is None else _int(length, f"length{where}", 1, len(row))
        songs = row[:n]
        for i, s in enumerate(songs):
            _int(s, f"history{where}[{i}]", 0, self.num_songs - 1)
        return songs

    def predict(self, body: dict) -> dict:
        """TF Serving's predict: row format answers `predictions`, columnar `outputs`."""
        signature = body.get("signature_name", "serving_default")
        if signature not in SIGNATURES:
            raise BadRequest(
                f"signature_name {signature!r}: this model has {', '.join(SIGNATURES)}"
            )
        if ("instances" in body) == ("inputs" in body):
            raise BadRequest("give either 'instances' (row format) or 'inputs' (columnar)")
        if "instances" in body:
            rows = _list(body["instances"], "instances", MAX_BATCH)
            if not all(isinstance(r, dict) for r in rows):
                raise BadRequest("instances: each instance is an object with 'history', 'length'")
            columns = {name: [r.get(name) for r in rows] for name in ("history", "length", "k")}
        elif isinstance(body["inputs"], dict):
            columns = dict(body["inputs"])
        else:
            raise BadRequest("inputs: expected an object of named inputs")
        rows = _list(columns.get("history"), "history", MAX_BATCH)
        lengths = columns.get("length")
        if lengths is None:
            lengths = [None] * len(rows)
        if len(_list(lengths, "length", MAX_BATCH)) != len(rows):
            raise BadRequest(f"length: {len(lengths)} values for {len(rows)} histories")
        histories = [
            self.history(h, n, f"[{i}]") for i, (h, n) in enumerate(zip(rows, lengths, strict=True))
        ]
        k = self.top_k
        if signature == "top_k":
            given = columns.get("k")
            if "instances" in body:  # one k per instance, as row format demands: all the same
                if len({repr(x) for x in given}) != 1:
                    raise BadRequest("k: every instance must give the same k")
                given = given[0]
            k = _int(given, "k", 1, self.num_songs)
        out = self.top(histories, k, self.exclude)
        out = {name: value.tolist() for name, value in out.items()}
        if "instances" in body:
            rows = zip(out["song_ids"], out["scores"], strict=True)
            return {"predictions": [{"song_ids": i, "scores": p} for i, p in rows]}
        return {"outputs": out}

    def recommend(self, body: dict) -> dict:
        """/recommend: songs by name or id -> the next `k` with titles and probabilities."""
        given = body.get("history")
        if isinstance(given, str):  # typed as for --history
            history = self.index.parse_history(given, "history", BadRequest)
        else:
            history = []
            for i, entry in enumerate(_list(given, "history", MAX_HISTORY)):
                if not isinstance(entry, str) and not isinstance(entry, int | bool):
                    raise BadRequest(f"history[{i}]: expected a name or an id, got {entry!r}")
                if isinstance(entry, str) and entry.strip().isascii() and entry.strip().isdigit():
                    entry = int(entry)  # "54" as 54, like --history
                if isinstance(entry, int):
                    entry = _int(entry, f"history[{i}]", 0, self.num_songs - 1)
                history.append(self.index.resolve(entry, f"history[{i}]", BadRequest))
        k = _int(body.get("k", self.top_k), "k", 1, self.num_songs)
        exclude = body.get("exclude_history", self.exclude)
        if not isinstance(exclude, bool):
            raise BadRequest(f"exclude_history: expected true or false, got {exclude!r}")
        out = self.top([history], k, exclude)
        ids, scores = out["song_ids"][0].tolist(), out["scores"][0].tolist()
        songs = [
            {"rank": r, **self.song(s), "probability": p}
            for r, (s, p) in enumerate(zip(ids, scores, strict=True), start=1)
        ]
        return {"history": [self.song(s) for s in history], "recommendations": songs}

    def song(self, song: int) -> dict:
        return {"id": song, "title": self.index.titles[song], "artist": self.index.artists[song]}


def page_path(dirs: tuple[str, ...] = PAGE_DIRS) -> str:
    """The page's index.html: in the first of `dirs` that has it (a 404 if none does)."""
    for directory in dirs:
        path = os.path.join(directory, "index.html")
        if os.path.isfile(path):
            return path
    raise HTTPException(404, f"the page (index.html) is not in {' or '.join(dirs)}")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def make_app(model: MusicModel, index: names.SongIndex, config: config_lib.Config) -> Any:
    """The FastAPI application answering with `model` over the catalog of `index`."""
    served = Recommender(model, index, config)
    app = fastapi.FastAPI(title="deepcf", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(BadRequest)
    def bad_request(request: fastapi.Request, e: BadRequest) -> JSONResponse:
        return _error(400, str(e))

    @app.exception_handler(RequestValidationError)
    def invalid(request: fastapi.Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ("request",)))
        return _error(400, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(HTTPException)
    def http_error(request: fastapi.Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(page_path(), media_type="text/html")

    @app.get("/v1/models/{name}")
    def status(name: str) -> dict:
        check_name(name)
        ok = {"error_code": "OK", "error_message": ""}
        return {"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": ok}]}

    @app.post("/v1/models/{name}:predict")
    async def predict(name: str, request: fastapi.Request) -> dict:
        check_name(name)
        return await run_in_threadpool(served.predict, await json_body(request))

    @app.post("/recommend")
    async def recommend(request: fastapi.Request) -> dict:
        return await run_in_threadpool(served.recommend, await json_body(request))

    @app.get("/search")
    def search(q: str = "", k: int = 10) -> dict:
        found = index.search(q, _int(k, "k", 1, SEARCH_LIMIT))
        return {"songs": [served.song(s) for s in found]}

    return app


async def json_body(request: fastapi.Request) -> dict:
    """The request's body as a JSON object, whatever its Content-Type says (curl -d sends
    application/x-www-form-urlencoded; TF Serving reads JSON all the same)."""
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def check_name(name: str) -> None:
    if name != MODEL_NAME:  # TF Serving's message for a model it does not have
        raise HTTPException(404, f"Servable not found for request: Latest({name})")


def check_port(host: str, port: int) -> None:
    """Refuses early (ConfigError naming --host/--port) an address nothing can listen on."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise ConfigError(f"--host={host} --port={port}: cannot listen there ({e})") from None


def run(app: Any, host: str, port: int) -> None:
    """Serves `app` on host:port until SIGINT/SIGTERM."""
    logging.info("serving on http://%s:%d/ (Ctrl-C stops)", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
