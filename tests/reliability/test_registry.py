"""A register stage that fails half-way and is run again registers the model once, not twice."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

import stages.tracking as tracking

from ..test_register import _register

pytestmark = pytest.mark.slow


def test_a_rerun_after_a_failure_past_registration_completes_the_same_version(tmp_path, mlflow_store, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = "exactly-once"
    attach = tracking.attach_onnx

    def tracking_server_drops(*args, **kwargs):
        raise ConnectionError("Connection refused (the tracking server went away after the version was created)")

    monkeypatch.setattr(tracking, "attach_onnx", tracking_server_drops)
    with pytest.raises(ConnectionError):
        _register(tmp_path, mlflow_store, "positive", 0.85, name)
    client = MlflowClient()
    (half,) = client.search_model_versions(f"name='{name}'")
    assert "gate.passed" not in half.tags  # the failure left it ungated, without alias

    monkeypatch.setattr(tracking, "attach_onnx", attach)
    receipt = _register(tmp_path, mlflow_store, "positive", 0.85, name)  # the same inputs: a rerun
    (version,) = client.search_model_versions(f"name='{name}'")
    assert receipt["version"] == int(version.version) == int(half.version)
    assert version.tags["gate.passed"] == "true" and receipt["aliases"] == ["challenger"]
    assert [a.path for a in client.list_artifacts(receipt["run_id"], "onnx")] == ["onnx/model.onnx", "onnx/model_int8.onnx"]

    again = _register(tmp_path, mlflow_store, "positive", 0.85, name)  # and once more, after success
    assert again["version"] == receipt["version"]
    assert len(client.search_model_versions(f"name='{name}'")) == 1

    other = _register(tmp_path / "other", mlflow_store, "positive", 0.86, name)  # a different evaluation
    assert other["version"] == receipt["version"] + 1
