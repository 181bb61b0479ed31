"""Label-efficiency curves (stages/curves.py): the label multiplier's interpolation, its interval, the
data each point trains on, and the summary on hand-made points."""

from __future__ import annotations

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
    for model, by_budget in truth.items():
        for b, acc in by_budget.items():
            for s in (0, 1, 2):
                (paths.curves / f"{model}-{b}-{s}.json").write_text(json.dumps({
                    "model": model, "budget": b, "seed": s, "name": "timm:efficientnet_lite0",
                    "accuracy": acc + 0.005 * (s - 1), "seconds": 1.0, "image_size": 48, "n_test": 2000}))
    out = curves.summary(params)
    assert out["curves"]["finetuned"]["100"]["mean"] == pytest.approx(0.84)
    assert out["finetuned_ci_above_scratch"]["100"] and out["finetuned_ci_above_scratch"]["1000"]
    lm = out["label_multiplier"]
    # scratch passes 0.84 six sevenths of the way (in log) from 300 to 1,000: 300 * (10/3)**(6/7) = 842
    assert lm["multiplier"] == pytest.approx(300 * (10 / 3) ** (6 / 7) / 100, abs=1e-3) and lm["more_than"] is None
    assert json.loads(paths.label_efficiency.read_text()) == out
    assert paths.label_efficiency_plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (paths.curves / "scratch-1000-2.json").unlink()
    with pytest.raises(FileNotFoundError, match="make curves"):
        curves.summary(params)
