"""Readers for the datasets `prepare.dataset` names, each turning `paths.source` into labelled examples:

  fashion-mnist  the four idx .gz files (Debian: dataset-fashion-mnist); has its own test set
  wordnet        WordNet 3.0's data.noun (Debian: wordnet-base): a gloss -> its topic (lexicographer file)
  image-folder   your images, one sub-folder per class (ImageFolder layout)
  text-table     your texts: a CSV, JSONL or Parquet file with prepare.text_column and prepare.label_column

For image-folder and text-table, a fixed test split of your own goes beside the training data:
`source/train/<class>/...` + `source/test/<class>/...`, or `source/train.csv` + `source/test.csv` (any of the
three formats); otherwise prepare draws a stratified test split.

An example that cannot be used (an unreadable image, an empty text, a missing label) is quarantined with
its reason rather than dropped silently; prepare writes the list and fails when more than
prepare.max_quarantined of the examples are in it."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import multiprocessing
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages.files import sha256_file
from stages.inputs import decode_image
from stages.splits import Rows, Split

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")
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
# WordNet lexicographer files (man 5 lexnames) of the text demo: ten topics with enough glosses each.
WORDNET_TOPICS = {5: "animal", 6: "artifact", 8: "body", 10: "communication", 12: "feeling",
                  13: "food", 15: "location", 18: "person", 20: "plant", 27: "substance"}  # fmt: skip


@dataclass
class Source:
    modality: str  # "image" or "text"
    classes: list[str]
    pool: Split  # examples to draw train/val (and test, when `test` is None) from
    test: Split | None  # the source's own test split
    files: dict[str, str]  # source file -> sha256 (directories: left to DVC's hash of the folder)
    quarantined: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"}
    seen: int = 0  # examples looked at, quarantined ones included


def read(dataset: str, source: Path, p, scratch: Path | None = None) -> Source:
    """Read `source` as `dataset`; `p` is PrepareParams. `scratch`: a folder where an image folder's decoded
    pixels stay, on disk (splits.Rows), instead of in memory."""
    if dataset == "image-folder":
        return image_folder(Path(source), p, scratch)
    readers = {"fashion-mnist": fashion_mnist, "wordnet": wordnet, "text-table": text_table}
    return readers[dataset](Path(source), p)


def keep_classes(src: Source, keep: list[str] | None) -> Source:
    """`src` with only the classes in `keep` (in that order, labels renumbered 0..k-1); None keeps all.
    This is how one source serves two tasks: e.g. Fashion-MNIST's first five classes to pre-train on
    (pretrain.classes) and the other five as the target (prepare.classes)."""
    if keep is None:
        return src
    unknown = [c for c in keep if c not in src.classes]
    if unknown or len(set(keep)) != len(keep) or len(keep) < 2:
        raise ValueError(f"classes {keep}: need at least two distinct class names of the source"
                         + (f"; not among them: {unknown} (the source has {src.classes})" if unknown else ""))
    old = np.array([src.classes.index(c) for c in keep])
    relabel = np.full(len(src.classes), -1)
    relabel[old] = np.arange(len(keep))

    def subset(split: Split | None) -> Split | None:
        if split is None:
            return None
        rows = np.flatnonzero(np.isin(split.y, old))
        return Split(split.x[rows], relabel[split.y[rows]].astype(np.int64))

    return dataclasses.replace(src, classes=list(keep), pool=subset(src.pool), test=subset(src.test))


# ---------------------------------------------------------------------------------------- Fashion-MNIST

INSTALL_HINT = (
    "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; `make run` does this "
    "when it runs as root), point paths.source in params.yaml at a folder holding the four idx .gz files, "
    "or set prepare.download: true to fetch them with torchvision (needs network)."
)


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


def find_fashion_mnist(source: Path, download: bool) -> Path:
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


def fashion_mnist(source: Path, p) -> Source:
    source = find_fashion_mnist(source, p.download)
    files = {k: source / v for k, v in FASHION_MNIST_FILES.items()}
    train_x, train_y = read_idx(files["train_images"]), read_idx(files["train_labels"]).astype(np.int64)
    test_x, test_y = read_idx(files["test_images"]), read_idx(files["test_labels"]).astype(np.int64)
    k = len(FASHION_MNIST_CLASSES)
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if len(x) != len(y):
            raise ValueError(f"{source}: {name} has {len(x)} images but {len(y)} labels")
        if x.ndim != 3:
            raise ValueError(f"{source}: {name} images have shape {x.shape}; expected (count, height, width)")
        bad = np.flatnonzero((y < 0) | (y >= k))
        if bad.size:
            raise ValueError(f"{source}: {name} label {int(y[bad[0]])} at index {int(bad[0])} is not a class "
                             f"(0-{k - 1}); {bad.size} such labels in all")
    return Source("image", list(FASHION_MNIST_CLASSES), Split(train_x, train_y), Split(test_x, test_y),
                  {f.name: sha256_file(f) for f in files.values()}, seen=len(train_y) + len(test_y))


# ---------------------------------------------------------------------------------------------- WordNet


def wordnet(source: Path, p) -> Source:
    """data.noun lines: `offset lex_filenum ss_type ... | gloss`; header lines start with two spaces."""
    if not source.is_file():
        raise FileNotFoundError(f"WordNet noun data not found at {source}. Install it with `sudo apt-get install "
                                "wordnet-base` (make run TASK=text does this when it runs as root), or point "
                                "paths.source at a WordNet 3.0 data.noun file.")
    classes = sorted(WORDNET_TOPICS.values())
    texts, labels = [], []
    for number, line in enumerate(_utf8_lines(source, p.encoding), 1):
        if line.startswith("  ") or not line.strip():
            continue
        fields, sep, gloss = line.partition(" | ")
        parts = fields.split(" ")
        if not sep or len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(f"{source}, line {number}: not a WordNet data line (expected 'offset lex_filenum "
                             f"... | gloss'): {line[:80]!r}")
        topic = WORDNET_TOPICS.get(int(parts[1]))
        if topic is not None:
            texts.append(gloss.strip())
            labels.append(classes.index(topic))
    if not texts:
        raise ValueError(f"{source}: no glosses of the topics {', '.join(classes)}: is it WordNet's data.noun?")
    return Source("text", classes, Split(np.array(texts, dtype=object), np.array(labels, dtype=np.int64)), None,
                  {source.name: sha256_file(source)}, seen=len(texts))


# ------------------------------------------------------------------------------------------ your images


def _fixed_test(source: Path, kind: str) -> tuple[Path, Path | None]:
    """(training data, test data or None) for a source that may hold its own train/test split."""
    if kind == "dir":
        if (source / "train").is_dir() and (source / "test").is_dir():
            return source / "train", source / "test"
        return source, None
    if source.is_dir():
        found = {stem: next((source / f"{stem}{s}" for s in TABLE_SUFFIXES if (source / f"{stem}{s}").exists()), None)
                 for stem in ("train", "test")}
        if found["train"] is None:
            raise FileNotFoundError(f"{source} is a folder but holds no train.csv / train.jsonl / train.parquet; "
                                    "point paths.source at your data file, or add train.<ext> (and test.<ext>)")
        return found["train"], found["test"]
    return source, None


def image_folder(source: Path, p, scratch: Path | None = None) -> Source:
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a folder: image-folder data is one sub-folder of images per class")
    train_dir, test_dir = _fixed_test(source, "dir")
    classes = class_folders(train_dir)
    quarantined: list[dict[str, str]] = []
    pool = _read_images(train_dir, classes, p, quarantined, scratch, "pool")
    test = None
    if test_dir is not None:
        extra = sorted(set(class_folders(test_dir)) - set(classes))
        if extra:
            raise ValueError(f"{test_dir} has classes the training data lacks: {', '.join(extra)}")
        test = _read_images(test_dir, classes, p, quarantined, scratch, "test")
    seen = len(pool.y) + (len(test.y) if test else 0) + len(quarantined)
    return Source("image", classes, pool, test, {}, quarantined, seen)


def class_folders(root: Path) -> list[str]:
    """Class names: the visible sub-folders (never .git, .ipynb_checkpoints, ...), each holding files."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class folders: expected {root}/<class>/<image files>")
    by_case: dict[str, list[str]] = {}
    for c in classes:
        by_case.setdefault(c.casefold(), []).append(c)
    clashes = [names for names in by_case.values() if len(names) > 1]
    if clashes:
        raise ValueError(f"{root}: class folders differ only by case: " + "; ".join(" / ".join(c) for c in clashes)
                         + ". Merge or rename them: on many file systems they are the same folder")
    empty = [c for c in classes if not any(f.is_file() and not f.name.startswith(".") for f in (root / c).rglob("*"))]
    if empty:
        raise ValueError(f"{root}: class folder(s) {', '.join(empty)} hold no files; add images or remove them")
    return classes


