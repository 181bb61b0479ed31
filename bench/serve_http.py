"""The model server under load: the real HTTP server (python -m ops.serve, as a separate process) driven
by concurrent clients, next to raw in-process ONNX Runtime on the same examples, measured in one run.

Run after `make run` (it serves what the export stage wrote, models/onnx, without the registry):
    .venv/bin/python bench/serve_http.py                 (or: make bench-http; NAME=text after make run NAME=text)
Prints a table and writes the model's entry in bench/results/serve_http.json (other models' entries kept).

Requests are what a user sends: each image of the test split as a PNG file (multipart/form-data, one
image per request) at the size prepare stored it, or one text per request as JSON. For each concurrency,
C clients each send a request as soon as their last one was answered, for --seconds after a warm-up;
requests/s counts answered requests (any non-200 is an error and reported). Raw ONNX Runtime is batch 1
too, in one thread: `raw_model` the session.run call alone on preprocessed input, `raw_pipeline` plus the
decoding and preprocessing the server also does. The client runs on the same machine and takes some of
its CPU: on a 2-core machine that is part of what the ratio measures."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


from stages import servable
from stages.params import Params
from stages.splits import load_split


def serve_key(contract: dict) -> str:
    """efficientnet_lite0@80px, all-MiniLM-L6-v2@64tok: the model's name in serve_http.json."""
    arch = contract["architecture"].split(":", 1)[-1].rstrip("/").split("/")[-1]
    inp = contract["input"]
    return f"{arch}@{inp['max_length']}tok" if contract["modality"] == "text" else f"{arch}@{inp['image_size']}px"


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def raw(model: servable.Servable, requests: list, seconds: float) -> dict[str, float]:
    """Batch-1 throughput in this process: the model call alone, and with decoding and preprocessing."""
    text = model.modality == "text"
    feeds = [model.feed([r] if text else model.decode(r)[None]) for r in requests[:200]]
    out = {}
    for name, call in (("raw_model", lambda i: model.session.run(["logits"], feeds[i % len(feeds)])),
                       ("raw_pipeline", lambda i: model.predict([requests[i % len(requests)]] if text else
                                                                model.decode(requests[i % len(requests)])[None]))):
        for i in range(20):
            call(i)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            call(n)
            n += 1
        out[name] = n / (time.perf_counter() - start)
    return out


