"""Serve a task's registered model over HTTP with ONNX Runtime: image files or texts in, labels out.

Run:   make serve NAME=<task> [ALIAS=champion] [PORT=8000]     (the image demo's task by default)
  or:  python -m ops.serve --task my-photos --alias champion
       python -m ops.serve --folder models/onnx              (what the export stage just wrote, no registry)
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
import os
import shutil
import tempfile
import threading
from pathlib import Path

from ops.follower import Current, Follower
from ops.serving_app import ADMIN_TOKEN_ENV, Metrics, create_app
from stages import servable
from stages.servable import NotServable


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
