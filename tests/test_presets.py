"""Presets (partial params files) and the deploy command's refusal without a Prefect server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from flows import compose
from stages.sources import FASHION_MNIST_CLASSES
from stages.params import RUN_PARAMS, Params

from .conftest import ROOT, flow_env, sh


def composed(task: str | None, *presets: Path) -> Params:
    return compose.settings(compose.compose(task, presets, params_file=ROOT / "params.yaml", tasks_dir=ROOT / "tasks"))


def test_smoke_preset_applies_over_params_yaml_without_writing_it():
    overrides = compose.read_partial(ROOT / "presets/smoke.yaml")
    assert overrides["finetune.epochs"] == 5 and overrides["finetune.probe_c"] == [1.0]
    before = (ROOT / "params.yaml").read_text()
    p = composed("image", ROOT / "presets/smoke.yaml")
    assert (p.finetune.epochs, p.model.image_size, p.prepare.per_class) == (5, 48, 20)
    assert (ROOT / "params.yaml").read_text() == before


OTHERS = ("text", "text-dapt", "pretrain")


@pytest.mark.parametrize("other", OTHERS)
def test_the_image_task_is_exactly_the_committed_settings(other):
    """`make run TASK=text` (or pretrain) then `make run TASK=image` must land on exactly the committed image
    settings, or DVC's run cache would not recognise them and the image models would retrain."""
    text, image = compose.read_partial(ROOT / f"tasks/{other}.yaml"), compose.read_partial(ROOT / "tasks/image.yaml")
    assert set(text) == set(image)  # every task file sets the same keys: switching leaves nothing behind
    committed = Params.load(ROOT / "params.yaml")
    assert composed("image") == committed == composed(None)  # params.yaml is the image task's settings
    own = compose.flatten(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert {k: own[k] for k in image} == image  # and image.yaml holds the committed values
    p = composed(other)
    if other.startswith("text"):
        assert (p.prepare.dataset, p.model.name, p.prepare.test_per_class) == (
            "wordnet", "hf:models/dapt" if other == "text-dapt" else "hf:sentence-transformers/all-MiniLM-L6-v2", 200)
    else:
        assert (p.model.name, p.prepare.classes) == ("local:models/pretrained", list(FASHION_MNIST_CLASSES[5:]))
    assert p.task == other


def test_a_preset_with_an_unknown_key_is_refused_naming_it(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("finetune:\n  epoch: 1\n")
    with pytest.raises(KeyError, match="no key 'epoch' under finetune"):
        composed("image", preset)
    preset.write_text("- just a list\n")
    with pytest.raises(ValueError, match="a preset is a mapping"):
        compose.read_partial(preset)


def test_the_composed_file_is_what_params_load_reads(tmp_path):
    out = compose.write(compose.compose("text", [ROOT / "presets/smoke.yaml"], {"finetune.epochs": 2},
                                        params_file=ROOT / "params.yaml", tasks_dir=ROOT / "tasks"), tmp_path / "run.yaml")
    p = Params.load(out)
    assert (p.task, p.finetune.epochs, p.prepare.dataset) == ("text", 2, "wordnet")


def test_deploy_without_a_prefect_server_says_how_to_start_one(tmp_path):
    res = sh([sys.executable, "-m", "flows.deploy"], ROOT, flow_env(tmp_path), check=False)
    assert res.returncode != 0
    assert "PREFECT_API_URL is not set" in res.stderr and "make prefect-server" in res.stderr


def test_the_replicate_folder_follows_the_seeds_the_settings_train(tmp_path):
    """evaluate.seeds: 3 composes the replicate entries 1 and 2 for dvc.yaml; writing the settings leaves
    paths.replicates holding those seeds' outputs only (evaluate depends on the folder), with its .gitignore."""
    three = compose.compose(None, (), {"evaluate.seeds": 3}, params_file=ROOT / "params.yaml",
                               tasks_dir=ROOT / "tasks")
    assert three["replicates"] == [1, 2]
    folder = tmp_path / three["run"]["paths"]["replicates"]
    for seed in ("1", "2", "5"):
        (folder / seed).mkdir(parents=True)
    compose.write(three, tmp_path / RUN_PARAMS)
    assert sorted(p.name for p in folder.iterdir()) == [".gitignore", "1", "2"]
    one = compose.compose(None, (), {}, params_file=ROOT / "params.yaml", tasks_dir=ROOT / "tasks")
    assert one["replicates"] == []
    compose.write(one, tmp_path / RUN_PARAMS)
    assert [p.name for p in folder.iterdir()] == [".gitignore"]
    assert (ROOT / three["run"]["paths"]["replicates"] / ".gitignore").read_text() == compose.REPLICATES_GITIGNORE
