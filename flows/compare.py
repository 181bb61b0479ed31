"""`make compare`: fine-tuning strategies side by side, as a Prefect flow over DVC stages.

Prepares the data and resolves the model (the pipeline's own prepare and select stages), then runs
compare@<name> from compare/dvc.yaml for each entry of compare.strategies in params.yaml (DVC skips the
ones whose code, data and settings did not change), gathers them into metrics/strategies.json and plots/strategies.png, and records the
comparison in MLflow: a parent run "compare" with one nested run per strategy.

Run:  python -m flows.compare                       (what `make compare` does)
      python -m flows.compare --only full lp_ft     (a subset; the summary still needs every entry)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from prefect import flow, get_run_logger, task

from flows import compose
from flows.pipeline import TASKS, _repro
from flows.workspace import WorkspaceBusy, workspace_lock
from stages.files import read_json, write_json
from stages.params import RUN_PARAMS, Params

COMPARE_DVC = "compare/dvc.yaml"


@task(name="summarise")
def _summarise(params_file: str) -> dict:
    return summarise(Params.load(Path(params_file)))


@task(name="log-to-mlflow", retries=2, retry_delay_seconds=10)
def _log(params_file: str) -> str:
    from stages.registry import Store
    from stages.tracking import lineage, log_comparison

    params = Params.load(Path(params_file))
    paths = params.paths
    return log_comparison(Store(paths.mlflow_db, paths.mlflow_artifacts), params.register.experiment,
                          paths.strategies_summary, paths.strategies, paths.strategies_plot,
                          lineage(paths.prepared, params.digest()))


strategy_task = task(_repro, name="strategy")


@flow(name="headstart-compare", log_prints=True)
def compare(params_file: str = str(RUN_PARAMS), only: list[str] | None = None) -> dict:
    log = get_run_logger()
    params = Params.load(Path(params_file))
    names = list(only or params.compare.strategies)
    with workspace_lock():
        TASKS["prepare"]("prepare")
        TASKS["select"]("select")  # paths.chosen_model: the model every strategy fine-tunes
        outcomes = {n: strategy_task.with_options(name=f"strategy {n}")(f"{COMPARE_DVC}:compare@{n}") for n in names}
        log.info("strategies: %s", ", ".join(f"{n} {o}" for n, o in outcomes.items()))
        if set(names) != set(params.compare.strategies):
            return {"ran": outcomes}
        summary = _summarise(params_file)
        run_id = _log(params_file)
        log.info("MLflow: parent run %s with %d nested strategy runs", run_id, len(names))
    return {"ran": outcomes, "summary": summary, "mlflow_run": run_id}


def summarise(params: Params) -> dict[str, Any]:
    """Gather every compare.strategies entry's result into paths.strategies_summary and draw the chart."""
    paths = params.paths
    missing = [n for n in params.compare.strategies if not (paths.strategies / f"{n}.json").exists()]
    if missing:
        raise FileNotFoundError(f"no result yet for {', '.join(missing)} in {paths.strategies}: run "
                                f"`make compare` (or dvc repro compare/dvc.yaml)")
    results = {n: read_json(paths.strategies / f"{n}.json") for n in params.compare.strategies}
    skipped = {n: results.pop(n)["not_applicable"] for n in list(results) if "not_applicable" in results[n]}
    keys = ("accuracy", "accuracy_ci95", "train_seconds", "trainable_params", "total_params", "val_accuracy",
            "settings")
    summary: dict[str, Any] = {"strategies": {n: {k: r[k] for k in keys if k in r} for n, r in results.items()}}
    for n, r in results.items():  # a headstart-pre-trained backbone: how much of its source task each keeps
        if "forgetting" in r:
            summary["strategies"][n]["forgetting"] = r["forgetting"]["forgetting"]
            summary["strategies"][n]["forgetting_ci95"] = r["forgetting"]["forgetting_ci95"]
    best = max(results, key=lambda n: results[n]["val_accuracy"])
    summary["best_on_validation"] = best
    if skipped:
        summary["not_applicable"] = skipped
    if "full" in results:
        a, b = results[best]["accuracy_ci95"], results["full"]["accuracy_ci95"]
        summary["best_vs_full"] = {
            "best": best, "accuracy_difference": round(results[best]["accuracy"] - results["full"]["accuracy"], 6),
            "cis_overlap": bool(a[0] <= b[1] and b[0] <= a[1])}
    write_json(paths.strategies_summary, summary)
    _plot(paths.strategies_plot, summary["strategies"], params.model.name)
    _print_table(summary)
    return summary


