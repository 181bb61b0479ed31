"""Tune a training setting on a development split, never on the test set. The validation split is too
small to choose between recipes (the text demo's 200 glosses: one gloss is half a point, and three
settings 1 point apart on test tied on it), and choosing on the test set flatters the figure it then
reports. This draws a separate development split from the source's examples that prepare left unused
(same seed and per-class shuffle, so it is disjoint from train, validation and test; copies of those are
dropped from it), trains the reference recipe (params.yaml + preset) and each variant on the task's
prepared training split, and scores them on it: accuracy with a 95% bootstrap interval, and each variant's
paired difference from the reference (same examples, averaged over the seeds) with its interval.

Run:  .venv/bin/python bench/recipe.py --preset tasks/text.yaml --variant finetune.lr=5.0e-5 \\
          --variant finetune.epochs=20 --seeds 0 1
      .venv/bin/python bench/recipe.py --kind scratch --variant baseline.scratch_lr=1.0e-3
A variant is one or more space-separated key=value settings (YAML values, checked like params.yaml).
--kind scratch trains the from-scratch baseline instead of the fine-tune (seeded by baseline.seed).
Everything it trains goes to a temporary folder; the test split is not scored.
Prints a table and writes bench/results/recipe-<dataset or preset>-<kind>.json."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from flows import compose
from stages import baseline, finetune, prepare, sources, zoo
from stages.files import read_json
from stages.params import Params
from stages.predict import predict
from stages.splits import Split, draw, load_split
from stages.stats import bootstrap_ci


def development_split(params: Params, prepared: Path, per_class: int) -> Split:
    """`per_class` examples per class that prepare did not draw: the next ones in each class's shuffle."""
    p = params.prepare
    src = sources.keep_classes(sources.read(p.dataset, params.paths.source, p), p.classes)
    if src.test is None and p.test_per_class is None:
        raise SystemExit("prepare.test_per_class is null: the test split took every example left, none remain")
    used = p.per_class + p.val_per_class + (p.test_per_class if src.test is None else 0)
    short = [f"{name!r} has {max(0, n - used)}" for name, n in zip(src.classes, np.bincount(src.pool.y))
             if n - used < per_class]
    if short:
        raise SystemExit(f"--dev-per-class {per_class}: too few unused examples ({', '.join(short)}); ask for fewer")
    # drawn exactly as prepare draws (splits.draw shuffles each class with its own (seed, class) generator):
    # the first `used` of each class are prepare's train/val/test, the next `per_class` ours
    dev = draw(src, per_class=used, val_per_class=per_class, test_per_class=0, seed=p.seed).val
    keys = prepare.duplicate_keys(dev.x, p.near_duplicate_bits)
    copies = {i for name in ("train", "val", "test") for i, _, _ in prepare._matches(
        keys, prepare.duplicate_keys(load_split(prepared, name).x, p.near_duplicate_bits), p.near_duplicate_bits)}
    keep = np.array([i not in copies for i in range(len(dev.y))], bool)
    return Split(dev.x[keep], dev.y[keep])


def variant_params(base: Params, settings: list[str]) -> Params:
    """`base` with `settings` ("finetune.lr=5.0e-5", parsed as `--set` is) applied, checked like params.yaml."""
    try:
        overrides = compose.parse_overrides(settings)
        return compose.with_settings(base, overrides)
    except KeyError as e:  # an unknown key or a missing "=": one line (a bad value stays a ValueError naming it)
        raise SystemExit(str(e.args[0])) from None


