"""Fine-tuning strategies side by side: each entry of compare.strategies fine-tunes the same pre-trained
model on the same prepared data with its finetune settings changed (stages/strategy.py), and is scored
on the test split (accuracy with a 95% bootstrap interval, training seconds, trainable parameters, and
forgetting of the source task when the model is a headstart pre-trained checkpoint).

  python -m stages.compare <name>   one entry -> paths.strategies/<name>.json (a DVC stage per entry,
                                    compare@<name> in compare/dvc.yaml, so each is cached on its own)
`make compare` (python -m flows.compare) runs every entry, gathers them into paths.strategies_summary and
paths.strategies_plot, and logs each strategy as a nested MLflow run.

compare/dvc.yaml is a pipeline of its own so that `dvc repro` (the nightly pipeline) does not train them
all; `dvc repro compare/dvc.yaml` does."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from stages import evaluate, finetune, weights, zoo
from stages.files import write_json
from stages.params import Params
from stages.predict import predict
from stages.splits import load_split
from stages.stats import bootstrap_ci


def run(params: Params, name: str) -> dict[str, Any]:
    """Fine-tune with compare.strategies[name]'s settings, score on test, write paths.strategies/<name>.json."""
    p = params.finetune_for(name)
    paths = params.paths
    model_p = zoo.resolve(params.model, paths.chosen_model)
    if p.strategy == "lora" and weights.family_of(model_p.name) != "hf":
        # one list serves both tasks: LoRA entries are recorded as not applicable to an image backbone
        result = {"strategy": name, "settings": params.compare.strategies[name],
                  "not_applicable": f"LoRA adapts transformer text models; {model_p.name} is not one"}
        write_json(paths.strategies / f"{name}.json", result)
        print(f"{name}: {result['not_applicable']} (skipped)")
        return result
    test = load_split(paths.prepared, "test")
    with tempfile.TemporaryDirectory(prefix=f"compare-{name}-") as tmp:
        # the model itself is not kept: the comparison is the product, and `make run` with the chosen
        # finetune.strategy trains the one to ship
        finetune.run(paths.prepared, Path(tmp) / "model", Path(tmp) / "history.csv", model_p, p,
                     paths.weights_lock, paths.checkpoints / "compare" / name)
        model, meta = zoo.load_checkpoint(Path(tmp) / "model")
        correct = predict(model, test.x, meta["preprocessing"], desc=f"test {name}").argmax(1) == test.y
        history = (Path(tmp) / "history.csv").read_text()
    train = meta["train"]
    n_boot, seed = params.evaluate.n_bootstrap, params.evaluate.seed
    lost = None  # a backbone headstart pre-trained itself has a source task: how much of it each strategy keeps
    if weights.family_of(model_p.name) == "local":
        lost = evaluate.forgetting(model, weights.find_weights(model_p.name, model_p.weights).path, n_boot, seed)
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
        **({"forgetting": lost} if lost else {}),
        "n_test": int(len(correct)),
        "history_csv": history,
    }
    write_json(paths.strategies / f"{name}.json", result)
    lo, hi = result["accuracy_ci95"]
    print(f"{name}: test accuracy {result['accuracy']:.4f} [{lo:.4f}, {hi:.4f}], {result['train_seconds']:.0f} s, "
          f"{result['trainable_params']:,} trainable parameters"
          + (f", forgetting of the source task {lost['forgetting']:+.4f}" if lost else ""))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("strategy", help="the compare.strategies entry to train and score")
    parser.add_argument("--params", type=Path, help="params file (default: the run's composed settings, else params.yaml)")
    args = parser.parse_args(argv)
    params = Params.load(args.params)
    if args.strategy not in params.compare.strategies:
        parser.error(f"{args.strategy!r} is not in compare.strategies: {', '.join(params.compare.strategies)}")
    run(params, args.strategy)


if __name__ == "__main__":
    main()

