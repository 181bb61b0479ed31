"""Does the select stage's ranking predict what fine-tuning gives? Scores every select.candidates entry
(LogME, k-NN; timed), then trains each one the way it would be used and scores it on the test split:
a pre-trained candidate is fine-tuned with the finetune settings in params.yaml, `random:<name>` is
trained from scratch with the baseline's budget and lr, `tfidf` is the TF-IDF + logistic-regression
floor. Reports Kendall's tau between each score and the test accuracies, and the selection time against
one fine-tune of the default model, both measured in this run.

Run:  .venv/bin/python bench/selection.py                        # the task params.yaml is set to
      .venv/bin/python bench/selection.py --preset tasks/text.yaml   # another, without touching params.yaml
Needs the prepared data of that task (make run TASK=...). Everything it trains goes to a temporary folder.
Prints a table and writes bench/results/selection-<dataset>.json."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from scipy.stats import kendalltau

from flows import compose
from stages import baseline, finetune, select, weights, zoo
from stages.files import read_json
from stages.params import Params
from stages.predict import predict
from stages.splits import load_split


def params_with(preset: Path | None) -> Params:
    """The current task's settings, with `preset` (a partial params file) applied in memory."""
    return compose.settings(compose.compose(compose.current_task(), [preset] if preset is not None else []))


def trained_accuracy(name: str, params: Params, tmp: Path, text_files: Path | None) -> tuple[float, float]:
    """(test accuracy, seconds) of candidate `name` trained as it would be used."""
    paths = params.paths
    classes = read_json(paths.prepared / "manifest.json")["classes"]
    train, val, test = (load_split(paths.prepared, s) for s in ("train", "val", "test"))
    start = time.perf_counter()
    if name == select.TFIDF:
        pre = {"modality": "text", "files": str(text_files), "max_length": params.model.max_length}
        model, pre, _, _ = baseline._tfidf_floor(train, val, classes, pre, params.baseline)
    elif name.startswith(select.RANDOM):
        m = dataclasses.replace(params.model, name=name.removeprefix(select.RANDOM))
        baseline.train_scratch(train, val, classes, tmp / "scratch", tmp / "scratch.csv", m, params.finetune,
                          params.baseline, paths.weights_lock, None)
        model, meta = zoo.load_checkpoint(tmp / "scratch")
        pre = meta["preprocessing"]
    else:
        m = dataclasses.replace(params.model, name=name)
        finetune.run(paths.prepared, tmp / "ft", tmp / "ft.csv", m, params.finetune, paths.weights_lock)
        model, meta = zoo.load_checkpoint(tmp / "ft")
        pre = meta["preprocessing"]
    seconds = time.perf_counter() - start
    acc = float((predict(model, test.x, pre, desc=f"test {name}").argmax(1) == test.y).mean())
    return acc, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=Path, help="a partial params file applied in memory (e.g. tasks/text.yaml)")
    args = parser.parse_args(argv)
    params = params_with(args.preset)
    paths = params.paths
    if not (paths.prepared / "manifest.json").exists():
        raise SystemExit(f"{paths.prepared} has no prepared data: run `make run` for this task first")
    manifest = read_json(paths.prepared / "manifest.json")
    if manifest.get("dataset") not in (None, params.prepare.dataset) or (
            params.prepare.classes and manifest["classes"] != params.prepare.classes):
        raise SystemExit(f"{paths.prepared} holds another task's data: run `make run` for this task first")
    with tempfile.TemporaryDirectory(prefix="bench-selection-") as tmp:
        scored = select.run(paths.prepared, Path(tmp) / "select.json", params.model, params.select, paths.weights_lock)
        text_files = next((weights.find_weights(n.removeprefix(select.RANDOM)).path for n in params.select.candidates
                           if n.removeprefix(select.RANDOM).startswith("hf:")), None)
        rows = []
        for name in params.select.candidates:
            if "logme" not in scored["candidates"][name]:  # another modality's model
                continue
            sub = Path(tmp) / name.replace(":", "_").replace("/", "_")
            sub.mkdir()
            acc, seconds = trained_accuracy(name, params, sub, text_files)
            rows.append({"candidate": name, **scored["candidates"][name], "test_accuracy": acc,
                         "train_seconds": round(seconds, 1)})
    acc = [r["test_accuracy"] for r in rows]
    taus = {k: float(kendalltau([r[k] for r in rows], acc).statistic) for k in ("logme", "knn_accuracy")}
    default = next(r for r in rows if r["candidate"] == zoo.resolve(params.model, paths.chosen_model).name
                   or r["candidate"] == scored["chosen"])
    result = {"dataset": params.prepare.dataset, "candidates": rows, "kendall_tau": taus,
              "selection_seconds": scored["seconds"], "one_finetune_seconds": default["train_seconds"],
              "selection_share_of_one_finetune": round(scored["seconds"] / default["train_seconds"], 4)}
    print(f"\n{'candidate':<50}{'LogME':>9}{'k-NN':>7}{'score s':>9}{'trained acc':>12}{'train s':>9}")
    for r in sorted(rows, key=lambda r: -r["logme"]):
        print(f"{r['candidate']:<50}{r['logme']:>9.4f}{r['knn_accuracy']:>7.3f}{r['seconds']:>9.1f}"
              f"{r['test_accuracy']:>12.4f}{r['train_seconds']:>9.1f}")
    print(f"Kendall tau with test accuracy: LogME {taus['logme']:+.3f}, k-NN {taus['knn_accuracy']:+.3f} "
          f"({len(rows)} candidates)")
    print(f"selection of all candidates {scored['seconds']:.1f} s = {result['selection_share_of_one_finetune']:.1%} "
          f"of one fine-tune of {default['candidate']} ({default['train_seconds']:.1f} s)")
    # named by dataset (selection-fashion-mnist.json, selection-wordnet.json), or by the preset for the tasks
    # that share a dataset with another (selection-pretrain.json)
    tag = args.preset.stem if args.preset and args.preset.stem not in ("image", "text") else params.prepare.dataset
    out = ROOT / "bench" / "results" / f"selection-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
