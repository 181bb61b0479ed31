"""Pre-train a backbone on a source task, so that headstart can fine-tune from weights it made itself:
supervised training of pretrain.architecture (random weights) on pretrain.classes of paths.source, read as
prepare.dataset. The demo (`make run TASK=pretrain`): Fashion-MNIST's first five classes (tops, trousers,
pullovers, dresses, coats) are the source, the other five (sandals, shirts, sneakers, bags, ankle boots)
the target, an inductive transfer split: the same kind of images, new labels.

Writes paths.pretrained, a headstart checkpoint the model zoo loads as `local:<paths.pretrained>`:
model.safetensors with the source head kept, model.json, and source_test.safetensors, held-out source
examples that evaluate scores before and after fine-tuning (forgetting) and select compares with the
target data (domain shift). The checkpoint's sha256 is recorded in paths.weights_lock, as any weights a
run may load are (origin: this stage), so a model fine-tuned from it names exactly these weights.

Run: dvc repro pretrain/dvc.yaml   (or: python -m stages.pretrain; `make run` runs it first when model.name
or select.candidates name the checkpoint)"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from stages import checkpoint, sources, weights, zoo
from stages.files import atomic_path, write_json
from stages.modality import adapter
from stages.params import FinetuneParams, Params, PretrainParams, cli
from stages.splits import draw, save_split


def run(source: Path, dataset_p: Any, p: PretrainParams, out: Path, metrics: Path, weights_lock: Path,
        history: Path | None = None) -> dict[str, Any]:
    """Train on the source classes, score on their held-out test examples, write the checkpoint and lock it."""
    from stages.predict import predict
    from stages.strategy import Plan
    from stages.train import fit, loop_settings, seed_everything, write_history

    began = time.perf_counter()
    src = sources.keep_classes(sources.read(dataset_p.dataset, Path(source), dataset_p), p.classes)
    if adapter(src.modality).PRETRAINING != "supervised":
        raise ValueError(f"pretrain: {dataset_p.dataset} is {src.modality} data; supervised pre-training here is for "
                         "image backbones (text models come pre-trained: hf:...)")
    own_test = src.test is not None
    drawn = draw(src, per_class=p.per_class, val_per_class=p.val_per_class,
                 test_per_class=p.test_per_class if own_test else 0, seed=p.seed, settings="pretrain")
    train, val, test = drawn.train, drawn.val, drawn.test
    if not own_test:  # a second draw, with the same seed, from the examples train and val left
        test = draw(dataclasses.replace(src, pool=drawn.rest), per_class=0, val_per_class=0,
                    test_per_class=p.test_per_class, seed=p.seed, settings="pretrain").test
    seed_everything(p.seed)
    pre = zoo.preprocessing(p.architecture, p.image_size)
    model = zoo.build(p.architecture, len(src.classes), pre)
    # the training loop's settings: the pretrain section's budget, every epoch run, light augmentation
    cfg = FinetuneParams(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                         patience=p.epochs, seed=p.seed, augment="flip_shift", label_smoothing=0.1)
    print(f"pre-training {p.architecture} from random weights on {len(train.y)} source images of "
          f"{len(src.classes)} classes ({', '.join(src.classes)}), {p.image_size} px")
    result = fit(model, train, val, pre, cfg, Plan.of(model), desc="pretrain")
    test_acc = float((predict(model, test.x, pre, desc="source test").argmax(1) == test.y).mean())
    meta = {
        "kind": "pretrained", "architecture": weights.canonical(p.architecture), "init": "random",
        "pretrained_sha256": None, "classes": src.classes, "preprocessing": pre,
        "train": {**loop_settings(cfg), "best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
                  "seconds": result.seconds, "n_train": int(len(train.y))},
        "source": {"dataset": dataset_p.dataset, "path": str(source), "classes": src.classes,
                   "files_sha256": src.files, "test_accuracy": test_acc, "n_test": int(len(test.y))},
    }
    with atomic_path(out) as tmp:  # one folder, written whole or not at all
        checkpoint.save_checkpoint(tmp, model, meta)
        save_split(tmp, checkpoint.SOURCE_TEST, test)
    if history is not None:
        write_history(history, result.history)
    name = f"local:{out}"
    entry = weights.lock(weights.find_weights(name), weights_lock)
    report = {"architecture": meta["architecture"], "classes": src.classes, "n_train": int(len(train.y)),
              "val_accuracy": result.best_val_accuracy, "test_accuracy": test_acc, "n_test": int(len(test.y)),
              "best_epoch": result.best_epoch, "seconds": round(time.perf_counter() - began, 2),
              "checkpoint": name, "weights_sha256": weights.digest(entry["files"])}
    write_json(metrics, report)
    print(f"source task: test accuracy {test_acc:.4f} on {len(test.y)} held-out images; {name} recorded in "
          f"{weights_lock}")
    return report


def main(argv: list[str] | None = None) -> None:
    params: Params = cli(__doc__, argv)
    paths = params.paths
    run(paths.source, params.prepare, params.pretrain, paths.pretrained, paths.pretrain_metrics, paths.weights_lock)


if __name__ == "__main__":
    main()
