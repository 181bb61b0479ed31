"""Data on disk and on its way into a model: the idx reader, the stratified split, the prepared splits
(images or texts) and the preprocessing every model's JSON describes. Shared by every stage that touches
examples."""

from __future__ import annotations

import gzip
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
SPLITS = ("train", "val", "test")


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (gzipped or not), the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an idx file ({len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but the file holds {body.size} values (truncated?)")
    return body.reshape(shape)


def stratified_indices(
    labels: np.ndarray, per_class: int, val_per_class: int, seed: int, test_per_class: int | None = 0,
    classes: list[str] | None = None,
) -> tuple[np.ndarray, ...]:
    """Draw `per_class` training and `val_per_class` validation indices from every class, disjoint; with
    `test_per_class` (a number, or None for every remaining example) also a disjoint test draw.

    Each class is shuffled with its own generator derived from (seed, class), so the draw for one class
    does not change when another class gains or loses examples.
    """
    train, val, test = [], [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        need = per_class + val_per_class + (test_per_class or 0)
        if idx.size < need:
            name = f"{classes[c]!r}" if classes else str(c)
            parts = f"prepare.per_class ({per_class}) + prepare.val_per_class ({val_per_class})"
            if test_per_class:
                parts += f" + prepare.test_per_class ({test_per_class})"
            raise ValueError(f"class {name} has {idx.size} examples; {parts} need {need}. Add {need - idx.size} "
                             "more, or lower those settings")
        rng = np.random.default_rng([seed, int(c)])
        idx = rng.permutation(idx)
        train.append(idx[:per_class])
        val.append(idx[per_class : per_class + val_per_class])
        test.append(idx[per_class + val_per_class : None if test_per_class is None else need])
    out = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
    return out if test_per_class == 0 else (*out, np.sort(np.concatenate(test)))


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # images: uint8 (N, H, W) grayscale or (N, H, W, 3) RGB; texts: an object array of str
    y: np.ndarray  # int64, (N,)


def save_split(folder: Path, name: str, split: Split) -> Path:
    """Images as safetensors, texts as JSON lines; returns the file written. Both formats' bytes depend only
    on the content (npz would embed a timestamp), so an unchanged split keeps its DVC hash and nothing
    downstream retrains."""
    if split.x.dtype == object:
        path = Path(folder) / f"{name}.jsonl"
        lines = (json.dumps({"text": str(t), "label": int(y)}, ensure_ascii=False) for t, y in zip(split.x, split.y))
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path
    from safetensors.numpy import save_file

    path = Path(folder) / f"{name}.safetensors"
    save_file({"x": np.ascontiguousarray(split.x), "y": split.y.astype(np.int64)}, str(path))
    return path


def load_split(prepared: Path, name: str) -> Split:
    folder = Path(prepared)
    if (folder / f"{name}.jsonl").exists():
        rows = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        return Split(x=np.array([r["text"] for r in rows], dtype=object),
                     y=np.array([r["label"] for r in rows], dtype=np.int64))
    from safetensors.numpy import load_file

    path = folder / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    arrays = load_file(str(path))
    return Split(x=arrays["x"], y=arrays["y"])


def split_file(prepared: Path, name: str) -> Path:
    folder = Path(prepared)
    return folder / f"{name}.jsonl" if (folder / f"{name}.jsonl").exists() else folder / f"{name}.safetensors"


def to_model_input(x: np.ndarray, pre: dict):
    """Examples -> what the model's forward takes, exactly as the model's JSON says: for images a float
    tensor (N, C, S, S); for texts the tuple (input_ids, attention_mask). The same function feeds
    training, evaluation and ONNX parity, and the model server calls the same numpy code beneath it
    (stages.inputs), so they cannot drift apart."""
    if pre.get("modality") == "text":
        from stages.text import tokenize

        return tokenize(x, pre)
    import torch

    from stages.inputs import image_array

    return torch.from_numpy(image_array(x, pre))


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
