"""The real thing on tiny settings: `python -m flows.pipeline` (Prefect's temporary server, DVC, the
stages, a SQLite MLflow store) in a fresh copy of the project, on real Fashion-MNIST and real
pre-trained weights, with presets/smoke.yaml: 20 labels per class, 48 px, 5 epochs, 200 test images."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stages.files import sha256_file
from stages.params import RUN_PARAMS, Params

from .conftest import ROOT, copy_project, flow_env, http_server, sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    if not Path(Params.load(ROOT / "params.yaml").paths.source, "train-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST is not installed: run `make data` (make test does it)")
    return copy_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def first_run(project: Path) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "flows.pipeline", "--preset", "presets/smoke.yaml"]
    return sh(args, project, flow_env(project))


def test_flow_runs_every_stage_and_writes_every_declared_output(project, first_run):
    params = Params.load(project / "params.yaml")
    for stage in ("prepare", "select", "finetune", "baseline", "evaluate", "export", "register"):
        assert f"Running stage '{stage}'" in first_run.stdout, stage
    for name, path in dataclasses.asdict(params.paths).items():
        # written by make compare, make curves and the pre-training stages, not by the pipeline
        if name in ("source", "mlflow_artifacts") or name.startswith(("strategies", "curves", "label_efficiency",
                                                                        "pretrain", "dapt")):
            continue
        if name == "checkpoints":  # training state, emptied once training completes
            assert not (project / path).exists() or not any((project / path).rglob("state.pt"))
            continue
        assert (project / path).exists(), f"paths.{name} = {path} was not written"
    for sub in ("scratch", "linear_probe", "floor"):
        assert (project / params.paths.baselines / sub / "model.safetensors").exists()
    assert "verdict" in first_run.stdout and "make ui" in first_run.stdout  # the summary table


def test_overrides_are_recorded_by_dvc_and_nothing_is_left_stale(project, first_run):
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert list(lock["stages"]) == ["prepare", "select", "finetune", "baseline", "evaluate", "export", "register"]
    assert lock["stages"]["finetune"]["params"][".headstart/params.yaml"]["run.finetune"]["epochs"] == 5
    assert (project / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()  # read, never written
    assert sh(["git", "status", "--porcelain", "--", "params.yaml", "tasks", "presets", ".headstart"], project).stdout == ""
    status = sh([sys.executable, "-m", "dvc", "status", "--json", "dvc.yaml"], project)  # not compare/
    assert json.loads(status.stdout) == {}  # `dvc repro` alone would now do nothing: same record


def test_evaluate_metrics_contract(project, first_run):
    ev = json.loads((project / "metrics/evaluate.json").read_text())
    for name in ("finetuned", "scratch", "linear_probe", "floor"):
        m = ev[name]
        lo, hi = m["accuracy_ci95"]
        assert 0 <= lo <= m["accuracy"] <= hi <= 1
        assert 0 <= m["macro_f1"] <= 1
        assert len(m["per_class_accuracy"]) == 10
    lo, hi = ev["transfer_gain_ci95"]
    assert lo <= ev["transfer_gain"] <= hi
    assert ev["transfer_gain"] == pytest.approx(ev["finetuned"]["accuracy"] - ev["scratch"]["accuracy"])
    assert 0 <= ev["mcnemar_p"] <= 1
    assert ev["transfer_verdict"] == ("positive" if lo > 0 else "negative" if hi < 0 else "inconclusive")
    # the verdict answers against the best alternative, each alternative with its own paired interval
    assert set(ev["vs"]) == {"scratch", "linear_probe", "floor"}
    alt = ev["best_alternative"]
    assert ev[alt]["accuracy"] == max(ev[m]["accuracy"] for m in ev["vs"])
    for m, c in ev["vs"].items():
        assert c["gain"] == pytest.approx(ev["finetuned"]["accuracy"] - ev[m]["accuracy"])
        assert c["gain_ci95"][0] <= c["gain"] <= c["gain_ci95"][1]
    lo, hi = ev["vs"][alt]["gain_ci95"]
    assert ev["verdict"] == ("positive" if lo > 0 else "negative" if hi < 0 else "inconclusive")
    assert ev[ev["best"]]["accuracy"] == max(ev[m]["accuracy"] for m in ("finetuned", *ev["vs"]))
    summary = json.loads((project / "reports/image/summary.json").read_text())
    assert summary["best"] == ev["best"] and summary["verdict"] == ev["verdict"]
    assert summary["models"]["floor"]["val_accuracy"] == ev["floor"]["val_accuracy"]
    # smoke ships the fine-tuned network whatever wins (presets/smoke.yaml); the answer still names the winner
    assert Params.load(project / RUN_PARAMS).register.candidate == "finetuned"  # the run's composed settings
    assert summary["registered"]["candidate"] == "finetuned" and summary["best"] == ev["best"]
    assert ev["n_test"] == 200
    assert ev["finetuned"]["accuracy"] > 0.3  # even the smoke settings learn (chance is 0.1)
    assert sorted(p.name for p in (project / "plots/evaluate").iterdir()) == [
        "confusion_finetuned.png", "confusion_floor.png", "confusion_linear_probe.png", "confusion_scratch.png"]


def test_onnx_export_matches_pytorch_on_the_test_set(project, first_run):
    ex = json.loads((project / "metrics/export.json").read_text())
    assert ex["n_examples"] == 200
    assert ex["top1_agreement"] >= 0.999
    assert ex["worst_tolerance_use"] <= 1
    assert ex["max_abs_diff"] < 1e-2
    assert (project / ex["onnx_path"]).stat().st_size > 1_000_000
    # the int8 model: smaller, scored on the same test set, accepted exactly when within the allowed drop
    assert ex["int8_size_bytes"] < ex["size_bytes"] / 2
    assert ex["int8_relative_drop"] == pytest.approx((ex["fp32_accuracy"] - ex["int8_accuracy"]) / ex["fp32_accuracy"])
    assert ex["int8_accepted"] == (ex["int8_relative_drop"] <= Params.load(project / "params.yaml").export.int8_max_relative_drop)
    assert ex["fp32_accuracy"] == pytest.approx(json.loads((project / "metrics/evaluate.json").read_text())[ex["model"]]["accuracy"], abs=0.01)


def test_registered_version_lineage_and_alias_rule(project, first_run):
    from mlflow.tracking import MlflowClient

    receipt = json.loads((project / "reports/registered.json").read_text())
    ev = json.loads((project / "metrics/evaluate.json").read_text())
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    version = client.get_model_version(receipt["model_name"], receipt["version"])
    head = sh(["git", "rev-parse", "HEAD"], project).stdout.strip()
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    prepared_md5 = lock["stages"]["prepare"]["outs"][0]["md5"]
    assert version.tags["git_commit"].startswith(head)
    assert version.tags["data_dvc_md5"] == prepared_md5
    assert version.tags["params_sha256"] == Params.load(project / RUN_PARAMS).digest()
    assert version.tags["verdict"] == ev["verdict"]
    assert float(version.tags["transfer_gain"]) == pytest.approx(ev["transfer_gain"], abs=1e-6)
    # the candidate the params name is what was registered (smoke: finetuned), and the run's best is recorded
    assert version.tags["candidate"] == receipt["candidate"] == "finetuned" and version.tags["best"] == ev["best"]
    pretrained = receipt["candidate"] in ("finetuned", "linear_probe")
    assert len(version.tags["pretrained_sha256"]) == (64 if pretrained else 0)
    # the gate, check by check; challenger exactly when every check passed
    checks = ("min_accuracy", "beats_alternatives", "onnx_parity", "vs_champion")
    passed = {c: version.tags[f"gate.{c}.passed"] for c in checks}
    assert set(passed.values()) <= {"true", "false"}
    assert passed["beats_alternatives"] == str(ev["vs"][ev["best_alternative"]]["gain_ci95"][0] > 0).lower()
    assert passed["onnx_parity"] == "true" and passed["vs_champion"] == "true"  # no champion in a fresh store
    assert version.tags["gate.passed"] == str(all(v == "true" for v in passed.values())).lower()
    assert ("challenger" in receipt["aliases"]) == (version.tags["gate.passed"] == "true")
    assert version.description.startswith(f"# {receipt['model_name']} version {receipt['version']}")
    assert sorted(version.aliases) == receipt["aliases"]
    # the ONNX files and their serving contract went to the run of the registered version, each file's
    # sha256 on the version (what a server checks before serving it)
    assert [a.path for a in client.list_artifacts(receipt["run_id"], "onnx")] == [
        "onnx/model.onnx", "onnx/model_int8.onnx", "onnx/serving.json"]
    assert version.tags["onnx_sha256"] == sha256_file(project / "models/onnx/model.onnx")
    assert version.tags["serving_sha256"] == sha256_file(project / "models/onnx/serving.json")
    assert float(version.tags["onnx_top1_agreement"]) >= 0.999
    # one parent run with a nested run per model
    runs = client.search_runs([client.get_experiment_by_name("headstart").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["finetuned", "floor", "linear_probe", "pipeline", "scratch"]


def test_second_run_with_nothing_changed_retrains_nothing(project, first_run):
    model = project / "models/finetuned/model.safetensors"
    before = model.stat().st_mtime_ns, (project / "reports/registered.json").read_text()
    start = time.perf_counter()
    res = sh([sys.executable, "-m", "flows.pipeline", "--preset", "presets/smoke.yaml"], project, flow_env(project))
    seconds = time.perf_counter() - start
    assert "nothing to retrain" in res.stdout
    assert "Running stage" not in res.stdout
    assert (model.stat().st_mtime_ns, (project / "reports/registered.json").read_text()) == before
    assert seconds < 60, f"a no-op run took {seconds:.0f}s"


def test_mlflow_ui_serves_the_registered_version_and_alias(project, first_run):
    """What `make ui` shows: a real `mlflow ui` process on the project's store, asked over HTTP."""
    import urllib.request

    receipt = json.loads((project / "reports/registered.json").read_text())
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    cmd = [mlflow_bin, "ui", "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}", "--host", "127.0.0.1",
           "--port", "{port}"]
    query = f"/api/2.0/mlflow/model-versions/get?name={receipt['model_name']}&version={receipt['version']}"
    with http_server(cmd, query, project) as (base, body):
        mv = body["model_version"]
        tags = {t["key"]: t["value"] for t in mv.get("tags", [])}
        assert tags["verdict"] == json.loads((project / "metrics/evaluate.json").read_text())["verdict"]
        assert sorted(mv.get("aliases", [])) == receipt["aliases"]
        with urllib.request.urlopen(f"{base}/", timeout=10) as r:
            assert r.status == 200  # the UI page itself


