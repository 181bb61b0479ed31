"""Serve an exported model over HTTP with ONNX Runtime: the minimal server a team can put behind a proxy.

Run:  python -m flows.serve --alias champion              (the version the registry calls champion)
      python -m flows.serve --checkpoint models/finetuned --onnx models/onnx/model.onnx
Then: curl -s localhost:8000/health
      curl -s -X POST localhost:8000/predict -H 'content-type: application/json' \\
           -d '{"images": [[[0, 0, ...28 values...], ...28 rows...]]}'

An alias is resolved to a concrete version once, at start-up, and every response names that version.
Requests are validated before any inference: a body larger than --max-body-bytes is refused (413),
as is a batch over --max-batch or an image of the wrong shape or value range (422)."""

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
    """An ONNX model plus the preprocessing and class names from its headstart checkpoint JSON."""

    def __init__(self, checkpoint_json: Path, onnx_path: Path, version: str | None = None) -> None:
        from stages.export import safe_session

        meta = json.loads(Path(checkpoint_json).read_text())
        self.classes: list[str] = meta["classes"]
        self.pre: dict = meta["preprocessing"]
        if self.pre.get("modality") == "text":
            raise SystemExit("this server takes images; serving a text model (tokenizer in front of the ONNX "
                             "graph) is not built yet. The ONNX file takes input_ids and attention_mask from the "
                             "tokenizer saved in the model's checkpoint folder.")
        self.input_shape = tuple(meta.get("input_shape", (28, 28)))
        self.version = version
        self.onnx_path = str(onnx_path)
        self.session = safe_session(Path(self.onnx_path))

    def predict(self, images: np.ndarray) -> list[dict[str, Any]]:
        from stages.data import to_model_input

        logits = self.session.run(None, {"input": to_model_input(images, self.pre).numpy()})[0]
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
        return {"status": "ok", "model_version": service.version, "onnx": service.onnx_path,
                "classes": service.classes, "input_shape": list(service.input_shape)}

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        body = await request.body()
        if len(body) > max_body_bytes:  # chunked bodies declare no length: check what arrived
            raise HTTPException(413, f"request body over {max_body_bytes} bytes")
        try:
            payload = json.loads(body)
        except json.JSONDecodeError as e:
            raise HTTPException(422, f"body is not JSON: {e}") from None
        if not isinstance(payload, dict) or "images" not in payload:
            raise HTTPException(422, "body must be a JSON object with the key 'images'")
        try:
            images = validate_images(payload["images"], service.input_shape, max_batch)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return {"model_version": service.version, "predictions": service.predict(images)}

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
    ap.add_argument("--max-batch", type=int, default=64)
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
