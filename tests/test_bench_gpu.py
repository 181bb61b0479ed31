"""bench/gpu.sh in its tiny CPU mode, as a GPU box would run it: without prefect, mlflow or dvc."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow

BLOCKING_PYTHON = """#!/bin/sh
exec {python} -c '
import runpy, sys
for name in ("prefect", "mlflow", "dvc", "sklearn", "onnxruntime"):
    sys.modules[name] = None  # what an absent package looks like
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
' "$@"
"""


def test_gpu_bench_tiny_cpu_mode_runs_without_the_orchestration_stack(tmp_path):
    python = tmp_path / "python"
    python.write_text(BLOCKING_PYTHON.format(python=sys.executable))
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "gpu.json"
    res = subprocess.run(["bash", "bench/gpu.sh", "--cpu-tiny", "--out", str(out)], cwd=ROOT,
                         env={**os.environ, "PYTHON": str(python)}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "plain PyTorch" in res.stdout and "headstart fit" in res.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["loop"] for r in rows] == ["plain PyTorch", "headstart fit"]
    for r in rows:
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["peak_memory_mb"] > 0 and r["steps"] == 8
    assert rows[1]["vs_plain"] == pytest.approx(rows[1]["images_per_s"] / rows[0]["images_per_s"], rel=1e-2)


def test_gpu_bench_refuses_full_mode_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: full mode is the one to run")  # CI machines have none
    res = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env={**os.environ, "PYTHON": sys.executable},
                         capture_output=True, text=True, timeout=300)  # what make bench-gpu runs
    assert res.returncode != 0 and "no CUDA device" in res.stderr
