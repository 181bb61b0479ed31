"""The alias rule, as a pure function and against a real MLflow SQLite store with tiny models."""

import json

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stages import checkpoint, zoo
from stages.files import write_json
from stages.params import RegisterParams
from stages.register import gate, run
from stages.registry import Store


EXPORT = {"max_abs_diff": 1e-5, "worst_tolerance_use": 0.1, "top1_agreement": 1.0, "fp32_accuracy": 0.8,
          "int8_accuracy": 0.8, "int8_relative_drop": 0.0, "int8_accepted": True, "size_bytes": 10,
          "int8_size_bytes": 5, "parity_passed": True}


def _report(acc: float, gain_ci: tuple[float, float], **extra) -> dict:
    """evaluate.json's shape: fine-tuned `acc`, every alternative 5 points below, the gains' interval `gain_ci`."""
    verdict = "positive" if gain_ci[0] > 0 else "negative" if gain_ci[1] < 0 else "inconclusive"
    vs = {m: {"gain": 0.05, "gain_ci95": list(gain_ci), "mcnemar_p": 0.01, "verdict": verdict}
          for m in zoo.BASELINES}
    report = {m: {"accuracy": acc - 0.05, **extra} for m in zoo.BASELINES}
    report.update({"finetuned": {"accuracy": acc, **extra}, "vs": vs, "best_vs": vs, "best": "finetuned",
                   "best_alternative": "scratch", "verdict": verdict, "transfer_verdict": verdict,
                   "transfer_gain": 0.05, "transfer_gain_ci95": list(gain_ci), "mcnemar_p": 0.01})
    return report


@pytest.mark.parametrize(
    ("acc", "gain_ci", "champion", "parity", "failed"),
    [
        (0.85, (0.05, 0.15), None, 0.5, []),
        (0.75, (0.05, 0.15), None, 0.5, ["min_accuracy"]),
        (0.85, (-0.01, 0.15), None, 0.5, ["beats_alternatives"]),
        (0.85, (0.05, 0.15), 0.86, 0.5, ["vs_champion"]),
        (0.85, (0.05, 0.15), 0.85, 0.5, []),
        (0.85, (0.05, 0.15), None, 1.5, ["onnx_parity"]),
    ],
)
def test_gate_fails_exactly_the_checks_that_are_not_met(acc, gain_ci, champion, parity, failed):
    checks = gate(_report(acc, gain_ci), {**EXPORT, "worst_tolerance_use": parity}, champion,
                  RegisterParams(model_name="m", experiment="e", min_accuracy=0.8))
    assert [c.name for c in checks] == ["min_accuracy", "beats_alternatives", "onnx_parity", "vs_champion"]
    assert [c.name for c in checks if not c.passed] == failed
    assert all(c.value and c.rule for c in checks)


def test_max_regression_allows_trailing_the_champion_a_little():
    p = RegisterParams(model_name="m", experiment="e", max_regression=0.02)
    assert all(c.passed for c in gate(_report(0.85, (0.05, 0.1)), EXPORT, 0.86, p))


def test_the_model_card_says_how_much_sooner_fine_tuning_reached_scratchs_best():
    from stages.speedup import time_to_reach
    from stages.register import model_card

    from .test_evaluate import FINETUNED, SCRATCH, history

    report = _report(0.85, (0.05, 0.15), accuracy_ci95=[0.84, 0.86], macro_f1=0.85)
    report.update({"test_sha256": "t" * 64, "n_test": 100})
    meta = {"architecture": zoo.PIXEL_LINEAR, "init": "random", "classes": ["a", "b"],
            "preprocessing": zoo.preprocessing(zoo.PIXEL_LINEAR, 28), "train": {}}
    checks = gate(report, EXPORT, None, RegisterParams(model_name="m", experiment="e"))

    def card(finetuned, scratch) -> list[str]:
        times = None if finetuned is None else {
            "scratch_best": time_to_reach("finetuned", finetuned, "scratch", scratch),
            "finetuned_best": time_to_reach("scratch", scratch, "finetuned", finetuned)}
        return model_card("m", 1, meta, {**report, "time_to_accuracy": times}, EXPORT, checks, {"git_commit": "a"}
                          ).splitlines()

    lines = card(FINETUNED, SCRATCH)
    said = "Time to scratch's best (val 0.76): fine-tuned 30.0 s / 3 epochs vs scratch 48.0 s / 4 epochs: 1.6x faster."
    assert lines[lines.index(said) + 1].startswith("Scored on 100 test examples")
    assert not any(line.startswith("Time to fine-tuned's best") for line in lines)  # scratch never got there
    both = card(history((1, 0.8, 10.0)), history((1, 0.5, 10.0), (2, 0.8, 30.0)))
    assert "Time to fine-tuned's best (val 0.80): scratch 30.0 s / 2 epochs vs fine-tuned 10.0 s / 1 epoch: " \
           "3.0x slower." in both
    assert not any(line.startswith("Time to") for line in card(None, None))  # an evaluation from before it


