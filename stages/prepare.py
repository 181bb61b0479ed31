"""Draw the labelled subset: `per_class` training images per class, a stratified validation split from the
rest of the training set, and the full test set. Reads paths.source, writes paths.prepared.
Run: dvc repro prepare   (or: python -m stages.prepare)"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import numpy as np

from stages.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    Split,
    read_idx,
    save_split,
    stratified_indices,
)
from stages.files import atomic_path, sha256_file, write_json
from stages.params import PrepareParams, cli

INSTALL_HINT = (
    "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; `make run` does this "
    "when it runs as root), point paths.source in params.yaml at a folder holding the four idx .gz files, "
    "or set prepare.download: true to fetch them with torchvision (needs network)."
)


def find_source(source: Path, download: bool) -> Path:
    missing = [f for f in FASHION_MNIST_FILES.values() if not (source / f).exists()]
    if not missing:
        return source
    if not download:
        raise FileNotFoundError(f"Fashion-MNIST not found in {source} (missing {', '.join(missing)}). {INSTALL_HINT}")
    from torchvision.datasets import FashionMNIST  # only on explicit request: this goes to the network

    with tempfile.TemporaryDirectory() as tmp:
        FashionMNIST(tmp, download=True)
        source.mkdir(parents=True, exist_ok=True)
        for f in FASHION_MNIST_FILES.values():
            shutil.copy(Path(tmp) / "FashionMNIST" / "raw" / f, source / f)
    return source


def run(source: Path, out: Path, p: PrepareParams) -> dict:
    source = find_source(Path(source), p.download)
    files = {k: source / v for k, v in FASHION_MNIST_FILES.items()}
    train_x, train_y = read_idx(files["train_images"]), read_idx(files["train_labels"]).astype(np.int64)
    test_x, test_y = read_idx(files["test_images"]), read_idx(files["test_labels"]).astype(np.int64)
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if len(x) != len(y):
            raise ValueError(f"{source}: {name} has {len(x)} images but {len(y)} labels")
        if x.ndim != 3:
            raise ValueError(f"{source}: {name} images have shape {x.shape}; expected (count, height, width)")
        bad = np.flatnonzero((y < 0) | (y >= len(FASHION_MNIST_CLASSES)))
        if bad.size:
            raise ValueError(f"{source}: {name} label {int(y[bad[0]])} at index {int(bad[0])} is not a class "
                             f"(0-{len(FASHION_MNIST_CLASSES) - 1}); {bad.size} such labels in all")

    tr, va = stratified_indices(train_y, p.per_class, p.val_per_class, p.seed)
    te = np.arange(len(test_y)) if p.test_per_class is None else stratified_indices(test_y, p.test_per_class, 0, p.seed)[0]
    splits = {
        "train": Split(train_x[tr], train_y[tr]),
        "val": Split(train_x[va], train_y[va]),
        "test": Split(test_x[te], test_y[te]),
    }
    classes = FASHION_MNIST_CLASSES
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for name, split in splits.items():
            save_split(tmp / f"{name}.safetensors", split)
        manifest = {
            "dataset": "fashion-mnist",
            "classes": classes,
            "seed": p.seed,
            "per_class": p.per_class,
            "val_per_class": p.val_per_class,
            "counts": {
                name: {classes[c]: int((s.y == c).sum()) for c in range(len(classes))} for name, s in splits.items()
            },
            "source_sha256": {f.name: sha256_file(f) for f in files.values()},
            # Identifies the test set, so models are only compared on the very same examples.
            "test_sha256": sha256_file(tmp / "test.safetensors"),
            "train_indices_sha256": _hash_indices(tr),
        }
        write_json(tmp / "manifest.json", manifest)
    print(
        f"prepared {len(tr)} train / {len(va)} val / {len(te)} test images "
        f"({p.per_class}+{p.val_per_class} per class, seed {p.seed}) -> {out}"
    )
    return manifest


def _hash_indices(idx: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(idx, dtype=np.int64).tobytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    params = cli(__doc__, argv)
    run(params.paths.source, params.paths.prepared, params.prepare)


if __name__ == "__main__":
    main()
