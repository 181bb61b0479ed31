"""Score every model on the full test set, decide whether fine-tuning beats every cheaper alternative, and
name the run's best model.
For each model: accuracy and macro-F1 with 95% bootstrap intervals, per-class accuracy, a confusion matrix
and the validation accuracy its training stage recorded (to catch a model scored on other inputs than it
was fitted on).
Fine-tuned vs each alternative (scratch, linear probe, floor): the paired-bootstrap interval of the
accuracy gain and McNemar's exact test. The verdict is fine-tuned vs the best alternative: positive only
when that whole interval lies above 0, negative when below. `best` is the highest test accuracy; with
register.candidate: best it is the model export and register ship.
Seeds: with evaluate.seeds > 1 the models that have a training seed (fine-tuned, scratch) were trained
once per seed (stages/replicate.py). A gain is then the mean over seeds, its interval resamples seeds and
then test examples (stats.two_level_ci), the verdict is inconclusive whenever the seeds disagree on its
sign, and `best` is by mean accuracy over the seeds; each model's reported accuracy is seed 0's, the model
that ships.
Forgetting, when the pre-trained model is a headstart checkpoint with a source task (stages/pretrain.py):
source-task accuracy before and after fine-tuning. Representation drift: linear CKA between the
pre-trained and the fine-tuned network's features on test examples, per layer group (1: the group
computes what it did before fine-tuning, up to rotation and scale; lower: it changed).
Time to accuracy, from the training histories: how much sooner fine-tuning reaches scratch's best
validation accuracy than scratch itself does, and the reverse (stages/speedup.py).
Reads paths.prepared, paths.finetuned, paths.baselines, paths.chosen_model, paths.finetune_history,
paths.scratch_history, paths.replicates (evaluate.seeds > 1) and the pre-trained weights (checked against
paths.weights_lock); writes paths.evaluate_metrics, paths.evaluate_plots, paths.predictions and
paths.test_logits.
Run: dvc repro evaluate   (or: python -m stages.evaluate)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stages import checkpoint, weights, zoo
from stages.checkpoint import source_test
from stages.files import atomic_path, read_json, write_json, write_text
from stages.modality import adapter
from stages.params import EvaluateParams, ModelParams, cli
from stages.predict import predict, read_logits, write_logits
from stages.speedup import describe_time, time_to_accuracy
from stages.splits import load_split
from stages.stats import bootstrap_ci, macro_f1, mcnemar_p, seeds_disagree, two_level_ci, verdict


def run(prepared: Path, finetuned: Path, baselines: Path, out: Path, plots: Path, p: EvaluateParams,
        model_p: ModelParams | None = None, weights_lock: Path | None = None, predictions: Path | None = None,
        test_logits: Path | None = None, histories: dict[str, Path] | None = None,
        replicates: Path | None = None) -> dict:
    manifest = read_json(Path(prepared) / "manifest.json")
    classes = manifest["classes"]
    test = load_split(prepared, "test")
    y, n, k = test.y, len(test.y), len(classes)

    logits, pres, val_acc = {}, {}, {}
    for name, path in checkpoint.model_dirs(finetuned, baselines).items():
        model, meta = zoo.load_checkpoint(path)
        pres[name] = meta["preprocessing"]
        logits[name] = predict(model, test.x, pres[name], desc=f"test {name}")
        # What training measured on the validation split for the weights it kept, through its own code path.
        # A test accuracy far outside its noise points at a model fitted on one input and scored on another.
        val_acc[name] = meta["train"].get("best_val_accuracy", meta["train"].get("val_accuracy"))
        if name == "finetuned":
            tuned = model  # drift and forgetting below look inside it again

    preds = {name: z.argmax(1) for name, z in logits.items()}
    report: dict = {}
    for name, pred in preds.items():
        correct = pred == y
        report[name] = {
            "accuracy": float(correct.mean()),
            "accuracy_ci95": _round(bootstrap_ci(lambda i: correct[i].mean(), n, p.n_bootstrap, p.seed)),
            "macro_f1": macro_f1(y, pred, k),
            "macro_f1_ci95": _round(bootstrap_ci(lambda i: macro_f1(y[i], pred[i], k), n, p.n_bootstrap, p.seed)),
            "per_class_accuracy": {c: float(correct[y == j].mean()) for j, c in enumerate(classes)},
            "val_accuracy": val_acc[name],
        }

    right = seed_correctness(logits, y, replicates, p.seeds, manifest["test_sha256"])
    if p.seeds > 1:
        for name, runs in right.items():
            report[name]["seed_accuracies"] = [float(r.mean()) for r in runs]
            report[name]["mean_accuracy"] = float(np.mean(report[name]["seed_accuracies"]))
    vs = {alt: compare(right["finetuned"], right[alt], p) for alt in right if alt != "finetuned"}
    best_alternative = max(vs, key=lambda alt: score(report, alt))
    best = winner(report)
    report.update({
        # does fine-tuning beat every cheaper alternative? Answered against the best of them
        "vs": vs,
        "best_alternative": best_alternative,
        "verdict": vs[best_alternative]["verdict"],
        "best": best,
        # the model that wins, against each other one (what a candidate other than finetuned must show)
        "best_vs": vs if best == "finetuned" else
        {other: compare(right[best], right[other], p) for other in right if other != best},
        # did transfer pay: fine-tuned vs the same network from random weights
        "transfer_gain": vs["scratch"]["gain"],
        "transfer_gain_ci95": vs["scratch"]["gain_ci95"],
        "mcnemar_p": vs["scratch"]["mcnemar_p"],
        "transfer_verdict": vs["scratch"]["verdict"],
        "n_test": n,
        "seeds": p.seeds,  # training seeds the gains, intervals and verdicts rest on
        "test_sha256": manifest["test_sha256"],
        # did transfer save time: fine-tuned vs scratch on the way to each other's best validation accuracy
        "time_to_accuracy": time_to_accuracy(histories or {}),
    })  # fmt: skip
    if model_p is not None and p.drift_examples:
        report["representation_drift"] = drift(tuned, pres["finetuned"], model_p, weights_lock, test.x, k,
                                               p.drift_examples, p.seed)
    if model_p is not None and weights.family_of(model_p.name) == "local":
        lost = forgetting(tuned, weights.find_weights(model_p.name, model_p.weights).path, p.n_bootstrap, p.seed)
        if lost is not None:
            report["forgetting"] = lost
    cut = adapter(pres["finetuned"]).truncated(test.x, pres["finetuned"])  # texts cut at model.max_length tokens
    if cut is not None:
        report["truncated_test_texts"] = cut
    write_json(out, report)
    if test_logits is not None:
        write_logits(test_logits, logits, manifest["test_sha256"])
    if predictions is not None:
        write_predictions(predictions, y, preds, classes)
    _confusion_plots(plots, y, preds, classes)
    _print_table(report)
    return report


def write_predictions(path: Path, y: np.ndarray, preds: dict[str, np.ndarray], classes: list[str]) -> None:
    """Every test example's true class and each model's prediction, in the prepared test split's order:
    for error analysis, and what a served model's answers on the same files are checked against."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "label", *preds])
    for i, row in enumerate(zip(y, *preds.values(), strict=True)):
        w.writerow([i, *(classes[int(c)] for c in row)])
    write_text(path, buf.getvalue())


