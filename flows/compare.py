"""`make compare`: fine-tuning strategies side by side, as a Prefect flow over DVC stages.

Prepares the data (the pipeline's own prepare stage), then runs compare@<name> from compare/dvc.yaml
for each entry of compare.strategies in params.yaml (DVC skips the ones whose code, data and settings
did not change), gathers them into metrics/strategies.json and plots/strategies.png, and records the
comparison in MLflow: a parent run "compare" with one nested run per strategy.

Run:  python -m flows.compare                       (what `make compare` does)
      python -m flows.compare --only full lp_ft     (a subset; the summary still needs every entry)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.pipeline import TASKS, WorkspaceBusy, _repro, apply_overrides, read_preset, workspace_lock
from stages.params import Params

COMPARE_DVC = "compare/dvc.yaml"


@task(name="summarise")
def _summarise(params_file: str) -> dict:
    from stages.compare import summarise

    return summarise(Params.load(Path(params_file)))


@task(name="log-to-mlflow", retries=2, retry_delay_seconds=10)
def _log(params_file: str) -> str:
    from stages.register import Store, lineage, log_comparison

    params = Params.load(Path(params_file))
    paths = params.paths
    return log_comparison(Store(paths.mlflow_db, paths.mlflow_artifacts), params.register.experiment,
                          paths.strategies_summary, paths.strategies, paths.strategies_plot,
                          lineage(paths.prepared, params.digest()))


strategy_task = task(_repro, name="strategy")


@flow(name="headstart-compare", log_prints=True)
def compare(params_file: str = "params.yaml", only: list[str] | None = None) -> dict:
    log = get_run_logger()
    params = Params.load(Path(params_file))
    names = list(only or params.compare.strategies)
    with workspace_lock():
        TASKS["prepare"]("prepare")
        outcomes = {n: strategy_task.with_options(name=f"strategy {n}")(f"{COMPARE_DVC}:compare@{n}") for n in names}
        log.info("strategies: %s", ", ".join(f"{n} {o}" for n, o in outcomes.items()))
        if set(names) != set(params.compare.strategies):
            return {"ran": outcomes}
        summary = _summarise(params_file)
        run_id = _log(params_file)
        log.info("MLflow: parent run %s with %d nested strategy runs", run_id, len(names))
    return {"ran": outcomes, "summary": summary, "mlflow_run": run_id}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these compare.strategies entries")
    parser.add_argument("--preset", type=Path, action="append", default=[], metavar="FILE",
                        help="apply a partial params file first (e.g. presets/text.yaml), as flows.pipeline does")
    args = parser.parse_args(argv)
    if args.preset:
        with workspace_lock():
            apply_overrides(Path(args.params), {k: v for f in args.preset for k, v in read_preset(f).items()})
    params = Params.load(Path(args.params))  # fail on a bad params file before anything starts
    unknown = [n for n in args.only or [] if n not in params.compare.strategies]
    if unknown:
        raise SystemExit(f"--only {' '.join(unknown)}: not in compare.strategies ({', '.join(params.compare.strategies)})")
    try:
        compare(params_file=args.params, only=args.only)
    except WorkspaceBusy as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