def _workspace(tmp_path, verdict: str, accuracy: float, n_classes: int = 10):
    """Checkpoints and an evaluate.json as the earlier stages would leave them, with tiny linear models."""
    pre = zoo.preprocessing(zoo.PIXEL_LINEAR, 28)
    classes = [str(i) for i in range(n_classes)]
    torch.manual_seed(0)
    for path in ("finetuned", "baselines/scratch", "baselines/linear_probe", "baselines/floor"):
        meta = {"kind": path, "architecture": zoo.PIXEL_LINEAR, "init": "random", "pretrained_sha256": None,
                "classes": classes, "preprocessing": pre, "train": {"epochs": 1}}
        checkpoint.save_checkpoint(tmp_path / path, zoo.build(zoo.PIXEL_LINEAR, n_classes, pre), meta)
    gain_ci = [0.05, 0.15] if verdict == "positive" else [-0.02, 0.1]
    report = _report(accuracy, gain_ci, accuracy_ci95=[accuracy - 0.01, accuracy + 0.01], macro_f1=accuracy)
    report.update({"test_sha256": "t" * 64, "n_test": 100})
    write_json(tmp_path / "evaluate.json", report)
    write_json(tmp_path / "export.json", EXPORT)
    for name in ("model.onnx", "model_int8.onnx"):
        (tmp_path / name).write_bytes(b"onnx bytes")
    history = tmp_path / "history.csv"
    history.write_text("epoch,train_loss,val_accuracy\n1,2.0,0.5\n2,1.0,0.7\n")
    return history