def _read_images(root: Path, classes: list[str], p, quarantined: list[dict[str, str]], scratch: Path | None,
                 name: str) -> Split:
    """The images under root/<class>/, decoded into `scratch`/<name>.u8 and kept there (Rows), or, with no
    scratch folder, read into memory."""
    files, labels = [], []
    for label, c in enumerate(classes):
        for f in sorted((root / c).rglob("*")):
            if not f.is_file() or any(part.startswith(".") for part in f.relative_to(root).parts):
                continue
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                quarantined.append({"file": str(f), "reason": f"not an image file type ({f.suffix or 'no suffix'})"})
                continue
            files.append(f)
            labels.append(label)
    keep = np.zeros(len(files), bool)
    with tempfile.TemporaryDirectory() as own:
        raw = Path(scratch or own) / f"{name}.u8"
        with open(raw, "wb") as out:  # each image's pixels as they arrive: none are held in memory
            decoded = decode_images(files, p.image_size, p.max_pixels, desc=f"decoding {root.name}")
            for i, (f, (image, error)) in enumerate(zip(files, decoded, strict=True)):
                if error is None:
                    out.write(image.tobytes())
                    keep[i] = True
                else:
                    quarantined.append({"file": str(f), "reason": error})
        shape, y = (p.image_size, p.image_size, 3), np.array(labels, dtype=np.int64)[keep]
        if scratch is None:
            return Split(np.fromfile(raw, np.uint8).reshape(-1, *shape), y)
    return Split(Rows(raw, shape, np.arange(len(y))), y)


