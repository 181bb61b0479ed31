"""The GitHub Actions workflow: valid against GitHub's schema (validated offline), triggered as the
operations issue says, and calling only make targets that exist, with the report where the
comment step reads it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from flows.report import DEFAULT_OUT

from .conftest import ROOT

WORKFLOW = ROOT / ".github/workflows/pipeline.yml"


def load() -> dict:
    doc = yaml.safe_load(WORKFLOW.read_text())
    doc["on"] = doc.pop(True)  # YAML 1.1 reads the bare key `on` as a boolean
    return doc


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def test_workflow_is_valid_against_the_github_workflow_schema():
    checker = Path(sys.executable).parent / "check-jsonschema"
    res = subprocess.run([str(checker), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_pull_requests_run_the_smoke_pipeline_and_comment_the_report():
    doc = load()
    assert "pull_request" in doc["on"]
    job = doc["jobs"]["smoke"]
    assert job["if"] == "github.event_name == 'pull_request'"
    runs = [s["run"] for s in job["steps"] if "run" in s]
    assert runs.index("make setup") < runs.index("make smoke") < runs.index(next(r for r in runs if r.startswith("make report")))
    assert "BASE=origin/${{ github.base_ref }}" in next(r for r in runs if r.startswith("make report"))
    comment = next(s for s in job["steps"] if "sticky-pull-request-comment" in s.get("uses", ""))
    assert comment["with"]["path"] == str(DEFAULT_OUT)
    assert doc["permissions"]["pull-requests"] == "write"
    checkout = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0  # dvc metrics diff needs the base branch


def test_pushes_to_main_that_change_data_or_params_run_the_full_pipeline():
    doc = load()
    push = doc["on"]["push"]
    assert push["branches"] == ["main"]
    for path in ("data/**", "**.dvc", "params.yaml", "dvc.yaml"):
        assert path in push["paths"]
    runs = [s["run"] for s in doc["jobs"]["full"]["steps"] if "run" in s]
    assert "make run" in runs
    assert "MLFLOW_TRACKING_URI" in doc["jobs"]["full"]["env"]


def test_steps_call_make_targets_that_exist_and_cache_pip_and_dvc():
    targets = make_targets()
    for name, job in load()["jobs"].items():
        for step in job["steps"]:
            if "run" not in step:
                continue
            cmd = step["run"].strip()
            if cmd.startswith("git config"):
                continue  # the container's checkout-ownership fix, not pipeline logic
            assert cmd.startswith("make "), f"{name}: {cmd!r} is not a make target"
            assert cmd.split()[1] in targets, f"{name}: make {cmd.split()[1]} does not exist"
        cached = {s["with"]["path"] for s in job["steps"] if s.get("uses", "").startswith("actions/cache")}
        assert ".dvc/cache" in cached and any("pip" in p for p in cached), name
