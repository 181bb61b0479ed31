"""headstart's training loop (stages/train.py `fit`) against a bare PyTorch loop on the CPU: same model,
data, batch, optimiser and schedule, augmentation off, measured pair by pair in one process so that the
machine's noise hits both sides alike. The ratio is what counts, not the absolute speed.

Run:  .venv/bin/python bench/loop.py                 # the default task's model and size, 3 pairs
      .venv/bin/python bench/loop.py --pairs 5 --profile   # and where fit spends host time (cProfile)
Prints a table and writes bench/results/loop.json. Random weights and data: speed does not depend on them.

fit's clock includes what a real run pays per epoch and the bare loop does not: validation (on a tenth of
the training size here), the progress bar, the history and the best-weights copy."""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import statistics
import time
from pathlib import Path

import torch


# bench/gpu.py beside this script (Python puts a script's folder first on sys.path): the same bare loop it uses on CUDA
from gpu import plain_loop, synthetic

from stages import zoo
from stages.strategy import Plan
from stages.params import FinetuneParams
from stages.train import fit

OUT = Path(__file__).parent / "results" / "loop.json"


def one_pair(name: str, side: int, image_size: int, n_train: int, batch: int, epochs: int, first: str,
             profile: bool) -> dict:
    pre = zoo.preprocessing(name, image_size)
    train, val = synthetic(n_train, side, 10, 0), synthetic(max(10, n_train // 10), side, 10, 1)
    cfg = FinetuneParams(epochs=epochs, batch_size=batch, lr=1e-3, weight_decay=0.01, patience=epochs + 1, seed=0,
                         augment="none", label_smoothing=0.1)
    out: dict = {}
    for loop in ((first, "fit" if first == "bare" else "bare")):
        torch.manual_seed(0)
        model = zoo.build(name, 10, pre)
        if loop == "bare":
            seconds = plain_loop(model, train, pre, cfg, torch.device("cpu"))
        else:
            prof = cProfile.Profile() if profile else None
            if prof:
                prof.enable()
            start = time.perf_counter()
            fit(model, train, val, pre, cfg, Plan.of(model), desc="bench")
            seconds = time.perf_counter() - start
            if prof:
                prof.disable()
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(15)
                out["profile"] = text.getvalue()
        out[loop] = epochs * n_train / seconds
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=80, help="the default task's model.image_size")
    ap.add_argument("--n-train", type=int, default=640)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="print where fit spends its time (cProfile, by own time)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    # one warm-up of each: first-call costs (kernel selection, allocator) are not the loop's
    one_pair(args.model, 28, args.image_size, 2 * args.batch, args.batch, 1, "bare", False)
    rows = []
    for i in range(args.pairs):
        first = "bare" if i % 2 == 0 else "fit"  # alternate which goes first
        r = one_pair(args.model, 28, args.image_size, args.n_train, args.batch, args.epochs, first,
                     args.profile and i == args.pairs - 1)
        rows.append({"pair": i + 1, "first": first, "bare_images_per_s": round(r["bare"], 1),
                     "fit_images_per_s": round(r["fit"], 1), "ratio": round(r["fit"] / r["bare"], 3)})
        if "profile" in r:
            print(r["profile"])
    ratio = statistics.median(r["ratio"] for r in rows)
    print(f"{args.model} @ {args.image_size} px, batch {args.batch}, {args.n_train} images x {args.epochs} epochs, "
          f"CPU threads {torch.get_num_threads()}")
    print(f"{'pair':>4}  {'first':>5}  {'bare img/s':>10}  {'fit img/s':>9}  {'fit/bare':>8}")
    for r in rows:
        print(f"{r['pair']:>4}  {r['first']:>5}  {r['bare_images_per_s']:>10}  {r['fit_images_per_s']:>9}  {r['ratio']:>8}")
    print(f"median fit/bare: {ratio:.3f} (target >= 0.95)")
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "machine": platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "settings": vars(args) | {"out": str(args.out)}, "pairs": rows,
                                    "median_ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