def seed_correctness(logits: dict[str, np.ndarray], y: np.ndarray, replicates: Path | None, seeds: int,
                     test_sha256: str) -> dict[str, list[np.ndarray]]:
    """Per model, whether each test example is right, once per training seed: seed 0 from `logits`, seeds
    1..seeds-1 from paths.replicates/<seed>/test_logits.npz. A model a seed's file lacks has no seed (the
    linear probe, the floor: exact fits), so its seed-0 predictions stand for every seed."""
    out = {name: [z.argmax(1) == y] for name, z in logits.items()}
    if seeds > 1 and replicates is None:
        raise ValueError(f"evaluate.seeds is {seeds}: pass paths.replicates, where the other seeds' logits are")
    for seed in range(1, seeds):
        path = Path(replicates) / str(seed) / "test_logits.npz"
        fresh = {name: read_logits(path, name, test_sha256) for name in logits}
        if fresh["finetuned"] is None:
            raise ValueError(f"evaluate.seeds is {seeds} but {path} holds no fine-tuned test logits for this test "
                             f"split: run `dvc repro replicate@{seed}` (make run does)")
        for name, z in fresh.items():
            out[name].append(out[name][0] if z is None else z.argmax(1) == y)
    return out


def compare(a: list[np.ndarray], b: list[np.ndarray], p: EvaluateParams) -> dict:
    """Model a vs model b, scored on the same test examples (`a`, `b`: per training seed, correct or not per
    example): the accuracy gain (the mean over seeds), its paired 95% interval (bootstrap over examples;
    over seeds, then examples, with more than one seed), McNemar's exact p (seed 0's models: the ones that
    ship), and the verdict read off the interval, inconclusive when the seeds disagree on the sign."""
    diff = np.stack([x.astype(float) - z.astype(float) for x, z in zip(a, b, strict=True)])
    if len(diff) == 1:
        ci = bootstrap_ci(lambda i: diff[0][i].mean(), diff.shape[1], p.n_bootstrap, p.seed)
    else:
        ci = two_level_ci(diff, p.n_bootstrap, p.seed)
    gains = [float(d.mean()) for d in diff]
    out = {"gain": float(diff.mean()), "gain_ci95": _round(ci), "mcnemar_p": mcnemar_p(a[0], b[0]),
           "verdict": verdict(ci, gains)}
    if len(gains) > 1:
        out.update({"seed_gains": [round(g, 6) for g in gains], "seeds_disagree": seeds_disagree(gains)})
    return out


