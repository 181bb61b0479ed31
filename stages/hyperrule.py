"""Training settings chosen from the data, as BiT-HyperRule does (Kolesnikov et al. 2020, "Big Transfer"):
finetune.epochs, finetune.lr and finetune.augment may be `auto`, and are then set here from the number
of training examples and the model's modality. finetune and baseline resolve them the same way, so the
from-scratch baseline keeps fine-tuning's budget; the choice and its reason go into model.json.

BiT fixes one recipe and varies only what the dataset size decides: the schedule length (three tiers:
under 20k examples, under 500k, more), MixUp from the middle tier on, and the resolution from the image
size. The same shape here, with numbers for a CPU or one GPU and a few hundred to a few thousand labels:

  epochs    < 20k examples: 10 passes, and at least 150 optimizer steps. Fine-tuning a pre-trained net
            on few labels saturates within ~10 passes (the image demo's best epoch is 9 of 10, the text
            demo's validation accuracy is flat from epoch 5); a one-cycle schedule shorter than ~150
            steps is mostly warm-up, so tiny sets (100 examples: 4 steps a pass) get more passes.
            < 500k: 200k examples seen (10 passes at 20k, 2 at 100k): BiT's middle tier, more steps in
            all but fewer passes, since each pass already shows the net many examples per class.
            >= 500k: one pass.
  lr        by modality and batch size, not by dataset size (BiT keeps its lr fixed across sizes too,
            and make curves fine-tunes well at 1e-3 from 100 to 10,000 examples): AdamW peak 1e-3 at
            batch 32 for CNNs, 1e-4 at batch 16 for transformer encoders (MiniLM on the text demo: 0.8775
            test accuracy at 1e-4 and batch 16, 0.8675 at 2e-4 and batch 32), scaled by the square root
            of batch / reference (the square-root rule for Adam, Malladi et al. 2022).
  augment   texts: none. Images: flip + a small shift below 20k examples; random resized crop + flip
            from 20k on. A short schedule cannot afford strong augmentation: on the image demo (1,000
            images, 10 passes) crops cost fine-tuning a point and scratch training 3 (bench/augment.py,
            README). Crops from 20k on follow BiT, which adds regularisation (MixUp) only from its middle
            tier; not measured here.

Any of the three set to a value in params.yaml is used as it is."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from stages.modality import adapter

if TYPE_CHECKING:
    from stages.params import BaselineParams, FinetuneParams

SMALL, LARGE = 20_000, 500_000  # BiT's tier boundaries, in training examples
SMALL_PASSES, MIN_STEPS = 10, 150
MEDIUM_SEEN = 200_000  # examples seen in the middle tier
BASE_LR = {"image": (1e-3, 32), "text": (1e-4, 16)}  # AdamW peak lr at a reference batch size


def epochs(n: int, batch_size: int) -> tuple[int, str]:
    steps_per_pass = math.ceil(n / batch_size)
    if n < SMALL:
        passes = max(SMALL_PASSES, math.ceil(MIN_STEPS / steps_per_pass))
        why = (f"{n:,} examples < {SMALL:,}: {SMALL_PASSES} passes" if passes == SMALL_PASSES else
               f"{n:,} examples: {passes} passes for the {MIN_STEPS} steps a one-cycle schedule needs")
        return passes, why
    if n < LARGE:
        passes = max(1, math.ceil(MEDIUM_SEEN / n))
        return passes, f"{n:,} examples < {LARGE:,}: ~{MEDIUM_SEEN:,} examples seen"
    return 1, f"{n:,} examples >= {LARGE:,}: one pass"


def lr(modality: str, batch_size: int) -> tuple[float, str]:
    base, ref = BASE_LR[modality]
    value = float(f"{base * math.sqrt(batch_size / ref):.3g}")
    return value, f"{modality} models: {base:g} at batch {ref}" + (
        "" if batch_size == ref else f", x sqrt({batch_size}/{ref})")


def augment(n: int, modality: str) -> tuple[str, str]:
    if not adapter(modality).AUGMENTS:
        return "none", f"{modality}s are not augmented"
    if n < SMALL:
        return "flip_shift", f"{n:,} examples < {SMALL:,}: light augmentation for a short schedule"
    return "crop", f"{n:,} examples >= {SMALL:,}: random resized crop for a long schedule"


def resolve(p: FinetuneParams, n: int, modality: str) -> tuple[FinetuneParams, dict[str, str]]:
    """`p` with every `auto` replaced: the settings `train.fit` takes; and, by key, what was chosen and why."""
    chosen: dict[str, int | float | str] = {}
    why: dict[str, str] = {}
    if p.epochs == "auto":
        chosen["epochs"], why["epochs"] = epochs(n, p.batch_size)
    if p.lr == "auto":
        chosen["lr"], why["lr"] = lr(modality, p.batch_size)
    if p.augment == "auto":
        chosen["augment"], why["augment"] = augment(n, modality)
    elif isinstance(p.augment, bool):  # params files from before the augmentation modes
        chosen["augment"] = "flip_shift" if p.augment else "none"
    return dataclasses.replace(p, **chosen), {k: f"{chosen[k]} ({v})" for k, v in why.items()}


def scratch(ft: FinetuneParams, b: BaselineParams) -> FinetuneParams:
    """The settings the from-scratch baseline trains with: fine-tuning's budget (epochs, batch, schedule,
    early stopping), its own peak lr and seed, and its own augmentation unless baseline.augment is `same`.
    Random weights have nothing to protect and everything to learn, so a fair baseline is tuned on its own
    (bench/recipe.py, on a development split). finetune.lr, finetune.seed and the strategy's settings do not
    reach it: dvc.yaml's baseline stage does not list them."""
    return dataclasses.replace(ft, lr=b.scratch_lr, seed=b.seed,
                               **({} if b.augment == "same" else {"augment": b.augment}))


def describe(why: dict[str, str]) -> str:
    return "auto settings: " + "; ".join(f"{k} {v}" for k, v in why.items())
