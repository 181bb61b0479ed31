"""ONNX export: no batch size baked into the graph (parity at batch 1, 7 and 64), and the int8 model."""

import numpy as np
import onnx
import pytest
import torch

from stages import zoo
from stages.export import export_onnx, onnx_logits, parity
from stages.modality import adapter
from stages.params import ExportParams, ModelParams
from stages.predict import predict
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pre = zoo.preprocessing("efficientnet_lite0", 32)
    torch.manual_seed(0)
    model = zoo.load(ModelParams(name="timm:efficientnet_lite0", image_size=32), 10, ROOT / "weights.lock").model
    model.eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(model, pre, path, opset=17)
    images = np.random.default_rng(0).integers(0, 256, (64, 28, 28), dtype=np.uint8)
    return model, pre, path, images


def test_the_batch_axis_is_symbolic(exported):
    _, _, path, _ = exported
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and not dims[0].dim_value
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_onnx_matches_pytorch_at_every_batch_size(exported, batch):
    model, pre, path, images = exported
    result, logits = parity(model, path, images[:batch], pre, ExportParams(batch_size=batch))
    assert logits.shape == (batch, 10)
    assert result["worst_tolerance_use"] <= 1
    assert result["top1_agreement"] == 1.0
    # the rule rests on a real measurement: fp32 is off from float64, by far less than a wrong weight moves things
    assert 0 < result["fp32_spread"] < 1e-4 and result["spread_examples"] == batch


def test_a_perturbed_onnx_weight_is_refused(exported, tmp_path):
    """One convolution's weights 1% off in the ONNX file: every prediction may still agree, but the logits
    move far beyond what fp32 rounding does, and the rule says so."""
    model, pre, path, images = exported
    graph = onnx.load(str(path))
    conv = next(t for t in graph.graph.initializer if len(t.dims) == 4 and t.dims[0] > 16)
    w = onnx.numpy_helper.to_array(conv)
    conv.CopyFrom(onnx.numpy_helper.from_array(w * 1.01, conv.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(graph, str(bad))
    result, _ = parity(model, bad, images, pre, ExportParams())
    assert result["worst_tolerance_use"] > 1, result
    good, _ = parity(model, path, images, pre, ExportParams())
    assert good["worst_tolerance_use"] <= 1 and result["max_row_deviation"] > 10 * good["max_row_deviation"]


def test_int8_model_runs_at_every_batch_size_and_tracks_fp32(exported, tmp_path):
    model, pre, path, images = exported
    out = tmp_path / "int8.onnx"
    adapter(pre).quantize_int8(path, out, images[:16], pre)
    assert out.stat().st_size < path.stat().st_size / 2
    assert not (tmp_path / "int8.prep.onnx").exists()
    fp32 = predict(model, images, pre)
    for batch in (1, 7, 64):
        logits = onnx_logits(out, images[:batch], pre, batch_size=batch)
        assert logits.shape == (batch, 10) and np.isfinite(logits).all()
    int8 = onnx_logits(out, images, pre, batch_size=64)
    # quantisation noise, not a different model: logits stay strongly correlated with fp32
    assert np.corrcoef(int8.ravel(), fp32.ravel())[0, 1] > 0.95


def test_evaluates_logits_are_reused_only_for_the_same_test_split_and_model(exported, tmp_path):
    """export proves its file against evaluate's PyTorch logits when they are for this test split and this
    model; another split's, or another model's name, is not used (read_logits says None: computed again)."""
    from stages.predict import read_logits, write_logits

    model, pre, path, images = exported
    reference = predict(model, images, pre)
    stored = tmp_path / "logits.npz"
    write_logits(stored, {"finetuned": reference, "scratch": reference + 1}, "sha-a")
    assert np.array_equal(read_logits(stored, "finetuned", "sha-a"), reference)
    assert read_logits(stored, "finetuned", "sha-b") is None  # evaluated on another test split
    assert read_logits(stored, "linear_probe", "sha-a") is None
    assert read_logits(tmp_path / "missing.npz", "finetuned", "sha-a") is None
    reused, _ = parity(model, path, images, pre, ExportParams(), read_logits(stored, "finetuned", "sha-a"))
    again, _ = parity(model, path, images, pre, ExportParams())
    assert reused == again
    # logits of another network under the right name are checked, not trusted: computed again, same result
    checked, _ = parity(model, path, images, pre, ExportParams(), read_logits(stored, "scratch", "sha-a"))
    assert checked == again