def score(report: dict, model: str) -> float:
    """What ranks the models: test accuracy, averaged over the training seeds when there are several."""
    return report[model].get("mean_accuracy", report[model]["accuracy"])


def winner(report: dict) -> str:
    """The model with the highest score; a tie goes to the one listed first (fine-tuned, then the baselines
    in zoo.BASELINES order)."""
    names = ["finetuned", *zoo.BASELINES]
    return max(names, key=lambda m: (score(report, m), -names.index(m)))


def candidate(report: dict, choice: str) -> str:
    """The model export and register ship: the run's winner (`best`) or the fine-tuned model (`finetuned`)."""
    return report["best"] if choice == "best" else "finetuned"


def answer(r: dict) -> str:
    """The run's answer in one sentence a manager can read."""
    best, alt = r["best"], r["best_alternative"]
    c = r["vs"][alt]
    lo, hi = c["gain_ci95"]
    gain = f"{c['gain'] * 100:+.1f} points [{lo * 100:+.1f}, {hi * 100:+.1f}] over {alt}, the best alternative"
    if r.get("seeds", 1) > 1:
        gain += f", over {r['seeds']} training seeds"
    if c.get("seeds_disagree"):
        each = ", ".join(f"{g * 100:+.1f}" for g in c["seed_gains"])
        return (f"Fine-tuning does not clearly beat the alternatives: {gain}, but the seeds disagree on the sign "
                f"({each} points); {best} scored highest.")
    if r["verdict"] == "positive":
        return f"Fine-tuning wins: {gain}; the fine-tuned model is the best of the run."
    if r["verdict"] == "negative":
        return f"Fine-tuning loses: {gain}; {best} is the best of the run."
    return (f"Fine-tuning does not clearly beat the alternatives: {gain}, an interval that includes 0; "
            f"{best} scored highest.")


def forgetting(tuned: torch.nn.Module, checkpoint: Path, n_bootstrap: int, seed: int) -> dict | None:
    """Source-task accuracy of a pre-trained checkpoint (its own head, its held-out source examples) before
    fine-tuning, and after: the fine-tuned backbone under the same source head. `forgetting` is before -
    after, with a paired-bootstrap 95% interval. None when the checkpoint has no source task with data
    (e.g. ImageNet weights; stages/pretrain.py keeps one with the checkpoints it makes)."""
    held = source_test(checkpoint)
    if held is None:
        return None
    source, meta = zoo.load_checkpoint(checkpoint)
    head = set(zoo.head_parameters(source))
    pre = meta["preprocessing"]
    before = predict(source, held.x, pre, desc="source task, before").argmax(1) == held.y
    body = {k: v for k, v in tuned.state_dict().items() if k not in head}
    missing = [k for k in source.state_dict() if k not in body and k not in head]
    if missing:
        raise ValueError(f"the fine-tuned model does not have the pre-trained backbone's layout ({missing[:3]}...): "
                         f"cannot measure forgetting on {checkpoint}'s source task")
    source.load_state_dict(body, strict=False)  # the fine-tuned backbone, the source head kept
    after = predict(source, held.x, pre, desc="source task, after").argmax(1) == held.y
    diff = before.astype(float) - after.astype(float)
    return {
        "source_classes": meta["classes"],
        "source_accuracy_before": float(before.mean()),
        "source_accuracy_after": float(after.mean()),
        "forgetting": float(diff.mean()),
        "forgetting_ci95": _round(bootstrap_ci(lambda i: diff[i].mean(), len(diff), n_bootstrap, seed)),
        "n_source_test": int(len(held.y)),
    }


