"""Which pre-trained model should the image demo use by default? For each model and input size, the flow
`make run` runs, on a scratch copy of the project (no outputs, no DVC run cache, a fresh MLflow store:
what a clean checkout does, install excluded), timed end to end, with the fine-tuned model's test
accuracy, the verdict and each stage's seconds. Issue 24's rule: the default is the highest fine-tuned
accuracy whose run takes at most 10 minutes on this machine (2 CPU cores).

Each row is one run (minutes each); rows are merged into bench/results/defaults.json by model and size,
so the study can be run a row at a time. Run nothing else meanwhile: the wall time is the measurement.

Run (from another worktree than the one `make setup` installed, prefix PYTHONPATH=.):
      .venv/bin/python bench/defaults.py                                      # every row of ROWS (~38 min)
      .venv/bin/python bench/defaults.py --row torchvision:mobilenet_v2@112   # one row
      .venv/bin/python bench/defaults.py --table                              # print what was measured
Prints a table and writes bench/results/defaults.json."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows.pipeline import STAGES
from stages.params import RUN_PARAMS, Params

from overhead import ROOT, scratch_project  # bench/, first on sys.path when this script runs

ROWS = ["timm:efficientnet_lite0@80", "torchvision:mobilenet_v2@80", "torchvision:mobilenet_v2@96",
        "torchvision:mobilenet_v2@112"]
LIMIT_S = 600  # issue 24: within 10 minutes of make run


def run_row(model: str, size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="headstart-defaults-") as tmp:
        proj = Path(tmp)
        env = scratch_project(proj)
        cmd = [sys.executable, "-m", "flows.pipeline", "--task", "image", "--set", f"model.name={model}",
               "--set", f"model.image_size={size}"]
        print(f"{model} @ {size} px: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        res = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if res.returncode != 0:
            raise SystemExit(f"{model} @ {size} px failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        print(f"  {wall:.0f} s", flush=True)
        said = res.stdout + res.stderr
        stages = {m[1]: int(m[2]) for m in re.finditer(r"stage (\w+): ran in (\d+)s", said)}
        params = Params.load(proj / RUN_PARAMS)
        ev = json.loads((proj / params.paths.evaluate_metrics).read_text())
        history = (proj / params.paths.finetune_history).read_text().splitlines()
    return {
        "model": model, "image_size": size, "wall_s": round(wall, 1), "within_limit": wall <= LIMIT_S,
        "finetuned_accuracy": ev["finetuned"]["accuracy"], "finetuned_ci95": ev["finetuned"]["accuracy_ci95"],
        "scratch_accuracy": ev["scratch"]["accuracy"], "linear_probe_accuracy": ev["linear_probe"]["accuracy"],
        "best": ev["best"], "verdict": ev["verdict"], "transfer_verdict": ev["transfer_verdict"],
        "finetune_epochs_run": len(history) - 1,
        "stages": {name: stages.get(name) for name in STAGES},
        "measured": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
    }


def choose(rows: list[dict]) -> dict | None:
    """Issue 24's rule: the most accurate row within the time limit."""
    fit = [r for r in rows if r["within_limit"]]
    return max(fit, key=lambda r: r["finetuned_accuracy"]) if fit else None


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<28}{'px':>5}{'make run s':>12}{'fine-tuned':>12}  {'95% CI':<17}{'scratch':>9}{'probe':>8}"
          f"{'finetune s':>12}{'baseline s':>12}")
    for r in sorted(rows, key=lambda r: (r["model"], r["image_size"])):
        lo, hi = r["finetuned_ci95"]
        s = r["stages"]
        print(f"{r['model']:<28}{r['image_size']:>5}{r['wall_s']:>12.0f}{r['finetuned_accuracy']:>12.4f}  "
              f"[{lo:.4f}, {hi:.4f}]{r['scratch_accuracy']:>9.4f}{r['linear_probe_accuracy']:>8.4f}"
              f"{s.get('finetune') or 0:>12}{s.get('baseline') or 0:>12}" + ("" if r["within_limit"] else "  (over 10 min)"))
    best = choose(rows)
    if best:
        print(f"highest accuracy within {LIMIT_S // 60} min: {best['model']} @ {best['image_size']} px, "
              f"{best['finetuned_accuracy']:.4f} in {best['wall_s'] / 60:.1f} min")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", action="append", help="MODEL@SIZE (repeatable); default: every row of ROWS")
    ap.add_argument("--table", action="store_true", help="print the rows measured so far; run nothing")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "defaults.json")
    args = ap.parse_args(argv)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}  # "default": the decision, said by hand
    kept = doc.get("rows", [])
    if not args.table:
        for spec in args.row or ROWS:
            model, _, size = spec.rpartition("@")
            if not model or not size.isdigit():
                raise SystemExit(f"--row {spec!r}: expected MODEL@SIZE, e.g. torchvision:mobilenet_v2@112")
            row = run_row(model, int(size))
            kept = [r for r in kept if (r["model"], r["image_size"]) != (row["model"], row["image_size"])] + [row]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            doc.update(limit_s=LIMIT_S, rows=kept, highest_within_limit=choose(kept))
            args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print_table(kept)


if __name__ == "__main__":
    main()
