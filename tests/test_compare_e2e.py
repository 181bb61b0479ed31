"""`make compare` for real on tiny settings: the Prefect flow runs one DVC stage per strategy (real
Fashion-MNIST, the real pre-trained EfficientNet-Lite0), gathers metrics/strategies.json and its chart,
logs a nested MLflow run per strategy, and retrains only the entry whose settings changed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from stages.params import Params

from .conftest import ROOT, copy_project, flow_env, sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    if not Path(Params.load(ROOT / "params.yaml").paths.source, "train-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST is not installed: run `make data` (make test does it)")
    proj = copy_project(tmp_path_factory.mktemp("compare"))
    raw = yaml.safe_load((proj / "params.yaml").read_text())
    for section, values in yaml.safe_load((proj / "presets" / "smoke.yaml").read_text()).items():
        raw[section].update(values)
    raw["prepare"].update(per_class=10, val_per_class=5)
    raw["model"]["image_size"] = 32
    raw["finetune"]["epochs"] = 2
    raw["compare"]["strategies"] = {"full": {}, "lp_ft": {"strategy": "lp_ft", "layer_decay": 0.5},
                                    "lora": {"strategy": "lora"}}
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return proj


def test_compare_flow_writes_results_chart_and_nested_runs_and_caches_per_strategy(project):
    env = flow_env(project)
    first = sh([sys.executable, "-m", "flows.compare"], project, env)
    out = first.stdout + first.stderr
    for name in ("full", "lp_ft", "lora"):
        assert f"Running stage 'compare/dvc.yaml:compare@{name}'" in first.stdout, name
    params = Params.load(project / "params.yaml")
    summary = json.loads((project / params.paths.strategies_summary).read_text())
    assert set(summary["strategies"]) == {"full", "lp_ft"}  # LoRA: not applicable to an image backbone
    assert "LoRA adapts transformer text models" in summary["not_applicable"]["lora"]
    for name, r in summary["strategies"].items():
        lo, hi = r["accuracy_ci95"]
        assert 0 <= lo <= r["accuracy"] <= hi <= 1 and r["train_seconds"] > 0, name
        assert 0 < r["trainable_params"] <= r["total_params"], name
    assert summary["strategies"]["full"]["trainable_params"] == summary["strategies"]["full"]["total_params"]
    assert (project / params.paths.strategies_plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best on validation" in out

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / params.paths.mlflow_db}")
    exp = client.get_experiment_by_name(params.register.experiment)
    parent = client.search_runs([exp.experiment_id], "tags.`headstart.role` = 'compare'")
    assert len(parent) == 1
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    assert {r.data.tags["headstart.strategy"] for r in children} == {"full", "lp_ft"}
    lp_ft = next(r for r in children if r.info.run_name == "lp_ft")
    assert lp_ft.data.params["finetune.layer_decay"] == "0.5"
    assert lp_ft.data.metrics["test_accuracy"] == summary["strategies"]["lp_ft"]["accuracy"]

    # one entry's settings change: only that entry trains again
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["compare"]["strategies"]["lp_ft"]["layer_decay"] = 0.8
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    again = sh([sys.executable, "-m", "flows.compare"], project, env)
    ran = [n for n in ("full", "lp_ft", "lora") if f"Running stage 'compare/dvc.yaml:compare@{n}'" in again.stdout]
    assert ran == ["lp_ft"]
    lock = yaml.safe_load((project / "compare" / "dvc.lock").read_text())
    assert lock["stages"]["compare@lp_ft"]["params"][".headstart/params.yaml"]["run.compare.strategies.lp_ft"]["layer_decay"] == 0.8