def drift(tuned: torch.nn.Module, pre: dict, model_p: ModelParams, weights_lock: Path, x: np.ndarray,
          n_classes: int, n: int, seed: int) -> dict:
    """Linear CKA per layer group between the pre-trained network (model_p) and the fine-tuned one (`tuned`,
    whose preprocessing is `pre`), on `n` test examples drawn with `seed`. A group's features: its last module's output, averaged over image
    positions or over a text's tokens."""
    from stages.shift import linear_cka

    base = zoo.load(model_p, n_classes, weights_lock).model.eval()
    groups = zoo.layer_groups(base)
    owners = [g[-1].rsplit(".", 1)[0] for g in groups]  # the module holding a group's last parameter
    rows = np.random.default_rng(seed).permutation(len(x))[: min(n, len(x))]
    feats = [_group_features(m, owners, x[rows], pre) for m in (base, tuned)]
    cka = {owner: round(linear_cka(a, b), 4) for owner, a, b in zip(owners, *feats, strict=True)}
    return {"linear_cka": cka, "n_examples": int(len(rows)), "min_group": min(cka, key=cka.get)}


def _group_features(model, owners: list[str], x: np.ndarray, pre: dict) -> list[np.ndarray]:
    captured: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor] = []

    def pooled(name):
        def hook(_module, _args, out):
            t = (out[0] if isinstance(out, tuple) else out).float()
            if t.ndim == 4:  # images: N, C, H, W
                captured[name] = t.mean((2, 3))
            elif t.ndim == 3 and mask:  # tokens: N, T, H, padding left out
                m = mask[0].to(t.dtype).unsqueeze(-1)
                captured[name] = (t * m).sum(1) / m.sum(1).clamp_min(1.0)
            else:
                captured[name] = t.flatten(1)
        return hook

    def fn(net, *inputs):
        mask[:] = [inputs[1]] if len(inputs) > 1 else []
        net(*inputs)
        return torch.cat([captured[o] for o in owners], 1)

    handles = [model.get_submodule(o).register_forward_hook(pooled(o)) for o in owners]
    try:
        flat = predict(model, x, pre, fn=fn, desc="drift features")
    finally:
        for h in handles:
            h.remove()
    widths = [int(captured[o].shape[1]) for o in owners]
    return np.split(flat, np.cumsum(widths)[:-1], axis=1)


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
    print(f"{'model':<14}{'accuracy':>10}  {'95% CI':<17}{'macro-F1':>9}{'val acc':>9}")
    for name in ("finetuned", *zoo.BASELINES):
        m = r[name]
        lo, hi = m["accuracy_ci95"]
        val = "-" if m["val_accuracy"] is None else f"{m['val_accuracy']:.4f}"
        print(f"{name:<14}{m['accuracy']:>10.4f}  [{lo:.4f}, {hi:.4f}] {m['macro_f1']:>9.4f}{val:>9}")
    for alt, c in r["vs"].items():
        lo, hi = c["gain_ci95"]
        print(f"fine-tuned - {alt:<13}{c['gain']:+.4f} [{lo:+.4f}, {hi:+.4f}], McNemar p={c['mcnemar_p']:.2g}: "
              f"{c['verdict']}")
    print(answer(r))
    for key in ("scratch_best", "finetuned_best"):
        print(describe_time(r["time_to_accuracy"][key]))
    if "representation_drift" in r:
        cka = r["representation_drift"]["linear_cka"]
        print("CKA pre-trained vs fine-tuned, input side first: " + ", ".join(f"{v:.2f}" for v in cka.values()))
    if "forgetting" in r:
        f = r["forgetting"]
        lo, hi = f["forgetting_ci95"]
        print(f"source task ({len(f['source_classes'])} classes): accuracy {f['source_accuracy_before']:.4f} before "
              f"fine-tuning, {f['source_accuracy_after']:.4f} after: forgetting {f['forgetting']:+.4f} [{lo:+.4f}, {hi:+.4f}]")


def main(argv: list[str] | None = None) -> None:
    params = cli(__doc__, argv)
    paths = params.paths
    run(paths.prepared, paths.finetuned, paths.baselines, paths.evaluate_metrics, paths.evaluate_plots,
        params.evaluate, zoo.resolve(params.model, paths.chosen_model), paths.weights_lock, paths.predictions,
        paths.test_logits, {"finetuned": paths.finetune_history, "scratch": paths.scratch_history},
        paths.replicates)


if __name__ == "__main__":
    main()
