"""Whole-pipeline time of two git revisions, side by side: is the code after a change slower than before it?

Each revision is checked out into a scratch worktree (sharing this checkout's .venv) and runs the pipeline
on presets/smoke.yaml with every stage forced to run (its dvc.lock, DVC's run cache and the stage outputs
removed first), the two in turn (A B A B ...), so a drift in the machine's speed hits both. Per pair: wall
and CPU seconds (the run's processes) and the ratio head/base; the median ratio is the figure to quote.
Shared machines are noisy: a ratio within the pairs' spread is "no difference".

Run:  .venv/bin/python bench/revisions.py --base 41eb36c            (head: HEAD; 3 pairs, ~10 min on 2 cores)
      .venv/bin/python bench/revisions.py --base main~5 --head my-branch --pairs 5
Writes bench/results/revisions.json."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what a run leaves that would let the next one skip a stage
FORCED = ("dvc.lock", ".dvc/cache/runs", "models/finetuned", "models/baselines", "models/onnx", "data/prepared")


def checkout(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(where), rev], check=True)
    (where / ".venv").symlink_to(ROOT / ".venv")
    return where


def forced_run(tree: Path, log: Path) -> dict:
    """One smoke run in `tree` with nothing to reuse; wall and CPU seconds of the run's processes."""
    for name in FORCED:
        path = tree / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{tree / '.venv' / 'bin'}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "a") as out:
        res = subprocess.run([sys.executable, "-m", "flows.pipeline", "--preset", "presets/smoke.yaml"], cwd=tree,
                             env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = log.read_text(errors="replace")
    if res.returncode != 0 or text.count("Running stage 'register'") == 0:
        raise SystemExit(f"the run in {tree} failed (exit {res.returncode}); its output: {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision before the change")
    parser.add_argument("--head", default="HEAD", help="the revision after it (default: %(default)s)")
    parser.add_argument("--pairs", type=int, default=3, help="runs of each, in turn (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        raise SystemExit("--pairs must be at least 1")
    revs = {}
    for label, rev in (("base", args.base), ("head", args.head)):
        res = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"--{label} {rev}: not a git revision here")
        revs[label] = res.stdout.strip()
    scratch = Path(tempfile.mkdtemp(prefix="bench-revisions-"))
    trees = {}
    try:
        trees = {label: checkout(rev, scratch / label) for label, rev in revs.items()}
        rows = []
        for i in range(1, args.pairs + 1):
            row = {"pair": i}
            for label in ("head", "base"):
                print(f"pair {i}/{args.pairs}: {label} ({revs[label]}) ...", flush=True)
                row[label] = forced_run(trees[label], scratch / f"{label}.log")
            row["wall_ratio"] = round(row["head"]["wall_s"] / row["base"]["wall_s"], 3)
            row["cpu_ratio"] = round(row["head"]["cpu_s"] / row["base"]["cpu_s"], 3)
            rows.append(row)
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nthe smoke pipeline, every stage forced: head {revs['head']} vs base {revs['base']}")
    print(f"{'pair':>4}  {'head wall s':>11}  {'base wall s':>11}  {'wall ratio':>10}  {'cpu ratio':>9}")
    for r in rows:
        print(f"{r['pair']:>4}  {r['head']['wall_s']:>11.1f}  {r['base']['wall_s']:>11.1f}  {r['wall_ratio']:>10.3f}  "
              f"{r['cpu_ratio']:>9.3f}")
    ratios = [r["wall_ratio"] for r in rows]
    summary = {"median_wall_ratio": round(statistics.median(ratios), 3), "min": min(ratios), "max": max(ratios),
               "median_cpu_ratio": round(statistics.median(r["cpu_ratio"] for r in rows), 3)}
    print(f"head/base wall: median {summary['median_wall_ratio']:.3f} ({summary['min']:.3f}-{summary['max']:.3f}); "
          f"cpu: median {summary['median_cpu_ratio']:.3f}")
    out = ROOT / "bench" / "results" / "revisions.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"head": revs["head"], "base": revs["base"], "preset": "presets/smoke.yaml",
                               "pairs": rows, **summary}, indent=2) + "\n")
    print(f"-> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
