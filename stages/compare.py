"""Fine-tuning strategies side by side: each entry of compare.strategies fine-tunes the same pre-trained
model on the same prepared data with its finetune settings changed (stages/strategy.py), and is scored
on the test split (accuracy with a 95% bootstrap interval, training seconds, trainable parameters).

  python -m stages.compare <name>    one entry -> paths.strategies/<name>.json (a DVC stage per entry,
                                     compare@<name> in compare/dvc.yaml, so each is cached on its own)
  python -m stages.compare --summary every entry's JSON -> paths.strategies_summary + paths.strategies_plot
`make compare` (python -m flows.compare) runs both and logs each strategy as a nested MLflow run.

compare/dvc.yaml is a pipeline of its own so that `dvc repro` (the nightly pipeline) does not train them
all; `dvc repro compare/dvc.yaml` does."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from stages import finetune, zoo
from stages.data import load_split
from stages.files import read_json, write_json
from stages.params import Params
from stages.stats import bootstrap_ci
from stages.train import predict


def run(params: Params, name: str) -> dict[str, Any]:
    """Fine-tune with compare.strategies[name]'s settings, score on test, write paths.strategies/<name>.json."""
    p = params.finetune_for(name)
    paths = params.paths
    if p.strategy == "lora" and zoo.family_of(params.model.name) != "hf":
        # one list serves both tasks: LoRA entries are recorded as not applicable to an image backbone
        result = {"strategy": name, "settings": params.compare.strategies[name],
                  "not_applicable": f"LoRA adapts transformer text models; {params.model.name} is not one"}
        write_json(paths.strategies / f"{name}.json", result)
        print(f"{name}: {result['not_applicable']} (skipped)")
        return result
    test = load_split(paths.prepared, "test")
    with tempfile.TemporaryDirectory(prefix=f"compare-{name}-") as tmp:
        # the model itself is not kept: the comparison is the product, and `make run` with the chosen
        # finetune.strategy trains the one to ship
        finetune.run(paths.prepared, Path(tmp) / "model", Path(tmp) / "history.csv", params.model, p,
                     paths.weights_lock, paths.checkpoints / "compare" / name)
        model, meta = zoo.load_checkpoint(Path(tmp) / "model")
        correct = predict(model, test.x, meta["preprocessing"], desc=f"test {name}").argmax(1) == test.y
        history = (Path(tmp) / "history.csv").read_text()
    train = meta["train"]
    n_boot, seed = params.evaluate.n_bootstrap, params.evaluate.seed
    result = {
        "strategy": name,
        "settings": params.compare.strategies[name],
        "accuracy": float(correct.mean()),
        "accuracy_ci95": [round(v, 6) for v in bootstrap_ci(lambda i: correct[i].mean(), len(correct), n_boot, seed)],
        "train_seconds": train["seconds"],
        "trainable_params": train["trainable_params"],
        "total_params": train["total_params"],
        "best_epoch": train["best_epoch"],
        "val_accuracy": train["best_val_accuracy"],
        **{k: train[k] for k in ("probe_C", "wise_alpha") if k in train},
        "n_test": int(len(correct)),
        "history_csv": history,
    }
    write_json(paths.strategies / f"{name}.json", result)
    lo, hi = result["accuracy_ci95"]
    print(f"{name}: test accuracy {result['accuracy']:.4f} [{lo:.4f}, {hi:.4f}], {result['train_seconds']:.0f} s, "
          f"{result['trainable_params']:,} trainable parameters")
    return result


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
    summary: dict[str, Any] = {"strategies": {n: {k: r[k] for k in keys} for n, r in results.items()}}
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
    ax1.set_xlim(max(0.0, float(acc.min() - lo.max()) - 0.05), min(1.0, float(acc.max() + hi.max()) + 0.02))
    ax1.set_xlabel("test accuracy (95% bootstrap CI)")
    for y, a in enumerate(acc):
        ax1.text(a, y, f" {a:.3f}", va="center", ha="left", fontsize=8)
    secs = [strategies[n]["train_seconds"] for n in names]
    share = [strategies[n]["trainable_params"] / strategies[n]["total_params"] for n in names]
    ax2.barh(names, secs, color="#DD8452")
    ax2.set_xlabel("training seconds")
    for y, (s, f) in enumerate(zip(secs, share, strict=True)):
        ax2.text(s, y, f" {s:.0f} s, {f:.1%} of weights train", va="center", ha="left", fontsize=8)
    ax2.set_xlim(0, max(secs) * 1.9 if max(secs) > 0 else 1)
    fig.suptitle(f"Fine-tuning strategies: {model_name}, same data and test set")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _print_table(summary: dict[str, Any]) -> None:
    rows = summary["strategies"]
    print(f"{'strategy':<18}{'test acc':>9}  {'95% CI':<18}{'seconds':>8}{'trainable':>12}")
    for n, r in sorted(rows.items(), key=lambda kv: -kv[1]["accuracy"]):
        lo, hi = r["accuracy_ci95"]
        print(f"{n:<18}{r['accuracy']:>9.4f}  [{lo:.4f}, {hi:.4f}]  {r['train_seconds']:>7.0f}"
              f"{r['trainable_params']:>12,}")
    if "best_vs_full" in summary:
        b = summary["best_vs_full"]
        print(f"best on validation: {b['best']} ({b['accuracy_difference']:+.4f} test accuracy vs full; 95% CIs "
              f"{'overlap' if b['cis_overlap'] else 'do not overlap'})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("strategy", nargs="?", help="the compare.strategies entry to train and score")
    parser.add_argument("--summary", action="store_true", help="gather every entry's result (after they ran)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    args = parser.parse_args(argv)
    params = Params.load(args.params)
    if args.summary == bool(args.strategy):
        parser.error(f"give one strategy ({', '.join(params.compare.strategies)}) or --summary")
    if args.summary:
        summarise(params)
    else:
        if args.strategy not in params.compare.strategies:
            parser.error(f"{args.strategy!r} is not in compare.strategies: {', '.join(params.compare.strategies)}")
        run(params, args.strategy)


if __name__ == "__main__":
    main()

