"""Against real servers, as a team runs headstart: PostgreSQL (Debian's package, started here as a
process) behind `mlflow server`; the register stage records a run and sets its alias through that
server, and 20 registrations at once under one model name get 20 distinct consecutive versions."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from .conftest import ROOT, background, http_server, sh

pytestmark = pytest.mark.slow


def pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        pytest.fail(f"PostgreSQL's {name} not found: install Debian's postgresql package (make setup does, as root)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on a free localhost port; yields the SQLAlchemy URL of database mlflow."""
    root = os.geteuid() == 0
    as_postgres = ["runuser", "-u", "postgres", "--"] if root else []  # postgres refuses to run as root
    base = Path(tempfile.mkdtemp(prefix="headstart-pg-"))
    if root:
        shutil.chown(base, "postgres")
    data, port = base / "data", free_port()
    try:
        sh(as_postgres + [pg_bin("initdb"), "-D", str(data), "-U", "headstart", "--auth=trust", "-E", "UTF8"], base)
        cmd = as_postgres + [pg_bin("postgres"), "-D", str(data), "-p", str(port), "-k", str(base),
                             "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200", "-c", "fsync=off"]
        with background(cmd, base) as proc:
            deadline = time.monotonic() + 60
            while subprocess.run([pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True).returncode:
                assert proc.poll() is None, f"postgres exited: {proc.output()[-2000:]}"
                assert time.monotonic() < deadline, "postgres did not accept connections in 60 s"
                time.sleep(0.5)
            sh([pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "headstart", "mlflow"], base)
            yield f"postgresql+psycopg://headstart@127.0.0.1:{port}/mlflow"
            subprocess.run(as_postgres + [pg_bin("pg_ctl"), "stop", "-D", str(data), "-m", "fast"], capture_output=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` on the Postgres backend, artifacts proxied to a local folder; yields its URL."""
    artifacts = tmp_path_factory.mktemp("mlflow-artifacts")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", postgres,
           "--artifacts-destination", artifacts.as_uri(), "--host", "127.0.0.1", "--port", "{port}",
           "--workers", "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with http_server(cmd, "/api/2.0/mlflow/experiments/get?experiment_id=0", ROOT, env, timeout=300) as (base, _):
        yield base


def test_register_stage_against_a_postgres_backed_tracking_server(mlflow_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from stages.registry import Store

    from .test_register import _register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    store = Store(tmp_path / "unused.db", tmp_path / "unused")  # MLFLOW_TRACKING_URI wins over the SQLite default
    receipt = _register(tmp_path / "run", store, "positive", 0.85, "served-model")
    assert receipt["tracking_uri"] == mlflow_server
    assert not (tmp_path / "unused.db").exists()
    client = MlflowClient(mlflow_server)
    version = client.get_model_version("served-model", receipt["version"])
    assert version.tags["gate.passed"] == "true" and version.tags["verdict"] == "positive"
    assert client.get_model_version_by_alias("served-model", "challenger").version == str(receipt["version"])
    assert [a.path for a in client.list_artifacts(receipt["run_id"], "onnx")] == ["onnx/model.onnx", "onnx/model_int8.onnx"]


def test_twenty_concurrent_registrations_get_twenty_consecutive_versions(mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    name = "concurrent-model"
    client.create_registered_model(name)
    run_ids = [client.create_run("0").info.run_id for _ in range(20)]
    start = threading.Barrier(20)
    versions, errors = {}, []

    def register(run_id: str) -> None:
        start.wait()  # all twenty at the same moment
        try:
            mv = MlflowClient(mlflow_server).create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
            versions[run_id] = int(mv.version)
        except Exception as e:  # noqa: BLE001 - every failure is reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=register, args=(r,)) for r in run_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert sorted(versions.values()) == list(range(1, 21))
    stored = client.search_model_versions(f"name='{name}'")
    assert sorted((int(v.version), v.run_id) for v in stored) == sorted((v, r) for r, v in versions.items())
