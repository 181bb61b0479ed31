"""Label-efficiency curves: how many labels does transfer save? For each label budget (curves.budgets,
examples per class) and seed (curves.seeds), the pre-trained model is fine-tuned and the same architecture
is trained from scratch on the same examples, and both are scored on one fixed test set.

  python -m stages.curves point finetuned 100 0   one point -> paths.curves/finetuned-100-0.json (a DVC
                                                  stage per point in curves/dvc.yaml, cached on its own:
                                                  adding a budget or a seed trains only the new points)
  python -m stages.curves summary                 every point -> paths.label_efficiency (JSON) and
                                                  paths.label_efficiency_plot (PNG)
`make curves` (python -m flows.curves) does both.

The data come straight from paths.source (prepare.dataset, prepare.classes), not from prepare's fixed
subset: per class, a seed's permutation gives the validation examples first (the same at every budget)
and then the training examples, so a seed's smaller budgets are subsets of its larger ones. The test set
is the source's test split (curves.test_per_class of each class, drawn once for every point) or, for a
source without one, a stratified draw made before any training examples.

How long a point trains is curves.schedule. `auto` (the default): each point, fine-tuned and scratch
alike, trains the epochs finetune's auto rule gives its number of examples (stages/hyperrule.py: 10
passes and at least 150 optimizer steps below 20k examples), at most curves.max_steps steps, and stops
early after finetune.patience epochs without a better validation accuracy on the point's own validation
split (never inside the one-cycle warm-up, a quarter of the schedule). So the schedule grows with the
data, and scratch is not cut short exactly where it should catch up. `steps`: every point trains
curves.steps optimizer steps whatever its budget (epochs = steps * batch / examples), every epoch run:
cheaper, but at 1,000 per class that is one pass, which under-trains scratch; the JSON, the plot and the
printed table say which protocol a figure used. Either way the best validation epoch is kept. Images are
resized to curves.image_size (smaller than model.image_size: the plot says so). The fine-tuned points use
`full` fine-tuning with finetune's lr and regularisation; scratch uses baseline.scratch_lr and
baseline.augment. Each budget also reports how much sooner fine-tuning reaches scratch's best validation
accuracy than scratch does (wall seconds, median over the seeds).

The label multiplier: the budget at which scratch reaches the fine-tuned accuracy at
curves.multiplier_at, divided by that budget (interpolated on a log scale between the budgets tried),
with a 95% interval from resampling the seeds; "more than" the largest budget / multiplier_at when
scratch never gets there."""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from stages import hyperrule, sources, zoo
from stages.files import atomic_path, read_json, write_json
from stages.params import FinetuneParams, Params
from stages.speedup import time_to_reach
from stages.splits import Split, draw

MODELS = ("finetuned", "scratch")
TEST_SEED = 12345  # the test draw is one for every point, whatever the seeds


def data(params: Params, budget: int, seed: int) -> tuple[Split, Split, Split, list[str]]:
    """Train (`budget` per class), validation and test splits for one point (see the module docstring)."""
    c = params.curves
    src = sources.keep_classes(sources.read(params.prepare.dataset, params.paths.source, params.prepare),
                               params.prepare.classes)
    # the test split first, with its own seed; a source without one gives a stratified draw of its pool
    test_per_class = c.test_per_class if src.test is not None else c.test_per_class or 100
    tested = draw(src, per_class=0, val_per_class=0, test_per_class=test_per_class, seed=TEST_SEED,
                  settings="curves")
    try:  # validation first, so it is the same at every budget and smaller budgets nest in larger ones
        drawn = draw(dataclasses.replace(src, pool=tested.rest, test=None), per_class=budget,
                     val_per_class=c.val_per_class, test_per_class=0, seed=seed, val_first=True, settings="curves")
    except ValueError as e:
        raise ValueError(f"budget {budget} per class: {e} (here: curves.val_per_class + the budget; lower "
                         "curves.budgets)") from None
    return drawn.train, drawn.val, tested.test, src.classes


