"""The GitHub Actions workflow: valid against GitHub's schema and actionlint (both offline), triggered as
the operations issue says, calling only make targets that exist, and its pull-request report run the way
the workflow runs it: smoke vs main's smoke, with the report where the comment step reads it."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ops.report import DEFAULT_OUT, NO_TRACKING
from stages.params import RUN_PARAMS

from .conftest import ROOT

WORKFLOW = ROOT / ".github/workflows/pipeline.yml"
BIN = Path(sys.executable).parent


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


def test_workflow_passes_actionlint():
    """actionlint checks expressions, action inputs and versions, job dependencies and permissions; it also
    runs shellcheck on run: scripts when shellcheck is installed (optional: steps are make calls)."""
    res = subprocess.run([str(BIN / "actionlint"), "-no-color", str(WORKFLOW)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def step(job: dict, prefix: str) -> dict:
    return next(s for s in job["steps"] if s.get("run", "").startswith(prefix) or s.get("uses", "").startswith(prefix))


def test_pull_requests_test_then_run_smoke_and_compare_with_mains_smoke():
    doc = load()
    assert "pull_request" in doc["on"]
    job = doc["jobs"]["smoke"]
    assert "if" not in job  # main runs it too: its smoke artifact is what pull requests compare with
    runs = [s["run"] for s in job["steps"] if "run" in s]
    report = step(job, "make report")
    order = [runs.index(r) for r in ("make setup", "make test-fast", "make smoke", report["run"])]
    assert order == sorted(order)
    upload = step(job, "actions/upload-artifact")
    download = step(job, "dawidd6/action-download-artifact")
    steps = job["steps"]
    assert steps.index(upload) < steps.index(download) < steps.index(report)
    assert "if" not in upload and download["with"]["name"] == upload["with"]["name"]
    for path in ("metrics/", str(RUN_PARAMS), "presets/smoke.yaml"):  # what the report reads from the base
        assert path in upload["with"]["path"].split()
    assert upload["with"]["include-hidden-files"] is True  # else .headstart/ is silently left out
    assert download["with"]["branch"] == "${{ github.base_ref }}" and download["with"]["workflow"] == WORKFLOW.name
    assert f"BASE_METRICS={download['with']['path']}" in report["run"].split()
    assert download["with"]["if_no_artifact_found"] == "warn"  # the report says there is no base, the job goes on
    comment = step(job, "marocchino/sticky-pull-request-comment")
    assert comment["with"]["path"] == str(DEFAULT_OUT)
    for s in (download, report, comment):
        assert s["if"] == "github.event_name == 'pull_request'"
    assert doc["permissions"]["pull-requests"] == "write" and doc["permissions"]["actions"] == "read"
    assert "MLFLOW_TRACKING_URI" in report["env"] and "env" not in job  # the report reads the champion; smoke
    assert "MLFLOW_TRACKING_URI" not in doc.get("env", {})              # never registers on the team's server
    # the step runs the PR's code: a reading account, not the pipeline's
    assert report["env"]["MLFLOW_TRACKING_PASSWORD"] != doc["jobs"]["full"]["env"]["MLFLOW_TRACKING_PASSWORD"]


def test_pushes_to_main_run_the_full_pipeline_then_push_the_cache_and_commit_the_lock():
    doc = load()
    push = doc["on"]["push"]
    assert push["branches"] == ["main"]
    for path in ("data/**", "**.dvc", "params.yaml", "dvc.yaml", "presets/**"):
        assert path in push["paths"]
    job = doc["jobs"]["full"]
    assert "refs/heads/main" in job["if"] and job["needs"] == "smoke"
    runs = [s["run"] for s in job["steps"] if "run" in s]
    assert runs.index("make pull") < runs.index("make run") < runs.index("make report") < runs.index("make commit-lock")
    assert job["permissions"] == {"contents": "write"}
    for var in ("MLFLOW_TRACKING_URI", "DVC_REMOTE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert var in job["env"], var
    assert any("user.name" in r for r in runs)  # the lock commit has an author
    assert "[skip ci]" in make_recipe("commit-lock") and "dvc push" in make_recipe("push")
    assert "--run-cache" in make_recipe("push") and "--run-cache" in make_recipe("pull")
    assert make_prerequisites("commit-lock") == ["push"]  # the cache reaches the remote before the lock names it


def make_recipe(target: str) -> str:
    text = (ROOT / "Makefile").read_text()
    body = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, flags=re.M)
    assert body, f"make {target} has no recipe"
    return body.group(1)


def make_prerequisites(target: str) -> list[str]:
    line = re.search(rf"^{re.escape(target)}:([^#\n]*)", (ROOT / "Makefile").read_text(), flags=re.M)
    return line.group(1).split()


def test_steps_call_make_targets_that_exist_and_cache_pip_and_dvc():
    """Every run: step is one `make <target> [VAR=value ...]` (the logic lives in the repository) or git config
    lines; each target exists and each variable is one the Makefile reads."""
    makefile = (ROOT / "Makefile").read_text()
    targets = make_targets()
    for name, job in load()["jobs"].items():
        for s in job["steps"]:
            if "run" not in s:
                continue
            lines = [line.strip() for line in s["run"].strip().splitlines()]
            if all(line.startswith("git config ") for line in lines):
                continue  # the container's checkout-ownership fix and the commit author, not pipeline logic
            assert len(lines) == 1, f"{name}: {s['run']!r} is a script, not a make target"
            words = re.sub(r"\$\{\{.*?\}\}", "EXPR", lines[0]).split()  # an expression is one value
            assert words[0] == "make" and len(words) >= 2, f"{name}: {lines[0]!r} is not a make target"
            assert words[1] in targets, f"{name}: make {words[1]} does not exist"
            for var in (w.split("=", 1)[0] for w in words[2:]):
                assert re.fullmatch(r"[A-Z_]+", var), f"{name}: {var!r} in {lines[0]!r} is not VAR=value"
                assert f"$({var})" in makefile, f"{name}: the Makefile never reads {var} ({lines[0]!r})"
        cached = {s["with"]["path"] for s in job["steps"] if s.get("uses", "").startswith("actions/cache")}
        assert ".dvc/cache" in cached and any("pip" in p for p in cached), name


# What `make report` reads, copied: the pipeline code, its config, and the Makefile's set-up inputs. The venv is
# linked in, and pyproject.toml and the requirements files are made older than its stamp, so make finds set-up up to
# date and runs the report's own command, exactly as the workflow's step does.
MAKE_FILES = ["Makefile", "pyproject.toml", "requirements.lock", "requirements-weights.txt", "dvc.yaml", "params.yaml",
              ".dvc/config", "stages", "flows", "ops", "presets", "tasks"]


def smoke_params() -> dict:
    """The settings `make smoke` runs with: the smoke preset over params.yaml's."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in yaml.safe_load((ROOT / "presets/smoke.yaml").read_text()).items():
        params[section].update(values)
    return params


