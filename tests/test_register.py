"""The alias rule, as a pure function and against a real MLflow SQLite store with tiny models."""

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from stages import zoo
from stages.files import write_json
from stages.params import RegisterParams
from stages.register import challenger_decision, run


@pytest.mark.parametrize(
    ("verdict", "acc", "champion", "max_reg", "expected"),
    [
        ("positive", 0.80, None, 0.0, True),
        ("inconclusive", 0.99, None, 0.0, False),
        ("negative", 0.99, None, 0.0, False),
        ("positive", 0.80, 0.81, 0.0, False),
        ("positive", 0.80, 0.81, 0.02, True),
        ("positive", 0.81, 0.81, 0.0, True),
    ],
)
def test_challenger_needs_a_positive_verdict_and_no_regression(verdict, acc, champion, max_reg, expected):
    ok, reason = challenger_decision(verdict, acc, champion, max_reg)
    assert ok is expected
    assert reason


def _workspace(tmp_path, verdict: str, accuracy: float):
    """Checkpoints and an evaluate.json as the earlier stages would leave them, with tiny linear models."""
    pre = zoo.preprocessing(zoo.PIXEL_LINEAR, 28)
    classes = [str(i) for i in range(10)]
    torch.manual_seed(0)
    for path in ("finetuned", "baselines/scratch", "baselines/linear_probe", "baselines/floor"):
        meta = {"kind": path, "architecture": zoo.PIXEL_LINEAR, "init": "random", "pretrained_sha256": None,
                "classes": classes, "preprocessing": pre, "train": {"epochs": 1}}
        zoo.save_checkpoint(tmp_path / path, zoo.build(zoo.PIXEL_LINEAR, 10, pre), meta)
    model_metrics = {"accuracy": accuracy, "accuracy_ci95": [accuracy - 0.01, accuracy + 0.01], "macro_f1": accuracy}
    report = {name: model_metrics for name in ("finetuned", "scratch", "linear_probe", "floor")}
    report.update({"transfer_gain": 0.1, "transfer_gain_ci95": [0.05, 0.15], "mcnemar_p": 0.001,
                   "verdict": verdict, "test_sha256": "t" * 64, "n_test": 100})
    write_json(tmp_path / "evaluate.json", report)
    history = tmp_path / "history.csv"
    history.write_text("epoch,train_loss,val_accuracy\n1,2.0,0.5\n2,1.0,0.7\n")
    return history


def _register(tmp_path, store, verdict, accuracy, name):
    history = _workspace(tmp_path, verdict, accuracy)
    return run(tmp_path / "prepared", tmp_path / "finetuned", tmp_path / "baselines", {"finetuned": history},
               tmp_path / "evaluate.json", tmp_path / "plots", tmp_path / "registered.json", store,
               RegisterParams(model_name=name, experiment="test"), {"git_commit": "abc", "params_sha256": "p"})


@pytest.mark.slow
def test_register_sets_challenger_only_when_earned(tmp_path, mlflow_store, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = "alias-rule"
    first = _register(tmp_path / "1", mlflow_store, "positive", 0.80, name)
    assert first["aliases"] == ["challenger"]
    receipt = json.loads((tmp_path / "1" / "registered.json").read_text())
    assert receipt == first and set(receipt) >= {"model_name", "version", "run_id", "aliases"}

    client = MlflowClient()
    version = client.get_model_version(name, first["version"])
    assert version.tags["verdict"] == "positive" and version.tags["git_commit"] == "abc"
    assert version.tags["test_sha256"] == "t" * 64
    history = client.get_metric_history(first["run_id"], "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.7)]

    # A person promotes version 1; a worse candidate on the same test set does not become challenger.
    client.set_registered_model_alias(name, "champion", first["version"])
    worse = _register(tmp_path / "2", mlflow_store, "positive", 0.75, name)
    assert worse["aliases"] == [] and "below the champion" in worse["challenger_reason"]
    assert client.get_model_version_by_alias(name, "challenger").version == first["version"]

    # An inconclusive verdict never earns it, however accurate.
    inconclusive = _register(tmp_path / "3", mlflow_store, "inconclusive", 0.95, name)
    assert inconclusive["aliases"] == []

    better = _register(tmp_path / "4", mlflow_store, "positive", 0.85, name)
    assert better["aliases"] == ["challenger"]
    assert better["version"] == first["version"] + 3
    assert client.get_model_version_by_alias(name, "champion").version == first["version"]