def _plot(out: Path, strategies: dict[str, dict], model_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.files import atomic_path

    names = sorted(strategies, key=lambda n: strategies[n]["accuracy"])
    acc = np.array([strategies[n]["accuracy"] for n in names])
    lo = acc - np.array([strategies[n]["accuracy_ci95"][0] for n in names])
    hi = np.array([strategies[n]["accuracy_ci95"][1] for n in names]) - acc
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.6), sharey=True,
                                   gridspec_kw={"width_ratios": [3, 2]})
    ax1.barh(names, acc, xerr=[lo, hi], color="#4C72B0", capsize=3)
    left = max(0.0, float(acc.min() - lo.max()) - 0.05)
    ax1.set_xlim(left, min(1.0, float(acc.max() + hi.max()) + 0.02))
    ax1.set_xlabel("test accuracy (95% bootstrap CI)")
    for y, a in enumerate(acc):  # inside the bar's base, clear of the interval at its end
        ax1.text(left + 0.003, y, f"{a:.4f}", va="center", ha="left", fontsize=8, color="white")
    secs = [strategies[n]["train_seconds"] for n in names]
    share = [strategies[n]["trainable_params"] / strategies[n]["total_params"] for n in names]
    ax2.barh(names, secs, color="#DD8452")
    ax2.set_xlabel("training seconds")
    for y, (s, f) in enumerate(zip(secs, share, strict=True)):
        ax2.text(s, y, f" {s:.0f} s, {f:.1%} of weights train" if f >= 0.01 else f" {s:.0f} s, {f:.2%} of weights train",
                 va="center", ha="left", fontsize=8)
    ax2.set_xlim(0, max(secs) * 1.9 if max(secs) > 0 else 1)
    fig.suptitle(f"Fine-tuning strategies: {model_name}, same data and test set")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _print_table(summary: dict[str, Any]) -> None:
    rows = summary["strategies"]
    print(f"{'strategy':<18}{'test acc':>9}  {'95% CI':<18}{'seconds':>8}{'trainable':>12}"
          + ("  forgetting [95% CI]" if any("forgetting" in r for r in rows.values()) else ""))
    for n, r in sorted(rows.items(), key=lambda kv: -kv[1]["accuracy"]):
        lo, hi = r["accuracy_ci95"]
        print(f"{n:<18}{r['accuracy']:>9.4f}  [{lo:.4f}, {hi:.4f}]  {r['train_seconds']:>7.0f}"
              f"{r['trainable_params']:>12,}" + (f"  {r['forgetting']:+.4f} [{r['forgetting_ci95'][0]:+.4f}, "
                                                  f"{r['forgetting_ci95'][1]:+.4f}]" if "forgetting" in r else ""))
    if "best_vs_full" in summary:
        b = summary["best_vs_full"]
        print(f"best on validation: {b['best']} ({b['accuracy_difference']:+.4f} test accuracy vs full; 95% CIs "
              f"{'overlap' if b['cis_overlap'] else 'do not overlap'})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(RUN_PARAMS), help="params file (default: %(default)s, composed first)")
    parser.add_argument("--task", "--name", dest="task", metavar="NAME", help="the task (default: the current one)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these compare.strategies entries")
    parser.add_argument("--preset", type=Path, action="append", default=[], metavar="FILE",
                        help="apply a partial params file for this run (e.g. presets/smoke.yaml), as flows.pipeline does")
    args = parser.parse_args(argv)
    if args.params == str(RUN_PARAMS):
        compose.write_for_command(args.task, args.preset)
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
