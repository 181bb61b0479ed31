"""Read the dataset prepare.dataset names from paths.source (stages/sources.py), and draw the labelled
subset: `per_class` training examples per class, a stratified validation split, and the test set (the
source's own, whole or `test_per_class` of each class, or else a stratified draw of its own). Examples that
cannot be used are listed with their reason in paths.quarantine; more than prepare.max_quarantined of them
fails the stage. Writes paths.prepared: train/val/test (safetensors for images, JSON lines for texts) and
manifest.json.
An image folder is decoded by worker processes into a file beside the output (splits.Rows), and the splits
are drawn from it and written a chunk at a time: prepare's memory does not grow with the number of images.
Run: dvc repro prepare   (or: python -m stages.prepare)"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from stages import sources
from stages.files import atomic_path, sha256_file, write_json
from stages.params import PrepareParams, cli
from stages.splits import Rows, Split, chunks, draw, save_split


def run(source: Path, out: Path, p: PrepareParams, quarantine: Path | None = None) -> dict:
    with atomic_path(out) as tmp:
        tmp.mkdir()
        # An image folder's decoded pixels wait on disk beside the output, deleted with its temporary folder
        # whatever happens: prepare's memory does not grow with the number of images
        scratch = tmp.parent / "decoded"
        scratch.mkdir()
        src = sources.keep_classes(sources.read(p.dataset, Path(source), p, scratch), p.classes)
        classes = src.classes
        record = _check_quarantine(src, p, quarantine)
        if len(src.pool.y) == 0:
            raise ValueError(f"{source}: the dataset is empty (no usable examples)")
        drawn = draw(src, per_class=p.per_class, val_per_class=p.val_per_class, test_per_class=p.test_per_class,
                     seed=p.seed)
        splits = {"train": drawn.train, "val": drawn.val, "test": drawn.test}
        splits, leaks = remove_leakage(splits, p)
        if leaks:
            if quarantine is not None:  # beside the unusable examples in the same report
                write_json(quarantine, {**record, "leakage_removed": leaks})
            print(f"removed {len(leaks)} examples from train/val that duplicate a later split"
                  + (f" (listed in {quarantine})" if quarantine else ""))
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
            "leakage_removed": len(leaks),
            # Identifies the test set, so models are only compared on the very same examples.
            "test_sha256": sha256_file(written["test"]),
            "train_indices_sha256": _hash_indices(drawn.train_rows),
        }
        write_json(tmp / "manifest.json", manifest)
    print(
        f"prepared {len(drawn.train.y)} train / {len(drawn.val.y)} val / {len(drawn.test.y)} test {src.modality}s of "
        f"{len(classes)} classes "
        f"({p.per_class}+{p.val_per_class} per class, seed {p.seed}) -> {out}"
    )
    return manifest


def remove_leakage(splits: dict[str, Split], p: PrepareParams) -> tuple[dict[str, Split], list[dict]]:
    """Drop from train the examples that also appear in val or test, and from val those in test, exactly
    or nearly (see prepare.leakage in params.yaml); with prepare.leakage: fail, raise instead."""
    keys = {name: duplicate_keys(s.x, p.near_duplicate_bits) for name, s in splits.items()}
    leaks, keep = [], {}
    for name, later in (("train", ("val", "test")), ("val", ("test",))):
        drop = np.zeros(len(splits[name].y), bool)
        for other in later:
            for i, j, how in _matches(keys[name], keys[other], p.near_duplicate_bits):
                if not drop[i]:
                    drop[i] = True
                    leaks.append({"file": f"{name} example {i}", "reason": f"{how} duplicate of {other} example {j}"})
        keep[name] = ~drop
    if leaks and p.leakage == "fail":
        raise ValueError(f"{len(leaks)} examples appear in two splits (prepare.leakage: fail):\n{_listing(leaks)}\nRemove the "
                         "copies from your data, or set prepare.leakage: remove to drop them from train/val")
    out = dict(splits)
    for name, k in keep.items():
        out[name] = Split(splits[name].x[k], splits[name].y[k])
    return out, leaks


def duplicate_keys(x: np.ndarray | Rows, near_bits: int) -> tuple[list[str], np.ndarray | list[str]]:
    """(exact keys, near keys) per example: content sha256; for images a 256-bit difference hash (16x17
    area-averaged grey levels, one bit per left/right comparison), for texts the normalised text."""
    if x.dtype == object:
        exact = [hashlib.sha256(str(t).encode()).hexdigest() for t in x]
        near = [" ".join(re.sub(r"[^\w\s]", " ", str(t).casefold()).split()) for t in x]
        return exact, near
    import torch

    exact, near = [], [np.zeros((0, 256), bool)]
    # a block at a time: float32 copies of every image would be 4x the data (and Rows are on disk)
    for part in chunks(x, 1024):
        exact += [hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in part]
        t = torch.from_numpy(np.asarray(part, dtype=np.float32))
        t = t.mean(-1) if t.ndim == 4 else t
        small = torch.nn.functional.interpolate(t[:, None], size=(16, 17), mode="area")[:, 0]
        near.append((small[:, :, 1:] > small[:, :, :-1]).reshape(len(t), -1).numpy())
    return exact, np.concatenate(near)


def _matches(a, b, near_bits: int):
    """(index in a, index in b, "exact"|"near") for every example of `a` that has a copy in `b`."""
    exact_b = {k: j for j, k in enumerate(b[0])}
    for i, k in enumerate(a[0]):
        if k in exact_b:
            yield i, exact_b[k], "exact"
    if isinstance(a[1], list):  # texts: equal normalised strings
        near_b = {k: j for j, k in enumerate(b[1])}
        for i, k in enumerate(a[1]):
            if k in near_b and a[0][i] not in exact_b:
                yield i, near_b[k], "near"
        return
    bb = b[1].astype(np.float32)
    for start in range(0, len(a[1]), 1024):  # Hamming distances as two matrix products, a block at a time
        ab = a[1][start : start + 1024].astype(np.float32)
        d = ab @ (1 - bb).T + (1 - ab) @ bb.T
        for i, j in zip(*np.nonzero(d <= near_bits + 0.5)):
            if a[0][start + i] not in exact_b:
                yield start + int(i), int(j), "near"


def _listing(items: list[dict[str, str]]) -> str:
    """The first ten {"file", "reason"} items, one per line, for an error or log message."""
    listed = "\n".join(f"  {q['file']}: {q['reason']}" for q in items[:10])
    return listed + (f"\n  ... and {len(items) - 10} more" if len(items) > 10 else "")


def _check_quarantine(src: sources.Source, p: PrepareParams, quarantine: Path | None) -> dict:
    """Record every quarantined example with its reason; fail when there are too many to trust the rest.
    Returns the report written to `quarantine`."""
    share = len(src.quarantined) / max(src.seen, 1)
    record = {"dataset": p.dataset, "examples_seen": src.seen, "quarantined": len(src.quarantined),
              "share": round(share, 6), "max_share": p.max_quarantined, "items": src.quarantined}
    if quarantine is not None:
        write_json(quarantine, record)
    if not src.quarantined:
        return record
    where = f" (all listed in {quarantine})" if quarantine else ""
    if share > p.max_quarantined:
        raise ValueError(f"{len(src.quarantined)} of {src.seen} examples ({share:.1%}) cannot be used, more than "
                         f"prepare.max_quarantined ({p.max_quarantined:.1%}){where}:\n{_listing(src.quarantined)}\n"
                         "Fix or remove them, or raise prepare.max_quarantined to train on the rest")
    print(f"quarantined {len(src.quarantined)} of {src.seen} examples{where}:\n{_listing(src.quarantined)}")
    return record


def _hash_indices(idx: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(idx, dtype=np.int64).tobytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    params = cli(__doc__, argv)
    run(params.paths.source, params.paths.prepared, params.prepare, params.paths.quarantine)


if __name__ == "__main__":
    main()
