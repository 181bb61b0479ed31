"""The statistics behind the verdict: bootstrap confidence intervals, the paired bootstrap of an accuracy
difference (over test examples, and over training seeds then test examples when a run trained several),
McNemar's exact test, and the rule that turns an interval into a verdict."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import binom


def bootstrap_ci(
    stat: Callable[[np.ndarray], float], n: int, n_boot: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat(indices)` over `n_boot` resamples of range(n).

    `stat` receives the resampled indices, so paired statistics (two models scored on the same
    examples) resample both together, which is what makes the paired interval narrow.
    """
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, n)) for _ in range(n_boot)])
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return float(lo), float(hi)


def two_level_ci(diff: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of `diff` (seeds x test examples: per training seed, model A's
    correctness minus model B's on each example) over resamples of the seeds, then of the examples.

    Both levels are resampled because both vary: another training seed gives another model, another test
    set another score. The examples are drawn once per resample and shared by every seed (and by both
    models), which keeps the comparison paired. With one seed this is the paired bootstrap over examples.
    """
    diff = np.asarray(diff, dtype=float)
    s, n = diff.shape
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        seeds, rows = rng.integers(0, s, s), rng.integers(0, n, n)
        values[b] = diff[:, rows].mean(1)[seeds].mean()
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return float(lo), float(hi)


def seeds_disagree(gains: list[float]) -> bool:
    """Whether some training seed has model A ahead and another has it behind."""
    return any(g > 0 for g in gains) and any(g < 0 for g in gains)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in y_true or y_pred (as scikit-learn)."""
    tp = np.bincount(y_true[y_true == y_pred], minlength=n_classes)
    true = np.bincount(y_true, minlength=n_classes)
    pred = np.bincount(y_pred, minlength=n_classes)
    present = (true + pred) > 0
    return float(np.mean(2 * tp[present] / (true + pred)[present]))


def mcnemar_p(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Two-sided exact McNemar test on paired correctness: does A get right what B gets wrong more often
    than the reverse? Exact (binomial on the discordant pairs), so it holds for small counts too."""
    b = int(np.sum(correct_a & ~correct_b))
    c = int(np.sum(~correct_a & correct_b))
    return mcnemar_exact(b, c)


def mcnemar_exact(b: int, c: int) -> float:
    if b + c == 0:
        return 1.0
    return float(min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5)))


def verdict(ci: tuple[float, float], seed_gains: list[float] = ()) -> str:
    """positive only when the whole interval of the gain lies above 0, negative only when below; and
    inconclusive, whatever the interval, when the training seeds disagree on the sign of the gain."""
    if seeds_disagree(list(seed_gains)):
        return "inconclusive"
    lo, hi = ci
    if lo > 0:
        return "positive"
    if hi < 0:
        return "negative"
    return "inconclusive"
