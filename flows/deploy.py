"""Deploy the pipeline for scheduled retraining on a Prefect server: deployment
`headstart-pipeline/<schedule.deployment>` with the cron schedule in params.yaml (nightly by default), on a
process work pool (created when missing), at most one run at a time (a run due while one is still going
waits for it). Each run is `flows.pipeline` in this project directory: when DVC says data, code and params
are unchanged it logs "nothing to retrain" and stops; otherwise it retrains, evaluates, exports and gates.

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
import sys
from pathlib import Path

from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.client.schemas.schedules import CronSchedule
from prefect.exceptions import ObjectNotFound

from flows.pipeline import pipeline
from stages.params import Params, ScheduleParams

ENTRYPOINT = "flows/pipeline.py:pipeline"


def ensure_work_pool(name: str) -> None:
    """Create the process work pool `name` unless it exists (a pool of another type is an error)."""
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            print(f"created process work pool {name!r}")
            return
    if pool.type != "process":
        raise SystemExit(f"work pool {name!r} exists with type {pool.type!r}; schedule.work_pool needs a process pool")


def deploy(project: Path, schedule: ScheduleParams, paused: bool = False) -> str:
    """Create or update the deployment; returns its full name (flow/deployment)."""
    if not os.environ.get("PREFECT_API_URL"):
        raise SystemExit("PREFECT_API_URL is not set: a schedule needs a running Prefect server. Start one with "
                         "`make prefect-server`, then export PREFECT_API_URL=http://127.0.0.1:4200/api")
    ensure_work_pool(schedule.work_pool)
    project = project.resolve()
    flow = pipeline.from_source(source=str(project), entrypoint=ENTRYPOINT)
    flow.deploy(
        name=schedule.deployment,
        work_pool_name=schedule.work_pool,
        schedule=CronSchedule(cron=schedule.cron, timezone=schedule.timezone),
        paused=paused,
        # One run at a time: two runs in one workspace would race on dvc.lock and the outputs. A run that
        # falls due while another is still going is queued, not dropped.
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        # The worker starts the run in this directory with this environment's Python and packages.
        job_variables={"working_dir": str(project), "env": {"PYTHONPATH": str(project)}},
        description="headstart nightly retraining: a no-op unless DVC finds changed data, code or params",
        tags=["headstart"],
        print_next_steps=False,
    )
    return f"{pipeline.name}/{schedule.deployment}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    ap.add_argument("--paused", action="store_true", help="deploy with the schedule paused")
    ap.add_argument("--run-now", action="store_true", help="also start one run now (a worker must be running)")
    args = ap.parse_args(argv)
    schedule = Params.load(args.params).schedule
    name = deploy(Path.cwd(), schedule, paused=args.paused)
    print(f"deployed {name}: cron {schedule.cron!r} ({schedule.timezone}), work pool {schedule.work_pool!r}, "
          f"concurrency limit 1{', paused' if args.paused else ''}")
    print(f"start a worker with: prefect worker start --pool {schedule.work_pool}   (or: make worker)")
    if args.run_now:
        from prefect.deployments import run_deployment

        run = run_deployment(name, timeout=0)
        print(f"started flow run {run.name} ({run.id}); follow it in the Prefect UI at "
              f"{os.environ['PREFECT_API_URL'].removesuffix('/api')}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
