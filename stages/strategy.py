"""How fine-tuning treats the pre-trained network (`finetune.strategy` and its settings in params.yaml):
which parameters train in which epoch, at which learning rate, pulled toward what (a `Plan`, which
`train.fit` follows), and the steps around the training loop: the linear probe, LoRA, WiSE-FT.

  full              every parameter trains from the first step (`freeze_epochs` > 0: the head alone first)
  linear_probe      the backbone stays frozen; the head is a logistic regression on its features, with the
                    L2 strength chosen on validation (no training loop)
  partial           the first `freeze_groups` layer groups stay frozen; the rest trains
  gradual_unfreeze  ULMFiT (Howard & Ruder 2018): the head trains alone in epoch 1, each later epoch unfreezes
                    the next layer group from the top
  lp_ft             Kumar et al. 2022: the linear probe first, then `full` starting from the probe's head. A
                    random head sends large, arbitrary gradients into the features in the first steps
                    ("feature distortion"); a fitted one does not
  lora              Hu et al. 2021, through peft: low-rank adapters on a transformer's attention projections
                    train with the head, the rest stays frozen; merged into the weights afterwards, so the
                    saved model and its ONNX export are a plain network
With any of them:
  layer_decay < 1   discriminative learning rates (ULMFiT, and layer-wise decay in BERT fine-tuning): the layer
                    group k places below the head trains at lr * layer_decay**k
  l2sp_alpha > 0    L2-SP (Li et al. 2018): alpha/2 * ||w - w_pretrained||^2 on the backbone plus
                    beta/2 * ||w_head||^2 join the loss, replacing weight decay (which pulls toward zero,
                    away from what was learned)
  wise_ft           WiSE-FT (Wortsman et al. 2022): the weights are interpolated between where fine-tuning
                    started (for lp_ft: pre-trained backbone + probe head) and where it ended, alpha in
                    0, 0.1, ..., 1 chosen on validation

Layer groups come from `zoo.layer_groups`: the stem, each indexed block (EfficientNet's `blocks.N`, a
transformer's `layer.N`), and whatever follows them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from stages import zoo
from stages.predict import accuracy, predict
from stages.splits import Split

if TYPE_CHECKING:  # scikit-learn is imported where a probe is fitted: GPU nodes may lack it (../shared)
    from sklearn.linear_model import LogisticRegression

    from stages.params import FinetuneParams


# No strategy at all: every parameter trains from the first step at one lr, with plain weight decay. What
# training from random weights gets (the scratch baseline, pre-training), whatever finetune.strategy says.
PLAIN = {"strategy": "full", "freeze_epochs": 0, "freeze_groups": 0, "layer_decay": 1.0, "l2sp_alpha": 0.0,
         "l2sp_beta": 0.0}


@dataclass(frozen=True)
class Plan:
    """Which parameters train in which epoch, and how: the model's layer groups and head, and the strategy's
    settings of a FinetuneParams (their defaults are the schema's, stages/params.py)."""

    groups: tuple[tuple[str, ...], ...]  # backbone parameter names by layer group, bottom to top
    head: tuple[str, ...]
    strategy: str
    freeze_epochs: int
    freeze_groups: int
    layer_decay: float
    l2sp_alpha: float
    l2sp_beta: float

    @classmethod
    def of(cls, model: nn.Module, settings: FinetuneParams | None = None) -> Plan:
        """The plan for `model` under `settings`; no settings: PLAIN."""
        given = {k: getattr(settings, k) for k in PLAIN} if settings is not None else PLAIN
        groups = tuple(tuple(g) for g in zoo.layer_groups(model))
        plan = cls(groups=groups, head=tuple(zoo.head_parameters(model)), **given)
        if plan.strategy == "partial" and plan.freeze_groups >= len(groups) > 0:
            raise ValueError(f"finetune.freeze_groups is {plan.freeze_groups} but the backbone has {len(groups)} "
                             f"layer groups: freezing all of them is strategy linear_probe")
        return plan

    def trainable(self, epoch: int) -> set[str]:
        """Names of the parameters that train in `epoch` (1-based)."""
        head = set(self.head)
        if self.strategy == "linear_probe" or epoch <= self.freeze_epochs:
            return head
        groups = self.groups
        if self.strategy == "partial":
            groups = groups[self.freeze_groups:]
        elif self.strategy == "gradual_unfreeze":
            opened = epoch - self.freeze_epochs - 1  # epoch 1: head only, then one more group per epoch
            groups = groups[len(groups) - opened:] if opened > 0 else ()
        names = {n for g in groups for n in g}
        if self.strategy == "lora":  # the adapters train, the weights they adapt stay as they are
            names = {n for n in names if "lora_" in n}
        return head | names

    def trainable_count(self, model: nn.Module, epochs: int) -> int:
        """Parameters (scalars) that train in at least one of `epochs` epochs."""
        names = set().union(*(self.trainable(e) for e in range(1, epochs + 1)))
        return sum(p.numel() for n, p in model.named_parameters() if n in names)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups, bottom layer group first and the head last, each with its peak lr.
        Under L2-SP weight decay is off: its penalty (alpha toward the pre-trained values, beta toward zero
        for the head) replaces it."""
        params = dict(model.named_parameters())
        wd = 0.0 if self.l2sp_alpha else weight_decay
        out = []
        depth = len(self.groups)
        for i, group in enumerate(self.groups):
            out.append({"params": [params[n] for n in group], "lr": lr * self.layer_decay ** (depth - i),
                        "weight_decay": wd, "name": f"group{i}"})
        out.append({"params": [params[n] for n in self.head], "lr": lr, "weight_decay": wd, "name": "head"})
        return [g for g in out if g["params"]]

    def anchors(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The pre-trained backbone values L2-SP pulls toward (None when L2-SP is off)."""
        if not self.l2sp_alpha:
            return None
        backbone = {n for g in self.groups for n in g}
        return {n: p.detach().clone() for n, p in model.named_parameters() if n in backbone}

    def penalty(self, model: nn.Module, anchors: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        """L2-SP's alpha/2 ||w - w0||^2 (trainable backbone) + beta/2 ||w_head||^2, or None when off."""
        if anchors is None:
            return None
        head = set(self.head)
        terms_sp, terms_head = [], []
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if n in anchors:
                terms_sp.append((p - anchors[n].to(p.device)).pow(2).sum())
            elif n in head:
                terms_head.append(p.pow(2).sum())
        zero = next(model.parameters()).new_zeros(())
        return 0.5 * self.l2sp_alpha * sum(terms_sp, zero) + 0.5 * self.l2sp_beta * sum(terms_head, zero)


def best_logreg(x_train, train: Split, x_val, val: Split, cs: list[float]) -> tuple[LogisticRegression, float, float]:
    """The multinomial logistic regression (of those with inverse L2 strength in `cs`) best on validation:
    (classifier, C, validation accuracy). Ties go to the first C listed."""
    from sklearn.linear_model import LogisticRegression

    best = None
    for c in cs:
        clf = LogisticRegression(C=c, max_iter=2000).fit(x_train, train.y)
        acc = float((clf.predict(x_val) == val.y).mean())
        if best is None or acc > best[2]:
            best = (clf, c, acc)
    return best


def load_linear(layer: nn.Linear, clf: LogisticRegression) -> None:
    """Put a fitted multinomial logistic regression into a torch Linear layer (same logits)."""
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(clf.coef_).float())
        layer.bias.copy_(torch.from_numpy(clf.intercept_).float())


def linear_probe(model: nn.Module, train: Split, val: Split, pre: dict, cs: list[float]) -> tuple[float, float]:
    """Fit the head of `model` as a logistic regression on its frozen features; (C, validation accuracy)."""
    f_train = predict(model, train.x, pre, fn=zoo.features, desc="probe features (train)")
    f_val = predict(model, val.x, pre, fn=zoo.features, desc="probe features (val)")
    clf, c, acc = best_logreg(f_train, train, f_val, val, cs)
    load_linear(model.get_submodule(zoo.head_name(model)), clf)
    return c, acc


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str] | None) -> None:
    """Wrap the transformer encoder of a text model with LoRA adapters (peft), in place. `targets` names the
    modules to adapt; None: peft's default for the architecture (query and value projections for BERT)."""
    from stages.textnet import TextClassifier

    if not isinstance(model, TextClassifier):
        raise ValueError(f"finetune.strategy lora adapts transformer text models (hf:...), not "
                         f"{type(model).__name__}; for an image backbone try partial, lp_ft or layer_decay")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    try:
        model.encoder = get_peft_model(model.encoder, config)
    except ValueError as e:
        raise ValueError(f"LoRA could not adapt {type(model.encoder).__name__}: {e}. Name the modules to adapt "
                         f"in finetune.lora_targets (e.g. [query, value])") from e