async def load(base: str, requests: list, text: bool, concurrency: int, seconds: float, warmup: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(10**9))
    timeout = aiohttp.ClientTimeout(total=60)

    async def client(session: aiohttp.ClientSession, until: float, record: bool) -> None:
        while time.perf_counter() < until:
            i = next(counter) % len(requests)
            if text:
                kwargs = {"json": {"texts": [requests[i]]}}
            else:
                form = aiohttp.FormData()
                form.add_field("files", requests[i], filename=f"{i}.png", content_type="image/png")
                kwargs = {"data": form}
            t = time.perf_counter()
            async with session.post(f"{base}/predict", **kwargs) as r:
                await r.read()
                if record:
                    latencies.append(time.perf_counter() - t)
                    if r.status != 200:
                        errors[str(r.status)] = errors.get(str(r.status), 0) + 1

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        await asyncio.gather(*(client(session, time.perf_counter() + warmup, False) for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(client(session, start + seconds, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {"requests_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)),
            "requests": len(latencies), "errors": errors}


WRK_SCRIPT = """
local bodies, n, i = {}, 0, 0
function init(args)
  local ctype = args[1]
  for k = 2, #args do
    local f = assert(io.open(args[k], "rb")); bodies[#bodies + 1] = f:read("*a"); f:close()
  end
  n = #bodies
  wrk.method = "POST"; wrk.headers["Content-Type"] = ctype
end
function request()
  i = i % n + 1
  return wrk.format(nil, "/predict", nil, bodies[i])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %f %f %f %f %d %d\\n", summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1e3, latency:percentile(95) / 1e3, latency:percentile(99) / 1e3,
    e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def wrk(base: str, bodies: list[bytes], content_type: str, concurrency: int, seconds: float, warmup: float,
        folder: Path) -> dict:
    """Debian's wrk (C, one thread): takes little of the CPU the server needs. Closed loop like the Python
    client: each connection sends its next request when the last one is answered."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "post.lua").write_text(WRK_SCRIPT)
    files = []
    for k, body in enumerate(bodies):
        (folder / f"{k}.bin").write_bytes(body)
        files.append(str(folder / f"{k}.bin"))

    def once(duration: float) -> list[str]:
        cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--timeout", "60s",
               "-s", str(folder / "post.lua"), base, "--", content_type, *files]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1:]

    once(warmup)
    n, secs, p50, p95, p99, status_errors, socket_errors = once(seconds)
    errors = {k: int(v) for k, v in (("non-200", status_errors), ("socket", socket_errors)) if int(v)}
    return {"requests_per_s": int(n) / float(secs), "p50_ms": float(p50), "p95_ms": float(p95),
            "p99_ms": float(p99), "requests": int(n), "errors": errors}


def request_bodies(requests: list, text: bool) -> tuple[list[bytes], str]:
    """What each request sends, encoded once: a multipart form with one image file, or a JSON text."""
    if text:
        return [json.dumps({"texts": [t]}).encode() for t in requests], "application/json"
    boundary = "headstartbench"
    bodies = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{k}.png\"\r\n"
               "Content-Type: image/png\r\n\r\n").encode() + r + f"\r\n--{boundary}--\r\n".encode()
              for k, r in enumerate(requests)]
    return bodies, f"multipart/form-data; boundary={boundary}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, help="the run's settings (default: the last run's)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per concurrency (default: %(default)s)")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--examples", type=int, default=500, help="distinct test examples sent, round robin")
    ap.add_argument("--client", choices=("wrk", "python"), default="wrk" if shutil.which("wrk") else "python",
                    help="Debian's wrk (default when installed: apt-get install wrk) or an aiohttp client")
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve_http.json"))
    ap.add_argument("server_args", nargs="*", help="after --: more options for python -m ops.serve")
    args = ap.parse_args()

    paths = Params.load(args.params).paths
    folder = Path(paths.serving).parent
    model = servable.load(folder)
    text = model.modality == "text"
    test = load_split(paths.prepared, "test").x[: args.examples]
    requests = [str(t) for t in test] if text else [png(x) for x in test]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "ops.serve", "--folder", str(folder), "--port", str(port), *args.server_args,
           "--max-inflight", str(max(args.concurrency) * 2)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import urllib.request

        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.5)
        rows = {}
        bodies, content_type = request_bodies(requests, text)
        with tempfile.TemporaryDirectory() as tmp:
            for c in args.concurrency:
                rows[c] = (wrk(base, bodies, content_type, c, args.seconds, args.warmup, Path(tmp))
                           if args.client == "wrk" else asyncio.run(load(base, requests, text, c, args.seconds, args.warmup)))
                print(f"  concurrency {c}: {rows[c]['requests_per_s']:.1f} req/s", flush=True)
    finally:
        server.terminate()
        server.wait(30)
    baseline = raw(model, requests, args.seconds)  # after the server is gone: it would share the cores

    key = serve_key(model.contract)
    print(f"\n{key}: HTTP server (1 image or text per request, client {args.client}) vs raw ONNX Runtime batch 1, "
          f"{os.cpu_count()} cores")
    print(f"raw ONNX Runtime: model call {baseline['raw_model']:.1f}/s, with decoding and preprocessing "
          f"{baseline['raw_pipeline']:.1f}/s")
    print(f"{'clients':>8}{'req/s':>9}{'x raw':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'p99/p50':>9}{'errors':>8}")
    for c, r in rows.items():
        r["ratio_to_raw_model"] = r["requests_per_s"] / baseline["raw_model"]
        r["ratio_to_raw_pipeline"] = r["requests_per_s"] / baseline["raw_pipeline"]
        print(f"{c:>8}{r['requests_per_s']:>9.1f}{r['ratio_to_raw_model']:>8.2f}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}"
              f"{r['p99_ms']:>9.2f}{r['p99_ms'] / r['p50_ms']:>9.2f}{sum(r['errors'].values()):>8}")
    result = {key: {"raw": baseline, "http": {str(c): r for c, r in rows.items()},
                    "settings": {"seconds": args.seconds, "warmup": args.warmup, "examples": len(requests),
                                 "cores": os.cpu_count(), "client": args.client, "cpu": platform.processor() or platform.machine(),
                                 "server": "python -m ops.serve defaults (one batching inference thread, all cores per call; 2 decoding threads)"}}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(args.out.read_text()) if args.out.exists() else {}
    args.out.write_text(json.dumps({**kept, **result}, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
