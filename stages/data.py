"""Data on disk and on its way into a model: the idx reader, the stratified split, the prepared arrays and
the preprocessing every model's JSON describes. Shared by every stage that touches examples."""

from __future__ import annotations

import gzip
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
    labels: np.ndarray, per_class: int, val_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw `per_class` training and `val_per_class` validation indices from every class, disjoint.

    Each class is shuffled with its own generator derived from (seed, class), so the draw for one class
    does not change when another class gains or loses examples.
    """
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        need = per_class + val_per_class
        if idx.size < need:
            raise ValueError(
                f"class {c} has {idx.size} examples; prepare.per_class + prepare.val_per_class needs {need}"
            )
        rng = np.random.default_rng([seed, int(c)])
        idx = rng.permutation(idx)
        train.append(idx[:per_class])
        val.append(idx[per_class:need])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # uint8, (N, H, W) grayscale
    y: np.ndarray  # int64, (N,)


def save_split(path: Path, split: Split) -> None:
    # safetensors rather than npz: the bytes depend only on the arrays (npz embeds a timestamp), so an
    # unchanged split keeps its DVC hash and nothing downstream retrains.
    from safetensors.numpy import save_file

    save_file({"x": np.ascontiguousarray(split.x), "y": split.y.astype(np.int64)}, str(path))


def load_split(prepared: Path, name: str) -> Split:
    from safetensors.numpy import load_file

    path = Path(prepared) / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    arrays = load_file(str(path))
    return Split(x=arrays["x"], y=arrays["y"])


def to_model_input(x_uint8: np.ndarray, pre: dict):
    """uint8 images (N, H, W) -> float tensor (N, C, S, S) exactly as the model's JSON says.

    `pre` is the "preprocessing" block of a model's JSON: image_size, channels, mean, std. The same
    function feeds training, evaluation and ONNX parity, so they cannot drift apart.
    """
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(x_uint8)).float().div_(255.0).unsqueeze(1)
    size = pre["image_size"]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if pre["channels"] == 3:  # grayscale repeated: the pre-trained stem expects RGB
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(pre["mean"], dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"], dtype=x.dtype).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
