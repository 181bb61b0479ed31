"""What does each image augmentation (finetune.augment) buy on the prepared data? Fine-tunes the model and
trains it from scratch once per mode, everything else as params.yaml says (auto settings resolved by
stages/hyperrule.py), and scores both on the test split with 95% bootstrap intervals.

Run:  .venv/bin/python bench/augment.py                       # none, flip_shift, crop
      .venv/bin/python bench/augment.py --modes flip_shift crop --crop-min-area 0.35 0.64
Needs the prepared data of an image task (make run). Everything it trains goes to a temporary folder.
Prints a table and writes bench/results/augment-<dataset>.json."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from stages import baseline, finetune, zoo
from stages.files import read_json
from stages.params import AUGMENTS, Params
from stages.predict import predict
from stages.splits import load_split
from stages.stats import bootstrap_ci


def score(folder: Path, test, n_boot: int) -> tuple[float, list[float]]:
    model, meta = zoo.load_checkpoint(folder)
    correct = predict(model, test.x, meta["preprocessing"], desc="test").argmax(1) == test.y
    return float(correct.mean()), [round(v, 4) for v in bootstrap_ci(lambda i: correct[i].mean(), len(correct), n_boot, 0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["none", "flip_shift", "crop"], choices=AUGMENTS)
    parser.add_argument("--crop-min-area", nargs="+", type=float, default=None,
                        help="crop: the smallest crop areas to try (default: finetune.crop_min_area)")
    args = parser.parse_args()
    params = Params.load()  # the last run's settings (its task, presets and --set values)
    paths = params.paths
    manifest = read_json(paths.prepared / "manifest.json")
    classes = manifest["classes"]
    train, val, test = (load_split(paths.prepared, s) for s in ("train", "val", "test"))
    model_p = zoo.resolve(params.model, paths.chosen_model)
    runs = [(m, a) for m in args.modes for a in ((args.crop_min_area or [params.finetune.crop_min_area])
                                                  if m == "crop" else [None])]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-augment-") as tmp:
        for mode, area in runs:
            ft = dataclasses.replace(params.finetune, augment=mode,
                                     **({"crop_min_area": area} if area is not None else {}))
            label = mode + (f" {area:g}" if area is not None else "")
            row: dict = {"augment": label}
            for kind in ("finetuned", "scratch"):
                out = Path(tmp) / f"{mode}-{area}-{kind}"
                start = time.perf_counter()
                if kind == "finetuned":
                    finetune.run(paths.prepared, out, Path(tmp) / "h.csv", model_p, ft, paths.weights_lock)
                else:
                    baseline.train_scratch(train, val, classes, out, Path(tmp) / "h.csv", model_p, ft, params.baseline,
                                      paths.weights_lock, None)
                acc, ci = score(out, test, params.evaluate.n_bootstrap)
                row[kind] = {"accuracy": round(acc, 4), "accuracy_ci95": ci,
                             "seconds": round(time.perf_counter() - start, 1)}
            row["gain"] = round(row["finetuned"]["accuracy"] - row["scratch"]["accuracy"], 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{manifest.get('dataset', '')}: {len(train.y)} training examples, {len(test.y)} test, {model_p.name}")
    print(f"{'augment':<16}{'fine-tuned [95% CI]':<28}{'scratch [95% CI]':<28}{'gain':>8}{'seconds':>10}")
    for r in rows:
        f, s = r["finetuned"], r["scratch"]
        cell = lambda m: f"{m['accuracy']:.4f} [{m['accuracy_ci95'][0]:.4f}, {m['accuracy_ci95'][1]:.4f}]"  # noqa: E731
        print(f"{r['augment']:<16}{cell(f):<28}{cell(s):<28}{r['gain']:>+8.4f}{f['seconds'] + s['seconds']:>10.0f}")
    out = ROOT / "bench" / "results" / f"augment-{manifest.get('dataset', 'data')}.json"
    out.write_text(json.dumps({"model": model_p.name, "n_train": len(train.y), "n_test": len(test.y), "rows": rows},
                              indent=2) + "\n")
    print(f"-> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