def write_run(root: Path, accuracy: float, params: dict) -> None:
    """A smoke run's metrics files, in the schema the pipeline writes (the committed files, rescaled to 200 test
    images), and its composed settings, under `root` at their workspace paths."""
    evaluation = json.loads((ROOT / "metrics/evaluate.json").read_text())
    evaluation["finetuned"]["accuracy"], evaluation["n_test"] = accuracy, 200
    export = json.loads((ROOT / "metrics/export.json").read_text())
    export["n_examples"], export["fp32_accuracy"] = 200, accuracy
    for name, data in (("evaluate", evaluation), ("export", export),
                       ("select", json.loads((ROOT / "metrics/select.json").read_text()))):
        (root / "metrics").mkdir(parents=True, exist_ok=True)
        (root / f"metrics/{name}.json").write_text(json.dumps(data))
    write_settings(root, params)


def write_settings(root: Path, params: dict) -> None:
    """A run's composed settings file, as flows/compose.py writes it."""
    (root / RUN_PARAMS).parent.mkdir(parents=True, exist_ok=True)
    composed = {"composed_from": ["params.yaml", "presets/smoke.yaml"], "run": params}
    (root / RUN_PARAMS).write_text(yaml.safe_dump(composed, sort_keys=False))


def run_report_step(proj: Path) -> tuple[subprocess.CompletedProcess, str]:
    """The pull-request job's report step in `proj`: its command line with the base branch `main`, its env with
    no secrets set (GitHub gives an unset secret as ''), and GITHUB_STEP_SUMMARY as Actions sets it."""
    report = step(load()["jobs"]["smoke"], "make report")
    cmd = shlex.split(report["run"].replace("${{ github.base_ref }}", "main"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "GITHUB_", "MAKE"))}
    env.update({k: "" for k in report.get("env", {})}, GITHUB_STEP_SUMMARY=str(proj / "summary.md"))
    res = subprocess.run([cmd[0], "-s", *cmd[1:]], cwd=proj, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "pip install" not in res.stdout + res.stderr  # set-up was found up to date
    return res, (proj / "reports/report.md").read_text()


def make_project(proj: Path) -> Path:
    for name in MAKE_FILES:
        src, dst = ROOT / name, proj / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    (proj / ".venv").symlink_to((ROOT / ".venv").resolve())
    for name in ("pyproject.toml", "requirements.lock", "requirements-weights.txt"):
        os.utime(proj / name, (0, 0))
    stamp = subprocess.run(["make", "-q", ".venv/.installed"], cwd=proj, capture_output=True, text=True)
    assert stamp.returncode == 0, "the venv is not set up (its stamp is missing or old): run make setup"
    return proj


def test_make_push_without_a_remote_fails_and_says_so(tmp_path):
    """CI on main must not commit a dvc.lock whose data never reached a remote: no remote, no push, an error."""
    proj = make_project(tmp_path / "proj")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MAKE"))}
    res = subprocess.run(["make", "-s", "push"], cwd=proj, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "make push: no DVC remote: set DVC_REMOTE to one of [minio]" in res.stderr and "nothing done" in res.stderr


def test_the_pull_request_report_step_compares_smoke_with_mains_smoke(tmp_path):
    proj = make_project(tmp_path / "proj")
    base = proj / step(load()["jobs"]["smoke"], "dawidd6/action-download-artifact")["with"]["path"]
    pr_params = smoke_params()
    pr_params["finetune"]["weight_decay"] = 0.05  # what this "pull request" changed
    write_run(proj, 0.62, pr_params)
    assert (proj / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()  # a run writes no params.yaml

    # no artifact found (a first pull request, or main's smoke artifact expired): said, and the job goes on
    res, text = run_report_step(proj)
    assert "### Against `main`\nNo smoke run of `main` to compare with" in text
    assert "| metrics/evaluate.json |" not in text and NO_TRACKING in text

    write_run(base, 0.60, smoke_params())
    res, text = run_report_step(proj)
    assert text == res.stdout.rstrip("\n") + "\n" and text in (proj / "summary.md").read_text()
    assert "### Against `main`: smoke vs smoke" in text and "Like with like" in text
    assert "| metrics/evaluate.json | finetuned.accuracy | 0.6 | 0.62 | 0.02 |" in text
    assert "| metrics/evaluate.json | n_test | 200 | 200 | 0 |" in text
    assert f"| {RUN_PARAMS} | finetune.weight_decay | 0.01 | 0.05 | 0.04 |" in text
    assert "\n### Against the champion\n" + NO_TRACKING + "\n" in text
    assert not (proj / "mlflow.db").exists()  # no store was created to look for a champion in

    full = copy.deepcopy(smoke_params())
    full["model"]["image_size"] = 80  # main's full-run settings against this smoke run: flagged
    write_settings(base, full)
    assert "### Against `main`: smoke vs full" in run_report_step(proj)[1]