def decode_images(files: list[Path], size: int, max_pixels: int, desc: str = "decoding",
                  workers: int | None = None, chunk: int = 64) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """(image, None) or (None, why it cannot be used) per file, in order: decoded by `workers` processes (all
    the cores this process may use) `chunk` files at a time, with a progress bar counting images per second.
    Fewer than 8 chunks decode inline: starting the processes would cost more than it saves."""
    from tqdm import tqdm

    workers = workers or len(os.sched_getaffinity(0))
    jobs = [(files[i : i + chunk], size, max_pixels) for i in range(0, len(files), chunk)]
    # spawned, not forked: a forked copy of a process with threads can deadlock
    pool = None if workers < 2 or len(jobs) < 8 else ProcessPoolExecutor(
        min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"))
    finished = 0  # jobs whose images were handed on
    try:
        with tqdm(total=len(files), desc=desc, unit="img", dynamic_ncols=True, disable=len(files) < chunk) as bar:
            try:
                for done in (pool.map if pool else map)(_decode_chunk, jobs):
                    yield from done
                    bar.update(len(done))
                    finished += 1
            except BrokenProcessPool:
                # A worker that could not start (the calling script read from stdin, or run without an
                # `if __name__ == "__main__":` guard, cannot be re-imported by it) or that died: same images, slower
                tqdm.write(f"{desc}: the worker processes stopped; decoding the other "
                           f"{len(files) - finished * chunk} images in this process")
                for done in map(_decode_chunk, jobs[finished:]):
                    yield from done
                    bar.update(len(done))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _decode_chunk(job: tuple[list[Path], int, int]) -> list[tuple[np.ndarray | None, str | None]]:
    files, size, max_pixels = job
    out: list[tuple[np.ndarray | None, str | None]] = []
    for f in files:
        try:
            out.append((decode_image(f, size, max_pixels), None))
        except Exception as e:  # every way an image can be bad ends in the quarantine, with its reason
            out.append((None, f"{type(e).__name__}: {e}"))
    return out


# ------------------------------------------------------------------------------------------- your texts


def text_table(source: Path, p) -> Source:
    if not source.exists():
        raise FileNotFoundError(f"{source} not found: text-table data is a .csv, .jsonl or .parquet file")
    train_file, test_file = _fixed_test(source, "file")
    quarantined: list[dict[str, str]] = []
    texts, labels = _read_table(train_file, p, quarantined)
    classes = sorted(set(labels))
    if not classes:
        raise ValueError(f"{train_file}: no usable rows (every row is quarantined: see the reasons above)")
    pool = Split(np.array(texts, dtype=object), np.array([classes.index(v) for v in labels], dtype=np.int64))
    test = None
    if test_file is not None:
        t_texts, t_labels = _read_table(test_file, p, quarantined)
        extra = sorted(set(t_labels) - set(classes))
        if extra:
            raise ValueError(f"{test_file} has labels the training data lacks: {', '.join(extra[:10])}")
        test = Split(np.array(t_texts, dtype=object), np.array([classes.index(v) for v in t_labels], dtype=np.int64))
    files = {f.name: sha256_file(f) for f in (train_file, test_file) if f is not None}
    seen = len(pool.y) + (len(test.y) if test else 0) + len(quarantined)
    return Source("text", classes, pool, test, files, quarantined, seen)


def _utf8_lines(path: Path, encoding: str) -> list[str]:
    data = path.read_bytes()
    try:
        return data.decode(encoding).splitlines()
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not valid {encoding} ({e.reason} at byte {e.start}: "
                         f"{data[e.start:e.start + 4]!r}). Re-save the file as UTF-8, or set prepare.encoding "
                         "to its encoding (e.g. latin-1, cp1252)") from None


def _read_table(path: Path, p, quarantined: list[dict[str, str]]) -> tuple[list[str], list[str]]:
    """Rows -> (texts, labels as strings). Rows with an empty text, NUL bytes or no label are quarantined."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        where = [f"row {i}" for i in range(1, len(rows) + 1)]
    elif suffix == ".jsonl":
        rows, where = [], []
        for number, line in enumerate(_utf8_lines(path, p.encoding), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not a JSON object ({e.msg})") from None
            where.append(f"line {number}")
    elif suffix == ".csv":
        text = "\n".join(_utf8_lines(path, p.encoding))
        rows = list(csv.DictReader(io.StringIO(text)))
        where = [f"row {i} after the header" for i in range(1, len(rows) + 1)]
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .csv, .jsonl or .parquet")
    if not rows:
        raise ValueError(f"{path} holds no rows: the dataset is empty")
    columns = set(rows[0]) if isinstance(rows[0], dict) else set()
    for column, key in ((p.text_column, "text_column"), (p.label_column, "label_column")):
        if column not in columns:
            raise ValueError(f"{path} has no column {column!r} (prepare.{key}); its columns are: "
                             f"{', '.join(sorted(map(str, columns))) or 'none'}")
    texts, labels = [], []
    for row, at in zip(rows, where):
        text, label = row.get(p.text_column), row.get(p.label_column)
        reason = None
        if label is None or str(label).strip() == "":
            reason = f"no label ({p.label_column} is empty)"
        elif not isinstance(text, str) or not text.strip():
            reason = f"empty text ({p.text_column})"
        elif "\x00" in text:
            reason = "the text holds NUL bytes"
        if reason:
            quarantined.append({"file": f"{path}, {at}", "reason": reason})
            continue
        texts.append(text)
        labels.append(str(label).strip())
    return texts, labels