def train_and_score(params: Params, kind: str, seed: int, dev: Split, tmp: Path) -> dict:
    paths = params.paths
    out = tmp / "model"
    model_p = zoo.resolve(params.model, paths.chosen_model)
    start = time.perf_counter()
    if kind == "finetuned":
        ft = dataclasses.replace(params.finetune, seed=seed)
        result = finetune.run(paths.prepared, out, tmp / "h.csv", model_p, ft, paths.weights_lock)
        val_accuracy = result.best_val_accuracy
    else:
        classes = read_json(paths.prepared / "manifest.json")["classes"]
        train, val = load_split(paths.prepared, "train"), load_split(paths.prepared, "val")
        bp = dataclasses.replace(params.baseline, seed=seed)
        val_accuracy = baseline.train_scratch(train, val, classes, out, tmp / "h.csv", model_p, params.finetune, bp,
                                         paths.weights_lock, None)
    seconds = time.perf_counter() - start
    model, meta = zoo.load_checkpoint(out)
    correct = predict(model, dev.x, meta["preprocessing"], desc="development").argmax(1) == dev.y
    return {"seed": seed, "dev_accuracy": float(correct.mean()), "correct": correct,
            "val_accuracy": round(val_accuracy, 4), "best_epoch": meta["train"]["best_epoch"],
            "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=Path, help="a partial params file applied in memory (e.g. tasks/text.yaml)")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[ KEY=VALUE...]",
                        help="settings that differ from the reference; repeat for more variants")
    parser.add_argument("--kind", choices=["finetuned", "scratch"], default="finetuned")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (the data stays the same)")
    parser.add_argument("--dev-per-class", type=int, default=150)
    parser.add_argument("--n-bootstrap", type=int, default=2000)
    args = parser.parse_args(argv)
    base = compose.settings(compose.compose(compose.current_task(), [args.preset] if args.preset else []))
    variants = [("reference", [])] + [(v, v.split()) for v in args.variant]
    checked = [(name, variant_params(base, s)) for name, s in variants]  # a typo fails before any training
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as tmp:
        prepared = Path(tmp) / "prepared"
        # the task's own prepared data, made here so the workspace's params.yaml and data/ stay as they are
        prepare.run(base.paths.source, prepared, base.prepare)
        dev = development_split(base, prepared, args.dev_per_class)
        print(f"development split: {len(dev.y)} examples ({args.dev_per_class} per class, copies removed)")
        for name, params in checked:
            params = dataclasses.replace(params, paths=dataclasses.replace(params.paths, prepared=prepared))
            runs = []
            for seed in args.seeds:
                with tempfile.TemporaryDirectory(dir=tmp) as sub:
                    runs.append(train_and_score(params, args.kind, seed, dev, Path(sub)))
                print(json.dumps({"variant": name, **{k: v for k, v in runs[-1].items() if k != "correct"}}), flush=True)
            rows.append({"variant": name, "runs": runs})
    ref = np.mean([r["correct"] for r in rows[0]["runs"]], axis=0)
    for row in rows:
        mean = np.mean([r["correct"] for r in row["runs"]], axis=0)  # per example, over the seeds
        row["dev_accuracy"] = round(float(mean.mean()), 4)
        row["dev_accuracy_ci95"] = [round(v, 4) for v in bootstrap_ci(lambda i: mean[i].mean(), len(mean),
                                                                        args.n_bootstrap, 0)]
        diff = mean - ref
        row["vs_reference"] = round(float(diff.mean()), 4)
        row["vs_reference_ci95"] = [round(v, 4) for v in bootstrap_ci(lambda i: diff[i].mean(), len(diff),
                                                                        args.n_bootstrap, 0)]
        row["val_accuracy"] = [r["val_accuracy"] for r in row["runs"]]
        row["seconds"] = round(sum(r["seconds"] for r in row["runs"]), 1)
        for r in row["runs"]:
            r.pop("correct")
    print(f"\n{base.prepare.dataset}: {args.kind}, seeds {args.seeds}, development split {len(dev.y)} examples")
    w = max(len(r["variant"]) for r in rows) + 2
    print(f"{'variant':<{w}}{'dev accuracy [95% CI]':<27}{'vs reference [95% CI]':<28}{'val':<14}{'seconds':>8}")
    for r in rows:
        ci, dci = r["dev_accuracy_ci95"], r["vs_reference_ci95"]
        val = "/".join(f"{v:.3f}" for v in r["val_accuracy"] if v is not None)
        print(f"{r['variant']:<{w}}{r['dev_accuracy']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]   "
              f"{r['vs_reference']:+.4f} [{dci[0]:+.4f}, {dci[1]:+.4f}]   {val:<14}{r['seconds']:>8.0f}")
    # by dataset, or by the preset for a task that shares its dataset with another (recipe-pretrain-...)
    tag = args.preset.stem if args.preset and args.preset.stem not in ("image", "text") else base.prepare.dataset
    out = ROOT / "bench" / "results" / f"recipe-{tag}-{args.kind}.json"
    out.write_text(json.dumps({"preset": str(args.preset) if args.preset else None, "kind": args.kind,
                               "seeds": args.seeds, "n_dev": len(dev.y), "rows": rows}, indent=2) + "\n")
    print(f"-> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
