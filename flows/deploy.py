"""Deploy the pipeline for scheduled retraining on a Prefect server: deployment
`headstart-pipeline/<schedule.deployment>` with the cron schedule in params.yaml (nightly by default), at
most one run at a time (a run due while one is still going waits for it).

Each run starts from git, not from this directory: the worker clones `schedule.repository` at
`schedule.branch` (default: this checkout's `origin` and branch), pulls data and DVC's cache from the
default DVC remote, runs `flows.pipeline` (a no-op when data, code and params are unchanged), and pushes
what it made back to the remote. So commit and push before deploying: the worker runs what the
repository holds. The work pool is a process pool (`make worker`, created here when missing) or a
Kubernetes pool (infra/k8s/prefect.yaml creates it; each run is a Job of `schedule.image`).

Needs a Prefect server (not the temporary one a plain run starts):
  make prefect-server                                  # terminal 1: http://127.0.0.1:4200
  export PREFECT_API_URL=http://127.0.0.1:4200/api
  python -m flows.deploy                               # once, and again after changing the schedule
  make worker                                          # terminal 2: runs what the schedule starts
  python -m flows.deploy --run-now                     # optional: start one run at once, as the schedule would
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.client.schemas.schedules import CronSchedule
from prefect.exceptions import ObjectNotFound
from prefect.runner.storage import GitRepository

from flows.pipeline import pipeline
from stages.params import Params, ScheduleParams

ENTRYPOINT = "flows/pipeline.py:pipeline"
POOL_TYPES = ("process", "kubernetes")
K8S_NAMESPACE = "headstart"  # infra/k8s/namespace.yaml


class DeployError(RuntimeError):
    """A deployment that cannot be made as configured; the message says what to change."""


def _git(project: Path, *args: str) -> str:
    res = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else ""


def git_source(project: Path, schedule: ScheduleParams) -> tuple[str, str]:
    """The repository URL and branch a worker clones: params.yaml's, else this checkout's origin and branch.
    A local repository path becomes a file:// URL (a worker on this machine can clone it)."""
    url = schedule.repository or _git(project, "remote", "get-url", "origin")
    if not url:
        raise DeployError("schedule.repository is empty and this checkout has no 'origin' remote: set "
                          "schedule.repository in params.yaml to the git URL your workers can clone")
    if "://" not in url and not url.startswith("git@") and Path(url).expanduser().is_dir():
        url = Path(url).expanduser().resolve().as_uri()
    branch = schedule.branch or _git(project, "rev-parse", "--abbrev-ref", "HEAD")
    if not branch or branch == "HEAD":
        raise DeployError("no branch is checked out here: set schedule.branch in params.yaml")
    return url, branch


def ensure_work_pool(name: str) -> str:
    """The pool's type; a missing pool is created as a process pool. A Kubernetes pool is made by its
    worker (infra/k8s/prefect.yaml), which has the Kubernetes integration and its default job template."""
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            print(f"created process work pool {name!r}")
            return "process"
    if pool.type not in POOL_TYPES:
        raise DeployError(f"work pool {name!r} has type {pool.type!r}; schedule.work_pool needs a process or "
                          "a kubernetes pool")
    return pool.type


def job_variables(pool_type: str, schedule: ScheduleParams) -> dict:
    """What each flow run's job gets. Secrets never go here (the server stores these in the clear): a
    process worker passes on its own environment, a Kubernetes Job takes them from the cluster's Secrets."""
    if pool_type == "kubernetes":
        return {"image": schedule.image, "namespace": K8S_NAMESPACE, "service_account_name": "headstart-pipeline",
                "env": {"PREFECT_LOGGING_LEVEL": "INFO"}}
    return {"working_dir": str(Path(schedule.workdir).expanduser())} if schedule.workdir else {}


def deploy(project: Path, schedule: ScheduleParams, paused: bool = False) -> tuple[str, str, str]:
    """Create or update the deployment; returns its full name (flow/deployment), the repository URL and the
    branch its runs clone."""
    if not os.environ.get("PREFECT_API_URL"):
        raise DeployError("PREFECT_API_URL is not set: a schedule needs a running Prefect server. Start one with "
                          "`make prefect-server`, then export PREFECT_API_URL=http://127.0.0.1:4200/api")
    url, branch = git_source(project, schedule)
    pool_type = ensure_work_pool(schedule.work_pool)
    flow = pipeline.from_source(source=GitRepository(url=url, branch=branch), entrypoint=ENTRYPOINT)
    flow.deploy(
        name=schedule.deployment,
        work_pool_name=schedule.work_pool,
        schedule=CronSchedule(cron=schedule.cron, timezone=schedule.timezone),
        paused=paused,
        # One run at a time: two runs in one workspace would race on dvc.lock and the outputs. A run that
        # falls due while another is still going is queued, not dropped.
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        parameters={"sync": True},  # pull from and push to the DVC remote around the run
        job_variables=job_variables(pool_type, schedule),
        description=f"headstart nightly retraining of {url} at {branch}: a no-op unless DVC finds changed data, "
                    "code or params",
        tags=["headstart"],
        print_next_steps=False,
    )
    return f"{pipeline.name}/{schedule.deployment}", url, branch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    ap.add_argument("--paused", action="store_true", help="deploy with the schedule paused")
    ap.add_argument("--run-now", action="store_true", help="also start one run now (a worker must be running)")
    ap.add_argument("--repository", help="the git URL workers clone (default: schedule.repository, else origin)")
    ap.add_argument("--branch", help="the branch they run (default: schedule.branch, else the one checked out)")
    args = ap.parse_args(argv)
    schedule = Params.load(args.params).schedule
    schedule = replace(schedule, repository=args.repository or schedule.repository, branch=args.branch or schedule.branch)
    try:
        name, url, branch = deploy(Path.cwd(), schedule, paused=args.paused)
    except DeployError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"deployed {name}: {url} at {branch}, cron {schedule.cron!r} ({schedule.timezone}), work pool "
          f"{schedule.work_pool!r}, concurrency limit 1{', paused' if args.paused else ''}")
    print(f"start a worker with: prefect worker start --pool {schedule.work_pool}   (or: make worker)")
    if args.run_now:
        from prefect.deployments import run_deployment

        run = run_deployment(name, timeout=0)
        print(f"started flow run {run.name} ({run.id}); follow it in the Prefect UI at "
              f"{os.environ['PREFECT_API_URL'].removesuffix('/api')}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