def merge_lora(model: nn.Module) -> None:
    """Fold the adapters into the weights they adapt: a plain network again, with the same outputs."""
    if hasattr(model, "encoder") and hasattr(model.encoder, "merge_and_unload"):
        model.encoder = model.encoder.merge_and_unload()


def wise_ft(model: nn.Module, start: dict[str, torch.Tensor], val: Split, pre: dict,
            steps: int = 10) -> tuple[float, list[dict[str, float]]]:
    """Replace the weights of `model` with (1 - alpha) * start + alpha * current for the alpha in
    0, 1/steps, ..., 1 with the best validation accuracy (a tie goes to the larger alpha, the fine-tuned
    end); returns (alpha, every alpha's validation accuracy). Integer buffers (BatchNorm's step counter)
    keep the fine-tuned value."""
    end = {k: v.detach().clone() for k, v in model.state_dict().items()}
    missing = end.keys() ^ start.keys()
    if missing:
        raise ValueError(f"WiSE-FT needs the same weights at both ends; these differ: {sorted(missing)[:5]}")
    def mix(a: float) -> dict[str, torch.Tensor]:
        return {k: torch.lerp(start[k].to(v.dtype), v, a) if v.is_floating_point() else v for k, v in end.items()}

    rows = []
    for alpha in np.linspace(0.0, 1.0, steps + 1):
        model.load_state_dict(mix(float(alpha)))
        rows.append({"alpha": round(float(alpha), 4), "val_accuracy": accuracy(model, val, pre)})
    best = max(rows, key=lambda r: (r["val_accuracy"], r["alpha"]))
    model.load_state_dict(mix(best["alpha"]))
    return best["alpha"], rows
