"""The alternatives fine-tuning must beat, on the same prepared data:
  scratch       the same architecture from random weights, same epochs and batch size (same budget);
  linear_probe  logistic regression on frozen pre-trained features (the regularisation strength chosen
                on the validation split), written into the network's head;
  floor         logistic regression on raw pixels (images) or on TF-IDF of the tokens (texts).
Reads paths.prepared, writes paths.baselines/<name>/ in the fine-tuned model's format, and
paths.scratch_history.
Run: dvc repro baseline   (or: python -m stages.baseline)"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from stages import checkpoint, hyperrule, zoo
from stages.files import atomic_path, read_json
from stages.inputs import image_array
from stages.modality import adapter
from stages.params import BaselineParams, FinetuneParams, ModelParams, cli
from stages.splits import load_split
from stages.strategy import Plan, best_logreg, linear_probe, load_linear
from stages.train import fit, loop_settings, seed_everything, write_history


def run(
    prepared: Path, out: Path, history: Path, model_p: ModelParams, ft: FinetuneParams, p: BaselineParams,
    weights_lock: Path, checkpoints: Path | None = None,
) -> dict[str, float]:
    """Train the three baselines; return each one's validation accuracy."""
    classes = read_json(Path(prepared) / "manifest.json")["classes"]
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    val_acc = {}
    with atomic_path(out) as tmp:  # the three are one output: all of them or none
        tmp.mkdir()
        val_acc["scratch"] = train_scratch(train, val, classes, tmp / "scratch", history, model_p, ft, p, weights_lock,
                                           checkpoints / "scratch" if checkpoints else None)
        pretrained = zoo.load(model_p, len(classes), weights_lock)
        val_acc["linear_probe"] = _linear_probe(train, val, classes, tmp / "linear_probe", pretrained, ft.probe_c)
        val_acc["floor"] = _floor(train, val, classes, tmp / "floor", pretrained.pre, p)
    print("validation accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in val_acc.items()) + f" -> {out}")
    return val_acc


def train_scratch(train, val, classes, out, history, model_p, ft, p, weights_lock, checkpoints) -> float:
    """The scratch model: `model_p`'s architecture from random weights (seed `p.seed`), saved to `out`; its
    best validation accuracy. Also stages/replicate.py's, once per extra seed."""
    seed_everything(p.seed)
    loaded = zoo.load(model_p, len(classes), weights_lock, pretrained=False)
    model, pre = loaded.model, loaded.pre
    # every layer trains from the first step (Plan.of(model)): finetune.strategy is about protecting
    # pre-trained weights, none here
    cfg, auto = scratch_settings(ft, p, len(train.y), zoo.modality(pre))
    print(f"training {model_p.name} from random weights on {len(train.y)} examples"
          + (f"; {hyperrule.describe(auto)}" if auto else ""))
    result = fit(model, train, val, pre, cfg, Plan.of(model), desc="scratch", checkpoints=checkpoints)
    write_history(history, result.history)
    checkpoint.save_checkpoint(out, model, _meta("scratch", loaded.architecture, "random", None, classes, pre, {
        **loop_settings(cfg), **({"auto": auto} if auto else {}), "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy, "seconds": result.seconds}))
    return result.best_val_accuracy


def scratch_settings(ft: FinetuneParams, p: BaselineParams, n: int, modality: str) -> tuple[FinetuneParams, dict]:
    """What the scratch model trains with: finetune's budget (epochs, batch, schedule, early stopping) by the
    same rule, its own peak lr, seed and augmentation (hyperrule.scratch). With finetune.probe_c (the linear
    probe's), the finetune keys this stage reads: dvc.yaml lists them (tests/test_stage_params.py)."""
    return hyperrule.resolve(hyperrule.scratch(ft, p), n, modality)


def _linear_probe(train, val, classes, out, loaded: zoo.Loaded, cs: list[float]) -> float:
    start = time.perf_counter()
    model, pre = loaded.model, loaded.pre
    c, acc = linear_probe(model, train, val, pre, cs)
    checkpoint.save_checkpoint(out, model, _meta("linear_probe", loaded.architecture, "pretrained",
                                          loaded.weights_sha256, classes, pre, {
        "C": c, "val_accuracy": acc, "seconds": round(time.perf_counter() - start, 2)}))
    return acc


def _floor(train, val, classes, out, model_pre: dict, p) -> float:
    start = time.perf_counter()
    arch = adapter(model_pre).FLOOR
    model, pre, c, acc = FLOORS[arch](train, val, classes, model_pre, [p.floor_c])
    checkpoint.save_checkpoint(out, model, _meta("floor", arch, "logistic_regression", None, classes, pre, {
        "C": c, "val_accuracy": acc, "seconds": round(time.perf_counter() - start, 2)}))
    return acc


def _pixel_floor(train, val, classes, model_pre: dict, cs: list[float]):
    """Logistic regression on raw pixels, moved into a Flatten + Linear module."""
    size, channels = int(train.x.shape[1]), 3 if train.x.ndim == 4 else 1
    pre = zoo.preprocessing(zoo.PIXEL_LINEAR, size, channels)
    # The features are exactly what the saved module's Flatten sees at evaluation and serving: the same
    # preprocessing (channels first), so RGB pixels are not scrambled between fitting and predicting.
    flat = lambda s: image_array(s.x, pre).reshape(len(s.x), -1)  # noqa: E731
    clf, c, acc = best_logreg(flat(train), train, flat(val), val, cs)
    model = zoo.build(zoo.PIXEL_LINEAR, len(classes), pre)
    load_linear(model[1], clf)
    return model, pre, c, acc


def _tfidf_floor(train, val, classes, model_pre: dict, cs: list[float]):
    """TF-IDF of the model's own tokens + logistic regression, moved into a TfidfLinear module."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from stages.text import word_piece_ids

    pre = {"modality": "text", "files": model_pre["files"], "max_length": model_pre["max_length"]}
    vec = TfidfVectorizer(analyzer=lambda row: row, lowercase=False)  # rows are already token ids
    x_train = vec.fit_transform(word_piece_ids(train.x, pre))
    clf, c, acc = best_logreg(x_train, train, vec.transform(word_piece_ids(val.x, pre)), val, cs)
    model = zoo.build(zoo.TFIDF_LINEAR, len(classes), pre)
    columns = torch.tensor([int(t) for t in vec.get_feature_names_out()])
    with torch.no_grad():
        model.idf.zero_()
        model.idf[columns] = torch.from_numpy(vec.idf_).float()
        model.linear.weight.zero_()
        model.linear.weight[:, columns] = torch.from_numpy(clf.coef_).float()
        model.linear.bias.copy_(torch.from_numpy(clf.intercept_).float())
    return model, pre, c, acc


# Each modality's floor (its adapter's FLOOR), fitted on the prepared examples: (model, preprocessing, C, val accuracy)
FLOORS = {zoo.PIXEL_LINEAR: _pixel_floor, zoo.TFIDF_LINEAR: _tfidf_floor}


def _meta(kind, arch, init, sha, classes, pre, train) -> dict:
    return {"kind": kind, "architecture": arch, "init": init, "pretrained_sha256": sha,
            "classes": classes, "preprocessing": pre, "train": train}


def main(argv: list[str] | None = None) -> None:
    params = cli(__doc__, argv)
    run(params.paths.prepared, params.paths.baselines, params.paths.scratch_history,
        zoo.resolve(params.model, params.paths.chosen_model), params.finetune, params.baseline,
        params.paths.weights_lock, params.paths.checkpoints)


if __name__ == "__main__":
    main()
