"""Scheduled retraining for real: a `prefect server start` process and a `prefect worker` process on
localhost, the deployment made by `python -m flows.deploy`, runs started as the scheduler starts them
(a scheduled flow run the worker picks up), the MLflow registry checked after each run.

The project copy keeps its raw data under DVC (`dvc add data/raw`, a subset of real Fashion-MNIST) and
runs presets/smoke.yaml. Three runs: the first trains and registers; the second, with nothing changed,
retrains nothing; the third follows `dvc add` of new raw data and retrains."""

from __future__ import annotations

import sys
import time
from datetime import timedelta, timezone
from pathlib import Path

import pytest
import yaml

from flows.pipeline import apply_overrides, read_preset
from stages.data import FASHION_MNIST_FILES, read_idx
from stages.params import Params

from .conftest import GIT, ROOT, background, copy_project, flow_env, http_server, sh, write_idx

pytestmark = pytest.mark.slow
RAW = "data/raw"


def write_raw_subset(project: Path, n_train: int, n_test: int = 300) -> None:
    """The first n_train / n_test real Fashion-MNIST images as the project's raw data (idx files)."""
    source = Params.load(ROOT / "params.yaml").paths.source
    raw = project / RAW
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        for kind in ("images", "labels"):
            name = FASHION_MNIST_FILES[f"{split}_{kind}"]
            write_idx(raw / name, read_idx(Path(source) / name)[:n])


def dvc_add_and_commit(project: Path, message: str) -> None:
    """What a user does with new data: `dvc add` it and commit the .dvc file."""
    sh([sys.executable, "-m", "dvc", "add", RAW], project)
    sh(GIT + ["add", "-A"], project)
    sh(GIT + ["commit", "-qm", message], project)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    proj = copy_project(tmp_path_factory.mktemp("scheduled"))
    write_raw_subset(proj, n_train=1500)
    apply_overrides(proj / "params.yaml", {**read_preset(ROOT / "presets/smoke.yaml"), "paths.source": RAW})
    dvc_add_and_commit(proj, "raw data v1, smoke settings")
    return proj


@pytest.fixture(scope="module")
def prefect(project: Path, tmp_path_factory):
    """A Prefect server and a worker for the project's work pool; yields (env for clients, a client)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-server")
    server_env = flow_env(project, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                          PREFECT_SERVER_UI_ENABLED="false")
    prefect_bin = str(Path(sys.executable).parent / "prefect")
    cmd = [prefect_bin, "server", "start", "--host", "127.0.0.1", "--port", "{port}"]
    with http_server(cmd, "/api/health", project, server_env, timeout=180) as (base, _):
        env = flow_env(project, PREFECT_API_URL=f"{base}/api", PREFECT_WORKER_QUERY_SECONDS="2",
                       PREFECT_WORKER_PREFETCH_SECONDS="2")
        deployed = sh([sys.executable, "-m", "flows.deploy"], project, env)
        assert "concurrency limit 1" in deployed.stdout
        pool = Params.load(project / "params.yaml").schedule.work_pool
        worker = [prefect_bin, "worker", "start", "--pool", pool, "--type", "process"]
        with background(worker, project, env, project.parent / "worker.log"):
            with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
                yield env, client


def scheduled_run(env: dict, client, project: Path, timeout: float = 900) -> tuple[str, str]:
    """Create a flow run of the deployment due now (what the scheduler does at the cron time), wait for the
    worker to finish it; return its final state name and its log."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    schedule = Params.load(project / "params.yaml").schedule
    deployment = client.read_deployment_by_name(f"headstart-pipeline/{schedule.deployment}")
    run = client.create_flow_run_from_deployment(deployment.id)
    deadline = time.monotonic() + timeout
    while not (state := client.read_flow_run(run.id).state).is_final():
        if time.monotonic() > deadline:
            worker_log = (project.parent / "worker.log").read_text()[-4000:]
            raise AssertionError(f"flow run still {state.name} after {timeout}s; worker log:\n{worker_log}")
        time.sleep(2)
    time.sleep(2)  # logs are shipped to the server in batches
    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    text = "\n".join(log.message for log in logs)
    assert state.is_completed(), f"flow run ended {state.name}: {state.message}\n{text[-4000:]}"
    return state.name, text


def versions(project: Path) -> list:
    from mlflow.tracking import MlflowClient

    name = Params.load(project / "params.yaml").register.model_name
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def test_deployment_has_the_nightly_schedule_pool_and_concurrency_limit(project, prefect):
    env, client = prefect
    schedule = Params.load(project / "params.yaml").schedule
    deployment = client.read_deployment_by_name(f"headstart-pipeline/{schedule.deployment}")
    assert [s.schedule.cron for s in deployment.schedules] == [schedule.cron] == ["0 2 * * *"]
    assert deployment.work_pool_name == schedule.work_pool
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.job_variables["working_dir"] == str(project.resolve())
    # the server's scheduler has put the coming nights on the calendar, at 02:00 UTC
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter

    deadline = time.monotonic() + 60
    while len(upcoming := client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(state={"name": {"any_": ["Scheduled"]}}))) < 3:
        assert time.monotonic() < deadline, f"the scheduler created {len(upcoming)} scheduled runs in 60 s, not 3"
        time.sleep(2)
    nights = sorted(r.expected_start_time for r in upcoming)[:3]
    assert all((t.astimezone(timezone.utc).hour, t.minute) == (2, 0) for t in nights), nights
    assert [b - a for a, b in zip(nights, nights[1:])] == [timedelta(days=1)] * 2, nights


def test_scheduled_runs_train_then_skip_then_retrain_on_new_data(project, prefect):
    env, client = prefect
    model = project / "models/finetuned/model.safetensors"

    _, log = scheduled_run(env, client, project)
    assert "stage finetune: ran in" in log and "stage register: ran in" in log
    first = versions(project)
    assert len(first) == 1
    trained_at = model.stat().st_mtime_ns

    # nothing changed: the run is a no-op, says so, and registers nothing
    _, log = scheduled_run(env, client, project)
    assert "nothing to retrain" in log
    assert model.stat().st_mtime_ns == trained_at
    assert len(versions(project)) == 1

    # new raw data, versioned with `dvc add`: the next run retrains and registers a new version
    write_raw_subset(project, n_train=2500)
    dvc_add_and_commit(project, "raw data v2: 1000 more training images")
    _, log = scheduled_run(env, client, project)
    assert "out of date: prepare" in log
    assert "stage finetune: ran in" in log and "stage register: ran in" in log
    assert model.stat().st_mtime_ns != trained_at
    after = versions(project)
    assert len(after) == 2
    assert after[1].tags["data_dvc_md5"] != after[0].tags["data_dvc_md5"]
    head = sh(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert after[1].tags["git_commit"].startswith(head)
    raw_md5 = yaml.safe_load((project / f"{RAW}.dvc").read_text())["outs"][0]["md5"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert {"path": RAW, "md5": raw_md5} in [{k: d.get(k) for k in ("path", "md5")} for d in lock["stages"]["prepare"]["deps"]]
