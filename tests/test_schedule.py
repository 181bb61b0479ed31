"""Scheduled retraining for real, on a worker that has nothing but the image, the repository and
credentials: a `prefect server start` process, a deployment made by `python -m flows.deploy` from a git
source, and a `prefect worker` process in a directory of its own, whose runs clone the repository, pull
data and cache from a DVC remote on a real S3 server (SeaweedFS), register into an `mlflow server` whose
artifacts live on that S3 server, and push what they made.

The origin repository keeps its raw data under DVC (`dvc add data/raw`, a subset of real Fashion-MNIST,
pushed to the remote) and runs presets/smoke.yaml. Three scheduled runs: the first trains and registers;
the second, with nothing new, is a no-op; the third follows new raw data pushed from the origin and
retrains. Then a fresh clone pulls from the remote and `flows.pipeline` retrains nothing."""

from __future__ import annotations

import sys
import time
import uuid
from datetime import timedelta, timezone
from pathlib import Path

import pytest
import yaml

from flows import compose
from stages.sources import FASHION_MNIST_FILES, read_idx
from stages.params import Params

from .conftest import GIT, ROOT, background, copy_project, flow_env, http_server, sh, write_idx

pytestmark = pytest.mark.slow
RAW = "data/raw"
DVC = [sys.executable, "-m", "dvc"]


def write_raw_subset(project: Path, n_train: int, n_test: int = 300) -> None:
    """The first n_train / n_test real Fashion-MNIST images as the project's raw data (idx files)."""
    source = Params.load(ROOT / "params.yaml").paths.source
    raw = project / RAW
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        for kind in ("images", "labels"):
            name = FASHION_MNIST_FILES[f"{split}_{kind}"]
            write_idx(raw / name, read_idx(Path(source) / name)[:n])


def publish_data(project: Path, env: dict, message: str) -> None:
    """What a user does with new data: `dvc add` it, commit the .dvc file, push the data to the remote."""
    sh(DVC + ["add", RAW], project, env)
    sh(GIT + ["add", "-A"], project)
    sh(GIT + ["commit", "-qm", message], project)
    sh(DVC + ["push"], project, env)


@pytest.fixture(scope="module")
def origin(tmp_path_factory, s3) -> Path:
    """The team's repository: the project with smoke settings, a default DVC remote on the S3 server
    (its URL and endpoint committed, its keys only in the environment) and raw data v1 pushed there."""
    proj = copy_project(tmp_path_factory.mktemp("origin"))
    sh(["git", "branch", "-M", "main"], proj)
    workdir = proj.parent / "worker-runs"
    workdir.mkdir()  # on the worker's machine; `make worker` makes it
    raw = compose.with_overrides(yaml.safe_load((proj / "params.yaml").read_text()), {
        **compose.read_partial(ROOT / "presets/smoke.yaml"), "paths.source": RAW, "schedule.workdir": str(workdir)})
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))  # the team's own settings, committed
    sh(DVC + ["remote", "add", "-d", "storage", f"s3://{s3.bucket}/dvc-{uuid.uuid4().hex[:8]}"], proj)
    sh(DVC + ["remote", "modify", "storage", "endpointurl", s3.endpoint], proj)
    write_raw_subset(proj, n_train=1500)
    sh([sys.executable, "-m", "flows.compose"], proj)  # as `make setup` does: dvc reads its vars there
    publish_data(proj, {**flow_env(proj), **s3.env()}, "raw data v1, smoke settings, the team's DVC remote")
    return proj


