"""Source pre-training on tiny data, through the stages' own entry points: pretrain on five classes, then
prepare / select / finetune / baseline / evaluate on the other five from that checkpoint, with the domain
shift (select), forgetting and drift (evaluate) reported."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from stages import baseline, checkpoint, evaluate, finetune, prepare, pretrain, select, sources, zoo
from stages.params import Params, PrepareParams
from stages.sources import FASHION_MNIST_CLASSES

from .conftest import ROOT, tiny_params


@pytest.fixture
def project(tmp_path, tiny_source):
    path = tiny_params(tmp_path, tiny_source)
    raw = yaml.safe_load(path.read_text())
    shutil.copy(ROOT / "weights.lock", tmp_path / "weights.lock")  # pretrain records its checkpoint in it
    raw["paths"]["weights_lock"] = str(tmp_path / "weights.lock")
    checkpoint = raw["paths"]["pretrained"]
    raw["pretrain"].update(classes=FASHION_MNIST_CLASSES[:5], per_class=10, val_per_class=4, test_per_class=6,
                           image_size=32, epochs=2, batch_size=16)
    raw["prepare"]["classes"] = FASHION_MNIST_CLASSES[5:]
    raw["model"]["name"] = f"local:{checkpoint}"
    raw["select"]["candidates"] = [f"local:{checkpoint}", f"random:local:{checkpoint}"]
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_backbone_pretrained_on_the_source_classes_is_fine_tuned_on_the_others(project):
    params = Params.load(project)
    paths = params.paths
    pretrain.main(["--params", str(project)])
    meta = json.loads((paths.pretrained / "model.json").read_text())
    assert meta["classes"] == FASHION_MNIST_CLASSES[:5] and meta["kind"] == "pretrained"
    held = checkpoint.source_test(paths.pretrained)
    assert len(held.y) == 5 * 6 and set(held.y.tolist()) == set(range(5))
    report = json.loads(paths.pretrain_metrics.read_text())
    assert 0 <= report["test_accuracy"] <= 1
    lock = json.loads(paths.weights_lock.read_text())
    entry = lock[params.model.name]  # the checkpoint is pinned like any other weights
    assert entry["source"] == "local checkpoint" and set(entry["files"]) == {"model.safetensors", "model.json"}
    assert "timm:efficientnet_lite0" in lock  # the others are kept

    for stage in (prepare, select, finetune, baseline, evaluate):
        stage.main(["--params", str(project)])
    manifest = json.loads((paths.prepared / "manifest.json").read_text())
    assert manifest["classes"] == FASHION_MNIST_CLASSES[5:]
    shift = json.loads(paths.select_metrics.read_text())["candidates"][params.model.name]["domain_shift"]
    assert 0 <= shift["proxy_a_distance"] <= 2 and 0 < shift["mmd_p_value"] <= 1
    ev = json.loads(paths.evaluate_metrics.read_text())
    f = ev["forgetting"]
    assert f["source_classes"] == FASHION_MNIST_CLASSES[:5] and f["n_source_test"] == 30
    assert f["forgetting"] == pytest.approx(f["source_accuracy_before"] - f["source_accuracy_after"])
    assert f["forgetting_ci95"][0] <= f["forgetting"] <= f["forgetting_ci95"][1]
    # before fine-tuning, the checkpoint scores what the pretrain stage measured on the same examples
    assert f["source_accuracy_before"] == pytest.approx(report["test_accuracy"])
    assert set(ev["representation_drift"]["linear_cka"]) and ev["finetuned"]["accuracy"] >= 0

    # the checkpoint changes under its name: a fine-tune refuses it until it is locked again
    checkpoint.save_checkpoint(paths.pretrained, zoo.load_checkpoint(paths.pretrained)[0], meta | {"note": "changed"})
    with pytest.raises(ValueError, match="differ from the sha256"):
        finetune.main(["--params", str(project)])


def test_forgetting_is_zero_when_the_backbone_did_not_move(project):
    params = Params.load(project)
    pretrain.main(["--params", str(project)])
    loaded = zoo.load(params.model, 5, params.paths.weights_lock)  # the backbone as pre-trained, a new head
    f = evaluate.forgetting(loaded.model, params.paths.pretrained, 200, 0)
    assert f["forgetting"] == 0 and f["source_accuracy_before"] == f["source_accuracy_after"]
    assert evaluate.forgetting(loaded.model, ROOT / "stages", 200, 0) is None  # no source task: nothing to report


def test_keep_classes_renumbers_and_names_unknown_classes(tiny_source):
    src = sources.read("fashion-mnist", tiny_source, PrepareParams())
    kept = sources.keep_classes(src, ["Bag", "Trouser"])
    assert kept.classes == ["Bag", "Trouser"] and set(kept.pool.y.tolist()) == {0, 1}
    assert (kept.pool.y == 0).sum() == (src.pool.y == 8).sum()
    assert sources.keep_classes(src, None) is src
    with pytest.raises(ValueError, match=r"not among them: \['Boot'\]"):
        sources.keep_classes(src, ["Bag", "Boot"])


@pytest.mark.parametrize(("preset", "stages"), [(None, []), ("pretrain", ["pretrain/dvc.yaml:pretrain"]),
                                                ("text-dapt", ["pretrain/dvc.yaml:dapt"]), ("text", [])])
def test_the_flow_runs_the_pre_training_stages_a_task_uses_and_only_those(tmp_path, preset, stages):
    from flows import compose
    from flows.pipeline import pretrain_stages

    composed = compose.compose(preset, params_file=ROOT / "params.yaml", tasks_dir=ROOT / "tasks")
    assert pretrain_stages(compose.settings(composed)) == stages


def test_the_summary_warns_of_negative_transfer_only_when_the_shift_is_large_and_the_verdict_not_positive(
        tmp_path, tiny_source):
    from flows.summary import _transfer_notes
    from stages.files import write_json

    params = Params.load(tiny_params(tmp_path, tiny_source))
    write_json(params.paths.chosen_model, {"model": "local:models/pretrained"})
    ev = {"verdict": "inconclusive"}
    for pad, verdict, warned in ((1.6, "inconclusive", True), (1.6, "positive", False), (0.4, "negative", False)):
        write_json(params.paths.select_metrics, {"candidates": {"local:models/pretrained": {"domain_shift": {
            "proxy_a_distance": pad, "mmd2": 0.1, "mmd_p_value": 0.002}}}})
        notes = _transfer_notes(params, {**ev, "verdict": verdict})
        assert notes[0].startswith(f"domain shift, source -> target (before training): proxy A-distance {pad:.2f}")
        assert any(n.startswith("WARNING: the target data is far from") for n in notes) == warned, (pad, verdict)
