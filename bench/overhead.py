"""What orchestration costs: the whole pipeline through the Prefect flow (`python -m flows.pipeline`, each
stage via `dvc repro --single-item`) against the same stages run directly one after another
(`python -m stages.<name>`), both from clean outputs and a fresh MLflow store, in a scratch copy of the
project, measured in one run. The difference is what Prefect (its temporary server included) and DVC
(hashing, lock file) add.

Run:  .venv/bin/python bench/overhead.py                    # on presets/smoke.yaml (about 4 minutes)
      .venv/bin/python bench/overhead.py --preset none      # on params.yaml as it is (the full run: ~20 min)
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows.pipeline import STAGES, apply_overrides, read_preset  # noqa: E402

PROJECT = ["stages", "flows", "presets", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvc/config", ".dvcignore"]
OUTPUTS = ["data/prepared", "models", "metrics", "plots", "reports", "dvc.lock", "mlflow.db", "mlartifacts", ".prefect"]


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return time.perf_counter() - start


def clean(proj: Path) -> None:
    for name in OUTPUTS:
        path = proj / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="presets/smoke.yaml", help="preset to apply, or 'none' (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overhead.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="headstart-overhead-") as tmp:
        proj = Path(tmp)
        for name in PROJECT:
            src, dst = ROOT / name, proj / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
        if args.preset != "none":
            apply_overrides(proj / "params.yaml", read_preset(ROOT / args.preset))
        subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
        env.update(PREFECT_HOME=str(proj / ".prefect"), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")

        direct = {name: timed([sys.executable, "-m", f"stages.{name}"], proj, env) for name in STAGES}
        clean(proj)
        flow = timed([sys.executable, "-m", "flows.pipeline"], proj, env)
        noop = timed([sys.executable, "-m", "flows.pipeline"], proj, env)

    total = sum(direct.values())
    rows = [(f"python -m stages.{n}", f"{s:.1f}") for n, s in direct.items()]
    rows += [("sum of the stages run directly", f"{total:.1f}"), ("python -m flows.pipeline (Prefect + DVC)", f"{flow:.1f}"),
             ("orchestration overhead", f"{flow - total:+.1f} ({(flow - total) / total:+.0%})"),
             ("second flow run, nothing changed", f"{noop:.1f}")]
    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  seconds\n" + "\n".join(f"{a:<{width}}  {b}" for a, b in rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"preset": args.preset, "direct_seconds": direct, "sum_direct": total,
                                    "flow_seconds": flow, "noop_seconds": noop}, indent=2) + "\n")


if __name__ == "__main__":
    main()