@pytest.fixture(scope="module")
def prefect(origin: Path, s3, s3_mlflow_server, tmp_path_factory):
    """A Prefect server, the deployment (from the origin's git URL), and a worker started in an empty
    directory of its own; yields (env for clients, a client, the worker's directory)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-server")
    server_env = flow_env(origin, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                          PREFECT_SERVER_UI_ENABLED="false")
    prefect_bin = str(Path(sys.executable).parent / "prefect")
    cmd = [prefect_bin, "server", "start", "--host", "127.0.0.1", "--port", "{port}"]
    with http_server(cmd, "/api/health", origin, server_env, timeout=180) as (base, _):
        env = flow_env(origin, PREFECT_API_URL=f"{base}/api", PREFECT_WORKER_QUERY_SECONDS="2",
                       PREFECT_WORKER_PREFETCH_SECONDS="2")
        deployed = sh([sys.executable, "-m", "flows.deploy", "--repository", str(origin)], origin, env)
        assert "concurrency limit 1" in deployed.stdout and f"{origin.as_uri()} at main" in deployed.stdout
        pool = Params.load(origin / "params.yaml").schedule.work_pool
        worker_dir = tmp_path_factory.mktemp("worker")  # no code, no data: all comes from git and the remote
        worker_env = {**env, **s3.env(), "MLFLOW_TRACKING_URI": s3_mlflow_server, "PREFECT_HOME": str(worker_dir / ".prefect")}
        worker_env.pop("MLFLOW_S3_ENDPOINT_URL")  # the tracking server proxies artifacts: the worker never needs it
        worker = [prefect_bin, "worker", "start", "--pool", pool, "--type", "process"]
        with background(worker, worker_dir, worker_env, worker_dir.parent / "worker.log"):
            with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
                yield env, client, worker_dir


def scheduled_run(client, origin: Path, worker_dir: Path, timeout: float = 900) -> tuple[str, str]:
    """Create a flow run of the deployment due now (what the scheduler does at the cron time), wait for the
    worker to finish it; return its final state name and its log."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    schedule = Params.load(origin / "params.yaml").schedule
    deployment = client.read_deployment_by_name(f"headstart-pipeline/{schedule.deployment}")
    run = client.create_flow_run_from_deployment(deployment.id)
    deadline = time.monotonic() + timeout
    while not (state := client.read_flow_run(run.id).state).is_final():
        if time.monotonic() > deadline:
            worker_log = (worker_dir.parent / "worker.log").read_text()[-4000:]
            raise AssertionError(f"flow run still {state.name} after {timeout}s; worker log:\n{worker_log}")
        time.sleep(2)
    time.sleep(2)  # logs are shipped to the server in batches
    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    text = "\n".join(log.message for log in logs)
    assert state.is_completed(), f"flow run ended {state.name}: {state.message}\n{text[-4000:]}"
    return state.name, text