def test_server_resolves_an_alias_and_answers_image_files_as_evaluate_did(project, first_run):
    """A person sets `champion` (here through the client, as the UI does); the server serves that version,
    and test images posted as PNG files get the labels the evaluate stage gave them."""
    import csv

    from mlflow.tracking import MlflowClient

    from stages.splits import load_split

    from .test_serve import multipart, png, post

    from stages.promotion import promote_version
    from stages.registry import Store

    receipt = json.loads((project / "reports/registered.json").read_text())
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    # champion, forced with a reason when the smoke model's gate failed (the server refuses it otherwise)
    passed = receipt["challenger_reason"].startswith("all gate checks passed")
    promote_version(Store(project / "mlflow.db", project / "mlartifacts"), receipt["model_name"], receipt["version"],
                    force=not passed, reason="" if passed else "end-to-end test of serving the smoke model")
    cmd = [sys.executable, "-m", "ops.serve", "--model", receipt["model_name"], "--alias", "champion",
           "--port", "{port}"]
    try:
        with http_server(cmd, "/health", project, flow_env(project)) as (base, health):
            assert health["version"] == str(receipt["version"]) and health["model"] == receipt["model_name"]
            test = load_split(project / "data/prepared", "test")
            status, body = post(f"{base}/predict", *multipart([(f"{i}.png", png(x)) for i, x in enumerate(test.x[:20])]))
            assert status == 200, body
            assert body["version"] == str(receipt["version"]) and len(body["predictions"]) == 20
            with open(project / "metrics/predictions.csv") as f:
                evaluated = [row[receipt["candidate"]] for row in csv.DictReader(f)][:20]
            assert [p["label"] for p in body["predictions"]] == evaluated
    finally:
        client.delete_registered_model_alias(receipt["model_name"], "champion")


