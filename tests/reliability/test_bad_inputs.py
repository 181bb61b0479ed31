"""Bad data and an unreachable tracking server end in one clear error naming the problem."""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from stages.params import PrepareParams
from stages.prepare import run as prepare
from stages.sources import FASHION_MNIST_FILES

from ..conftest import ROOT, write_idx


def _source(tmp_path, **replace):
    """tiny Fashion-MNIST-shaped files; `replace` swaps one file's bytes."""
    rng = np.random.default_rng(0)
    src = tmp_path / "source"
    src.mkdir()
    for split in ("train", "test"):
        y = np.repeat(np.arange(10), 10)
        write_idx(src / FASHION_MNIST_FILES[f"{split}_images"], rng.integers(0, 255, (len(y), 28, 28)))
        write_idx(src / FASHION_MNIST_FILES[f"{split}_labels"], y)
    for key, data in replace.items():
        (src / FASHION_MNIST_FILES[key]).write_bytes(data)
    return src


P = PrepareParams(per_class=4, val_per_class=2, test_per_class=2)


def test_a_zero_byte_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz: .*too short"):
        prepare(_source(tmp_path, test_labels=gzip.compress(b"")), tmp_path / "out", P)


def test_a_file_that_is_not_idx_is_named(tmp_path):
    png = gzip.compress(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: not an unsigned-byte idx file"):
        prepare(_source(tmp_path, train_images=png), tmp_path / "out", P)


def test_a_corrupt_gzip_stream_is_an_error_not_a_partial_read(tmp_path):
    good = (_source(tmp_path) / FASHION_MNIST_FILES["train_images"]).read_bytes()
    (tmp_path / "source" / FASHION_MNIST_FILES["train_images"]).write_bytes(good[: len(good) // 2])
    with pytest.raises((EOFError, OSError, ValueError)):
        prepare(tmp_path / "source", tmp_path / "out", P)
    assert not (tmp_path / "out").exists()


def test_images_and_labels_of_different_counts_are_refused(tmp_path):
    src = _source(tmp_path)
    write_idx(src / FASHION_MNIST_FILES["train_labels"], np.repeat(np.arange(10), 9))
    with pytest.raises(ValueError, match="train has 100 images but 90 labels"):
        prepare(src, tmp_path / "out", P)


def test_a_label_outside_the_classes_is_refused_with_its_index(tmp_path):
    src = _source(tmp_path)
    y = np.repeat(np.arange(10), 10)
    y[17] = 12
    write_idx(src / FASHION_MNIST_FILES["test_labels"], y)
    with pytest.raises(ValueError, match=r"test label 12 at index 17 is not a class \(0-9\)"):
        prepare(src, tmp_path / "out", P)


def test_a_failed_prepare_keeps_the_previous_output(tmp_path):
    src = _source(tmp_path)
    prepare(src, tmp_path / "out", P)
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "out").iterdir())
    write_idx(src / FASHION_MNIST_FILES["train_labels"], np.repeat(np.arange(10), 9))
    with pytest.raises(ValueError):
        prepare(src, tmp_path / "out", P)
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "out").iterdir()) == before


@pytest.mark.slow
def test_register_with_the_tracking_server_down_says_so_and_registers_nothing(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    code = ("from stages.registry import Store; from stages.tracking import connect; from pathlib import Path; "
            "connect(Store(Path('x.db'), Path('a')), 'headstart')")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert f"ConnectionError: cannot reach the MLflow tracking store at http://127.0.0.1:{port}" in res.stderr
    assert "Nothing was registered" in res.stderr
    from flows.pipeline import is_transient

    assert is_transient(res.stderr)  # so the flow retries the stage
