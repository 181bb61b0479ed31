"""Score every model on the full test set and decide whether transfer helped.
For each model: accuracy and macro-F1 with 95% bootstrap intervals, per-class accuracy and a confusion
matrix. Fine-tuned vs scratch: the paired-bootstrap interval of the accuracy gain, McNemar's exact test,
and a verdict (positive / negative / inconclusive) read off the interval.
Reads paths.prepared, paths.finetuned, paths.baselines; writes paths.evaluate_metrics and
paths.evaluate_plots.
Run: dvc repro evaluate   (or: python -m stages.evaluate)"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages import zoo
from stages.data import load_split
from stages.files import atomic_path, read_json, write_json
from stages.params import EvaluateParams, cli
from stages.stats import bootstrap_ci, macro_f1, mcnemar_p, verdict
from stages.train import predict


def run(prepared: Path, finetuned: Path, baselines: Path, out: Path, plots: Path, p: EvaluateParams) -> dict:
    manifest = read_json(Path(prepared) / "manifest.json")
    classes = manifest["classes"]
    test = load_split(prepared, "test")
    y, n, k = test.y, len(test.y), len(classes)

    preds, pres = {}, {}
    for name, path in zoo.model_dirs(finetuned, baselines).items():
        model, meta = zoo.load_checkpoint(path)
        pres[name] = meta["preprocessing"]
        preds[name] = predict(model, test.x, pres[name], desc=f"test {name}").argmax(1)

    report: dict = {}
    for name, pred in preds.items():
        correct = pred == y
        report[name] = {
            "accuracy": float(correct.mean()),
            "accuracy_ci95": _round(bootstrap_ci(lambda i: correct[i].mean(), n, p.n_bootstrap, p.seed)),
            "macro_f1": macro_f1(y, pred, k),
            "macro_f1_ci95": _round(bootstrap_ci(lambda i: macro_f1(y[i], pred[i], k), n, p.n_bootstrap, p.seed)),
            "per_class_accuracy": {c: float(correct[y == j].mean()) for j, c in enumerate(classes)},
        }

    ft, sc = preds["finetuned"] == y, preds["scratch"] == y
    diff = ft.astype(float) - sc.astype(float)
    gain_ci = bootstrap_ci(lambda i: diff[i].mean(), n, p.n_bootstrap, p.seed)
    report.update({
        "transfer_gain": float(diff.mean()),
        "transfer_gain_ci95": _round(gain_ci),
        "mcnemar_p": mcnemar_p(ft, sc),
        "verdict": verdict(gain_ci),
        "n_test": n,
        "test_sha256": manifest["test_sha256"],
    })  # fmt: skip
    if zoo.modality(pres["finetuned"]) == "text":
        from stages.text import truncated_count

        report["truncated_test_texts"] = truncated_count(test.x, pres["finetuned"])  # cut at model.max_length tokens
    write_json(out, report)
    _confusion_plots(plots, y, preds, classes)
    _print_table(report)
    return report


def _round(ci: tuple[float, float]) -> list[float]:
    return [round(ci[0], 6), round(ci[1], 6)]


def _confusion_plots(out: Path, y: np.ndarray, preds: dict[str, np.ndarray], classes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    k = len(classes)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for name, pred in preds.items():
            cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
            fig, ax = plt.subplots(figsize=(7, 6))
            im = ax.imshow(cm / cm.sum(1, keepdims=True), cmap="Blues", vmin=0, vmax=1)
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] > 0.5 * cm[i].sum() else "black")
            ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(k), classes, fontsize=8)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(f"{name}: accuracy {np.mean(pred == y):.3f} on {len(y)} test examples")
            fig.colorbar(im, ax=ax, label="fraction of the true class")
            fig.tight_layout()
            fig.savefig(tmp / f"confusion_{name}.png", dpi=110)
            plt.close(fig)


def _print_table(r: dict) -> None:
    print(f"{'model':<14}{'accuracy':>10}  {'95% CI':<17}{'macro-F1':>9}")
    for name in ("finetuned", *zoo.BASELINES):
        m = r[name]
        lo, hi = m["accuracy_ci95"]
        print(f"{name:<14}{m['accuracy']:>10.4f}  [{lo:.4f}, {hi:.4f}] {m['macro_f1']:>9.4f}")
    lo, hi = r["transfer_gain_ci95"]
    print(f"transfer gain {r['transfer_gain']:+.4f} [{lo:+.4f}, {hi:+.4f}], McNemar p={r['mcnemar_p']:.2g}: "
          f"{r['verdict']}")


def main(argv: list[str] | None = None) -> None:
    params = cli(__doc__, argv)
    paths = params.paths
    run(paths.prepared, paths.finetuned, paths.baselines, paths.evaluate_metrics, paths.evaluate_plots,
        params.evaluate)


if __name__ == "__main__":
    main()
