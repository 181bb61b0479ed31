"""Serve an exported model over HTTP with ONNX Runtime: the minimal server a team can put behind a proxy.

Run:  python -m flows.serve --alias champion              (the version the registry calls champion)
      python -m flows.serve --checkpoint models/finetuned --onnx models/onnx/model.onnx
Then: curl -s localhost:8000/health
      curl -s -X POST localhost:8000/predict -H 'content-type: application/json' \\
           -d '{"images": [[[0, 0, ...28 values...], ...28 rows...]]}'
A text model takes texts instead, tokenised with the tokenizer saved in its checkpoint:
      curl -s -X POST localhost:8000/predict -H 'content-type: application/json' \\
           -d '{"texts": ["a domestic animal that barks", "a baked food made of flour"]}'

An alias is resolved to a concrete version once, at start-up, and every response names that version.
Requests are validated before any inference: a body larger than --max-body-bytes is refused (413),
as is a batch over --max-batch, an image of the wrong shape or value range, or a text that is not a
non-empty string (422). Texts longer than the model's max_length tokens are truncated, as in training."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request  # module level: FastAPI resolves handler annotations here
from fastapi.responses import JSONResponse


class ModelService:
    """An ONNX model plus the preprocessing and class names from its headstart checkpoint JSON (and, for a
    text model, the tokenizer files beside it)."""

    def __init__(self, checkpoint_json: Path, onnx_path: Path, version: str | None = None) -> None:
        from stages import zoo
        from stages.export import safe_session

        meta = zoo.checkpoint_meta(Path(checkpoint_json).parent)  # a text model's tokenizer files: that folder
        self.classes: list[str] = meta["classes"]
        self.pre: dict = meta["preprocessing"]
        self.text = self.pre.get("modality") == "text"
        if self.text:
            from stages.text import tokenizer

            try:  # at start-up, not at the first request: a server without its tokenizer should not start
                tokenizer(self.pre["files"])
            except (OSError, ValueError) as e:
                raise SystemExit(f"{checkpoint_json}: the text model's tokenizer files are not in "
                                 f"{self.pre['files']} ({e}); serve a checkpoint folder as the finetune stage "
                                 f"wrote it, or a registered version with --alias") from None
        self.input_key = "texts" if self.text else "images"
        self.input_shape = None if self.text else tuple(meta.get("input_shape", (28, 28)))
        self.version = version
        self.onnx_path = str(onnx_path)
        self.session = safe_session(Path(self.onnx_path))

    def validate(self, raw: Any, max_batch: int) -> np.ndarray:
        if self.text:
            return validate_texts(raw, max_batch)
        return validate_images(raw, self.input_shape, max_batch)

    def predict(self, examples: np.ndarray) -> list[dict[str, Any]]:
        from stages.export import onnx_feed

        logits = self.session.run(["logits"], onnx_feed(examples, self.pre))[0]
        z = np.exp(logits - logits.max(1, keepdims=True))
        probs = z / z.sum(1, keepdims=True)
        return [
            {"label": int(i), "class": self.classes[int(i)], "probability": float(p[i])}
            for i, p in zip(logits.argmax(1), probs, strict=True)
        ]


def validate_images(raw: Any, shape: tuple[int, int], max_batch: int) -> np.ndarray:
    """The request's images as a uint8 array, or ValueError saying what is wrong with them."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("'images' must be a non-empty list of images (each a list of rows of pixel values)")
    if len(raw) > max_batch:
        raise ValueError(f"{len(raw)} images in one request; at most {max_batch}")
    try:
        arr = np.asarray(raw, dtype=np.float64)
    except (ValueError, TypeError):
        raise ValueError(f"images must be numeric arrays of shape {list(shape)}") from None
    if arr.shape[1:] != shape:
        raise ValueError(f"each image must have shape {list(shape)} (rows x columns), got {list(arr.shape[1:])}")
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255 or not np.all(arr == np.round(arr)):
        raise ValueError("pixel values must be whole numbers from 0 to 255")
    return arr.astype(np.uint8)


def validate_texts(raw: Any, max_batch: int) -> np.ndarray:
    """The request's texts as an object array, or ValueError saying what is wrong with them."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("'texts' must be a non-empty list of strings")
    if len(raw) > max_batch:
        raise ValueError(f"{len(raw)} texts in one request; at most {max_batch}")
    for i, t in enumerate(raw):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}] is {type(t).__name__}, not a string")
        if not t.strip():
            raise ValueError(f"texts[{i}] is empty: there is nothing to classify")
    return np.array(raw, dtype=object)


def create_app(service: ModelService, max_batch: int = 64, max_body_bytes: int = 2_000_000):
    app = FastAPI(title="headstart model server")

    @app.middleware("http")
    async def cap_body(request: Request, call_next):
        # Refuse before reading: a declared size over the cap, or a body that grows past it.
        declared = request.headers.get("content-length")
        if declared is not None and int(declared) > max_body_bytes:
            return JSONResponse({"detail": f"request body over {max_body_bytes} bytes"}, status_code=413)
        return await call_next(request)

    @app.get("/health")
    def health() -> dict:
        shape = ({"max_length": service.pre["max_length"]} if service.text
                 else {"input_shape": list(service.input_shape)})
        return {"status": "ok", "model_version": service.version, "onnx": service.onnx_path,
                "classes": service.classes, "input": service.input_key, **shape}

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        body = await request.body()
        if len(body) > max_body_bytes:  # chunked bodies declare no length: check what arrived
            raise HTTPException(413, f"request body over {max_body_bytes} bytes")
        try:
            payload = json.loads(body)
        except json.JSONDecodeError as e:
            raise HTTPException(422, f"body is not JSON: {e}") from None
        key = service.input_key
        if not isinstance(payload, dict) or key not in payload:
            other = "images" if service.text else "texts"
            hint = ""
            if isinstance(payload, dict) and other in payload:
                hint = f" (this is {'a text' if service.text else 'an image'} model; it does not take '{other}')"
            raise HTTPException(422, f"body must be a JSON object with the key '{key}'{hint}")
        try:
            examples = service.validate(payload[key], max_batch)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return {"model_version": service.version, "predictions": service.predict(examples)}

    return app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--alias", help="serve the registered version with this alias, e.g. champion")
    src.add_argument("--checkpoint", type=Path, help="a headstart checkpoint folder (for model.json)")
    ap.add_argument("--onnx", type=Path, help="with --checkpoint: the ONNX file to serve")
    ap.add_argument("--int8", action="store_true", help="with --alias: serve the int8 model (if export accepted it)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-batch", type=int, default=64, help="images or texts in one request (default: %(default)s)")
    ap.add_argument("--max-body-bytes", type=int, default=2_000_000)
    args = ap.parse_args(argv)

    if args.alias:
        from stages.params import Params
        from stages.register import Store, fetch_alias

        params = Params.load(args.params)
        store = Store(params.paths.mlflow_db, params.paths.mlflow_artifacts)
        folder = Path(tempfile.mkdtemp(prefix="headstart-serve-"))
        version, checkpoint_json, onnx_path = fetch_alias(store, params.register.model_name, args.alias, folder, args.int8)
        print(f"{params.register.model_name}@{args.alias} is version {version}: serving {onnx_path.name}")
    else:
        if args.onnx is None:
            ap.error("--checkpoint needs --onnx")
        version, checkpoint_json, onnx_path = None, args.checkpoint / "model.json", args.onnx

    import uvicorn

    service = ModelService(checkpoint_json, onnx_path, version)
    uvicorn.run(create_app(service, args.max_batch, args.max_body_bytes), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