def settings(params: Params, model: str, n: int, modality: str, seed: int) -> FinetuneParams:
    """What a point trains with, by curves.schedule: `auto`, the epochs finetune's auto rule gives `n`
    examples (hyperrule.epochs: 10 passes and at least 150 steps below 20k examples) within curves.max_steps,
    stopping early after finetune.patience epochs without a better validation accuracy (never inside the
    one-cycle warm-up, a quarter of the steps); `steps`, curves.steps optimizer steps (epochs = steps * batch
    / examples, at least 1), every epoch run. Both: its own seed, no checkpoints kept; lr and augmentation by
    finetune's rule, or the baseline's own for scratch. The finetune and baseline keys this reads are the
    curve stage's params in curves/dvc.yaml (tests/test_stage_params.py)."""
    ft, c = params.finetune, params.curves
    if model == "scratch":  # the baseline's own lr and augmentation
        ft = hyperrule.scratch(ft, params.baseline)
    ft, _ = hyperrule.resolve(ft, n, modality)  # lr and augmentation (epochs: below)
    if c.schedule == "steps":
        epochs = max(1, round(c.steps * ft.batch_size / n))
        patience = epochs
    else:
        per_pass = math.ceil(n / ft.batch_size)
        epochs = max(1, min(hyperrule.epochs(n, ft.batch_size)[0], c.max_steps // per_pass))
        patience = max(ft.patience, math.ceil(epochs / 4) + 1)
    return dataclasses.replace(ft, epochs=epochs, seed=seed, patience=patience, compile=False,
                               checkpoint_every_steps=0)


def point(params: Params, model: str, budget: int, seed: int) -> dict[str, Any]:
    """Train one point of the curve and score it on the test set; writes paths.curves/<model>-<budget>-<seed>.json."""
    from stages.predict import predict
    from stages.strategy import Plan
    from stages.train import fit, seed_everything

    began = time.perf_counter()
    c = params.curves
    train, val, test, classes = data(params, budget, seed)
    model_p = dataclasses.replace(zoo.resolve(params.model, params.paths.chosen_model), image_size=c.image_size)
    seed_everything(seed)
    loaded = zoo.load(model_p, len(classes), params.paths.weights_lock, pretrained=model == "finetuned")
    cfg = settings(params, model, len(train.y), zoo.modality(loaded.pre), seed)
    epochs = cfg.epochs
    stops = f", stopping after {cfg.patience} epochs without a better validation accuracy" if cfg.patience < epochs else ""
    print(f"{model} {model_p.name}, {budget} per class ({len(train.y)} examples), seed {seed}: "
          f"{epochs} epochs of {math.ceil(len(train.y) / cfg.batch_size)} steps{stops}")
    result = fit(loaded.model, train, val, loaded.pre, cfg, Plan.of(loaded.model), desc=f"{model}-{budget}-{seed}")
    correct = predict(loaded.model, test.x, loaded.pre, desc="test").argmax(1) == test.y
    out = {
        "model": model, "budget": budget, "seed": seed, "name": model_p.name,
        "accuracy": float(correct.mean()), "val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch,
        "epochs": epochs, "epochs_run": len(result.history), "schedule": c.schedule,
        "n_train": int(len(train.y)), "n_test": int(len(test.y)),
        "image_size": loaded.pre.get("image_size"),  # curves.image_size, for image models
        "seconds": round(time.perf_counter() - began, 2),
        # per epoch: the summary's time to the other model's best validation accuracy at this budget
        "history": [{k: r[k] for k in ("epoch", "val_accuracy", "seconds")} for r in result.history],
    }
    write_json(params.paths.curves / f"{model}-{budget}-{seed}.json", out)
    print(f"{model} at {budget} per class, seed {seed}: test accuracy {out['accuracy']:.4f}")
    return out


# ------------------------------------------------------------------------------------------ the summary


def mean_ci(values: list[float]) -> tuple[float, list[float]]:
    """Mean and 95% t-interval across seeds (a single seed: the interval is the point)."""
    from scipy import stats

    v = np.asarray(values, float)
    if len(v) < 2:
        return float(v.mean()), [float(v.mean())] * 2
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), [float(v.mean() - half), float(v.mean() + half)]


def budget_to_reach(budgets: list[int], accuracy: list[float], target: float) -> float | None:
    """The smallest budget at which the curve (piecewise linear in log budget) reaches `target`; None when
    it never does within `budgets`. At or above target at the first budget: that budget (an upper bound)."""
    for i, a in enumerate(accuracy):
        if a >= target:
            if i == 0:
                return float(budgets[0])
            a0, lb0, lb1 = accuracy[i - 1], math.log(budgets[i - 1]), math.log(budgets[i])
            return float(math.exp(lb0 + (target - a0) / (a - a0) * (lb1 - lb0)))
    return None


def interpolate(budgets: list[int], accuracy: list[float], at: float) -> float:
    """The curve's accuracy at budget `at` (linear in log budget; `at` within the budgets tried)."""
    return float(np.interp(math.log(at), np.log(budgets), accuracy))


def label_multiplier(budgets: list[int], finetuned: np.ndarray, scratch: np.ndarray, at: int,
                     n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """How many times `at` labels per class scratch needs to match fine-tuning at `at`. `finetuned` and
    `scratch` are (budgets x seeds) accuracies; the interval resamples the seeds of every point."""
    if not budgets[0] <= at <= budgets[-1]:
        raise ValueError(f"curves.multiplier_at {at} is outside the budgets tried ({budgets[0]}-{budgets[-1]})")

    def one(f: np.ndarray, s: np.ndarray) -> float:
        b = budget_to_reach(budgets, list(s.mean(1)), interpolate(budgets, list(f.mean(1)), at))
        return math.inf if b is None else b / at

    rng = np.random.default_rng(seed)
    pick = lambda a: np.take_along_axis(a, rng.integers(0, a.shape[1], a.shape), 1)  # noqa: E731
    draws = np.array([one(pick(finetuned), pick(scratch)) for _ in range(n_resamples)])
    # an observed draw at each end (no interpolation: a draw may be infinite, scratch never catching up)
    ordered = np.sort(draws)
    lo, hi = (float(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]) for q in (0.025, 0.975))
    value = one(finetuned, scratch)
    most = budgets[-1] / at
    return {
        "at": at,
        "finetuned_accuracy": interpolate(budgets, list(finetuned.mean(1)), at),
        "multiplier": None if math.isinf(value) else round(value, 3),
        "more_than": None if not math.isinf(value) else round(most, 3),
        "ci95": [None if math.isinf(lo) else round(lo, 3), None if math.isinf(hi) else round(hi, 3)],
        "ci95_note": ("null: scratch never caught up within the budgets tried in any resample of the seeds"
                      if math.isinf(lo) else "null upper end: in some resamples of the seeds scratch never caught up "
                      "within the budgets tried" if math.isinf(hi) else None),
    }


def summary(params: Params) -> dict[str, Any]:
    """Gather every point into paths.label_efficiency and draw paths.label_efficiency_plot."""
    c, paths = params.curves, params.paths
    budgets, seeds = sorted(c.budgets), list(c.seeds)
    files = {(m, b, s): paths.curves / f"{m}-{b}-{s}.json" for m in MODELS for b in budgets for s in seeds}
    missing = [f.name for f in files.values() if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} points have no result yet ({', '.join(missing[:4])}...): run "
                                "`make curves` (or dvc repro curves/dvc.yaml)")
    points = {k: read_json(f) for k, f in files.items()}
    stale = [f.name for k, f in files.items() if points[k].get("schedule", "steps") != c.schedule]
    if stale:
        raise ValueError(f"{len(stale)} points were trained with another curves.schedule than {c.schedule!r} "
                         f"({', '.join(stale[:4])}...): run `make curves` to retrain them")
    acc = {m: np.array([[points[m, b, s]["accuracy"] for s in seeds] for b in budgets]) for m in MODELS}
    curves: dict[str, Any] = {}
    for m in MODELS:
        curves[m] = {}
        for i, b in enumerate(budgets):
            mean, ci = mean_ci(list(acc[m][i]))
            curves[m][str(b)] = {"mean": round(mean, 6), "ci95": [round(v, 6) for v in ci],
                                 "per_seed": {str(s): acc[m][i][j] for j, s in enumerate(seeds)},
                                 "seconds": round(sum(points[m, b, s]["seconds"] for s in seeds), 1)}
    separated = {str(b): curves["finetuned"][str(b)]["ci95"][0] > curves["scratch"][str(b)]["ci95"][1]
                 for b in budgets}
    first = points[MODELS[0], budgets[0], seeds[0]]
    out = {
        "model": first["name"],
        "budgets": budgets,
        "seeds": seeds,
        "settings": {"image_size": first["image_size"], "schedule": c.schedule,
                     "steps": c.steps if c.schedule == "steps" else None,
                     "max_steps": c.max_steps if c.schedule == "auto" else None,
                     "batch_size": params.finetune.batch_size, "val_per_class": c.val_per_class,
                     "n_test": first["n_test"], "budget": protocol(params)},
        "curves": curves,
        "time_to_scratch_best": {str(b): time_at(points, b, seeds) for b in budgets},
        "finetuned_ci_above_scratch": separated,
        "label_multiplier": label_multiplier(budgets, acc["finetuned"], acc["scratch"], c.multiplier_at),
        "seconds": round(sum(p["seconds"] for p in points.values()), 1),
    }
    write_json(paths.label_efficiency, out)
    _plot(paths.label_efficiency_plot, out)
    _print(out)
    return out


