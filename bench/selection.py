"""Does the select stage's ranking predict what fine-tuning gives? Scores every select.candidates entry
(LogME, k-NN; timed), then trains each one the way it would be used and scores it on the test split:
a pre-trained candidate is fine-tuned with the finetune settings in params.yaml, `random:<name>` is
trained from scratch with the baseline's budget and lr, `tfidf` is the TF-IDF + logistic-regression
floor. Reports Kendall's tau and weighted tau between each score and the test accuracies (among the
pre-trained candidates, the choice select makes, and among all), how far select's pick is from the best
candidate, and the scoring time against fine-tuning them all, all measured in this run. Candidates select
skipped (another modality, weights missing or not the locked files) are listed with the reason.

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

from scipy.stats import kendalltau, weightedtau

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


def rank_agreement(scores: list[float], accuracy: list[float]) -> dict[str, float | None]:
    """Kendall's tau between a score and the trained accuracies, and its weighted form (scipy's weightedtau,
    hyperbolic weights: swaps among the top candidates, the ones a choice is made from, count most). None
    with fewer than 3 candidates: no ranking worth the name."""
    if len(scores) < 3:
        return {"tau": None, "weighted_tau": None}
    return {"tau": round(float(kendalltau(scores, accuracy).statistic), 4),
            "weighted_tau": round(float(weightedtau(scores, accuracy).statistic), 4)}


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
        rows, skipped = [], {}
        for name in params.select.candidates:
            if "logme" not in scored["candidates"][name]:  # another modality's model, or weights not usable here
                skipped[name] = scored["candidates"][name]["skipped"]
                continue
            sub = Path(tmp) / name.replace(":", "_").replace("/", "_")
            sub.mkdir()
            acc, seconds = trained_accuracy(name, params, sub, text_files)
            rows.append({"candidate": name, **scored["candidates"][name], "test_accuracy": acc,
                         "train_seconds": round(seconds, 1)})
    # the choice select makes is among the pre-trained candidates; random twins and tfidf are references
    real = [r for r in rows if r["candidate"] != select.TFIDF and not r["candidate"].startswith(select.RANDOM)]
    taus = {f"{k}{suffix}": rank_agreement([r[k] for r in among], [r["test_accuracy"] for r in among])
            for k in ("logme", "knn_accuracy") for suffix, among in (("", rows), ("_pretrained", real))}
    best = max(real, key=lambda r: r["test_accuracy"]) if real else None
    picked = next((r for r in real if r["candidate"] == scored["chosen"]), None)
    default = next(r for r in rows if r["candidate"] == zoo.resolve(params.model, paths.chosen_model).name
                   or r["candidate"] == scored["chosen"])
    finetune_all = sum(r["train_seconds"] for r in real)
    gap = round(100 * (picked["test_accuracy"] - best["test_accuracy"]), 2) if picked and best else None
    share = round(scored["seconds"] / finetune_all, 4) if finetune_all else None
    result = {"dataset": params.prepare.dataset, "candidates": rows, "skipped": skipped, "rank_agreement": taus,
              "chosen": scored["chosen"], "best": best and best["candidate"], "chosen_minus_best_points": gap,
              "selection_seconds": scored["seconds"], "finetune_all_seconds": round(finetune_all, 1),
              "selection_share_of_finetuning_all": share,
              "one_finetune_seconds": default["train_seconds"],
              "selection_share_of_one_finetune": round(scored["seconds"] / default["train_seconds"], 4)}
    print(f"\n{'candidate':<50}{'LogME':>9}{'k-NN':>7}{'score s':>9}{'trained acc':>12}{'train s':>9}")
    for r in sorted(rows, key=lambda r: -r["logme"]):
        print(f"{r['candidate']:<50}{r['logme']:>9.4f}{r['knn_accuracy']:>7.3f}{r['seconds']:>9.1f}"
              f"{r['test_accuracy']:>12.4f}{r['train_seconds']:>9.1f}")
    for name, why in skipped.items():
        print(f"{name:<50} skipped: {why}")
    for suffix, among in (("_pretrained", real), ("", rows)):
        print(f"rank agreement with test accuracy, {len(among)} {'pre-trained ' if suffix else ''}candidates: "
              + ", ".join(f"{k} tau {taus[k + suffix]['tau']:+.3f} / weighted {taus[k + suffix]['weighted_tau']:+.3f}"
                          for k in ("logme", "knn_accuracy")))
    if picked and best:
        print(f"select picks {picked['candidate']} ({picked['test_accuracy']:.4f}); the best is {best['candidate']} "
              f"({best['test_accuracy']:.4f}): {result['chosen_minus_best_points']:+.2f} points")
    if finetune_all:
        print(f"scoring all candidates {scored['seconds']:.1f} s = {share:.1%} of fine-tuning the {len(real)} "
              f"pre-trained ones ({finetune_all:.1f} s)")
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
