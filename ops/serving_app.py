"""The model server's ASGI app: the API schema, the endpoints (/predict, /metadata, /health, /metrics,
/admin/reload), reading and checking each request's examples, the Prometheus metrics, and Guard, the
middleware that enforces the limits (body size, read time, requests in progress). ops/serve.py starts it."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request  # module level: FastAPI resolves handler annotations here
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ops.batcher import Batcher
from ops.follower import Current, Follower
from stages.servable import Servable

ADMIN_TOKEN_ENV = "HEADSTART_ADMIN_TOKEN"


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
                  description="Predictions from a registered headstart model (python -m ops.serve --help).")

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

    if not model.adapter.ACCEPTS_FILES:
        field = model.adapter.REQUEST_FIELDS[0]
        raise HTTPException(422, f'this is a {model.modality} model: send JSON {{"{field}": [...]}}, not files')
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
    wanted = model.adapter.REQUEST_FIELDS
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
