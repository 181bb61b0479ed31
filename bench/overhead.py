"""What a pipeline run costs besides training: every stage timed on its own (`python -m stages.<name>`, from
clean outputs and a fresh MLflow store, in a scratch copy of the project), plus what orchestration adds
(a second `python -m flows.pipeline` with nothing to do: Prefect's start-up and DVC's checks of every
stage). The ratio is (everything but finetune and baseline) / (finetune + baseline); issue 24's target is
<= 0.30. Both demos are measured side by side in one run, so a ratio compares like with like on a machine
whose speed drifts.

With --before REV the same is measured for the code of git revision REV too, task by task, before and
after alternating, so a change's effect is read off one run.

Run:  .venv/bin/python bench/overhead.py                          # the default task and the text demo (~15 min)
      .venv/bin/python bench/overhead.py --before 6a4f574         # and the same at that commit (~30 min)
      .venv/bin/python bench/overhead.py --task image --preset presets/smoke.yaml   # a quick look (~3 min)
Prints a table and writes bench/results/overhead.json."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows import compose
from flows.pipeline import STAGES
from stages.params import RUN_PARAMS

ROOT = Path(__file__).resolve().parent.parent

PROJECT = ["stages", "flows", "presets", "tasks", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvc/config",
           ".dvcignore", "weights.lock", "models/replicates/.gitignore"]
TRAINING = ("finetune", "baseline")
TASKS = ("image", "text")


def scratch_project(proj: Path, rev: str | None = None) -> dict[str, str]:
    """Copy what a run needs into `proj` (a fresh git repository: no outputs, no DVC run cache, no MLflow
    store), from the working tree or from git revision `rev`, and return the environment to run it in:
    this venv's tools, Prefect's home inside it, and no tracking or Prefect server of the caller's."""
    if rev:
        archive = subprocess.run(["git", "archive", rev, *PROJECT], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(proj)], input=archive, check=True)
    else:
        for name in PROJECT:
            src, dst = ROOT / name, proj / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env.update(PREFECT_HOME=str(proj / ".prefect"), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    return env


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return time.perf_counter() - start


def measure(task: str, preset: str | None, rev: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"headstart-overhead-{task}-") as tmp:
        proj = Path(tmp)
        env = scratch_project(proj, rev)
        presets = [ROOT / preset] if preset else []
        compose.write(compose.compose(task, presets, params_file=proj / "params.yaml", tasks_dir=proj / "tasks"),
                      proj / RUN_PARAMS)  # what the stages read, as a run would compose it
        stages = {}
        for name in STAGES:
            stages[name] = round(timed([sys.executable, "-m", f"stages.{name}"], proj, env), 1)
            print(f"  {task}{f' at {rev}' if rev else ''}: {name} {stages[name]:.1f} s", flush=True)
        # DVC records the outputs the direct runs left (no stage reruns), so the flow finds nothing to do:
        # what it takes is orchestration alone (Prefect's start-up, DVC's check of every stage).
        timed([sys.executable, "-m", "dvc", "commit", "--force", "--quiet"], proj, env)
        orchestration = round(timed([sys.executable, "-m", "flows.pipeline", "--task", task,
                                     *(f"--preset={p}" for p in presets)], proj, env), 1)
    training = sum(stages[s] for s in TRAINING)
    rest = sum(s for name, s in stages.items() if name not in TRAINING) + orchestration
    return {"stages": stages, "orchestration": orchestration, "training": round(training, 1),
            "overhead": round(rest, 1), "ratio": round(rest / training, 3), "total": round(training + rest, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=[*TASKS, "both"], default="both")
    ap.add_argument("--preset", default=None, help="a partial params file applied on top, e.g. presets/smoke.yaml")
    ap.add_argument("--before", metavar="REV", default=None,
                    help="also measure the code of this git revision, alternating with the working tree's")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overhead.json")
    args = ap.parse_args(argv)
    tasks = list(TASKS) if args.task == "both" else [args.task]
    results, before, runs = {}, {}, []  # runs: the table's columns, each task's before beside its after
    for task in tasks:
        if args.before:
            before[task] = measure(task, args.preset, args.before)
            runs.append((f"{task} @{args.before}", before[task]))
        results[task] = measure(task, args.preset)
        runs.append((task, results[task]))

    rows = [(f"stages.{name}", *(f"{r['stages'][name]:.1f}" for _, r in runs)) for name in STAGES]
    rows += [("orchestration (no-op flow run)", *(f"{r['orchestration']:.1f}" for _, r in runs)),
             ("training (finetune + baseline)", *(f"{r['training']:.1f}" for _, r in runs)),
             ("everything else", *(f"{r['overhead']:.1f}" for _, r in runs)),
             ("ratio (target <= 0.30)", *(f"{r['ratio']:.2f}" for _, r in runs))]
    width = max(len(r[0]) for r in rows)
    col = max(10, *(len(name) + 2 for name, _ in runs))
    print(f"{'seconds':<{width}}" + "".join(f"{name:>{col}}" for name, _ in runs))
    for row in rows:
        print(f"{row[0]:<{width}}" + "".join(f"{v:>{col}}" for v in row[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"preset": args.preset, "measured": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "tasks": results}
    if args.before:
        record["before"] = {"rev": args.before, "tasks": before}
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
