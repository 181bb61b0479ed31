"""Presets (partial params files) and the deploy command's refusal without a Prefect server."""

from __future__ import annotations

import sys

import pytest

from flows.pipeline import apply_overrides, read_preset
from stages.params import Params
from stages.sources import FASHION_MNIST_CLASSES

from .conftest import ROOT, flow_env, sh


def test_smoke_preset_flattens_to_valid_overrides(tmp_path):
    overrides = read_preset(ROOT / "presets/smoke.yaml")
    assert overrides["finetune.epochs"] == 5 and overrides["finetune.probe_c"] == [1.0]
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    apply_overrides(params, overrides)
    p = Params.load(params)
    assert (p.finetune.epochs, p.model.image_size, p.prepare.per_class) == (5, 48, 20)
    assert "# labelled training examples per class" in params.read_text()  # the file keeps its comments


OTHERS = ("text", "text-dapt", "pretrain")


@pytest.mark.parametrize("other", OTHERS)
def test_the_image_preset_resets_everything_the_other_presets_set(tmp_path, other):
    """`make run TASK=text` (or pretrain) then `make run TASK=image` must land on exactly the committed image
    settings, or DVC's run cache would not recognise them and the image models would retrain."""
    text, image = read_preset(ROOT / f"tasks/{other}.yaml"), read_preset(ROOT / "tasks/image.yaml")
    assert set(text) == set(image)  # every task preset sets the same keys: switching leaves nothing behind
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    committed = Params.load(params)
    apply_overrides(params, image)
    assert Params.load(params) == committed  # image.yaml holds the committed values
    apply_overrides(params, text)
    p = Params.load(params)
    if other.startswith("text"):
        assert (p.prepare.dataset, p.model.name, p.prepare.test_per_class) == (
            "wordnet", "hf:models/dapt" if other == "text-dapt" else "hf:sentence-transformers/all-MiniLM-L6-v2", 200)
    else:
        assert (p.model.name, p.prepare.classes) == ("local:models/pretrained", list(FASHION_MNIST_CLASSES[5:]))
    apply_overrides(params, image)
    assert Params.load(params) == committed
    assert params.read_text() == (ROOT / "params.yaml").read_text()  # byte for byte: comments, 1.0e-3, [a, b]


def test_a_preset_with_an_unknown_key_is_refused_naming_it(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("finetune:\n  epoch: 1\n")
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    with pytest.raises(KeyError, match="no key 'epoch' under finetune"):
        apply_overrides(params, read_preset(preset))
    preset.write_text("- just a list\n")
    with pytest.raises(SystemExit, match="a preset is a mapping"):
        read_preset(preset)


def test_deploy_without_a_prefect_server_says_how_to_start_one(tmp_path):
    res = sh([sys.executable, "-m", "flows.deploy"], ROOT, flow_env(tmp_path), check=False)
    assert res.returncode != 0
    assert "PREFECT_API_URL is not set" in res.stderr and "make prefect-server" in res.stderr