def _register(tmp_path, store, verdict, accuracy, name, n_classes=10):
    history = _workspace(tmp_path, verdict, accuracy, n_classes)
    return run(tmp_path / "prepared", tmp_path / "finetuned", tmp_path / "baselines", {"finetuned": history},
               tmp_path / "evaluate.json", tmp_path / "plots", tmp_path / "export.json",
               {"fp32": tmp_path / "model.onnx", "int8": tmp_path / "model_int8.onnx"}, tmp_path / "registered.json",
               store, RegisterParams(model_name=name, experiment="test", min_accuracy=0.7),
               {"git_commit": "abc", "params_sha256": "p"})


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
    assert version.tags["gate.passed"] == "true" and version.tags["onnx_int8_accepted"] == "True"
    assert "## Gate: passed" in version.description and "| vs_champion | no champion |" in version.description
    assert [a.path for a in client.list_artifacts(first["run_id"], "onnx")] == ["onnx/model.onnx", "onnx/model_int8.onnx"]
    history = client.get_metric_history(first["run_id"], "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.7)]

    # A person promotes version 1; a worse candidate on the same test set does not become challenger.
    client.set_registered_model_alias(name, "champion", first["version"])
    worse = _register(tmp_path / "2", mlflow_store, "positive", 0.75, name)
    assert worse["aliases"] == [] and worse["challenger_reason"] == "gate failed: vs_champion"
    tags = client.get_model_version(name, worse["version"]).tags
    assert tags["gate.passed"] == "false" and tags["gate.vs_champion.passed"] == "false"
    assert tags["gate.vs_champion.value"] == "-0.0500" and tags["gate.min_accuracy.passed"] == "true"
    assert client.get_model_version_by_alias(name, "challenger").version == first["version"]

    # An inconclusive verdict never earns it, however accurate.
    inconclusive = _register(tmp_path / "3", mlflow_store, "inconclusive", 0.95, name)
    assert inconclusive["aliases"] == [] and "beats_alternatives" in inconclusive["challenger_reason"]

    better = _register(tmp_path / "4", mlflow_store, "positive", 0.85, name)
    assert better["aliases"] == ["challenger"]
    assert better["version"] == first["version"] + 3
    assert client.get_model_version_by_alias(name, "champion").version == first["version"]


@pytest.mark.slow
def test_promotion_needs_a_passed_gate_or_a_recorded_reason(tmp_path, mlflow_store, monkeypatch):
    import os
    import subprocess
    import sys

    from stages.params import Params
    from stages.promotion import PromotionRefused, promote_version
    from stages.registry import CHALLENGER, CHAMPION

    from .conftest import ROOT

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = Params.load(ROOT / "params.yaml").register.model_name  # what the CLI reads
    good = _register(tmp_path / "good", mlflow_store, "positive", 0.85, name)["version"]
    bad = _register(tmp_path / "bad", mlflow_store, "inconclusive", 0.85, name)["version"]
    client = MlflowClient()

    # the CLI, as a person runs it: refused, exit status 1, the failing check named
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store.uri(), "PREFECT_HOME": str(tmp_path / "prefect")}
    res = subprocess.run([sys.executable, "-m", "flows.promote", str(bad), "--model", name], cwd=ROOT, env=env,
                         capture_output=True, text=True)  # --model: the same as params.yaml's, by name
    assert res.returncode == 1, res.stdout + res.stderr
    assert "gate.beats_alternatives.passed is false" in res.stderr
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(name, "champion")

    with pytest.raises(ValueError, match="--force needs --reason"):
        promote_version(mlflow_store, name, bad, force=True)
    with pytest.raises(PromotionRefused):
        promote_version(mlflow_store, name, bad)

    res = subprocess.run([sys.executable, "-m", "flows.promote", str(good)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert client.get_model_version_by_alias(name, "champion").version == good

    forced = promote_version(mlflow_store, name, bad, force=True, reason="hotfix for class 6", by="alice")
    assert forced["forced"] and forced["previous"] == good
    tags = client.get_model_version(name, bad).tags
    assert tags["champion.forced_reason"] == "hotfix for class 6" and tags["champion.promoted_by"] == "alice"
    assert "beats_alternatives" in tags["champion.forced_over"]

    rollback = promote_version(mlflow_store, name, good, by="alice")  # moving the alias back
    assert rollback["previous"] == bad and not rollback["forced"]
    assert client.get_model_version_by_alias(name, "champion").version == good

    # the card's first line says what the gate decided, in words a promoter cannot miss
    assert client.get_model_version(name, bad).description.splitlines()[0] == (
        f"# {name} version {bad}: finetuned, GATE FAILED (beats_alternatives): do not promote")
    assert client.get_model_version(name, good).description.splitlines()[0].endswith(": finetuned, gate passed")


    # The registry docs' UI steps and tables name exactly the aliases and tags the code writes.
    readme = (ROOT / "docs" / "operations.md").read_text()
    written = set(client.get_model_version(name, bad).tags) | set(client.get_model_version(name, good).tags)
    for tag in sorted(t for t in written if t.startswith(("gate.", "champion.", "challenger"))):
        parts = tag.split(".")
        if len(parts) == 3 and parts[0] == "gate":  # gate.<check>.value / .passed: the generic name + the check
            assert f"`gate.<check>.{parts[2]}`" in readme and f"`{parts[1]}`" in readme, tag
        else:
            assert f"`{tag}`" in readme, f"docs/operations.md does not mention the tag {tag}"
    for alias in (CHALLENGER, CHAMPION):
        assert f"`{alias}`" in readme
    assert f"Models → `{name}`" in readme


def _constant_model(folder, predicts: int) -> None:
    """A pixel-linear checkpoint that predicts class `predicts` for every image."""
    pre = zoo.preprocessing(zoo.PIXEL_LINEAR, 28)
    model = zoo.build(zoo.PIXEL_LINEAR, 10, pre)
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()
        model[1].bias[predicts] = 5.0
    meta = {"kind": "finetuned", "architecture": zoo.PIXEL_LINEAR, "init": "random", "pretrained_sha256": None,
            "classes": [str(i) for i in range(10)], "preprocessing": pre, "train": {"epochs": 1}}
    checkpoint.save_checkpoint(folder, model, meta)


@pytest.mark.slow
def test_a_retrained_model_that_forgets_the_previous_data_version_is_refused_challenger(
        tmp_path, mlflow_store, monkeypatch):
    """Data version A (its test set: class 0 only) registers a model that gets it right. A retrain on data
    version B that has forgotten class 0 is refused `challenger`; one that still knows it is not. The old
    test set comes from the DVC cache, found by the prepared data's hash recorded on the earlier version."""
    import sys

    import numpy as np
    import yaml

    from stages.splits import Split, save_split

    from .conftest import sh

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    sh(["git", "init", "-q"], tmp_path)
    dvc = [sys.executable, "-m", "dvc"]
    sh(dvc + ["init", "-q"], tmp_path)
    md5 = {}
    for version, label in (("A", 0), ("B", 1)):
        folder = tmp_path / f"prepared-{version}"
        folder.mkdir()
        save_split(folder, "test", Split(np.zeros((30, 28, 28), np.uint8), np.full(30, label, np.int64)))
        sh(dvc + ["add", "-q", folder.name], tmp_path)
        md5[version] = yaml.safe_load((tmp_path / f"{folder.name}.dvc").read_text())["outs"][0]["md5"]
    name = "continual"

    def register(where: str, data: str, predicts: int, allow_unchecked: bool = False) -> dict:
        history = _workspace(tmp_path / where, "positive", 0.9)
        _constant_model(tmp_path / where / "finetuned", predicts)
        return run(tmp_path / where / "prepared", tmp_path / where / "finetuned", tmp_path / where / "baselines",
                   {"finetuned": history}, tmp_path / where / "evaluate.json", tmp_path / where / "plots",
                   tmp_path / where / "export.json",
                   {"fp32": tmp_path / where / "model.onnx", "int8": tmp_path / where / "model_int8.onnx"},
                   tmp_path / where / "registered.json", mlflow_store,
                   RegisterParams(model_name=name, experiment="test", min_accuracy=0.7,
                                  allow_unchecked_previous_data=allow_unchecked),
                   {"git_commit": "abc", "params_sha256": where, "data_dvc_md5": md5[data]})

    first = register("a", "A", predicts=0)
    assert first["aliases"] == ["challenger"]
    assert {c["name"]: c["value"] for c in first["gate"]}["previous_data"] == "no earlier data version"
    forgot = register("b-forgot", "B", predicts=1)  # class 0 forgotten: 0.0 on version A's test set
    check = next(c for c in forgot["gate"] if c["name"] == "previous_data")
    assert not check["passed"] and check["value"] == f"-1.0000 vs v{first['version']}"
    assert forgot["aliases"] == [] and forgot["challenger_reason"] == "gate failed: previous_data"
    kept = register("b-kept", "B", predicts=0)  # still right on A's test set (the other checks use the tags)
    assert next(c for c in kept["gate"] if c["name"] == "previous_data")["passed"]
    assert kept["aliases"] == ["challenger"]
    client = MlflowClient()
    assert client.get_model_version(name, forgot["version"]).tags["gate.previous_data.passed"] == "false"

    # the old data version gone from the cache (dvc gc): the guard says so instead of guessing
    import shutil

    shutil.rmtree(tmp_path / ".dvc" / "cache")
    gone = register("b-gone", "B", predicts=1)
    check = next(c for c in gone["gate"] if c["name"] == "previous_data")
    assert check["value"] == f"not run: v{first['version']}'s test set is not in the DVC cache" and not check["passed"]
    assert gone["aliases"] == [] and gone["challenger_reason"] == (
        f"gate failed: previous_data; not run: previous_data ({check['value']})")  # fails closed
    allowed = register("b-gone-allowed", "B", predicts=0, allow_unchecked=True)  # opted in: passes, still says so
    check = next(c for c in allowed["gate"] if c["name"] == "previous_data")
    assert check["passed"] and check["value"].startswith("not run") and allowed["aliases"] == ["challenger"]
    assert allowed["challenger_reason"].startswith("all gate checks passed; not run: previous_data")


@pytest.mark.slow
def test_a_model_of_another_task_is_never_registered_under_the_same_name(tmp_path, mlflow_store, monkeypatch):
    """A 3-class model after a 10-class one under one registered name: refused, naming both, nothing added."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = "one-task-per-name"
    first = _register(tmp_path / "1", mlflow_store, "positive", 0.80, name)
    with pytest.raises(ValueError, match=r"version \d+ is a model of images, classes \['0', '1'.*this run's model is of "
                                         r"images, classes \['0', '1', '2'\]"):
        _register(tmp_path / "2", mlflow_store, "positive", 0.80, name, n_classes=3)
    assert [int(v.version) for v in MlflowClient().search_model_versions(f"name='{name}'")] == [first["version"]]


def test_two_stores_in_one_process_are_each_read_as_themselves(tmp_path, monkeypatch):
    """MLflow exports the URI it is given to MLFLOW_TRACKING_URI; Store.uri() reads that variable as the
    user's choice, so without care the first store used would answer for every later one."""
    import os

    from stages.registry import use

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a, b = Store(tmp_path / "a.db", tmp_path / "a"), Store(tmp_path / "b.db", tmp_path / "b")
    use(a)
    assert "MLFLOW_TRACKING_URI" not in os.environ and b.uri().endswith("/b.db")
    use(b)
    assert mlflow.get_tracking_uri().endswith("/b.db") and mlflow.get_registry_uri().endswith("/b.db")
    # a client given its own store reads that store's registry, whatever was used before
    assert MlflowClient(f"sqlite:///{tmp_path / 'a.db'}")._registry_uri.endswith("/a.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # the user's own server still wins
    assert a.uri() == "http://127.0.0.1:5000"


def test_the_gate_refuses_a_gain_the_training_seeds_disagree_on():
    report = _report(0.85, (0.01, 0.15))
    report["seeds"] = 3
    for c in report["vs"].values():
        c.update({"seed_gains": [0.08, -0.01, 0.06], "seeds_disagree": True, "verdict": "inconclusive"})
    [beats] = [c for c in gate(report, EXPORT, None, RegisterParams(model_name="m", experiment="e"))
               if c.name == "beats_alternatives"]
    assert not beats.passed and "seeds disagree" in beats.value and "3 training seeds" in beats.rule
