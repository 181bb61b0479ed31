import numpy as np
import pytest
from sklearn.metrics import f1_score

from stages.stats import bootstrap_ci, macro_f1, mcnemar_exact, mcnemar_p, seeds_disagree, two_level_ci, verdict


def test_bootstrap_interval_covers_the_true_accuracy_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    p, n, trials = 0.7, 200, 200
    hits = 0
    for t in range(trials):
        correct = rng.random(n) < p
        lo, hi = bootstrap_ci(lambda i: correct[i].mean(), n, n_boot=400, seed=t)
        hits += lo <= p <= hi
    # Percentile intervals run a little short at n=200; 0.88-0.99 still fails a broken one (e.g. one
    # resampling the wrong axis, which gives ~0 width, or a 68% interval).
    assert 0.88 <= hits / trials <= 0.99


def test_bootstrap_interval_narrows_with_more_data():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 10_000):
        correct = rng.random(n) < 0.8
        lo, hi = bootstrap_ci(lambda i: correct[i].mean(), n, n_boot=500, seed=0)
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 5  # width ~ 1/sqrt(n): 10x narrower


def test_mcnemar_exact_matches_hand_computed_values():
    # b=10, c=2: two-sided exact p = 2 * P(X <= 2 | n=12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096)
    # b=c: no evidence of a difference
    assert mcnemar_exact(5, 5) == 1.0
    # b=3, c=0: 2 * (1/8) = 0.25
    assert mcnemar_exact(3, 0) == pytest.approx(0.25)
    assert mcnemar_exact(0, 0) == 1.0


def test_mcnemar_counts_only_discordant_pairs():
    a = np.array([1, 1, 1, 1, 1, 1, 0, 0, 1, 1], bool)
    b = np.array([0, 0, 0, 1, 1, 1, 0, 1, 1, 1], bool)
    # discordant: a right/b wrong = 3, a wrong/b right = 1 -> 2 * P(X<=1 | 4) = 2 * 5/16
    assert mcnemar_p(a, b) == pytest.approx(10 / 16)


def test_macro_f1_matches_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    pred = np.where(rng.random(300) < 0.6, y, rng.integers(0, 5, 300))
    assert macro_f1(y, pred, 5) == pytest.approx(f1_score(y, pred, average="macro"))
    pred[pred == 4] = 0  # a class never predicted still counts (F1 = 0)
    assert macro_f1(y, pred, 5) == pytest.approx(f1_score(y, pred, average="macro"))


@pytest.mark.parametrize(
    ("ci", "expected"),
    [((0.01, 0.2), "positive"), ((-0.2, -0.01), "negative"), ((-0.01, 0.2), "inconclusive"), ((0.0, 0.1), "inconclusive")],
)
def test_verdict_needs_the_whole_interval_on_one_side(ci, expected):
    assert verdict(ci) == expected


def _diffs(gains: list[float], n: int = 2000, seed: int = 0) -> np.ndarray:
    """Per seed, A's correctness minus B's on `n` examples, with mean gain `gains[s]` (values in {-1, 0, 1})."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in gains:
        a = rng.random(n) < 0.5 + g / 2
        b = rng.random(n) < 0.5 - g / 2
        rows.append(a.astype(float) - b.astype(float))
    return np.stack(rows)


def test_the_two_level_interval_widens_with_the_spread_between_seeds():
    same = two_level_ci(_diffs([0.10, 0.10, 0.10]), 1000, 0)
    spread = two_level_ci(_diffs([0.02, 0.10, 0.18]), 1000, 0)
    assert same[0] > 0.05 and same[1] < 0.15  # agreeing seeds: about the one-level interval around 0.10
    assert spread[1] - spread[0] > 1.5 * (same[1] - same[0])  # the seeds' own spread is in the interval
    one = _diffs([0.10])  # one seed: the paired bootstrap over examples, what bootstrap_ci gives
    lo, hi = bootstrap_ci(lambda i: one[0][i].mean(), one.shape[1], 1000, 0)
    assert two_level_ci(one, 1000, 0) == pytest.approx((lo, hi), abs=0.01)


def test_seeds_that_disagree_on_the_sign_make_the_verdict_inconclusive_whatever_the_interval():
    assert seeds_disagree([0.05, -0.01, 0.04]) and not seeds_disagree([0.05, 0.0, 0.04])
    assert verdict((0.01, 0.2), [0.05, -0.01, 0.04]) == "inconclusive"
    assert verdict((0.01, 0.2), [0.05, 0.02, 0.04]) == "positive"
    assert verdict((-0.2, -0.01), [-0.05, -0.02]) == "negative"
