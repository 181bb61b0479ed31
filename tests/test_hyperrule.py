"""Settings chosen from the data (stages/hyperrule.py) and the image augmentations they choose between."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from flows import compose
from stages import hyperrule
from stages.augment import augment
from stages.params import BaselineParams, FinetuneParams
from stages.train import fit

from .conftest import ROOT
from .test_strategy import small_cnn, tiny_images


@pytest.mark.parametrize(("n", "batch", "epochs"), [
    (1_000, 32, 10),    # the image demo
    (500, 16, 10),      # the text demo
    (500, 32, 10),      # the pretrain demo: 16 steps a pass, 160 in all
    (100, 32, 38),      # 4 steps a pass: passes until 150 steps
    (19_999, 32, 10),
    (20_000, 32, 10),   # the middle tier starts where 10 passes = 200k examples seen
    (100_000, 64, 2),
    (499_999, 32, 1),
    (2_000_000, 256, 1),
])
def test_epochs_follow_the_dataset_size_tiers(n, batch, epochs):
    assert hyperrule.epochs(n, batch)[0] == epochs


def test_more_data_never_means_fewer_examples_seen_or_fewer_steps():
    sizes = [50, 100, 300, 1_000, 5_000, 19_999, 20_000, 50_000, 200_000, 499_999, 500_000, 3_000_000]
    seen = [hyperrule.epochs(n, 32)[0] * n for n in sizes]
    steps = [hyperrule.epochs(n, 32)[0] * math.ceil(n / 32) for n in sizes]
    assert seen == sorted(seen) and min(steps) >= hyperrule.MIN_STEPS
    assert [hyperrule.epochs(n, 32)[0] for n in sizes] == sorted((hyperrule.epochs(n, 32)[0] for n in sizes), reverse=True)


def test_lr_by_modality_and_batch_size_with_the_square_root_rule():
    assert hyperrule.lr("image", 32)[0] == 1e-3 and hyperrule.lr("text", 16)[0] == 1e-4
    assert hyperrule.lr("image", 128)[0] == pytest.approx(2e-3) and hyperrule.lr("text", 4)[0] == pytest.approx(5e-5)
    assert "sqrt(128/32)" in hyperrule.lr("image", 128)[1]


def test_augmentation_by_modality_and_size():
    assert hyperrule.augment(100_000, "text")[0] == "none"
    assert hyperrule.augment(1_000, "image")[0] == "flip_shift"
    assert hyperrule.augment(20_000, "image")[0] == "crop"


def test_resolve_replaces_only_auto_and_says_why():
    p = FinetuneParams()  # the defaults are auto
    assert (p.epochs, p.lr, p.augment) == ("auto", "auto", "auto")
    r, why = hyperrule.resolve(p, 1_000, "image")
    assert (r.epochs, r.lr, r.augment) == (10, 1e-3, "flip_shift")
    assert why["epochs"].startswith("10 (1,000 examples < 20,000") and set(why) == {"epochs", "lr", "augment"}
    mine = dataclasses.replace(p, epochs=3, lr=5e-4, augment="crop")
    assert hyperrule.resolve(mine, 1_000, "image") == (mine, {})
    old = dataclasses.replace(p, epochs=3, lr=5e-4)
    assert hyperrule.resolve(dataclasses.replace(old, augment=True), 10, "image")[0].augment == "flip_shift"
    assert hyperrule.resolve(dataclasses.replace(old, augment=False), 10, "image")[0].augment == "none"


def test_scratch_keeps_the_budget_with_its_own_lr_and_augmentation():
    ft = dataclasses.replace(FinetuneParams(), batch_size=16)
    same = hyperrule.resolve(hyperrule.scratch(ft, BaselineParams(scratch_lr=3e-3)), 1_000, "image")[0]
    assert (same.epochs, same.lr, same.augment, same.batch_size) == (10, 3e-3, "flip_shift", 16)
    own, why = hyperrule.resolve(hyperrule.scratch(ft, BaselineParams(scratch_lr=3e-3, augment="none")), 1_000,
                                 "image")
    assert (own.epochs, own.lr, own.augment) == (10, 3e-3, "none") and set(why) == {"epochs"}


def test_training_refuses_settings_that_were_not_resolved():
    with pytest.raises(ValueError, match="epochs is 'auto': pass the settings through stages.hyperrule.resolve"):
        fit(None, None, None, {}, FinetuneParams(), None)  # refused before anything is touched
    with pytest.raises(ValueError, match="augment is True"):
        fit(None, None, None, {}, dataclasses.replace(FinetuneParams(), epochs=1, lr=1e-3, augment=True), None)


@pytest.mark.parametrize(("preset", "n", "expected"), [
    ("image", 1_000, (10, 1e-3, "flip_shift")),
    ("text", 500, (10, 1e-4, "none")),
    ("pretrain", 500, (10, 1e-3, "flip_shift")),
])
def test_each_demo_gets_the_settings_it_was_tuned_with(tmp_path, preset, n, expected):
    """The rule reproduces the hand-tuned values the demos' measured results were obtained with."""
    p = compose.settings(compose.compose(preset, params_file=ROOT / "params.yaml", tasks_dir=ROOT / "tasks"))
    classes = len(p.prepare.classes or range(10))
    assert p.prepare.per_class * classes == n
    r, _ = hyperrule.resolve(p.finetune, n, "text" if p.prepare.dataset == "wordnet" else "image")
    assert (r.epochs, r.lr, r.augment) == expected


