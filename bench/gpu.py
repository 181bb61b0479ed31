"""Training speed of headstart's loop (stages/train.py `fit`) against a minimal plain-PyTorch loop on the
same model, data, optimiser, schedule and precision, measured side by side in one process.

Run on a GPU box (needs only torch, timm, numpy, tqdm, safetensors: no prefect, mlflow or dvc, no network):
    bash bench/gpu.sh                 # image model at 224 px, a few hundred steps each; under 5 minutes on an H100
    bash bench/gpu.sh --cpu-tiny      # a few steps at 32 px on CPU: checks the script runs (tests do this)
Prints a table and writes bench/results/gpu.json. Random weights: speed does not depend on them.
The text model is not measured yet: headstart's text path comes with the text-models issue."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


from stages import zoo
from stages.predict import device
from stages.splits import Split, to_model_input
from stages.strategy import Plan
from stages.params import FinetuneParams
from stages.train import fit


def synthetic(n: int, side: int, classes: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    return Split(x=rng.integers(0, 256, (n, side, side), dtype=np.uint8), y=rng.integers(0, classes, n).astype(np.int64))


def peak_memory_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (Linux: KiB)


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def plain_loop(model: nn.Module, train: Split, pre: dict, cfg: FinetuneParams, dev: torch.device) -> float:
    """The loop a person would write by hand: same optimiser, schedule, precision and memory format;
    no validation, no early stopping, no progress bar. Returns seconds for cfg.epochs epochs."""
    cuda = dev.type == "cuda"
    model.to(dev, memory_format=torch.channels_last).train()  # as fit does, on every device
    x = to_model_input(train.x, pre).to(dev)
    y = torch.from_numpy(train.y).to(dev)
    steps = math.ceil(len(y) / cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps, pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if cuda:
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(y), device=dev)
        for i in range(steps):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb = x[idx].contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                loss = loss_fn(model(xb).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    if cuda:
        torch.cuda.synchronize(dev)
    return time.perf_counter() - start


def measure(name: str, side: int, image_size: int, n_train: int, batch: int, epochs: int, seed: int = 0) -> list[dict]:
    dev = device()
    pre = zoo.preprocessing(name, image_size)
    train, val = synthetic(n_train, side, 10, seed), synthetic(10, side, 10, seed + 1)
    cfg = FinetuneParams(epochs=epochs, batch_size=batch, lr=1e-3, weight_decay=0.01,
                         patience=epochs + 1, seed=seed, augment="none", label_smoothing=0.1)
    steps = epochs * math.ceil(n_train / batch)
    rows = []
    for loop in ("plain PyTorch", "headstart fit"):
        torch.manual_seed(seed)
        model = zoo.build(name, 10, pre)
        warm = dataclasses.replace(cfg, epochs=1)
        plain_loop(model, synthetic(8 * batch, side, 10, 9), pre, warm, dev)  # warm-up: kernels, allocator
        reset_peak(dev)
        if loop == "plain PyTorch":
            seconds = plain_loop(model, train, pre, cfg, dev)
        else:
            result = fit(model, train, val, pre, cfg, Plan.of(model), desc="bench")
            # fit's own clock includes its per-epoch validation on the 10 validation images
            seconds = result.seconds
        rows.append({"model": f"{name} @ {image_size} px", "loop": loop, "device": str(dev),
                     "images_per_s": round(epochs * n_train / seconds, 1),
                     "step_ms": round(1000 * seconds / steps, 2), "peak_memory_mb": round(peak_memory_mb(dev), 1),
                     "steps": steps, "batch": batch})
    rows[1]["vs_plain"] = round(rows[1]["images_per_s"] / rows[0]["images_per_s"], 3)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-tiny", action="store_true", help="a few steps at 32 px: checks the script works")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu.json")
    args = ap.parse_args(argv)
    if args.cpu_tiny:
        rows = measure("efficientnet_lite0", 28, 32, n_train=64, batch=8, epochs=1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu-tiny, or on a GPU machine")
        torch.backends.cudnn.benchmark = True
        rows = measure("efficientnet_lite0", 28, 224, n_train=4096, batch=128, epochs=3)
    cols = ["model", "loop", "device", "images_per_s", "step_ms", "peak_memory_mb", "vs_plain"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    print("text model: not measured (headstart's text path is not built yet)")
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "rows": rows, "tiny": args.cpu_tiny}, indent=2) + "\n")


if __name__ == "__main__":
    main()