def test_report_from_the_real_run(project, first_run):
    """What the pull-request workflow posts: `python -m ops.report --base <rev>`, also written to a file."""
    res = sh([sys.executable, "-m", "ops.report", "--base", "HEAD"], project, flow_env(project))
    text = (project / "reports/report.md").read_text()
    assert text == res.stdout.rstrip("\n") + "\n"
    ev = json.loads((project / "metrics/evaluate.json").read_text())
    receipt = json.loads((project / "reports/registered.json").read_text())
    assert f"**Verdict: {ev['verdict']}**" in text and f"**Transfer verdict: {ev['transfer_verdict']}**" in text
    assert f"| finetuned | {ev['finetuned']['accuracy']:.4f} |" in text
    assert f"version {receipt['version']}" in text
    assert len(receipt["gate"]) == 5 and all(f"| {c['name']} |" in text for c in receipt["gate"])
    assert "| metrics/evaluate.json | finetuned.accuracy | – |" in text  # HEAD of the copy has no metrics yet
    assert "- `plots/evaluate/confusion_finetuned.png`" in text


def test_switching_to_the_text_demo_and_back_retrains_nothing(project, first_run):
    """`make run TASK=text` then `make run TASK=image`: the text demo (WordNet glosses, the packaged MiniLM;
    tiny here, with a second training seed) runs every stage, and going back to the image settings (one
    seed) restores every image output from DVC's run cache, byte for byte, without training anything.
    Runs last: it changes the workspace."""
    if not Path("/usr/share/wordnet/data.noun").exists():
        pytest.fail("WordNet is not installed: run `make data TASK=text` (make test does it)")
    image_outputs = {p: (project / p).read_bytes() for p in (
        "models/finetuned/model.safetensors", "models/baselines/scratch/model.safetensors",
        "models/onnx/model.onnx", "metrics/evaluate.json", "reports/registered.json")}
    tiny = ["--set", "prepare.per_class=4", "--set", "prepare.val_per_class=2", "--set", "prepare.test_per_class=5",
            "--set", "finetune.epochs=1", "--set", "evaluate.seeds=2"]
    text = sh([sys.executable, "-m", "flows.pipeline", "--task", "text", *tiny], project, flow_env(project))
    for stage in ("prepare", "finetune", "baseline", "replicate@1", "evaluate", "export", "register"):
        assert f"Running stage '{stage}'" in text.stdout, stage
    ev = json.loads((project / "metrics/evaluate.json").read_text())
    assert ev["n_test"] == 50 and len(ev["finetuned"]["per_class_accuracy"]) == 10
    # the verdict rests on both seeds: seed 1's models are trained by replicate@1, scored, and resampled
    assert ev["seeds"] == 2 and len(ev["finetuned"]["seed_accuracies"]) == 2
    assert all(len(c["seed_gains"]) == 2 for c in ev["vs"].values())
    assert "2 training seeds" in text.stdout  # the summary says what the verdict rests on
    assert json.loads((project / "metrics/export.json").read_text())["parity_passed"]
    assert json.loads((project / "reports/registered.json").read_text())["model_name"] == "headstart-wordnet-topics"

    assert json.loads((project / "reports/text/summary.json").read_text())["registered"]["model_name"] == \
        "headstart-wordnet-topics"
    back = sh([sys.executable, "-m", "flows.pipeline", "--task", "image", "--preset", "presets/smoke.yaml"], project,
              flow_env(project))
    # prepare may run again (a second of reading; DVC keeps no run cache for it here), but writes the same
    # bytes, so every later stage is found in the run cache: nothing trains, evaluates or exports again.
    for stage in ("finetune", "baseline", "evaluate", "export", "register"):
        assert f"stage {stage}: restored from DVC's run cache" in back.stdout + back.stderr, stage
    assert [s for s in ("finetune", "baseline", "evaluate", "export", "register")
            if f"Running stage '{s}'" in back.stdout] == []
    assert {p: (project / p).read_bytes() for p in image_outputs} == image_outputs
    status = sh([sys.executable, "-m", "dvc", "status", "--json", "dvc.yaml"], project)  # not compare/
    assert json.loads(status.stdout) == {}
    assert sh(["git", "status", "--porcelain", "--", "params.yaml", "tasks", "presets", ".headstart"], project).stdout == ""
