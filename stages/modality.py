"""What differs between images and texts, behind one interface: `adapter(pre)` gives the module that knows
a modality (stages/image.py, stages/text.py), and stages call it instead of branching on the modality.
A third modality is a module with these operations and one line in ADAPTERS.

Every adapter imports only numpy and stages/inputs.py at load time (torch, transformers and onnxruntime
inside the functions that need them): the model server imports the adapters and has no torch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from stages import image, text


class Adapter(Protocol):
    """The operations a modality provides. Each adapter module satisfies this as a module: its functions
    and constants, no classes to instantiate."""

    NAME: str  # model.json's preprocessing["modality"], serving.json's "modality"
    EXAMPLE_MODEL: str  # a pre-trained model of this modality, suggested when none is named
    REQUEST_FIELDS: tuple[str, ...]  # the JSON fields the model server accepts for it
    ACCEPTS_FILES: bool  # whether the server takes multipart file uploads of it
    AUGMENTS: bool  # whether training augments it (hyperrule's `auto`)
    PRETRAINING: str  # what its pre-training stage does: "supervised" (stages/pretrain.py), "masked_lm" (dapt)
    FLOOR: str  # the architecture of its cheapest baseline (stages/baseline.py FLOORS)

    # training, evaluation and every stage that feeds a model
    def model_input(self, x: np.ndarray, pre: dict) -> Any: ...
    def batch_order(self, x: np.ndarray) -> np.ndarray | None: ...  # for inference; None: as they come
    def truncated(self, x: np.ndarray, pre: dict) -> int | None: ...
    def configure(self, pre: dict, model_p: Any) -> dict: ...
    def save_files(self, model: Any, pre: dict, out: Path) -> dict: ...

    # export
    def input_names(self, pre: dict) -> tuple[str, ...]: ...
    def example_inputs(self, pre: dict) -> tuple[Any, ...]: ...
    def dynamic_axes(self, pre: dict) -> dict[str, dict[int, str]]: ...
    def quantize_int8(self, fp32: Path, out: Path, calibration: np.ndarray, pre: dict) -> str: ...
    def serving_input(self, pre: dict, stored: np.ndarray, max_pixels: int) -> dict: ...

    # serving (numpy, Pillow and `tokenizers` only)
    def serving_feed(self, contract_input: dict) -> Callable[[Any], dict[str, np.ndarray]]: ...
    def warm_up_examples(self, contract_input: dict) -> Any: ...
    def join(self, parts: list[Any]) -> Any: ...

    # registration and the model card
    def input_params(self, pre: dict) -> dict[str, Any]: ...
    def describe(self, pre: dict) -> str: ...


ADAPTERS: dict[str, Adapter] = {"image": image, "text": text}


def adapter(pre_or_name: dict | str) -> Adapter:
    """The adapter of a model's preprocessing block (model.json; no "modality" key means image, as in
    checkpoints written before texts existed) or of a modality's name."""
    name = pre_or_name if isinstance(pre_or_name, str) else pre_or_name.get("modality", "image")
    if name not in ADAPTERS:
        raise ValueError(f"modality {name!r}: headstart knows {', '.join(ADAPTERS)} (stages/modality.py ADAPTERS)")
    return ADAPTERS[name]
