"""How much fp32 logits legitimately vary with the CPU's kernels: the figures export's parity rule is built on.

The same checkpoint runs in PyTorch under three oneDNN instruction sets (ONEDNN_MAX_CPU_ISA unset, AVX2,
SSE41; one process each, since oneDNN reads the variable once) and with 1 and 2 threads, on the same test
examples; ONNX Runtime runs the exported file. Every pair is compared with export's per-example measure
(stages.export.row_deviation: largest |diff| over the logits / (1 + max |logit|)), and so is PyTorch fp32
against the same network in float64 (`fp32_spread`, what the export stage measures on every run).

Run after `make run` (or point --model/--onnx/--prepared at any checkpoint, ONNX file and prepared data; a
missing ONNX file is exported first):
    .venv/bin/python bench/parity.py [--examples 512]
Prints a table and writes bench/results/parity-<model>@<input size>.json."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


ISAS = ("default", "AVX2", "SSE41")


def worker(model_dir: Path, onnx_path: Path, prepared: Path, n: int, threads: int, out: Path) -> None:
    import torch

    from stages import zoo
    from stages.export import exact_logits, onnx_logits
    from stages.predict import predict
    from stages.splits import load_split

    torch.set_num_threads(threads)
    model, meta = zoo.load_checkpoint(model_dir)
    pre = meta["preprocessing"]
    x = load_split(prepared, "test").x[:n]
    arrays = {"torch": predict(model, x, pre)}
    if os.environ.get("ONEDNN_MAX_CPU_ISA") is None and threads == 2:  # once: they do not use oneDNN's ISA
        arrays["fp64"] = exact_logits(model, x, pre, 256)
        arrays["onnx"] = onnx_logits(onnx_path, x, pre, 256)
    np.savez(out, **arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: paths.finetuned)")
    parser.add_argument("--onnx", type=Path, default=None, help="ONNX file (default: paths.onnx)")
    parser.add_argument("--prepared", type=Path, default=None, help="prepared data (default: paths.prepared)")
    parser.add_argument("--examples", type=int, default=512, help="test examples compared (default: %(default)s)")
    parser.add_argument("--worker", nargs=2, metavar=("THREADS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from stages.params import Params

    paths = Params.load().paths
    model, onnx_path = args.model or paths.finetuned, args.onnx or paths.onnx
    prepared = args.prepared or paths.prepared
    if args.worker:
        worker(model, onnx_path, prepared, args.examples, int(args.worker[0]), Path(args.worker[1]))
        return

    from stages.export import row_deviation

    logits: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not Path(onnx_path).exists():  # e.g. a model whose export was refused: export it here to look
            from stages import zoo
            from stages.export import export_onnx

            net, meta = zoo.load_checkpoint(model)
            onnx_path = Path(tmp) / "model.onnx"
            export_onnx(net, meta["preprocessing"], onnx_path, Params.load().export.opset)
        for isa, threads in itertools.product(ISAS, (2, 1)):
            env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
            if isa != "default":
                env["ONEDNN_MAX_CPU_ISA"] = isa
            out = Path(tmp) / f"{isa}-{threads}.npz"
            subprocess.run([sys.executable, __file__, "--model", str(model), "--onnx", str(onnx_path), "--prepared",
                            str(prepared), "--examples", str(args.examples), "--worker", str(threads), str(out)],
                           env=env, check=True)
            for name, arr in np.load(out).items():
                logits[f"{name} {isa} {threads}t" if name == "torch" else name] = arr
    exact = logits.pop("fp64")
    torch_runs = [k for k in logits if k.startswith("torch")]
    rows = {f"{a} vs {b}": row_deviation(logits[a], logits[b], exact) for a, b in itertools.combinations(torch_runs, 2)}
    rows.update({f"{k} vs fp64": row_deviation(logits[k], exact, exact) for k in logits})
    rows.update({f"onnx vs {k}": row_deviation(logits["onnx"], logits[k], exact) for k in torch_runs})
    cross = max(v.max() for k, v in rows.items() if k.startswith("torch") and "fp64" not in k)
    fp32 = rows["torch default 2t vs fp64"].max()
    onnx = max(v.max() for k, v in rows.items() if k.startswith("onnx vs torch"))
    print(f"{'comparison':<40}{'max':>10}{'p99':>10}{'median':>10}")
    for name, dev in rows.items():
        print(f"{name:<40}{dev.max():>10.2e}{np.quantile(dev, 0.99):>10.2e}{np.median(dev):>10.2e}")
    print(f"PyTorch across ISAs and threads: {cross:.2e}; PyTorch fp32 vs fp64: {fp32:.2e} "
          f"(ratio {cross / fp32:.1f}); ONNX vs PyTorch: {onnx:.2e} ({onnx / fp32:.1f}x the fp32 spread)")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    meta = json.loads((Path(model) / "model.json").read_text())
    arch, pre = meta["architecture"].split(":", 1)[-1].rstrip("/").split("/")[-1], meta["preprocessing"]
    key = f"{arch}@{pre['max_length']}tok" if pre.get("modality") == "text" else f"{arch}@{pre['image_size']}px"
    result = {
        "model": str(model), "architecture": meta["architecture"], "examples": args.examples, "cpu": cpu,
        "comparisons": {k: {"max": float(v.max()), "p99": float(np.quantile(v, 0.99)),
                            "median": float(np.median(v))} for k, v in rows.items()},
        "torch_cross_isa_thread_max": float(cross), "torch_fp32_vs_fp64_max": float(fp32),
        "onnx_vs_torch_max": float(onnx), "onnx_over_fp32_spread": float(onnx / fp32),
    }
    out = Path(__file__).parent / "results" / f"parity-{key}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
