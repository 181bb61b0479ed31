"""Label-efficiency curves (stages/curves.py): the label multiplier's interpolation, its interval, the
data each point trains on, and the summary on hand-made points."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import yaml

from stages import curves
from stages.params import Params

from .conftest import tiny_params


def test_budget_to_reach_interpolates_on_a_log_scale():
    budgets = [10, 100, 1000]
    scratch = [0.6, 0.7, 0.8]  # +0.1 per decade
    assert curves.budget_to_reach(budgets, scratch, 0.75) == pytest.approx(10**2.5)  # halfway in log: 316
    assert curves.budget_to_reach(budgets, scratch, 0.7) == pytest.approx(100)
    assert curves.budget_to_reach(budgets, scratch, 0.5) == 10  # reached at the first budget already
    assert curves.budget_to_reach(budgets, scratch, 0.81) is None  # never within the budgets tried
    # not monotone: the first crossing counts
    assert curves.budget_to_reach([10, 100, 1000], [0.6, 0.8, 0.7], 0.7) == pytest.approx(10**1.5)


def test_label_multiplier_with_its_interval_and_when_scratch_never_catches_up():
    budgets = [10, 100, 1000]
    seeds = np.array([-0.01, 0.0, 0.01])
    scratch = np.array([[0.6], [0.7], [0.8]]) + seeds
    finetuned = np.array([[0.7], [0.75], [0.85]]) + seeds
    m = curves.label_multiplier(budgets, finetuned, scratch, at=100)
    assert m["finetuned_accuracy"] == pytest.approx(0.75)
    assert m["multiplier"] == pytest.approx(10**0.5, abs=1e-3) and m["more_than"] is None
    lo, hi = m["ci95"]
    assert lo < m["multiplier"] < hi and hi < 10  # seed noise of +-0.01 moves the crossing a little
    # at a budget between those tried, the fine-tuned accuracy is interpolated too
    assert curves.label_multiplier(budgets, finetuned, scratch, at=10**1.5)["finetuned_accuracy"] == pytest.approx(0.725)

    never = curves.label_multiplier(budgets, finetuned + 0.2, scratch, at=100)
    assert never["multiplier"] is None and never["more_than"] == 10 and never["ci95"][1] is None
    assert "more than 10x" in curves.describe(never)
    with pytest.raises(ValueError, match="outside the budgets"):
        curves.label_multiplier(budgets, finetuned, scratch, at=5000)


def test_mean_ci_is_a_t_interval_across_seeds():
    mean, (lo, hi) = curves.mean_ci([0.80, 0.82, 0.84])
    assert mean == pytest.approx(0.82)
    assert hi - mean == pytest.approx(4.303 * 0.02 / math.sqrt(3), rel=1e-3)  # t(0.975, 2) = 4.303
    assert curves.mean_ci([0.8]) == (0.8, [0.8, 0.8])


def test_points_draw_nested_training_sets_the_same_validation_and_one_test_set(tmp_path, tiny_source):
    path = tiny_params(tmp_path, tiny_source)
    raw = yaml.safe_load(path.read_text())
    raw["curves"].update(val_per_class=3, test_per_class=4)
    path.write_text(yaml.safe_dump(raw))
    params = Params.load(path)
    small_train, small_val, small_test, classes = curves.data(params, 5, seed=0)
    big_train, big_val, big_test, _ = curves.data(params, 10, seed=0)
    other_train, other_val, _, _ = curves.data(params, 5, seed=1)
    assert len(classes) == 10 and np.bincount(small_train.y).tolist() == [5] * 10
    key = lambda s: {x.tobytes() for x in s.x}  # noqa: E731
    assert key(small_train) < key(big_train)  # a seed's smaller budget is part of its larger one
    assert key(small_val) == key(big_val) and not key(small_val) & key(big_train)
    assert np.array_equal(small_test.x, big_test.x) and np.bincount(small_test.y).tolist() == [4] * 10
    assert key(other_train) != key(small_train) and key(other_val) != key(small_val)
    with pytest.raises(ValueError, match="lower curves.budgets"):
        curves.data(params, 50, seed=0)  # 20 per class in the tiny source


def test_summary_writes_the_curves_the_multiplier_and_the_plot(tmp_path, tiny_source):
    params = Params.load(tiny_params(tmp_path, tiny_source))
    paths = params.paths
    paths.curves.mkdir(parents=True)
    truth = {"finetuned": {10: 0.70, 30: 0.78, 100: 0.84, 300: 0.87, 1000: 0.89},
             "scratch": {10: 0.40, 30: 0.55, 100: 0.68, 300: 0.78, 1000: 0.85}}
    # validation histories: scratch gets to its best (0.7) at 3 s; fine-tuning at 1 s, but at 1,000 per class never
    fast = [{"epoch": 1, "val_accuracy": 0.9, "seconds": 1.0}]
    slow = [{"epoch": e, "val_accuracy": v, "seconds": float(e)} for e, v in ((1, 0.5), (2, 0.6), (3, 0.7))]
    for model, by_budget in truth.items():
        for b, acc in by_budget.items():
            history = slow if model == "scratch" else fast if b < 1000 else [{**fast[0], "val_accuracy": 0.65}]
            for s in (0, 1, 2):
                (paths.curves / f"{model}-{b}-{s}.json").write_text(json.dumps({
                    "model": model, "budget": b, "seed": s, "name": "timm:efficientnet_lite0", "schedule": "auto",
                    "accuracy": acc + 0.005 * (s - 1), "seconds": 1.0, "image_size": 48, "n_test": 2000,
                    "history": history}))
    out = curves.summary(params)
    assert out["settings"]["schedule"] == "auto" and "early stopping" in out["settings"]["budget"]
    assert out["time_to_scratch_best"]["100"]["median_speedup"] == 3.0
    assert out["time_to_scratch_best"]["100"]["reached"] == "3 of 3 seeds"
    late = out["time_to_scratch_best"]["1000"]
    assert late["median_speedup"] is None and late["reached"] == "0 of 3 seeds"
    assert "never reached 0.7000" in late["per_seed"]["0"]["reason"]
    assert out["curves"]["finetuned"]["100"]["mean"] == pytest.approx(0.84)
    assert out["finetuned_ci_above_scratch"]["100"] and out["finetuned_ci_above_scratch"]["1000"]
    lm = out["label_multiplier"]
    # scratch passes 0.84 six sevenths of the way (in log) from 300 to 1,000: 300 * (10/3)**(6/7) = 842
    assert lm["multiplier"] == pytest.approx(300 * (10 / 3) ** (6 / 7) / 100, abs=1e-3) and lm["more_than"] is None
    assert json.loads(paths.label_efficiency.read_text()) == out
    assert paths.label_efficiency_plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a point from the fixed-step protocol (older points have no schedule) is not mixed into the auto curves
    fixed = json.loads((paths.curves / "scratch-300-1.json").read_text())
    del fixed["schedule"]
    (paths.curves / "scratch-300-1.json").write_text(json.dumps(fixed))
    with pytest.raises(ValueError, match="another curves.schedule than 'auto'.*scratch-300-1.json.*make curves"):
        curves.summary(params)
    (paths.curves / "scratch-1000-2.json").unlink()
    with pytest.raises(FileNotFoundError, match="make curves"):
        curves.summary(params)


def test_a_point_trains_as_long_as_the_auto_rule_says_for_its_budget_or_a_fixed_number_of_steps(tmp_path, tiny_source):
    params = Params.load(tiny_params(tmp_path, tiny_source))
    params = dataclasses.replace(params, finetune=dataclasses.replace(params.finetune, batch_size=32, patience=5))

    def point(model: str, n: int, **curve_settings):
        c = dataclasses.replace(params.curves, **curve_settings)
        return curves.settings(dataclasses.replace(params, curves=c), model, n, "image", 7)

    # auto: 100 examples are 4 steps a pass, so 38 passes for the 150 steps; early stopping waits out the warm-up
    small = point("finetuned", 100, schedule="auto", max_steps=4000)
    assert (small.epochs, small.patience, small.seed) == (38, 11, 7)
    # 10,000 examples: 10 passes of 313 steps, finetune's own patience; scratch keeps the baseline's lr
    big = point("scratch", 10_000, schedule="auto", max_steps=4000)
    assert (big.epochs, big.patience, big.lr) == (10, 5, params.baseline.scratch_lr)
    assert point("scratch", 10_000, schedule="auto", max_steps=1000).epochs == 3  # the cap: 1000 // 313
    assert point("scratch", 10_000, schedule="auto", max_steps=100).epochs == 1  # at least one pass
    # steps: the same 300 steps at any budget, every epoch run
    fixed = [point("scratch", n, schedule="steps", steps=300) for n in (100, 1_000, 10_000)]
    assert [(f.epochs, f.patience) for f in fixed] == [(96, 96), (10, 10), (1, 1)]
