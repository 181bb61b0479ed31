"""Labelled examples as every stage holds them (`Split`): drawn from a source (`draw`: the one train/val/test
draw, used by prepare, pretrain and curves), saved and loaded as prepared split files, and turned into
model inputs and batches as each model's JSON says."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from stages.sources import Source

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    x: np.ndarray | Rows  # images: uint8 (N, H, W) grayscale or (N, H, W, 3) RGB; texts: an object array of str
    y: np.ndarray  # int64, (N,)


class Rows:
    """Images kept on disk instead of in memory: the uint8 rows of one raw file, each `row_shape`, read with
    pread (the page cache holds them, not this process), `rows` of them in that order. What prepare decodes
    a folder of photos into and draws its splits from, so its memory stays the same for 5,000 photos or
    50,000. Indexing gives another Rows (no pixels read); np.asarray reads them, `chunks` a part at a time."""

    dtype = np.dtype(np.uint8)

    def __init__(self, path: Path, row_shape: tuple[int, ...], rows: np.ndarray):
        self.path, self.row_shape, self.rows = Path(path), tuple(row_shape), np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx) -> Rows | np.ndarray:
        if isinstance(idx, (int, np.integer)):  # one image, read
            return np.asarray(Rows(self.path, self.row_shape, self.rows[[idx]]))[0]
        return Rows(self.path, self.row_shape, self.rows[idx])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        nbytes = int(np.prod(self.row_shape))
        out = np.empty(self.shape, np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, r in enumerate(self.rows):
                out[i] = np.frombuffer(os.pread(fd, nbytes, int(r) * nbytes), np.uint8).reshape(self.row_shape)
        finally:
            os.close(fd)
        return out if dtype is None else out.astype(dtype)


def chunks(x: np.ndarray | Rows, size: int = 1024) -> Iterator[np.ndarray]:
    """Examples `size` at a time, as arrays: for Rows, never more of them in memory than that."""
    for start in range(0, len(x), size):
        yield np.asarray(x[start : start + size])


@dataclass(frozen=True)
class Drawn:
    train: Split
    val: Split
    test: Split
    train_rows: np.ndarray  # rows of the source's pool in `train` (prepare records their hash)
    rest: Split  # the pool's examples no split took


def draw(source: Source, *, per_class: int, val_per_class: int, test_per_class: int | None, seed: int,
         val_first: bool = False, settings: str = "prepare") -> Drawn:
    """The stratified train/val/test draw, disjoint: `per_class` training and `val_per_class` validation
    examples of each class of the source's pool. The test split: the source's own (all of it when
    `test_per_class` is None, else that many of each class), or, for a source without one, `test_per_class`
    more pool examples of each class (None: all the pool's rest; 0: none).

    Each class is shuffled with its own generator seeded by (seed, class), so the draw for one class does not
    change when another class gains or loses examples, and the splits are consecutive runs of that order:
    train, val, then test. `val_first`: validation first, so it stays the same whatever `per_class` is and a
    smaller `per_class` draws a subset of a larger one's training examples (curves). `settings`: the params
    section the sizes come from, for the error that says which to lower."""
    pool, own_test = source.pool, source.test
    sizes = {"per_class": per_class, "val_per_class": val_per_class}
    if val_first:
        sizes = {"val_per_class": val_per_class, "per_class": per_class}
    sizes["test_per_class"] = test_per_class if own_test is None else 0
    cuts = _per_class(pool.y, sizes, seed, source.classes, settings)
    train, val = cuts["per_class"], cuts["val_per_class"]
    if own_test is None:
        test = Split(pool.x[cuts["test_per_class"]], pool.y[cuts["test_per_class"]])
    elif test_per_class is None:
        test = own_test
    else:
        rows = _per_class(own_test.y, {"test_per_class": test_per_class}, seed, source.classes, settings)
        rows = rows["test_per_class"]
        test = Split(own_test.x[rows], own_test.y[rows])
    rest = np.setdiff1d(np.arange(len(pool.y)), np.concatenate(list(cuts.values())))
    return Drawn(train=Split(pool.x[train], pool.y[train]), val=Split(pool.x[val], pool.y[val]), test=test,
                 train_rows=train, rest=Split(pool.x[rest], pool.y[rest]))


def _per_class(labels: np.ndarray, sizes: dict[str, int | None], seed: int, classes: list[str],
               settings: str) -> dict[str, np.ndarray]:
    """Sorted row indices of `labels` for each of `sizes` (examples per class, in order along each class's
    (seed, class) permutation; a last size of None takes the rest of the class)."""
    taken: dict[str, list[np.ndarray]] = {name: [] for name in sizes}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        need = sum(n or 0 for n in sizes.values())
        if idx.size < need:
            parts = " + ".join(f"{settings}.{name} ({n})" for name, n in sizes.items() if n or name != "test_per_class")
            raise ValueError(f"class {classes[c]!r} has {idx.size} examples; {parts} need {need}. Add "
                             f"{need - idx.size} more, or lower those settings")
        idx = np.random.default_rng([seed, int(c)]).permutation(idx)
        start = 0
        for name, n in sizes.items():
            taken[name].append(idx[start:None if n is None else start + n])
            start += n or 0
    return {name: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64) for name, parts in taken.items()}


def save_split(folder: Path, name: str, split: Split) -> Path:
    """Images as safetensors, texts as JSON lines; returns the file written. Both formats' bytes depend only
    on the content (npz would embed a timestamp), so an unchanged split keeps its DVC hash and nothing
    downstream retrains."""
    if split.x.dtype == object:
        path = Path(folder) / f"{name}.jsonl"
        lines = (json.dumps({"text": str(t), "label": int(y)}, ensure_ascii=False) for t, y in zip(split.x, split.y))
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path
    path = Path(folder) / f"{name}.safetensors"
    write_safetensors(path, split.x, split.y.astype(np.int64))
    return path


def write_safetensors(path: Path, x: np.ndarray | Rows, y: np.ndarray) -> None:
    """{"x": uint8 images, "y": int64 labels} in the safetensors format, byte for byte what
    safetensors.numpy.save_file writes (y first: it orders by alignment), with x written a chunk at a time so
    Rows on disk never need to be in memory at once."""
    import struct

    if not isinstance(x, Rows) and x.dtype != np.uint8:
        raise ValueError(f"images are stored as uint8, got {x.dtype}")
    ny = y.nbytes
    nx = int(np.prod(x.shape))  # bytes, one per uint8
    header = json.dumps({"y": {"dtype": "I64", "shape": list(y.shape), "data_offsets": [0, ny]},
                         "x": {"dtype": "U8", "shape": list(x.shape), "data_offsets": [ny, ny + nx]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.write(np.ascontiguousarray(y, dtype="<i8").tobytes())
        for part in chunks(x):
            f.write(np.ascontiguousarray(part, dtype=np.uint8).tobytes())


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
    from stages.modality import adapter

    return adapter(pre).model_input(x, pre)


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
