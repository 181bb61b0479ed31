"""Read the dataset prepare.dataset names from paths.source (stages/datasets.py), and draw the labelled
subset: `per_class` training examples per class, a stratified validation split, and the test set (the
source's own, whole or `test_per_class` of each class, or else a stratified draw of its own). Examples that
cannot be used are listed with their reason in paths.quarantine; more than prepare.max_quarantined of them
fails the stage. Writes paths.prepared: train/val/test (safetensors for images, JSON lines for texts) and
manifest.json.
Run: dvc repro prepare   (or: python -m stages.prepare)"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from stages import datasets
from stages.data import Split, save_split, stratified_indices
from stages.files import atomic_path, sha256_file, write_json
from stages.params import PrepareParams, cli


def run(source: Path, out: Path, p: PrepareParams, quarantine: Path | None = None) -> dict:
    src = datasets.read(p.dataset, Path(source), p)
    classes = src.classes
    _check_quarantine(src, p, quarantine)
    if len(src.pool.y) == 0:
        raise ValueError(f"{source}: the dataset is empty (no usable examples)")
    if src.test is None:  # no test split of its own: a stratified one, disjoint from train and val
        tr, va, te = stratified_indices(src.pool.y, p.per_class, p.val_per_class, p.seed, p.test_per_class, classes)
        test = Split(src.pool.x[te], src.pool.y[te])
    else:
        tr, va = stratified_indices(src.pool.y, p.per_class, p.val_per_class, p.seed, 0, classes)
        te = np.arange(len(src.test.y)) if p.test_per_class is None else stratified_indices(
            src.test.y, p.test_per_class, 0, p.seed, 0, classes)[0]
        test = Split(src.test.x[te], src.test.y[te])
    splits = {"train": Split(src.pool.x[tr], src.pool.y[tr]), "val": Split(src.pool.x[va], src.pool.y[va]),
              "test": test}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        written = {name: save_split(tmp, name, split) for name, split in splits.items()}
        manifest = {
            "dataset": p.dataset,
            "modality": src.modality,
            "classes": classes,
            "seed": p.seed,
            "per_class": p.per_class,
            "val_per_class": p.val_per_class,
            "counts": {
                name: {classes[c]: int((s.y == c).sum()) for c in range(len(classes))} for name, s in splits.items()
            },
            "source_sha256": src.files,
            "quarantined": len(src.quarantined),
            # Identifies the test set, so models are only compared on the very same examples.
            "test_sha256": sha256_file(written["test"]),
            "train_indices_sha256": _hash_indices(tr),
        }
        write_json(tmp / "manifest.json", manifest)
    kind = "images" if src.modality == "image" else "texts"
    print(
        f"prepared {len(tr)} train / {len(va)} val / {len(test.y)} test {kind} of {len(classes)} classes "
        f"({p.per_class}+{p.val_per_class} per class, seed {p.seed}) -> {out}"
    )
    return manifest


def _check_quarantine(src: datasets.Source, p: PrepareParams, quarantine: Path | None) -> None:
    """Record every quarantined example with its reason; fail when there are too many to trust the rest."""
    share = len(src.quarantined) / max(src.seen, 1)
    if quarantine is not None:
        write_json(quarantine, {"dataset": p.dataset, "examples_seen": src.seen, "quarantined": len(src.quarantined),
                                "share": round(share, 6), "max_share": p.max_quarantined, "items": src.quarantined})
    if not src.quarantined:
        return
    listed = "\n".join(f"  {q['file']}: {q['reason']}" for q in src.quarantined[:10])
    more = f"\n  ... and {len(src.quarantined) - 10} more" if len(src.quarantined) > 10 else ""
    where = f" (all listed in {quarantine})" if quarantine else ""
    if share > p.max_quarantined:
        raise ValueError(f"{len(src.quarantined)} of {src.seen} examples ({share:.1%}) cannot be used, more than "
                         f"prepare.max_quarantined ({p.max_quarantined:.1%}){where}:\n{listed}{more}\nFix or remove "
                         "them, or raise prepare.max_quarantined to train on the rest")
    print(f"quarantined {len(src.quarantined)} of {src.seen} examples{where}:\n{listed}{more}")


def _hash_indices(idx: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(idx, dtype=np.int64).tobytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    params = cli(__doc__, argv)
    run(params.paths.source, params.paths.prepared, params.prepare, params.paths.quarantine)


if __name__ == "__main__":
    main()
