"""Shared fixtures: tiny idx datasets in the Fashion-MNIST layout, and one MLflow store per session
(creating a SQLite store runs migrations that take tens of seconds)."""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from stages.data import FASHION_MNIST_FILES

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def http_server(cmd: list[str], ready_path: str, cwd: Path, env: dict | None = None, timeout: float = 90):
    """Start a server process on a free localhost port (`{port}` in `cmd`), wait until GET `ready_path`
    answers, yield (base_url, the first answer's JSON), and stop it however the test ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([c.replace("{port}", str(port)) for c in cmd], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(base + ready_path, timeout=5) as r:
                    first = json.loads(r.read())
                break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(f"{cmd[:3]} exited: {proc.stdout.read().decode()[-3000:]}") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"{cmd[:3]} did not answer {ready_path} in {timeout}s") from None
                time.sleep(0.5)
        yield base, first
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_source(tmp_path: Path) -> Path:
    """A Fashion-MNIST-shaped source folder: 10 classes, 20 train and 6 test images each. Each class has
    its own brightness pattern so even a linear model can learn it."""
    rng = np.random.default_rng(0)
    src = tmp_path / "source"
    src.mkdir()
    for split, per_class in (("train", 20), ("test", 6)):
        y = np.repeat(np.arange(10), per_class)
        rng.shuffle(y)
        x = rng.integers(0, 60, (len(y), 28, 28))
        for i, c in enumerate(y):
            x[i, c * 2 : c * 2 + 6, :] += 180
        write_idx(src / FASHION_MNIST_FILES[f"{split}_images"], x)
        write_idx(src / FASHION_MNIST_FILES[f"{split}_labels"], y)
    return src


def tiny_params(tmp_path: Path, source: Path) -> Path:
    """params.yaml with every output under tmp_path and settings small enough for a test."""
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"] = {k: str(source if k == "source" else tmp_path / v) for k, v in raw["paths"].items()}
    raw["prepare"].update(per_class=4, val_per_class=2, test_per_class=2)
    raw["model"]["image_size"] = 32
    raw["finetune"].update(epochs=1, batch_size=8)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    from stages.register import Store

    root = tmp_path_factory.mktemp("mlflow")
    return Store(db=root / "mlflow.db", artifacts=root / "artifacts")
