"""Serve a task's registered model over HTTP with ONNX Runtime: image files or texts in, labels out.

Run:   make serve NAME=<task> [ALIAS=champion] [PORT=8000]     (the image demo's task by default)
  or:  python -m flows.serve --task my-photos --alias champion
       python -m flows.serve --folder models/onnx              (what the export stage just wrote, no registry)
Then:  curl -s -F files=@cat.png -F files=@dog.jpg localhost:8000/predict
       curl -s -H 'content-type: application/json' -d '{"texts": ["a dog barking"]}' localhost:8000/predict
       curl -s localhost:8000/metadata          (classes and the input contract)   /docs (OpenAPI)   /metrics

What is served is a version's ONNX file and the serving contract export wrote beside it (serving.json:
classes, how an image file is decoded, resized and normalised, or the tokenizer), each checked against the
sha256 recorded on the version at registration before it answers a request. The server imports numpy,
Pillow, tokenizers and ONNX Runtime; never torch.

Following promotions: with --alias, the server asks the registry every --poll-seconds which version holds
the alias (and at once on POST /admin/reload with `Authorization: Bearer $HEADSTART_ADMIN_TOKEN`). A new
version is downloaded, verified and warmed up beside the one serving, then swapped in: requests in flight
finish on the old one, and every response names the version that answered. A version that fails its
checks is refused and the previous one keeps serving.

Limits (each refusal is a 4xx or 503 with a reason in `detail`; the server keeps serving): the body
(--max-body-bytes, chunked uploads too; 413), the time to send it (--read-timeout; 408), the examples per
request (--max-batch; 422), each image's pixels (the training data's prepare.max_pixels; 422 naming the
part), requests in progress (--max-inflight; 503 with Retry-After)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request  # module level: FastAPI resolves handler annotations here
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages import servable
from stages.servable import NotServable, Servable

ADMIN_TOKEN_ENV = "HEADSTART_ADMIN_TOKEN"


# ------------------------------------------------------------------------------------------- API schema


class PredictJSON(BaseModel):
    """A JSON request: exactly one of the three lists."""

    model_config = ConfigDict(extra="forbid")
    images_b64: list[str] | None = Field(None, description="image files (PNG, JPEG, WebP, GIF, BMP, TIFF), base64")
    images: list[list] | None = Field(None, description="images as arrays of whole numbers 0-255, rows x columns "
                                      "(grayscale) or rows x columns x 3 (RGB), at the stored size /metadata gives")
    texts: list[str] | None = Field(None, description="texts, for a text model")


class Prediction(BaseModel):
    label: str = Field(description="the most probable class")
    score: float = Field(description="its probability")
    probabilities: dict[str, float] = Field(description="every class's probability")


class PredictResponse(BaseModel):
    model: str = Field(description="the registered model's name (empty when serving a folder)")
    version: str | None = Field(description="the registered version that answered")
    predictions: list[Prediction] = Field(description="one per example, in request order")


class Problem(BaseModel):
    detail: str


class Metadata(BaseModel):
    model: str
    version: str | None
    alias: str | None
    candidate: str = Field(description="which of the run's models this is: finetuned, scratch, linear_probe, floor")
    architecture: str
    modality: str
    classes: list[str]
    input: dict[str, Any] = Field(description="the input contract (a text model's tokenizer itself omitted)")
    files: dict[str, str] = Field(description="sha256 of the contract and the ONNX file being served")
    max_batch: int


MULTIPART_SCHEMA = {"type": "object", "required": ["files"], "properties": {
    "files": {"type": "array", "items": {"type": "string", "format": "binary"},
              "description": "one part per image file, each named files"}}}
PROBLEMS = {code: {"model": Problem, "description": what} for code, what in {
    408: "the body took longer than --read-timeout to arrive", 413: "the body is over --max-body-bytes",
    415: "not multipart/form-data or application/json", 422: "the examples cannot be used; detail says which",
    503: "--max-inflight requests in progress; retry after Retry-After seconds"}.items()}


# ------------------------------------------------------------------------------------- the model in use


@dataclass
class Current:
    """The servable answering requests now. A request takes `model` once and uses that object to the end,
    so a swap (one reference assignment) never mixes two versions within a request."""

    model: Servable
    folder: Path | None = None  # where its files were downloaded (removed once it is swapped out)


def other_task(serving: Servable, new: Servable) -> str:
    """How `new` differs in task from the model being served ("" when it does not): its modality or classes."""
    if new.modality != serving.modality:
        return f"{new.modality}s where version {serving.version} takes {serving.modality}s"
    if new.classes != serving.classes:
        return f"classes {new.classes} where version {serving.version} has {serving.classes}"
    return ""


class Follower:
    """Keeps `current` on the version that holds the alias: polled, or at once via refresh()."""

    def __init__(self, current: Current, store: Any, name: str, alias: str, downloads: Path, int8: bool,
                 threads: int, metrics: Metrics) -> None:
        self.current, self.store, self.name, self.alias = current, store, name, alias
        self.downloads, self.int8, self.threads, self.metrics = downloads, int8, threads, metrics
        self.lock = threading.Lock()  # one refresh at a time: the poller and the admin endpoint may race
        self.last_error: str | None = None

    def refresh(self) -> dict[str, Any]:
        from stages.registry import describe_alias, fetch_servable

        with self.lock:
            serving = self.current.model.version
            try:
                found = describe_alias(self.store, self.name, self.alias)
            except Exception as e:  # the registry is down: keep serving what we have
                return self._failed(f"cannot reach the registry: {str(e).splitlines()[0][:200]}", serving)
            if found is None:
                return self._failed(f"no version holds {self.alias!r} now; still serving version {serving}", serving)
            if str(found["version"]) == serving:
                return {"changed": False, "version": serving}
            try:
                model = fetch_servable(self.store, self.name, self.alias, self.downloads, self.int8, found, self.threads)
                switch = other_task(self.current.model, model)
                if switch and found["tags"].get(f"{self.alias}.forced") != "true":
                    shutil.rmtree(self.downloads / f"v{model.version}", ignore_errors=True)
                    raise NotServable(
                        f"it is another task ({switch}) than version {serving}, "
                        f"which clients of {self.name}@{self.alias} send their inputs for; to switch tasks, promote "
                        f"it with a reason: python -m flows.promote {found['version']} --model {self.name} "
                        f"--alias {self.alias} --force --reason '...'")
                model.warm_up()
            except (NotServable, LookupError, OSError, ValueError) as e:
                return self._failed(f"version {found['version']} refused: {e}", serving)
            old = self.current.folder
            self.current.model, self.current.folder = model, self.downloads / f"v{model.version}"
            self.metrics.swapped(model)
            self.last_error = None
            print(f"{self.name}@{self.alias}: now serving version {model.version} (was {serving})", flush=True)
            if old is not None and old != self.current.folder:
                shutil.rmtree(old, ignore_errors=True)  # its session holds the model in memory already
            return {"changed": True, "version": model.version, "previous": serving}

    def _failed(self, reason: str, serving: str | None) -> dict[str, Any]:
        self.metrics.reload_failures.inc()
        if reason != self.last_error:
            print(f"{self.name}@{self.alias}: {reason}", file=sys.stderr, flush=True)
        self.last_error = reason
        return {"changed": False, "version": serving, "error": reason}

    def poll(self, seconds: float, stop: threading.Event) -> None:
        while not stop.wait(seconds):
            self.refresh()


class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps in one process don't collide)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("headstart_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram("headstart_request_seconds", "time to answer, by endpoint", ["endpoint"],
                                 registry=self.registry,
                                 buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30))
        self.examples = Counter("headstart_examples", "examples predicted", registry=self.registry)
        self.inflight = Gauge("headstart_inflight_requests", "predict requests in progress", registry=self.registry)
        self.version = Gauge("headstart_model_version", "the registered version serving (0: a folder)",
                             ["model"], registry=self.registry)
        self.swaps = Counter("headstart_model_swaps", "versions swapped in after a promotion", registry=self.registry)
        self.reload_failures = Counter("headstart_reload_failures",
                                       "alias checks that kept the old version (registry down, version refused)",
                                       registry=self.registry)

    def swapped(self, model: Servable) -> None:
        self.swaps.inc()
        self.show(model)

    def show(self, model: Servable) -> None:
        self.version.clear()
        self.version.labels(model.name or "-").set(float(model.version or 0))

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Batcher:
    """Predictions in one worker thread, several requests at a time: the requests that arrive while the
    model is busy are predicted together in its next call (up to `max_examples` examples), so under
    concurrent load each call does more work for the same per-call cost, and with one request at a time
    nothing waits for company. Requests are only grouped with others for the same model object, so a
    swap never mixes versions."""

    def __init__(self, max_examples: int) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.max_examples = max_examples
        threading.Thread(target=self._work, name="predict", daemon=True).start()

    async def predict(self, model: Servable, examples: Any) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.jobs.put((model, examples, future, loop))
        return await future

    def _work(self) -> None:
        held = None
        while True:
            group = [held or self.jobs.get()]
            held, n = None, len(group[0][1])
            while n < self.max_examples:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job[0] is not group[0][0] or n + len(job[1]) > self.max_examples:
                    held = job
                    break
                group.append(job)
                n += len(job[1])
            model = group[0][0]
            try:
                batch = ([t for job in group for t in job[1]] if model.modality == "text"
                         else np.concatenate([job[1] for job in group]))
                answers, start = model.predict(batch), 0
                for _, examples, future, loop in group:
                    loop.call_soon_threadsafe(_settle, future, answers[start : start + len(examples)], None)
                    start += len(examples)
            except Exception as e:  # noqa: BLE001 - handed to each waiting request, which answers 500
                for _, _, future, loop in group:
                    loop.call_soon_threadsafe(_settle, future, None, e)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if not future.done():  # the client may have gone away meanwhile
        future.set_exception(error) if error is not None else future.set_result(result)


# ------------------------------------------------------------------------------------------ the limits


class Guard:
    """Plain ASGI middleware, outermost: counts and times every request, refuses a predict request over
    --max-inflight with 503 before reading it, and reads each body whole under the byte cap and the read
    timeout (a chunked body declares no length, so the cap is checked as the bytes arrive) before the app
    sees it."""

    ROUTES = ("/predict", "/metadata", "/health", "/metrics", "/admin/reload", "/docs", "/openapi.json")

    def __init__(self, app: Any, metrics: Metrics, max_body: int, read_timeout: float, max_inflight: int) -> None:
        self.app, self.metrics = app, metrics
        self.max_body, self.read_timeout, self.max_inflight = max_body, read_timeout, max_inflight
        self.inflight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self.ROUTES else "other"
        start, status = time.perf_counter(), [500]

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        counted = False
        try:
            if endpoint == "/predict":
                if self.inflight >= self.max_inflight:
                    await _problem(send_counted, 503, f"{self.inflight} requests in progress (--max-inflight "
                                   f"{self.max_inflight}); retry shortly", [(b"retry-after", b"1")])
                    return
                counted = True
                self.inflight += 1
                self.metrics.inflight.set(self.inflight)
            body = await self._read(scope, receive, send_counted)
            if body is None:
                return
            done = False

            async def replay() -> dict:
                nonlocal done
                if not done:
                    done = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_counted)
        finally:
            if counted:
                self.inflight -= 1
                self.metrics.inflight.set(self.inflight)
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def _read(self, scope: dict, receive: Any, send: Any) -> bytes | None:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            await _problem(send, 413, f"request body over {self.max_body} bytes (--max-body-bytes)")
            return None
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.read_timeout):  # the whole body, however it is split
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    size += len(message.get("body", b""))
                    if size > self.max_body:
                        await _problem(send, 413, f"request body over {self.max_body} bytes (--max-body-bytes)")
                        return None
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            await _problem(send, 408, f"the body did not arrive within {self.read_timeout:g} s (--read-timeout)")
            return None


async def _problem(send: Any, code: int, detail: str, headers: list | None = None) -> None:
    body = JSONResponse({"detail": detail}).body
    await send({"type": "http.response.start", "status": code, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------- the app


def create_app(current: Current, follower: Follower | None = None, *, max_batch: int = 64,
               max_body_bytes: int = 20_000_000, read_timeout: float = 30.0, max_inflight: int = 64,
               workers: int = 2, admin_token: str | None = None, metrics: Metrics | None = None) -> Any:
    """The ASGI app serving `current.model`; with `follower`, /admin/reload checks the alias at once."""
    metrics = metrics or Metrics()
    metrics.show(current.model)
    # Image decoding runs in this pool and inference in the batcher's thread, never on the event loop: a
    # request being decoded or predicted does not stop others from being read, refused or answered. One
    # inference thread: each ONNX Runtime call already uses every core, and two at once only contend.
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    batcher = Batcher(max_examples=max_batch)
    app = FastAPI(title="headstart model server", version="1",
                  description="Predictions from a registered headstart model (python -m flows.serve --help).")

    @app.get("/health")
    def health() -> dict:
        m = current.model
        return {"status": "ok", "model": m.name, "version": m.version, "modality": m.modality}

    @app.get("/metadata", response_model=Metadata)
    def metadata() -> dict:
        m = current.model
        contract = {k: v for k, v in m.contract["input"].items() if k != "tokenizer"}
        return {"model": m.name, "version": m.version, "alias": m.alias, "candidate": m.contract["model"],
                "architecture": m.contract["architecture"], "modality": m.modality, "classes": m.classes,
                "input": contract, "files": m.contract["files"], "max_batch": max_batch}

    @app.get("/metrics", response_class=Response)
    def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.post("/admin/reload", responses={401: {"model": Problem}, 403: {"model": Problem}})
    async def reload(request: Request) -> dict:
        if admin_token is None:
            raise HTTPException(403, f"the admin endpoint is off: start the server with {ADMIN_TOKEN_ENV} set")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {admin_token}".encode()):
            raise HTTPException(401, "a valid 'Authorization: Bearer <token>' header is required")
        if follower is None:
            raise HTTPException(409, "this server serves a folder, not an alias: nothing to reload")
        return await asyncio.get_running_loop().run_in_executor(None, follower.refresh)

    @app.post("/predict", response_model=PredictResponse, responses=PROBLEMS, openapi_extra={"requestBody": {
        "required": True, "content": {"multipart/form-data": {"schema": MULTIPART_SCHEMA},
                                      "application/json": {"schema": PredictJSON.model_json_schema()}}}})
    async def predict(request: Request) -> JSONResponse:
        model = current.model  # this request's model, whatever is swapped in meanwhile
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            files = await _multipart_files(request, model, max_batch)
            examples = await _run(pool, _decode_all, model, files)
        elif kind == "application/json":
            examples = await _json_examples(await request.body(), model, max_batch, pool)
        else:
            raise HTTPException(415, f"content type {kind or 'none'!r}: send image files as multipart/form-data "
                                "(parts named files) or JSON (application/json) with images_b64, images or texts")
        predictions = await batcher.predict(model, examples)
        metrics.examples.inc(len(predictions))
        # returned as a response, not a dict: FastAPI would validate it against PredictResponse again
        return JSONResponse({"model": model.name, "version": model.version, "predictions": predictions})

    return Guard(app, metrics, max_body_bytes, read_timeout, max_inflight)


async def _run(pool: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


async def _multipart_files(request: Request, model: Servable, max_batch: int) -> list[tuple[str, bytes]]:
    from starlette.datastructures import UploadFile

    if model.modality != "image":
        raise HTTPException(422, "this is a text model: send JSON {\"texts\": [...]}, not files")
    try:
        form = await request.form(max_files=max_batch + 1, max_fields=max_batch + 1)
    except Exception as e:  # the multipart parser's own errors: a broken body, too many parts
        raise HTTPException(422, f"not a readable multipart/form-data body: {e}") from None
    other = sorted({k for k in form.keys() if k != "files"})
    if other:
        raise HTTPException(422, f"unexpected part(s) {', '.join(other)}: send each image as a part named files")
    parts = form.getlist("files")
    if not parts:
        raise HTTPException(422, "no parts named files: send each image file as -F files=@image.png")
    if len(parts) > max_batch:
        raise HTTPException(422, f"{len(parts)} images in one request; at most {max_batch} (--max-batch)")
    out = []
    for i, part in enumerate(parts):
        if not isinstance(part, UploadFile):
            raise HTTPException(422, f"files[{i}] is a form field, not a file: send it with -F files=@path")
        out.append((f"files[{i}] ({part.filename})", await part.read()))
    return out


def _decode_all(model: Servable, files: list[tuple[str, bytes]]) -> np.ndarray:
    images = []
    for where, data in files:
        if not data:
            raise HTTPException(422, f"{where} is empty")
        try:
            images.append(model.decode(data))
        except Exception as e:  # every way a file can be unreadable: say which, and why
            raise HTTPException(422, f"{where} is not a usable image: {type(e).__name__}: {e}") from None
    return np.stack(images)


async def _json_examples(body: bytes, model: Servable, max_batch: int, pool: ThreadPoolExecutor) -> Any:
    try:
        req = PredictJSON.model_validate_json(body)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:5])
        raise HTTPException(422, f"invalid JSON request: {problems}") from None
    given = {k: v for k, v in req.model_dump().items() if v is not None}
    wanted = ("texts",) if model.modality == "text" else ("images_b64", "images")
    if len(given) != 1 or next(iter(given)) not in wanted:
        raise HTTPException(422, f"send exactly one of {' or '.join(wanted)} (this is {model.modality} model)"
                            + (f"; got {', '.join(given)}" if given else ""))
    key, values = next(iter(given.items()))
    if not values:
        raise HTTPException(422, f"{key} is empty: nothing to predict")
    if len(values) > max_batch:
        raise HTTPException(422, f"{len(values)} {key.split('_')[0]} in one request; at most {max_batch} (--max-batch)")
    if key == "texts":
        for i, t in enumerate(values):
            if not t.strip():
                raise HTTPException(422, f"texts[{i}] is empty: there is nothing to classify")
        return values
    if key == "images_b64":
        files = []
        for i, s in enumerate(values):
            try:
                files.append((f"images_b64[{i}]", base64.b64decode(s, validate=True)))
            except (binascii.Error, ValueError):
                raise HTTPException(422, f"images_b64[{i}] is not valid base64") from None
        return await _run(pool, _decode_all, model, files)
    return _arrays(values, model.contract["input"]["decode"]["size"])


def _arrays(raw: list, size: int) -> np.ndarray:
    """Images given as arrays: taken as prepare stores images, size x size, grayscale or RGB, 0-255."""
    try:
        arr = np.asarray(raw, dtype=np.float64)
    except (ValueError, TypeError):
        arr = None
    if arr is None or arr.shape[1:] not in ((size, size), (size, size, 3)):
        got = "ragged or non-numeric" if arr is None else f"{list(arr.shape[1:])}"
        raise HTTPException(422, f"each image array must be [{size}, {size}] or [{size}, {size}, 3] (the stored size; "
                            f"send files for other sizes), got {got}")
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255 or not np.all(arr == np.round(arr)):
        raise HTTPException(422, "pixel values must be whole numbers from 0 to 255")
    return arr.astype(np.uint8)


# ---------------------------------------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--task", help="serve this task's registered model (tasks/<task>.yaml; default: image)")
    src.add_argument("--model", help="serve this registered model name instead of a task's")
    src.add_argument("--folder", type=Path, help="serve the export stage's output folder (serving.json + "
                     "model.onnx), without the registry")
    ap.add_argument("--alias", default="champion", help="the version to serve and follow (default: %(default)s)")
    ap.add_argument("--int8", action="store_true", help="serve the int8 model (when export accepted it)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="for the tracking store's location")
    ap.add_argument("--host", default="127.0.0.1", help="default %(default)s: this machine only")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--poll-seconds", type=float, default=30.0,
                    help="how often to check which version holds the alias; 0: only on POST /admin/reload")
    ap.add_argument("--admin-token-file", type=Path, help=f"a file holding the admin token (else ${ADMIN_TOKEN_ENV}; "
                    "without either, /admin/reload is off)")
    ap.add_argument("--max-batch", type=int, default=64, help="images or texts in one request (default: %(default)s)")
    ap.add_argument("--max-body-bytes", type=int, default=20_000_000, help="default: %(default)s")
    ap.add_argument("--read-timeout", type=float, default=30.0, help="seconds to send a body (default: %(default)s)")
    ap.add_argument("--max-inflight", type=int, default=64, help="predict requests in progress before 503s")
    ap.add_argument("--workers", type=int, default=2, help="image decoding threads (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per call (default: all cores)")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a server's log is not a terminal

    token = (args.admin_token_file.read_text().strip() if args.admin_token_file else os.environ.get(ADMIN_TOKEN_ENV))
    follower, stop = None, threading.Event()
    onnx_name = "model_int8.onnx" if args.int8 else "model.onnx"
    try:
        if args.folder:
            current = Current(servable.load(args.folder, onnx_name, threads=args.threads))
            where = f"{args.folder} ({current.model.contract['model']})"
        else:
            from stages.params import Params
            from stages.registry import Store, fetch_servable

            from flows.tasks import registered_name

            name = args.model or registered_name(args.task or "image")
            paths = Params.load(args.params).paths
            store = Store(paths.mlflow_db, paths.mlflow_artifacts)
            downloads = Path(tempfile.mkdtemp(prefix="headstart-serve-"))
            model = fetch_servable(store, name, args.alias, downloads, args.int8, threads=args.threads)
            current = Current(model, downloads / f"v{model.version}")
            metrics = Metrics()
            follower = Follower(current, store, name, args.alias, downloads, args.int8, args.threads, metrics)
            where = f"{name}@{args.alias}: version {model.version} ({model.contract['model']})"
        current.model.warm_up()
    except (NotServable, LookupError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None

    import uvicorn

    app = create_app(current, follower, max_batch=args.max_batch, max_body_bytes=args.max_body_bytes,
                     read_timeout=args.read_timeout, max_inflight=args.max_inflight, workers=args.workers,
                     admin_token=token, metrics=follower.metrics if follower else None)
    if follower is not None and args.poll_seconds > 0:
        threading.Thread(target=follower.poll, args=(args.poll_seconds, stop), daemon=True).start()
    print(f"serving {where} on http://{args.host}:{args.port} ({current.model.modality}s; /docs for the API)",
          flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=5,
                    timeout_graceful_shutdown=10)
    finally:
        stop.set()
        if follower is not None:
            shutil.rmtree(follower.downloads, ignore_errors=True)


if __name__ == "__main__":
    main()
