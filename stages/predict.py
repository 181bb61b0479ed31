"""Inference: where networks run (`device`), and logits or features for a set of images or texts, batch by
batch (`predict`), as every stage after training computes them, and the file of test logits they pass on.
Also the two shapes a preprocessed batch takes (an image tensor, or a text's (input_ids, attention_mask))
and the helpers the training loop shares."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stages.files import atomic_path
from stages.modality import adapter
from stages.splits import Split, batches, to_model_input


def device() -> torch.device:
    """Where every stage trains and runs its networks (fit and predict: select's features, evaluate, CKA,
    export's PyTorch side): $HEADSTART_DEVICE when set (cpu, cuda, cuda:1, mps, ...), else the GPU when
    there is one, else the CPU. Under torchrun a bare `cuda` is this process's GPU (LOCAL_RANK)."""
    name = os.environ.get("HEADSTART_DEVICE", "auto").strip() or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"HEADSTART_DEVICE={name!r} is not a device: use auto, cpu, cuda, cuda:<n> or mps") from None


@torch.no_grad()
def predict(
    model: nn.Module,
    x: np.ndarray,
    pre: dict,
    batch_size: int = 64,  # on this CPU 1.5x faster than 256: activations stay in the allocator's cache
    fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    desc: str | None = None,
) -> np.ndarray:
    """Logits (or `fn(model, *inputs)`, e.g. features) for images or texts, batch by batch, in fp32, on
    device(); the model is back where it was, in its memory format, afterwards. Logits come from
    `folded(model)`: the same function, faster."""
    dev, home = device(), next(model.parameters()).device
    was_training = model.training
    conv = next((w for w in model.parameters() if w.ndim == 4), None)
    was_format = torch.channels_last if conv is not None and not conv.is_contiguous() else torch.contiguous_format
    model.eval().to(dev, memory_format=torch.channels_last)  # as in fit: 1.8x faster inference on this CPU
    net = model if fn else folded(model).to(memory_format=torch.channels_last)  # fn's hooks are on model's modules
    order = batch_order(x, pre)
    out = []
    it = batches(len(x), batch_size)
    if desc:
        it = tqdm(it, total=math.ceil(len(x) / batch_size), desc=desc, leave=False, dynamic_ncols=True)
    # Scores and parity references are fp32: TF32, cuDNN's default for convolutions on recent GPUs, moved
    # logits by up to 0.3 on an H200 and failed export's parity with ONNX Runtime's fp32 (99.43% top-1)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            for sl in it:
                args = as_args(map_inputs(to_model_input(x[order[sl]], pre), lambda t: _on(t, dev)))
                out.append((fn(model, *args) if fn else net(*args)).float().cpu().numpy())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        model.train(was_training).to(home, memory_format=was_format)  # contiguous is what safetensors can save
    return in_place(np.concatenate(out), order)


def batch_order(x: np.ndarray, pre: dict) -> np.ndarray:
    """The order inference runs examples in, batch after batch: the modality's (texts by length: a batch
    pads to its longest, and 2x less padding is 2x less work), else as they come. in_place undoes it."""
    order = adapter(pre).batch_order(x)
    return np.arange(len(x)) if order is None else order


def in_place(rows: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Rows computed in `order` (batch_order), put back in the examples' own order."""
    out = np.empty_like(rows)
    out[order] = rows
    return out


def folded(model: nn.Module) -> nn.Module:
    """An eval-mode network with a BatchNorm layer after its convolutions: a copy with each BatchNorm folded
    into the convolution before it (torch.fx), which computes the same logits within fp32 rounding (1.6e-5
    on MobileNetV2) in half the time on this CPU, where BatchNorm took 15 of evaluate's 50 s. Any other
    network, or one torch.fx cannot trace, is returned as it is; `model` itself is never changed."""
    if model.training or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model)
    except Exception:  # noqa: BLE001 - untraceable control flow: the network runs unfolded, only slower
        return model


def write_logits(path: Path, logits: dict[str, np.ndarray], test_sha256: str) -> None:
    """Every model's fp32 PyTorch logits on the test split, named by the split's sha256: export proves its
    ONNX file against evaluate's instead of running the network over the test set a second time, and
    evaluate reads each extra training seed's (stages/replicate.py) instead of keeping its weights."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, test_sha256=np.array(test_sha256), **logits)


def read_logits(path: Path, name: str, test_sha256: str) -> np.ndarray | None:
    """Model `name`'s logits from write_logits, or None when they are missing or were computed on another
    test split (the caller computes them then)."""
    try:
        with np.load(path) as stored:
            if str(stored["test_sha256"]) != test_sha256 or name not in stored:
                return None
            return stored[name]
    except (OSError, KeyError, ValueError):
        return None


def _on(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    t = t.to(dev)
    return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t


Inputs = torch.Tensor | tuple[torch.Tensor, ...]  # an image batch, or (input_ids, attention_mask)


def as_args(x: Inputs) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def map_inputs(x: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    return tuple(fn(t) for t in x) if isinstance(x, tuple) else fn(x)


def take(x: Inputs, idx: torch.Tensor) -> Inputs:
    """Rows `idx` of a preprocessed set. Token batches lose the padding columns none of their rows needs:
    the set is padded to its longest text, most batches are much shorter."""
    if not isinstance(x, tuple):
        return x[idx]
    ids, mask = x[0][idx], x[1][idx]
    width = max(int(mask.sum(1).max()), 1)
    return ids[:, :width], mask[:, :width]


def accuracy(model: nn.Module, split: Split, pre: dict) -> float:
    return float((predict(model, split.x, pre).argmax(1) == split.y).mean())
