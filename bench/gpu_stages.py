"""The default pipeline's stages on the GPU, each timed: `python -m stages.<name>` for prepare, select,
finetune, baseline, evaluate and export, with HEADSTART_DEVICE (default: auto, the GPU), on params.yaml
with paths.source set to the Fashion-MNIST folder given. register is left out: it needs MLflow, which a
bare GPU box may not have (bench/gpu.sh runs this where only torch, timm, onnxruntime and the scientific
stack are installed). Checks that finetune reports the device it was asked for.

Run:  python3 bench/gpu_stages.py --source /path/to/fashion-mnist      (called by bench/gpu.sh --stages)
Prints a table and writes bench/results/gpu_stages.json."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("prepare", "select", "finetune", "baseline", "evaluate", "export")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True, help="the Fashion-MNIST folder (four idx .gz files)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/headstart-gpu-stages"), help="outputs go here")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_stages.json")
    args = ap.parse_args(argv)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    keep = {"source": str(args.source.resolve()), "weights_lock": str(ROOT / "weights.lock")}
    raw["paths"] = {k: keep.get(k, str(args.work / v)) for k, v in raw["paths"].items()}
    args.work.mkdir(parents=True, exist_ok=True)
    params = args.work / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    seconds, logs = {}, {}
    for name in STAGES:
        start = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", f"stages.{name}", "--params", str(params)], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        seconds[name] = round(time.perf_counter() - start, 1)
        logs[name] = res.stdout[-1500:]
        print(f"{name}: {seconds[name]} s (exit {res.returncode})", flush=True)
        if res.returncode:
            print(res.stdout[-3000:], res.stderr[-3000:], sep="\n")
            break
    device = next((line for line in logs.get("finetune", "").splitlines() if "device" in line), "")
    metrics = {}
    for name in ("evaluate", "export"):
        path = Path(raw["paths"][f"{name}_metrics"])
        if path.exists():
            metrics[name] = json.loads(path.read_text())
    summary = {
        "device_env": os.environ.get("HEADSTART_DEVICE", "auto"), "finetune_said": device.strip(),
        "stage_seconds": seconds, "training_seconds": round(seconds.get("finetune", 0) + seconds.get("baseline", 0), 1),
        "finetuned_accuracy": metrics.get("evaluate", {}).get("finetuned", {}).get("accuracy"),
        "export_parity": {k: metrics.get("export", {}).get(k) for k in ("worst_tolerance_use", "top1_agreement")},
        "evaluate_tail": logs.get("evaluate", "")[-800:],
    }
    print(json.dumps(summary, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    if len(seconds) < len(STAGES):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
