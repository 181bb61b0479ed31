import dataclasses

import numpy as np
import pytest

from stages.files import read_json
from stages.params import PrepareParams
from stages.prepare import run
from stages.sources import FASHION_MNIST_FILES, Source, read_idx
from stages.splits import Split, draw, load_split

from .conftest import write_idx


def _source(labels: np.ndarray, test_labels: np.ndarray | None = None) -> Source:
    """A source whose examples are their own row numbers (the test split's: 1000 + row), so a split's x
    says which rows it drew."""
    test = None if test_labels is None else Split(1000 + np.arange(len(test_labels)), test_labels)
    classes = [chr(ord("a") + c) for c in range(int(labels.max()) + 1)]
    return Source("image", classes, Split(np.arange(len(labels)), labels), test, {})


def test_stratified_draw_has_exact_counts_and_disjoint_splits():
    labels = np.repeat(np.arange(4), [50, 60, 70, 80])
    d = draw(_source(labels), per_class=10, val_per_class=5, test_per_class=3, seed=3)
    assert np.bincount(d.train.y).tolist() == [10, 10, 10, 10]
    assert np.bincount(d.val.y).tolist() == [5, 5, 5, 5]
    assert np.bincount(d.test.y).tolist() == [3, 3, 3, 3]
    assert not set(d.train.x) & set(d.val.x) and not set(d.test.x) & (set(d.train.x) | set(d.val.x))
    assert sorted([*d.train.x, *d.val.x, *d.test.x, *d.rest.x]) == list(range(len(labels)))


