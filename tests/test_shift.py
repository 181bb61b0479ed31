"""Representation and domain measures (stages/shift.py) on data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from stages import shift


def test_cka_is_one_for_the_same_features_up_to_rotation_and_scale_and_near_zero_for_independent_ones():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 20))
    q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    assert shift.linear_cka(x, x) == pytest.approx(1.0)
    assert shift.linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0)  # rotated, scaled, shifted
    assert shift.linear_cka(x, rng.normal(size=(500, 30))) < 0.1
    half = np.hstack([x[:, :10], rng.normal(size=(500, 10))])  # shares half its directions
    assert 0.3 < shift.linear_cka(x, half) < 0.7
    with pytest.raises(ValueError, match="same examples"):
        shift.linear_cka(x, x[:10])


def test_proxy_a_distance_is_near_zero_for_one_distribution_and_near_two_for_disjoint_ones():
    rng = np.random.default_rng(1)
    same = shift.proxy_a_distance(rng.normal(size=(400, 8)), rng.normal(size=(400, 8)))
    apart = shift.proxy_a_distance(rng.normal(size=(400, 8)), rng.normal(size=(400, 8)) + 6.0)
    assert same < 0.3 and apart > 1.9


def test_mmd_permutation_test_rejects_a_shift_and_not_the_same_distribution():
    rng = np.random.default_rng(2)
    _, p_same = shift.mmd_permutation_test(rng.normal(size=(150, 5)), rng.normal(size=(150, 5)), 300)
    mmd, p_shift = shift.mmd_permutation_test(rng.normal(size=(150, 5)), rng.normal(size=(150, 5)) + 0.5, 300)
    assert p_same > 0.05 and p_shift < 0.01 and mmd > 0
    # the p-value is calibrated: under no difference it is roughly uniform (20 draws, most above 0.05)
    ps = [shift.mmd_permutation_test(rng.normal(size=(40, 3)), rng.normal(size=(40, 3)), 100, seed=s)[1]
          for s in range(20)]
    assert sum(p < 0.05 for p in ps) <= 3


def test_drift_per_layer_group_is_one_where_nothing_changed_and_lower_where_weights_moved(tmp_path):
    import torch

    from stages import checkpoint, zoo
    from stages.evaluate import drift
    from stages.params import ModelParams

    from .conftest import ROOT

    m = ModelParams(name="timm:efficientnet_lite0", image_size=32)  # 8 groups; CKA over 50 examples of 1,280 features
    loaded = zoo.load(m, 10, ROOT / "weights.lock")
    model = loaded.model
    groups = zoo.layer_groups(model)
    with torch.no_grad():  # "fine-tuning" that moved only the last stage
        for name, p in model.named_parameters():
            if name in groups[-1] and p.ndim > 1:
                p.add_(torch.randn_like(p) * p.std())
    checkpoint.save_checkpoint(tmp_path / "ft", model, {"architecture": loaded.architecture, "classes": list("abcdefghij"),
                                                 "preprocessing": loaded.pre})
    x = np.random.default_rng(0).integers(0, 255, (60, 28, 28)).astype(np.uint8)
    tuned, meta = zoo.load_checkpoint(tmp_path / "ft")
    result = drift(tuned, meta["preprocessing"], m, ROOT / "weights.lock", x, 10, n=50, seed=0)
    cka = list(result["linear_cka"].values())
    assert len(cka) == len(groups) and result["n_examples"] == 50
    assert all(v == pytest.approx(1.0, abs=1e-4) for v in cka[:-1])
    assert cka[-1] < 0.99 and result["min_group"] == list(result["linear_cka"])[-1]