def protocol(params: Params) -> str:
    """How long a point trains, in one sentence (the JSON's settings, the plot, docs/results.md)."""
    c = params.curves
    if c.schedule == "steps":
        return f"{c.steps} optimizer steps per point for both models, whatever the number of labels"
    return (f"finetune's auto schedule for each budget ({hyperrule.SMALL_PASSES} passes, at least "
            f"{hyperrule.MIN_STEPS} steps, below {hyperrule.SMALL // 1000}k examples) for both models, at most {c.max_steps} steps, early stopping on the point's validation split")


def time_at(points: dict, budget: int, seeds: list[int]) -> dict[str, Any]:
    """At one budget, how much sooner fine-tuning reaches scratch's best validation accuracy than scratch
    does, per seed (speedup.time_to_reach on the two points' histories); `median_speedup` over the seeds
    where fine-tuning got there (None when it never did or a point has no history)."""
    per_seed = {str(s): time_to_reach("finetuned", points["finetuned", budget, s].get("history"), "scratch",
                                      points["scratch", budget, s].get("history")) for s in seeds}
    speedups = [t["speedup"] for t in per_seed.values() if t["speedup"] is not None]
    return {"median_speedup": round(float(np.median(speedups)), 3) if speedups else None,
            "reached": f"{len(speedups)} of {len(seeds)} seeds", "per_seed": per_seed}


