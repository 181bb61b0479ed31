"""`make curves`: label-efficiency curves as a Prefect flow over DVC stages (stages/curves.py says what
each point is).

Resolves the model (the pipeline's prepare and select stages, for model.name: auto), runs every point of
curves/dvc.yaml that is out of date (DVC skips the rest), then writes paths.label_efficiency and
paths.label_efficiency_plot and logs them to MLflow as a run named "curves".

Run:  python -m flows.curves                    (what `make curves` does)
      python -m flows.curves --preset tasks/text.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows import compose
from flows.pipeline import TASKS, _repro
from flows.workspace import WorkspaceBusy, workspace_lock
from stages import curves as curves_stage
from stages.params import RUN_PARAMS, Params

CURVES_DVC = "curves/dvc.yaml"


@task(name="summary")
def _summary(params_file: str) -> dict:
    return curves_stage.summary(Params.load(Path(params_file)))


@task(name="log-to-mlflow", retries=2, retry_delay_seconds=10)
def _log(params_file: str) -> str:
    from stages.registry import Store
    from stages.tracking import log_curves

    params = Params.load(Path(params_file))
    paths = params.paths
    return log_curves(Store(paths.mlflow_db, paths.mlflow_artifacts), params.register.experiment,
                      paths.label_efficiency, paths.label_efficiency_plot, params.digest())


point_task = task(_repro, name="point")


@flow(name="headstart-curves", log_prints=True)
def curves(params_file: str = str(RUN_PARAMS)) -> dict:
    log = get_run_logger()
    params = Params.load(Path(params_file))
    c = params.curves
    with workspace_lock():
        TASKS["prepare"]("prepare")
        TASKS["select"]("select")  # paths.chosen_model, when model.name is auto
        outcomes = {}
        # the cheapest points first: a broken setting fails in seconds, not after the 1,000-per-class runs
        for budget in sorted(c.budgets):
            for seed in c.seeds:
                for model in curves_stage.MODELS:
                    name = f"{model}-{budget}-{seed}"
                    outcomes[name] = point_task.with_options(name=f"point {name}")(f"{CURVES_DVC}:curve@{name}")
        ran = sum(not o.startswith("up to date") for o in outcomes.values())
        log.info("%d of %d points trained, the rest were up to date", ran, len(outcomes))
        result = _summary(params_file)
        run_id = _log(params_file)
        log.info("MLflow: run %s", run_id)
    return {"points": outcomes, "label_multiplier": result["label_multiplier"], "mlflow_run": run_id}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(RUN_PARAMS), help="params file (default: %(default)s, composed first)")
    parser.add_argument("--task", "--name", dest="task", metavar="NAME", help="the task (default: the current one)")
    parser.add_argument("--preset", type=Path, action="append", default=[], metavar="FILE",
                        help="apply a partial params file for this run (e.g. presets/smoke.yaml), as flows.pipeline does")
    args = parser.parse_args(argv)
    if args.params == str(RUN_PARAMS):
        compose.write_for_command(args.task, args.preset)
    Params.load(Path(args.params))  # fail on a bad params file before anything starts
    try:
        curves(params_file=args.params)
    except WorkspaceBusy as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
