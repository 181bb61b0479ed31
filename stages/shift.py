"""How far apart two sets of features are: what fine-tuning did to the representation, and how different a
source domain is from a target one.

  linear_cka           Kornblith et al. 2019: similarity of two representations of the same examples,
                       1 when one is a rotation / isotropic scaling of the other, near 0 when unrelated
  proxy_a_distance     Ben-David et al. 2007: 2 (1 - 2 err) for the held-out error of a linear classifier
                       told to separate the two sets; 0 when it cannot, 2 when it always can
  mmd_permutation_test Gretton et al. 2012: the unbiased squared MMD with a Gaussian kernel (median
                       heuristic bandwidth), and its p-value from relabelling the pooled examples at random

numpy and scikit-learn only; every function takes plain feature arrays (n_examples x n_features)."""

from __future__ import annotations

import numpy as np

# A proxy A-distance above this counts as a large shift: a linear domain classifier is right 3 times in 4
# (PAD = 2(1 - 2 err) = 1.0 at 25% error). Between two halves of one dataset it is near 0, between
# different tasks' images near 2.
LARGE_PAD = 1.0


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA between two representations of the same n examples (rows paired)."""
    if len(x) != len(y):
        raise ValueError(f"CKA compares representations of the same examples: {len(x)} vs {len(y)} rows")
    x = np.asarray(x, np.float64) - np.mean(x, 0)
    y = np.asarray(y, np.float64) - np.mean(y, 0)
    cross = np.linalg.norm(y.T @ x) ** 2  # Frobenius
    norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / norm) if norm > 0 else 0.0


def proxy_a_distance(source: np.ndarray, target: np.ndarray, seed: int = 0, c: float = 1.0) -> float:
    """Proxy A-distance from a logistic-regression domain classifier, trained on one half of each set (the
    larger set subsampled to the smaller's size) and scored on the other half, then the halves swapped."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    n = min(len(source), len(target))
    a = np.asarray(source, np.float64)[rng.permutation(len(source))[:n]]
    b = np.asarray(target, np.float64)[rng.permutation(len(target))[:n]]
    half = n // 2
    errors = []
    for fit, held in ((slice(0, half), slice(half, n)), (slice(half, n), slice(0, half))):
        x_fit, y_fit = np.vstack([a[fit], b[fit]]), np.r_[np.zeros(len(a[fit])), np.ones(len(b[fit]))]
        x_held, y_held = np.vstack([a[held], b[held]]), np.r_[np.zeros(len(a[held])), np.ones(len(b[held]))]
        scaler = StandardScaler().fit(x_fit)
        clf = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(x_fit), y_fit)
        errors.append(float((clf.predict(scaler.transform(x_held)) != y_held).mean()))
    err = min(float(np.mean(errors)), 0.5)  # worse than chance is chance
    return 2.0 * (1.0 - 2.0 * err)


def _mmd2(k: np.ndarray, m: int) -> float:
    """Unbiased MMD^2 from the pooled kernel matrix whose first m rows are the first sample."""
    kxx, kyy, kxy = k[:m, :m], k[m:, m:], k[:m, m:]
    n = len(k) - m
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def mmd_permutation_test(source: np.ndarray, target: np.ndarray, n_permutations: int = 500, seed: int = 0,
                         max_examples: int = 1000) -> tuple[float, float]:
    """(MMD^2, p-value) with a Gaussian kernel whose bandwidth is the median pairwise distance. Each set is
    subsampled to `max_examples` (the kernel matrix is quadratic in size)."""
    rng = np.random.default_rng(seed)
    a = np.asarray(source, np.float64)
    b = np.asarray(target, np.float64)
    a, b = a[rng.permutation(len(a))[:max_examples]], b[rng.permutation(len(b))[:max_examples]]
    pooled = np.vstack([a, b])
    sq = np.sum(pooled**2, 1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * pooled @ pooled.T, 0.0)
    bandwidth2 = np.median(d2[np.triu_indices(len(pooled), 1)])
    k = np.exp(-d2 / max(bandwidth2, 1e-12))
    m = len(a)
    observed = _mmd2(k, m)
    exceed = 0
    for _ in range(n_permutations):
        p = rng.permutation(len(pooled))
        exceed += _mmd2(k[np.ix_(p, p)], m) >= observed
    return observed, (1 + exceed) / (1 + n_permutations)
