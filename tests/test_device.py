"""Every stage runs its networks where HEADSTART_DEVICE says, not only `fit`: select's features, evaluate's
scores and CKA, export's PyTorch side. No GPU here, so the device other than the default is `meta` (shapes
without numbers): a network that ran there fails only when its numbers are read back, which is the proof
that it ran there."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages import zoo
from stages.params import ExportParams, ModelParams
from stages.predict import device, predict

from .conftest import ROOT

IMAGES = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
PRE = zoo.preprocessing("efficientnet_lite0", 32)
MODEL = ModelParams(name="timm:efficientnet_lite0", image_size=32)


def tiny() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(4, 2))


def test_the_setting_is_read_and_a_wrong_one_is_named(monkeypatch):
    monkeypatch.delenv("HEADSTART_DEVICE", raising=False)
    assert device() == torch.device("cuda" if torch.cuda.is_available() else "cpu", 0 if torch.cuda.is_available() else None)
    monkeypatch.setenv("HEADSTART_DEVICE", "cpu")
    assert device() == torch.device("cpu")
    monkeypatch.setenv("HEADSTART_DEVICE", "tpu-please")
    with pytest.raises(ValueError, match=r"HEADSTART_DEVICE='tpu-please' is not a device: use auto, cpu, cuda"):
        device()


def test_predict_runs_on_the_device_and_returns_the_model_where_it_was(monkeypatch):
    model, seen = tiny(), []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].device.type))
    monkeypatch.setenv("HEADSTART_DEVICE", "cpu")
    out = predict(model, IMAGES, PRE)
    assert out.shape == (6, 2) and seen == ["cpu"]
    assert next(model.parameters()).is_contiguous()  # back in the format safetensors saves
    monkeypatch.setenv("HEADSTART_DEVICE", "meta")
    with pytest.raises(NotImplementedError, match="meta"):
        predict(tiny(), IMAGES, PRE)


@pytest.fixture
def on_meta(monkeypatch):
    monkeypatch.setenv("HEADSTART_DEVICE", "meta")


def test_select_computes_its_features_on_the_device(on_meta):
    from stages.select import candidate_features
    from stages.splits import Split

    with pytest.raises(NotImplementedError, match="meta"):
        candidate_features(MODEL.name, MODEL, 10, Split(IMAGES, np.arange(6) % 2), ROOT / "weights.lock", None)


def test_evaluates_cka_runs_on_the_device(on_meta):
    from stages.evaluate import drift

    tuned = zoo.load(MODEL, 10, ROOT / "weights.lock").model
    with pytest.raises(NotImplementedError, match="meta"):
        drift(tuned, PRE, MODEL, ROOT / "weights.lock", IMAGES, 10, 6, 0)


def test_exports_pytorch_side_runs_on_the_device(on_meta, tmp_path):
    from stages.export import export_onnx, parity

    model = zoo.load(MODEL, 10, ROOT / "weights.lock").model.eval()
    export_onnx(model, PRE, tmp_path / "m.onnx", opset=17)  # the export itself traces on the CPU
    with pytest.raises(NotImplementedError, match="meta"):
        parity(model, tmp_path / "m.onnx", IMAGES, PRE, ExportParams())


def test_predict_scores_in_true_fp32_and_restores_the_tf32_settings(monkeypatch):
    """TF32 (cuDNN's default for convolutions on recent GPUs) moved logits by up to 0.3 on an H200 and failed
    export's parity: predict turns it off while it runs and gives the settings back as they were."""
    monkeypatch.setenv("HEADSTART_DEVICE", "cpu")
    model, seen = tiny(), []
    model.register_forward_pre_hook(
        lambda _m, _a: seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)))
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        predict(model, IMAGES, PRE)
        assert seen == [(False, False)]
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
