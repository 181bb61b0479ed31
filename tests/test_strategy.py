"""Fine-tuning strategies (stages/strategy.py): layer groups, what trains when, discriminative learning
rates, L2-SP, the linear probe, LoRA and WiSE-FT, on tiny real models and data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from stages import strategy, weights, zoo
from stages.params import FinetuneParams, ModelParams, Params
from stages.predict import accuracy, predict
from stages.splits import Split
from stages.strategy import Plan
from stages.train import fit

from .conftest import tiny_hf_model


def tiny_images(n: int, seed: int, classes: int = 3) -> Split:
    """Images whose class is the brightness of one quadrant: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 60, (n, 16, 16)).astype(np.uint8)
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, r * 8:(r + 1) * 8, col * 8:(col + 1) * 8] += 150
    return Split(x=x, y=y.astype(np.int64))


def small_cnn():
    pre = zoo.preprocessing("timm:resnet10t", 16)
    torch.manual_seed(0)
    return zoo.build("timm:resnet10t", 3, pre), pre


CFG = FinetuneParams(epochs=3, batch_size=8, lr=3e-3, weight_decay=0.01, patience=9, seed=0, augment="none",
                     label_smoothing=0.0)


def test_layer_groups_follow_depth_for_cnns_and_transformers(tmp_path):
    groups = zoo.layer_groups(zoo.build("timm:efficientnet_lite0", 10, zoo.preprocessing("timm:efficientnet_lite0", 32)))
    assert len(groups) == 8  # stem, then the stages blocks.0-6 (the final convolution with the last)
    assert groups[0][0] == "conv_stem.weight" and all(n.startswith("blocks.3.") for n in groups[4])
    assert "conv_head.weight" in groups[-1] and not any(n.startswith("classifier") for g in groups for n in g)
    for model_type, first, blocks, last in [("bert", "encoder.embeddings.", "encoder.encoder.layer.", "encoder.pooler."),
                                            ("gpt2", "encoder.wte.", "encoder.h.", "encoder.ln_f.")]:
        folder = tiny_hf_model(tmp_path / model_type, model_type)
        loaded = zoo.load(ModelParams(name=f"hf:{folder}"), 3, _locked(tmp_path, folder), pretrained=False)
        groups = zoo.layer_groups(loaded.model)
        assert [g[0].startswith(first) for g in groups][0], groups[0]
        assert all(n.startswith(f"{blocks}{i}.") for i, g in enumerate(groups[1:3]) for n in g)
        assert all(n.startswith(last) for n in groups[-1]) and len(groups) == 4


def _locked(tmp_path, folder):
    lock = tmp_path / "weights.lock"
    weights.lock(weights.find_weights(f"hf:{folder}"), lock)
    return lock


def test_plan_says_what_trains_in_each_epoch():
    model, _ = small_cnn()
    settings = lambda **k: dataclasses.replace(FinetuneParams(), **k)  # noqa: E731
    full = Plan.of(model, settings())
    everything = set(dict(model.named_parameters()))
    assert full.trainable(1) == everything
    assert Plan.of(model, settings(freeze_epochs=1)).trainable(1) == set(full.head)
    assert Plan.of(model, settings(strategy="linear_probe")).trainable(5) == set(full.head)
    partial = Plan.of(model, settings(strategy="partial", freeze_groups=2))
    frozen = {n for g in full.groups[:2] for n in g}
    assert partial.trainable(1) == everything - frozen
    gradual = Plan.of(model, settings(strategy="gradual_unfreeze"))
    assert gradual.trainable(1) == set(full.head)
    assert gradual.trainable(2) == set(full.head) | set(full.groups[-1])
    assert gradual.trainable(len(full.groups) + 1) == everything
    assert gradual.trainable_count(model, 2) < gradual.trainable_count(model, 99) == sum(
        p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="linear_probe"):
        Plan.of(model, settings(strategy="partial", freeze_groups=len(full.groups)))


