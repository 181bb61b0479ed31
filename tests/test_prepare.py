import numpy as np
import pytest

from stages.data import FASHION_MNIST_FILES, load_split, read_idx, stratified_indices
from stages.files import read_json
from stages.params import PrepareParams
from stages.prepare import run

from .conftest import write_idx


def test_stratified_draw_has_exact_counts_and_disjoint_splits():
    labels = np.repeat(np.arange(4), [50, 60, 70, 80])
    tr, va = stratified_indices(labels, per_class=10, val_per_class=5, seed=3)
    assert np.bincount(labels[tr]).tolist() == [10, 10, 10, 10]
    assert np.bincount(labels[va]).tolist() == [5, 5, 5, 5]
    assert not set(tr) & set(va)


def test_stratified_draw_is_deterministic_and_seeded():
    labels = np.repeat(np.arange(3), 40)
    a = stratified_indices(labels, 10, 5, seed=0)
    b = stratified_indices(labels, 10, 5, seed=0)
    c = stratified_indices(labels, 10, 5, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_a_class_too_small_for_the_split_says_how_many_are_needed():
    labels = np.array([0] * 20 + [1] * 7)
    with pytest.raises(ValueError, match="class 1 has 7 examples; .* need 15. Add 8 more"):
        stratified_indices(labels, 10, 5, seed=0)


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
