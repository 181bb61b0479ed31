"""`make curves` for real on tiny settings: the Prefect flow runs one DVC stage per point (real
Fashion-MNIST, the real pre-trained EfficientNet-Lite0), writes the curves with the label multiplier and
the plot, logs an MLflow run, and trains only the new points when the ladder grows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from stages.params import Params

from .conftest import ROOT, copy_project, flow_env, sh

pytestmark = pytest.mark.slow


def test_curves_flow_writes_the_curves_and_trains_only_new_points(tmp_path):
    if not Path(Params.load(ROOT / "params.yaml").paths.source, "train-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST is not installed: run `make data` (make test does it)")
    project = copy_project(tmp_path)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["prepare"].update(per_class=5, val_per_class=2, test_per_class=2)
    raw["finetune"]["batch_size"] = 8
    raw["select"]["candidates"] = ["timm:efficientnet_lite0"]
    # the auto schedule capped at 3 steps: one pass at either budget (3 and 5 steps at batch 8; at least one pass)
    raw["curves"].update(budgets=[2, 4], seeds=[0, 1], val_per_class=2, test_per_class=3, image_size=32,
                         schedule="auto", max_steps=3, multiplier_at=2)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = flow_env(project)

    first = sh([sys.executable, "-m", "flows.curves"], project, env)
    ran = [ln for ln in first.stdout.splitlines() if "Running stage 'curves/dvc.yaml:curve@" in ln]
    assert len(ran) == 2 * 2 * 2  # models x budgets x seeds
    params = Params.load(project / "params.yaml")
    out = json.loads((project / params.paths.label_efficiency).read_text())
    assert out["budgets"] == [2, 4] and out["seeds"] == [0, 1] and out["settings"]["n_test"] == 30
    for model in ("finetuned", "scratch"):
        for b in ("2", "4"):
            point = out["curves"][model][b]
            assert point["ci95"][0] <= point["mean"] <= point["ci95"][1] and len(point["per_seed"]) == 2
    assert set(out["label_multiplier"]) >= {"at", "multiplier", "more_than", "ci95"}
    assert out["settings"]["schedule"] == "auto" and set(out["time_to_scratch_best"]) == {"2", "4"}
    point = json.loads((project / params.paths.curves / "scratch-4-1.json").read_text())
    assert point["schedule"] == "auto" and point["epochs"] == 1 and len(point["history"]) == point["epochs_run"] == 1
    assert (project / params.paths.label_efficiency_plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "scratch needs" in first.stdout + first.stderr

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / params.paths.mlflow_db}")
    exp = client.get_experiment_by_name(params.register.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`headstart.role` = 'curves'")
    assert len(runs) == 1 and runs[0].data.metrics["finetuned_accuracy"] == out["curves"]["finetuned"]["4"]["mean"]

    # a longer ladder: only the new budget's points train
    raw["curves"]["budgets"] = [2, 4, 6]
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    again = sh([sys.executable, "-m", "flows.curves"], project, env)
    ran = sorted(ln.split("curve@")[1].rstrip("':") for ln in again.stdout.splitlines()
                 if "Running stage 'curves/dvc.yaml:curve@" in ln)
    assert ran == ["finetuned-6-0", "finetuned-6-1", "scratch-6-0", "scratch-6-1"]
    assert json.loads((project / params.paths.label_efficiency).read_text())["budgets"] == [2, 4, 6]