def test_layer_decay_scales_each_groups_peak_lr():
    model, _ = small_cnn()
    plan = Plan.of(model, dataclasses.replace(FinetuneParams(), layer_decay=0.5))
    groups = plan.param_groups(model, 1e-2, 0.01)
    depth = len(plan.groups)
    assert [g["lr"] for g in groups] == pytest.approx([1e-2 * 0.5 ** (depth - i) for i in range(depth)] + [1e-2])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def _moved(before: dict, model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def test_partial_and_gradual_unfreeze_leave_frozen_layers_untouched():
    train, val = tiny_images(48, 0), tiny_images(12, 1)
    for strat, epochs in [("partial", 2), ("gradual_unfreeze", 2)]:
        model, pre = small_cnn()
        plan = Plan.of(model, dataclasses.replace(FinetuneParams(), strategy=strat, freeze_groups=3))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        fit(model, train, val, pre, dataclasses.replace(CFG, epochs=epochs), plan, desc=strat)
        expected = set().union(*(plan.trainable(e) for e in range(1, epochs + 1)))
        assert _moved(before, model) == expected, strat


def test_l2sp_keeps_the_backbone_nearer_its_start():
    train, val = tiny_images(48, 0), tiny_images(12, 1)
    distance = {}
    for alpha in (0.0, 50.0):
        model, pre = small_cnn()
        plan = Plan.of(model, dataclasses.replace(FinetuneParams(), l2sp_alpha=alpha, l2sp_beta=0.01))
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        if alpha:  # the penalty is zero where training starts, and grows with the distance
            assert float(plan.penalty(model, plan.anchors(model))) == pytest.approx(
                0.5 * 0.01 * sum(float(p.pow(2).sum()) for n, p in model.named_parameters() if n in plan.head))
        fit(model, train, val, pre, CFG, plan, desc=f"l2sp {alpha}")
        backbone = [n for g in plan.groups for n in g]
        distance[alpha] = sum(float((dict(model.named_parameters())[n].detach() - start[n]).pow(2).sum()) for n in backbone)
    assert distance[50.0] < 0.5 * distance[0.0]


def test_linear_probe_head_gives_the_logistic_regressions_logits():
    from sklearn.linear_model import LogisticRegression

    train, val = tiny_images(60, 0), tiny_images(30, 1)
    model, pre = small_cnn()
    c, acc = strategy.linear_probe(model, train, val, pre, [0.1, 1.0])
    feats = predict(model, train.x, pre, fn=zoo.features)
    clf = LogisticRegression(C=c, max_iter=2000).fit(feats, train.y)
    assert np.allclose(predict(model, val.x, pre), clf.decision_function(predict(model, val.x, pre, fn=zoo.features)),
                       atol=1e-3)
    assert acc == accuracy(model, val, pre)


def test_wise_ft_picks_the_mix_best_on_validation():
    train, val = tiny_images(48, 0), tiny_images(30, 1)
    model, pre = small_cnn()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, train, val, pre, CFG, Plan.of(model), desc="wise")
    end = {k: v.clone() for k, v in model.state_dict().items()}
    alpha, rows = strategy.wise_ft(model, start, val, pre)
    assert [r["alpha"] for r in rows] == pytest.approx(np.linspace(0, 1, 11))
    best = max(r["val_accuracy"] for r in rows)
    assert accuracy(model, val, pre) == best and dict((r["alpha"], r["val_accuracy"]) for r in rows)[alpha] == best
    for k in ("fc.weight", "conv1.0.weight"):  # the chosen mix is what the model holds
        assert torch.allclose(model.state_dict()[k], torch.lerp(start[k], end[k], alpha))


def test_lora_trains_a_few_percent_and_merges_into_a_plain_model(tmp_path):
    folder = tiny_hf_model(tmp_path / "bert", "bert")
    m = ModelParams(name=f"hf:{folder}", max_length=12)
    loaded = zoo.load(m, 3, _locked(tmp_path, folder))
    model, pre = loaded.model, loaded.pre
    plain_keys = set(model.state_dict())
    p = dataclasses.replace(FinetuneParams(), strategy="lora", lora_rank=2)
    strategy.add_lora(model, p.lora_rank, p.lora_alpha, p.lora_dropout, p.lora_targets)
    plan = Plan.of(model, p)
    trainable = plan.trainable(1)
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert plan.trainable_count(model, 3) < 0.2 * sum(t.numel() for t in model.parameters())
    texts = np.array(["a dog", "a loaf of bread", "joy and sorrow", "a cat"] * 6, dtype=object)
    split = Split(x=texts, y=np.array([0, 1, 2, 0] * 6))
    fit(model, split, split, pre, dataclasses.replace(CFG, lr=5e-3), plan, desc="lora")
    before = predict(model, texts, pre)
    strategy.merge_lora(model)
    assert set(model.state_dict()) == plain_keys  # a plain network again: saves, exports and serves as one
    assert np.allclose(predict(model, texts, pre), before, atol=1e-5)
    with pytest.raises(ValueError, match="transformer text models"):
        strategy.add_lora(small_cnn()[0], 2, 4.0, 0.0, None)


def test_compare_strategies_are_checked_as_finetune_settings():
    raw = Params.load().to_dict()
    raw["compare"] = {"strategies": {"mine": {"strategy": "lp_ft", "layer_decy": 0.5}, "bad": {"strategy": "magic"}}}
    with pytest.raises(ValueError) as e:
        Params.from_dict(raw)
    assert "compare.strategies.mine.layer_decy: unknown key (did you mean layer_decay?)" in str(e.value)
    assert "compare.strategies.bad.strategy: must be one of full, linear_probe" in str(e.value)
    raw["compare"] = {"strategies": {"mine": {"strategy": "lp_ft", "layer_decay": 0.5}}}
    assert Params.from_dict(raw).finetune_for("mine").layer_decay == 0.5


def test_training_ends_with_the_best_validation_epoch_or_with_keep_last_the_last_one():
    train, v = tiny_images(24, 0), tiny_images(12, 1)
    # validation labels shifted by one class: the more the model learns, the worse it scores there, so the
    # best validation epoch is the first and patience 1 stops the run in the second
    val = Split(x=v.x, y=(v.y + 1) % 3)
    for keep in ("best", "last"):
        model, pre = small_cnn()
        cfg = dataclasses.replace(CFG, epochs=4, patience=1, keep=keep)
        result = fit(model, train, val, pre, cfg, Plan.of(model), desc=keep)
        vals = [row["val_accuracy"] for row in result.history]
        if keep == "best":
            assert result.best_epoch == 1 and len(vals) == 2 and vals[0] > vals[1]
            assert accuracy(model, val, pre) == pytest.approx(vals[0], abs=1e-6)
        else:  # never stops early, and the weights it returns score what the last epoch did
            assert result.best_epoch == 4 and len(vals) == 4
            assert accuracy(model, val, pre) == pytest.approx(vals[-1], abs=1e-6)