def describe(m: dict[str, Any]) -> str:
    """The label multiplier in one sentence."""
    at = m["at"]
    if m["multiplier"] is None:
        return (f"scratch needs more than {m['more_than']:g}x the labels ({at} per class) to match fine-tuning: "
                "it never caught up within the budgets tried")
    lo, hi = m["ci95"]
    return (f"scratch needs {m['multiplier']:.1f}x the labels to match fine-tuning at {at} per class "
            f"(95% interval {lo:.1f}x to " + (f"{hi:.1f}x)" if hi is not None else "beyond the budgets tried)"))


def _plot(out: Path, r: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    b = np.array(r["budgets"])
    for m, colour in zip(MODELS, ("#4C72B0", "#DD8452"), strict=True):
        rows = [r["curves"][m][str(x)] for x in b]
        mean = np.array([p["mean"] for p in rows])
        ax.plot(b, mean, "o-", color=colour, label="fine-tuned (pre-trained)" if m == "finetuned" else "from scratch")
        ax.fill_between(b, [p["ci95"][0] for p in rows], [p["ci95"][1] for p in rows], color=colour, alpha=0.2)
        for x, p in zip(b, rows, strict=True):
            ax.scatter([x] * len(p["per_seed"]), list(p["per_seed"].values()), color=colour, s=8, alpha=0.6)
    lm = r["label_multiplier"]
    ax.axhline(lm["finetuned_accuracy"], color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xticks(b, [str(x) for x in b])
    ax.set_xlabel("labelled training examples per class (log scale)")
    ax.set_ylabel("test accuracy (mean over seeds, 95% CI band)")
    s = r["settings"]
    size = f"{s['image_size']} px images, " if s["image_size"] else ""
    when = (f"{s['steps']} steps per point" if s.get("schedule", "steps") == "steps" else
            f"auto schedule per budget (<= {s['max_steps']} steps, early stopping)")
    ax.set_title(f"Label efficiency: {r['model']}\n{size}{when}, both models, "
                 f"{len(r['seeds'])} seeds, {s['n_test']} test examples", fontsize=10)
    ax.text(0.98, 0.03, describe(lm).replace(" (95%", "\n(95%"), transform=ax.transAxes, ha="right", va="bottom",
            fontsize=8, wrap=True)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _print(r: dict[str, Any]) -> None:
    print(f"protocol: {r['settings']['budget']}")
    print(f"{'per class':>10}{'fine-tuned':>12}  {'95% CI':<17}{'scratch':>9}  {'95% CI':<17}{'time to scratch best':>22}")
    for b in r["budgets"]:
        f, s = r["curves"]["finetuned"][str(b)], r["curves"]["scratch"][str(b)]
        t = r["time_to_scratch_best"][str(b)]
        speed = "-" if t["median_speedup"] is None else f"{t['median_speedup']:.1f}x ({t['reached']})"
        print(f"{b:>10}{f['mean']:>12.4f}  [{f['ci95'][0]:.4f}, {f['ci95'][1]:.4f}]{s['mean']:>9.4f}  "
              f"[{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]{speed:>22}" + ("" if r["finetuned_ci_above_scratch"][str(b)]
                                                                        else "  (intervals overlap)"))
    print(describe(r["label_multiplier"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, help="params file (default: the run's composed settings, else params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("point", help="train and score one point of the curves")
    one.add_argument("model", choices=MODELS)
    one.add_argument("budget", type=int, help="labelled examples per class")
    one.add_argument("seed", type=int)
    sub.add_parser("summary", help="gather the points into the JSON and the plot")
    args = parser.parse_args(argv)
    params = Params.load(args.params)
    if args.command == "point":
        point(params, args.model, args.budget, args.seed)
    else:
        summary(params)


if __name__ == "__main__":
    main()