def versions(origin: Path, tracking_uri: str) -> list:
    from mlflow.tracking import MlflowClient

    name = Params.load(origin / "params.yaml").register.model_name
    return sorted(MlflowClient(tracking_uri).search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def test_deployment_clones_the_repository_on_the_nightly_schedule_one_run_at_a_time(origin, prefect):
    env, client, _ = prefect
    schedule = Params.load(origin / "params.yaml").schedule
    deployment = client.read_deployment_by_name(f"headstart-pipeline/{schedule.deployment}")
    assert [s.schedule.cron for s in deployment.schedules] == [schedule.cron] == ["0 2 * * *"]
    assert deployment.work_pool_name == schedule.work_pool
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.parameters == {"sync": True}
    assert deployment.job_variables == {"working_dir": schedule.workdir}
    clone = [step["prefect.deployments.steps.git_clone"] for step in deployment.pull_steps
             if "prefect.deployments.steps.git_clone" in step]
    assert clone and clone[0]["repository"] == origin.as_uri() and clone[0]["branch"] == "main", deployment.pull_steps
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


def test_a_kubernetes_pool_gets_the_worker_image_and_no_secrets(origin, prefect, tmp_path):
    from prefect.client.schemas.actions import WorkPoolCreate

    env, client, _ = prefect
    client.create_work_pool(WorkPoolCreate(name="headstart-k8s", type="kubernetes"))
    raw = yaml.safe_load((origin / "params.yaml").read_text())
    raw["schedule"].update(work_pool="headstart-k8s", deployment="nightly-k8s", workdir="")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    sh([sys.executable, "-m", "flows.deploy", "--params", str(params), "--repository", str(origin)], origin, env)
    variables = client.read_deployment_by_name("headstart-pipeline/nightly-k8s").job_variables
    assert variables["image"] == raw["schedule"]["image"] == "headstart-worker:0.1.0"
    assert variables["namespace"] == "headstart"
    assert not any(word in str(variables).lower() for word in ("secret", "password", "key", "token")), variables


def test_scheduled_runs_on_a_clean_worker_train_then_skip_then_retrain_on_pushed_data(origin, prefect, s3,
                                                                                      s3_mlflow_server, tmp_path):
    env, client, worker_dir = prefect
    workdir = Path(Params.load(origin / "params.yaml").schedule.workdir)

    _, log = scheduled_run(client, origin, worker_dir)
    assert "dvc pull, remote storage" in log and "dvc push, remote storage" in log, log[-3000:]
    assert "stage finetune: ran in" in log and "stage register: ran in" in log
    assert len(versions(origin, s3_mlflow_server)) == 1
    (clone,) = [p.parent for p in workdir.glob("*/.git")]
    model = clone / "models/finetuned/model.safetensors"
    trained_at = model.stat().st_mtime_ns
    # the origin never ran anything (composing its settings made only the empty folder evaluate reads extra
    # seeds from): the worker did, from its clone
    assert not [p for p in (origin / "models").rglob("*") if p.is_file() and p.name != ".gitignore"]
    remote = sh(DVC + ["config", "remote.storage.url"], origin).stdout.strip().removeprefix(f"s3://{s3.bucket}/")
    assert len(s3.keys(remote)) > 10  # data, outputs and the run cache

    # nothing new: the run is a no-op, says so, and registers nothing
    _, log = scheduled_run(client, origin, worker_dir)
    assert "nothing to retrain" in log
    assert model.stat().st_mtime_ns == trained_at
    assert len(versions(origin, s3_mlflow_server)) == 1

    # new raw data, pushed from the origin: the next run pulls it, retrains and registers a new version
    write_raw_subset(origin, n_train=2500)
    publish_data(origin, {**flow_env(origin), **s3.env()}, "raw data v2: 1000 more training images")
    _, log = scheduled_run(client, origin, worker_dir)
    assert "out of date: prepare" in log
    assert "stage finetune: ran in" in log and "stage register: ran in" in log
    after = versions(origin, s3_mlflow_server)
    assert len(after) == 2
    assert after[1].tags["data_dvc_md5"] != after[0].tags["data_dvc_md5"]
    head = sh(["git", "rev-parse", "HEAD"], origin).stdout.strip()
    assert after[1].tags["git_commit"].startswith(head)
    raw_md5 = yaml.safe_load((origin / f"{RAW}.dvc").read_text())["outs"][0]["md5"]
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    assert {"path": RAW, "md5": raw_md5} in [{k: d.get(k) for k in ("path", "md5")} for d in lock["stages"]["prepare"]["deps"]]

    # a fresh clone restores the worker's outputs from the remote and retrains nothing
    fresh = tmp_path / "fresh"
    sh(["git", "clone", "-q", str(origin), str(fresh)], tmp_path)
    user_env = {**flow_env(fresh, PREFECT_API_URL=env["PREFECT_API_URL"]), **s3.env(), "MLFLOW_TRACKING_URI": s3_mlflow_server}
    start = time.monotonic()
    sh([sys.executable, "-m", "flows.compose"], fresh, user_env)  # what `make pull` does first (its setup)
    sh(DVC + ["pull", "--run-cache", "--allow-missing"], fresh, user_env)
    run = sh([sys.executable, "-m", "flows.pipeline"], fresh, user_env)
    seconds = time.monotonic() - start
    out = run.stdout + run.stderr
    for stage in ("select", "finetune", "baseline", "evaluate", "export", "register"):
        assert f"stage {stage}: restored from DVC's run cache" in out, out[-3000:]
    assert len(versions(origin, s3_mlflow_server)) == 2
    print(f"fresh clone: dvc pull + flows.pipeline restored every output in {seconds:.1f}s, trained nothing")
