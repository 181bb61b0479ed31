"""What serving the fine-tuned model costs on this CPU: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime
int8, measured in one process, interleaved (each round times every engine once, so machine noise hits
all of them alike), after warm-up, on real test examples: images or texts, whichever the pipeline made.

Run after `make run` (it reads the pipeline's outputs):  .venv/bin/python bench/serve.py
                   or `make run TASK=text`, then the same command for the text model.
Prints a table and writes the model's entry in bench/results/serve.json (other models' entries are kept).
Times are for the model call alone: preprocessing (resize and normalise; tokenise, each batch padded to
its longest text as a server would) is done beforehand, the same for all engines. Threads: --threads for both."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

# Three engines share 2 cores in one process. Busy-waiting worker threads (OpenMP's for PyTorch,
# ONNX Runtime's spinning pool) would steal the CPU from whichever engine runs next and make the
# interleaved timings measure each other; both are told to sleep when idle instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from stages import zoo
from stages.export import onnx_feed
from stages.modality import adapter
from stages.params import Params
from stages.splits import load_split


def serve_key(meta: dict) -> str:
    """The model's name in serve.json: efficientnet_lite0@80px, all-MiniLM-L6-v2@64tok."""
    arch = meta["architecture"].split(":", 1)[-1].rstrip("/").split("/")[-1]
    pre = meta["preprocessing"]
    return f"{arch}@{pre['max_length']}tok" if pre.get("modality") == "text" else f"{arch}@{pre['image_size']}px"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, help="the run's settings (default: the last run's)")
    ap.add_argument("--rounds", type=int, default=200, help="timed batch-1 requests per engine (default: %(default)s)")
    ap.add_argument("--batch-rounds", type=int, default=20, help="timed batch-64 calls per engine")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve.json"))
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    torch.set_num_threads(args.threads)
    paths = Params.load(args.params).paths
    model, meta = zoo.load_checkpoint(paths.finetuned)
    pre = meta["preprocessing"]
    examples = load_split(paths.prepared, "test").x[:512]
    names = adapter(pre).input_names(pre)

    def session(path: Path):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda feed: s.run(None, feed)[0]

    @torch.inference_mode()
    def eager(feed):
        return model(*(torch.from_numpy(feed[n]) for n in names)).numpy()

    engines = {"pytorch_eager": eager, "onnx_fp32": session(paths.onnx), "onnx_int8": session(paths.onnx_int8)}
    rng = np.random.default_rng(0)

    def timed(batch_size: int, rounds: int) -> dict[str, list[float]]:
        times = {name: [] for name in engines}
        for r in range(args.warmup + rounds):
            start = rng.integers(0, len(examples) - batch_size + 1)
            feed = onnx_feed(examples[start : start + batch_size], pre)  # untimed: the same for every engine
            for name, fn in engines.items():  # interleaved: one call of each engine per round
                t = time.perf_counter()
                fn(feed)
                if r >= args.warmup:
                    times[name].append(time.perf_counter() - t)
        return times

    single, batched = timed(1, args.rounds), timed(64, args.batch_rounds)
    model_name = serve_key(meta)
    row = {}
    for name in engines:
        p50, p95 = (float(np.percentile(single[name], q) * 1e3) for q in (50, 95))
        row[name] = {"p50_ms_b1": p50, "p95_ms_b1": p95, "throughput_b64": 64 / statistics.median(batched[name])}
    base = row["pytorch_eager"]["p50_ms_b1"]
    result = {model_name: {
        "speedup_fp32_b1": base / row["onnx_fp32"]["p50_ms_b1"],
        "speedup_int8_b1": base / row["onnx_int8"]["p50_ms_b1"],
        "engines": row,
        "settings": {"threads": args.threads, "rounds": args.rounds, "batch_rounds": args.batch_rounds,
                     "warmup": args.warmup, "cpu": platform.processor() or platform.machine()},
    }}  # fmt: skip
    print(f"{model_name}, {args.threads} threads, batch-1 p50/p95 over {args.rounds} interleaved requests, "
          f"batch-64 median over {args.batch_rounds}")
    print(f"{'engine':<15}{'p50 ms':>9}{'p95 ms':>9}{'b64 ex/s':>11}{'speedup b1':>12}")
    for name, r in row.items():
        print(f"{name:<15}{r['p50_ms_b1']:>9.2f}{r['p95_ms_b1']:>9.2f}{r['throughput_b64']:>11.0f}"
              f"{base / r['p50_ms_b1']:>11.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(args.out.read_text()) if args.out.exists() else {}
    args.out.write_text(json.dumps({**kept, **result}, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
