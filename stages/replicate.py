"""One more training seed for the verdict (evaluate.seeds > 1): the fine-tuned and the scratch model trained
again exactly as the finetune and baseline stages train them, with every training seed moved by SEED
(finetune.seed + SEED, baseline.seed + SEED: another head initialisation, batch order and augmentation),
then scored on the test split. Evaluate resamples these seeds beside seed 0 (stats.two_level_ci).

The linear probe and the floor are not trained again: they have no seed (exact solvers on fixed features
and fixed data), so their one fit is every seed's. The weights are not kept either: the model the pipeline
ships is seed 0's, and the verdict needs only what each seed's models predict.

Reads paths.prepared; writes paths.replicates/<SEED>/: test_logits.npz (finetuned, scratch),
finetune_history.csv, scratch_history.csv and replicate.json (the seeds and accuracies).
Run: dvc repro replicate@SEED   (or: python -m stages.replicate SEED [--params FILE])"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

from stages import finetune, zoo
from stages.baseline import train_scratch
from stages.files import atomic_path, read_json, write_json
from stages.params import BaselineParams, FinetuneParams, ModelParams, Params
from stages.predict import predict, write_logits
from stages.splits import load_split

MODELS = ("finetuned", "scratch")  # the trainings a seed changes


def run(prepared: Path, out: Path, model_p: ModelParams, ft: FinetuneParams, bp: BaselineParams,
        weights_lock: Path, offset: int, checkpoints: Path | None = None) -> dict:
    """Train both models with their seeds moved by `offset` (>= 1; 0 is the pipeline's own run) into `out`."""
    if offset < 1:
        raise ValueError(f"replicate SEED must be >= 1 (seed 0 is the finetune and baseline stages' run), got {offset}")
    began = time.perf_counter()
    manifest = read_json(Path(prepared) / "manifest.json")
    classes = manifest["classes"]
    train, val, test = (load_split(prepared, s) for s in ("train", "val", "test"))
    ft, bp = dataclasses.replace(ft, seed=ft.seed + offset), dataclasses.replace(bp, seed=bp.seed + offset)
    resume = Path(checkpoints) / f"replicate-{offset}" if checkpoints else None
    with atomic_path(out) as tmp:  # all of a seed or none of it
        tmp.mkdir()
        print(f"seed {offset}: finetune.seed {ft.seed}, baseline.seed {bp.seed}")
        tuned = finetune.run(prepared, tmp / "finetuned", tmp / "finetune_history.csv", model_p, ft, weights_lock,
                             resume)
        scratch_val = train_scratch(train, val, classes, tmp / "scratch", tmp / "scratch_history.csv", model_p, ft,
                                    bp, weights_lock, resume / "scratch" if resume else None)
        logits = {}
        for name in MODELS:
            model, meta = zoo.load_checkpoint(tmp / name)
            logits[name] = predict(model, test.x, meta["preprocessing"], desc=f"test {name}, seed {offset}")
            shutil.rmtree(tmp / name)
        write_logits(tmp / "test_logits.npz", logits, manifest["test_sha256"])
        record = {
            "seed": offset, "finetune_seed": ft.seed, "baseline_seed": bp.seed,
            "val_accuracy": {"finetuned": tuned.best_val_accuracy, "scratch": scratch_val},
            "test_accuracy": {m: float((z.argmax(1) == test.y).mean()) for m, z in logits.items()},
            "seconds": round(time.perf_counter() - began, 1),
        }  # fmt: skip
        write_json(tmp / "replicate.json", record)
    acc = record["test_accuracy"]
    print(f"seed {offset}: test accuracy fine-tuned {acc['finetuned']:.4f}, scratch {acc['scratch']:.4f} -> {out}")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seed", type=int, help="the seed offset, 1 .. evaluate.seeds - 1")
    parser.add_argument("--params", type=Path, help="params file (default: the run's composed settings)")
    args = parser.parse_args(argv)
    if args.seed < 1:
        parser.error(f"SEED must be >= 1 (seed 0 is the finetune and baseline stages' run), got {args.seed}")
    params = Params.load(args.params)
    paths = params.paths
    run(paths.prepared, paths.replicates / str(args.seed), zoo.resolve(params.model, paths.chosen_model),
        params.finetune, params.baseline, paths.weights_lock, args.seed, paths.checkpoints)


if __name__ == "__main__":
    main()