def test_stratified_draw_is_deterministic_and_seeded():
    src = _source(np.repeat(np.arange(3), 40))
    a, b, c = (draw(src, per_class=10, val_per_class=5, test_per_class=0, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a.train.x, b.train.x) and np.array_equal(a.val.x, b.val.x)
    assert not np.array_equal(a.train.x, c.train.x)


def test_a_class_too_small_for_the_split_says_how_many_are_needed():
    labels = np.array([0] * 20 + [1] * 7)
    with pytest.raises(ValueError, match=r"class 'b' has 7 examples; prepare.per_class \(10\) \+ "
                                         r"prepare.val_per_class \(5\) need 15. Add 8 more"):
        draw(_source(labels), per_class=10, val_per_class=5, test_per_class=0, seed=0)


# What prepare, pretrain and curves drew before `draw` replaced stratified_indices (six positional
# arguments), computed with that function: rows of the pool (the source's own test split: 1000 + row).
POOL_Y = [2, 1, 2, 2, 1, 2, 2, 0, 0, 0, 0, 2, 2, 0, 1, 2, 0, 2, 0, 1, 2, 0, 1, 0, 2, 0, 2, 1, 1, 1, 1, 1, 1, 2,
          2, 2, 2, 1, 1, 2, 1, 0, 2, 0, 2, 1, 0, 0, 1, 0, 0, 1, 2, 1, 2, 2, 2, 1, 1, 1]
TEST_Y = [0, 1, 1, 0, 2, 0, 0, 0, 2, 2, 2, 0, 2, 1, 1, 0, 1, 2, 1, 0, 1, 0, 2, 2, 0, 1, 2, 2, 2, 1]
BEFORE = {
    "prepare": (
        [8, 10, 11, 21, 27, 33, 38, 40, 43, 51, 52, 55],
        [24, 25, 34, 45, 50, 57],
        [9, 12, 13, 14, 17, 31, 41, 54, 59],
    ),
    "prepare_rest": (
        [8, 10, 11, 21, 27, 33, 38, 40, 43, 51, 52, 55],
        [24, 25, 34, 45, 50, 57],
        [0, 1, 2, 3, 4, 5, 6, 7, 9, 12, 13, 14, 15, 16, 17, 18, 19, 20, 22, 23, 26, 28, 29, 30, 31, 32, 35, 36,
         37, 39, 41, 42, 44, 46, 47, 48, 49, 53, 54, 56, 58, 59],
    ),
    "prepare_own_test": (
        [8, 10, 11, 21, 27, 33, 38, 40, 43, 51, 52, 55],
        [24, 25, 34, 45, 50, 57],
        [1009, 1012, 1015, 1018, 1019, 1020],
    ),
    "pretrain": (
        [8, 10, 11, 21, 27, 33, 38, 40, 43, 51, 52, 55],
        [24, 25, 34, 45, 50, 57],
        [3, 6, 9, 20, 32, 37, 41, 46, 48],
    ),
    "curves": (
        [8, 9, 10, 11, 16, 20, 26, 29, 31, 37, 48, 55],
        [12, 25, 35, 38, 40, 50],
        [13, 17, 18, 32, 36, 41, 42, 43, 44, 45, 46, 51, 52, 57, 59],
    ),
    "curves_own_test": (
        [8, 24, 25, 33, 34, 38, 40, 43, 45, 50, 55, 57],
        [10, 11, 21, 27, 51, 52],
        [1004, 1007, 1013, 1016, 1021, 1023],
    ),
}


def test_every_caller_draws_the_same_examples_as_before():
    pool, test = np.array(POOL_Y), np.array(TEST_Y)
    no_test, own_test = _source(pool), _source(pool, test)
    got = {}
    d = draw(no_test, per_class=4, val_per_class=2, test_per_class=3, seed=5)
    got["prepare"] = d.train, d.val, d.test
    d = draw(no_test, per_class=4, val_per_class=2, test_per_class=None, seed=5)
    got["prepare_rest"] = d.train, d.val, d.test
    d = draw(own_test, per_class=4, val_per_class=2, test_per_class=2, seed=5)
    got["prepare_own_test"] = d.train, d.val, d.test
    d = draw(no_test, per_class=4, val_per_class=2, test_per_class=0, seed=5)  # pretrain, no test split
    rest = draw(dataclasses.replace(no_test, pool=d.rest), per_class=0, val_per_class=0, test_per_class=3, seed=5)
    got["pretrain"] = d.train, d.val, rest.test
    for name, src, n_test in (("curves", no_test, 5), ("curves_own_test", own_test, 2)):
        t = draw(src, per_class=0, val_per_class=0, test_per_class=n_test, seed=12345)
        d = draw(dataclasses.replace(src, pool=t.rest, test=None), per_class=4, val_per_class=2, test_per_class=0,
                 seed=5, val_first=True)
        got[name] = d.train, d.val, t.test
    for name, splits in BEFORE.items():
        assert [s.x.tolist() for s in got[name]] == [list(x) for x in splits], name


def test_truncated_idx_file_is_rejected(tmp_path):
    path = tmp_path / "x.gz"
    write_idx(path, np.zeros((5, 28, 28)))
    import gzip

    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_prepare_writes_stratified_splits_and_a_manifest(tiny_source, tmp_path):
    out = tmp_path / "prepared"
    manifest = run(tiny_source, out, PrepareParams(per_class=5, val_per_class=3, seed=0))
    train, val, test = (load_split(out, s) for s in ("train", "val", "test"))
    assert np.bincount(train.y).tolist() == [5] * 10
    assert np.bincount(val.y).tolist() == [3] * 10
    assert len(test.y) == 60 and train.x.shape[1:] == (28, 28) and train.x.dtype == np.uint8
    assert manifest == read_json(out / "manifest.json")
    assert set(manifest["source_sha256"]) == set(FASHION_MNIST_FILES.values())
    assert manifest["counts"]["train"]["Bag"] == 5


def test_prepare_is_byte_for_byte_reproducible(tiny_source, tmp_path):
    p = PrepareParams(per_class=5, val_per_class=3, seed=0, test_per_class=2)
    run(tiny_source, tmp_path / "a", p)
    run(tiny_source, tmp_path / "b", p)
    for name in ("train.safetensors", "val.safetensors", "test.safetensors", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_rerunning_replaces_the_output_whole(tiny_source, tmp_path):
    out = tmp_path / "prepared"
    run(tiny_source, out, PrepareParams(per_class=5, val_per_class=3))
    (out / "stray.txt").write_text("left over")
    run(tiny_source, out, PrepareParams(per_class=4, val_per_class=3))
    assert not (out / "stray.txt").exists()
    assert len(load_split(out, "train").y) == 40


def test_missing_source_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        run(tmp_path / "nowhere", tmp_path / "out", PrepareParams())


def test_images_decode_in_worker_processes_in_order_with_the_bad_ones_named(tmp_path):
    """Enough files to start the worker processes: every image comes back at its own index, the same
    pixels as decoding it inline, and a broken file has its reason instead of stopping the rest."""
    from PIL import Image

    from stages.sources import decode_images

    rng = np.random.default_rng(0)
    files = []
    for i in range(40):
        f = tmp_path / f"{i:02d}.jpg"
        Image.fromarray(rng.integers(0, 256, (40 + i, 30, 3), dtype=np.uint8)).save(f)
        files.append(f)
    files[7].write_bytes(files[7].read_bytes()[:200])  # cut mid-file, as a failed copy leaves it
    files[23].write_text("not an image")
    inline = list(decode_images(files, 16, 10**6, workers=1, chunk=4))
    pooled = list(decode_images(files, 16, 10**6, workers=2, chunk=4))  # 10 chunks: two processes
    assert [e is None for _, e in pooled] == [i not in (7, 23) for i in range(40)]
    assert "OSError" in pooled[7][1] and "UnidentifiedImageError" in pooled[23][1]
    for (a, ea), (b, eb) in zip(inline, pooled, strict=True):
        assert ea == eb and (a is None or np.array_equal(a, b))


def test_a_disk_that_fills_fails_prepare_with_a_clear_message_and_keeps_the_previous_data(tiny_source, tmp_path):
    """A real small file system (tmpfs), filled up between two runs: the second run's write fails with a
    message that names the problem, and the first run's prepared data is still there, byte for byte, with
    no temporary folder left beside it."""
    import os
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    try:
        out = disk / "prepared"
        run(tiny_source, out, PrepareParams(per_class=5, val_per_class=3, seed=0))
        before = {f.name: f.read_bytes() for f in out.iterdir()}
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 16 * 1024))  # room for a few files, not for the splits
        with pytest.raises(OSError, match=r"no space left on the disk holding .* the previous prepared is kept"):
            run(tiny_source, out, PrepareParams(per_class=5, val_per_class=3, seed=1))
        assert {f.name: f.read_bytes() for f in out.iterdir()} == before
        assert sorted(f.name for f in disk.iterdir()) == ["filler", "prepared"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_an_image_folder_waits_on_disk_and_prepares_the_same_splits_as_in_memory(tmp_path):
    """Prepare keeps an image folder's decoded pixels in a file (Rows), not in memory: the same pixels, the
    same quarantine, the same splits as reading them into memory, and nothing left beside the output."""
    from PIL import Image

    from stages import sources
    from stages.splits import Rows

    rng = np.random.default_rng(0)
    src = tmp_path / "photos"
    for c in ("ant", "bee", "cat"):
        (src / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(src / c / f"{i}.png")
    (src / "bee" / "broken.png").write_bytes(b"not a png")
    p = PrepareParams(dataset="image-folder", per_class=5, val_per_class=2, image_size=16, max_quarantined=0.1)
    in_memory = sources.read("image-folder", src, p)
    (tmp_path / "scratch").mkdir()
    on_disk = sources.read("image-folder", src, p, tmp_path / "scratch")
    assert isinstance(on_disk.pool.x, Rows) and np.array_equal(np.asarray(on_disk.pool.x), in_memory.pool.x)
    assert on_disk.quarantined == in_memory.quarantined and len(in_memory.quarantined) == 1
    run(src, tmp_path / "prepared", p)
    drawn = draw(in_memory, per_class=5, val_per_class=2, test_per_class=None, seed=p.seed)
    for name in ("train", "val", "test"):
        split, expected = load_split(tmp_path / "prepared", name), getattr(drawn, name)
        assert np.array_equal(split.x, expected.x) and np.array_equal(split.y, expected.y)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["photos", "prepared", "scratch"]


def test_split_files_are_byte_for_byte_what_safetensors_writes_from_memory_or_from_disk(tmp_path):
    """save_split streams images a chunk at a time; its bytes must stay safetensors' own, or every prepared
    dataset would change its DVC hash (and retrain everything downstream) for nothing."""
    from safetensors.numpy import save_file

    from stages.splits import Rows, save_split

    rng = np.random.default_rng(0)
    for shape in ((7, 5, 5, 3), (3, 28, 28), (0, 4, 4, 3), (2500, 6, 6, 3)):
        x, y = rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 10, shape[0])
        save_file({"x": x, "y": y.astype(np.int64)}, str(tmp_path / "reference.safetensors"))
        raw = tmp_path / "rows.u8"
        raw.write_bytes(x[::-1].tobytes())  # on disk in another order, drawn back into this one
        rows = Rows(raw, shape[1:], np.arange(shape[0])[::-1])
        for source in (x, rows):
            written = save_split(tmp_path, "test", Split(source, y))
            assert written.read_bytes() == (tmp_path / "reference.safetensors").read_bytes(), shape
        if shape[0]:
            assert np.array_equal(rows[1], x[1]) and np.array_equal(np.asarray(rows[::2]), x[::2])


def test_images_still_decode_when_the_worker_processes_cannot_start(tmp_path):
    """A script read from stdin cannot be re-imported by a spawned worker, so the pool breaks: the images are
    decoded in the calling process instead, the same ones, in order."""
    import subprocess
    import sys

    from PIL import Image

    from .conftest import ROOT

    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (30, 20 + i, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    script = (
        "import sys, numpy as np; from pathlib import Path; from stages.sources import decode_images\n"
        f"files = sorted(Path({str(tmp_path)!r}).glob('*.png'))\n"
        "got = list(decode_images(files, 8, 10**6, workers=2, chunk=4))\n"
        "print(sum(e is None for _, e in got), int(sum(int(im.sum()) for im, _ in got)))\n")
    res = subprocess.run([sys.executable, "-"], input=script, cwd=ROOT, capture_output=True, text=True, timeout=120)
    from stages.sources import decode_images

    inline = list(decode_images(sorted(tmp_path.glob("*.png")), 8, 10**6, workers=1, chunk=4))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines()[-1].split() == ["40", str(int(sum(int(im.sum()) for im, _ in inline)))]
    assert "the worker processes stopped; decoding the other 40 images in this process" in res.stdout