# ------------------------------------------------------------------------------------------ augmentations


def ramp(n: int = 64, size: int = 32) -> torch.Tensor:
    """Images whose value is the column's position, 0 at the left edge to 1 at the right."""
    x = torch.linspace(0, 1, size).expand(n, 3, size, size)
    return x.contiguous()


def test_random_resized_crop_keeps_between_min_area_and_all_of_the_image_and_flips_half():
    x = ramp()
    out = augment(x, torch.Generator().manual_seed(0), "crop", crop_min_area=0.35)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1  # bilinear: no values outside the input
    row = out[:, 0, 16]  # one row per image: the crop's horizontal extent, possibly reversed
    span = (row[:, -1] - row[:, 0]).abs()
    # width fraction sqrt(area * ratio), area >= 0.35 and ratio >= 3/4; the sampling grid's half-pixel edges
    # pull the measured span in by about one pixel
    assert span.min() >= math.sqrt(0.35 * 3 / 4) - 2 / 32 and span.max() <= 1
    assert span.std() > 0.05  # crops differ in size
    flipped = (row[:, -1] < row[:, 0]).float().mean()
    assert 0.3 < flipped < 0.7
    again = augment(x, torch.Generator().manual_seed(0), "crop", crop_min_area=0.35)
    assert torch.equal(out, again)  # the generator decides everything: a resumed run redraws the same crops


def test_a_larger_min_area_gives_larger_crops():
    x = ramp(256)
    spans = []
    for area in (0.2, 0.9):
        row = augment(x, torch.Generator().manual_seed(1), "crop", crop_min_area=area)[:, 0, 16]
        spans.append(float((row[:, -1] - row[:, 0]).abs().mean()))
    assert spans[1] > spans[0] + 0.1


def test_flip_and_none():
    x = ramp(200)
    assert torch.equal(augment(x, torch.Generator(), "none"), x)
    out = augment(x, torch.Generator().manual_seed(0), "flip")
    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, x, strict=True)]
    assert all(f or torch.equal(o, i) for f, o, i in zip(flipped, out, x, strict=True)) and 60 < sum(flipped) < 140
    with pytest.raises(ValueError, match="unknown augmentation 'mixup'"):
        augment(x, torch.Generator(), "mixup")


def test_training_with_crops_learns_the_tiny_task():
    train, val = tiny_images(96, 0), tiny_images(48, 1)
    model, pre = small_cnn()
    cfg = FinetuneParams(epochs=4, batch_size=8, lr=3e-3, weight_decay=0.01, patience=9, seed=0, augment="crop",
                         crop_min_area=0.6, label_smoothing=0.0)
    from stages.strategy import Plan

    result = fit(model, train, val, pre, cfg, Plan.of(model))
    assert result.best_val_accuracy > 0.8
    assert np.isfinite([h["train_loss"] for h in result.history if "train_loss" in h]).all()
