"""The model server, as a user meets it: a real process on localhost, real HTTP requests."""

import json
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from flows.serve import validate_images
from stages import zoo
from stages.params import ModelParams
from stages.export import export_onnx, onnx_logits

from .conftest import ROOT, http_server


def test_validation_names_the_problem():
    ok = validate_images([[[0] * 28] * 28], (28, 28), 4)
    assert ok.shape == (1, 28, 28) and ok.dtype == np.uint8
    with pytest.raises(ValueError, match=r"shape \[28, 28\].*got \[27, 28\]"):
        validate_images([[[0] * 28] * 27], (28, 28), 4)
    with pytest.raises(ValueError, match="at most 4"):
        validate_images([[[0] * 28] * 28] * 5, (28, 28), 4)
    with pytest.raises(ValueError, match="from 0 to 255"):
        validate_images([[[300] * 28] * 28], (28, 28), 4)
    with pytest.raises(ValueError, match="from 0 to 255"):
        validate_images([[[0.5] * 28] * 28], (28, 28), 4)
    with pytest.raises(ValueError, match="non-empty list"):
        validate_images([], (28, 28), 4)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_server_answers_real_requests_and_refuses_bad_ones(tmp_path):
    pre = zoo.preprocessing("efficientnet_lite0", 32)
    torch.manual_seed(0)
    model = zoo.load(ModelParams(name="timm:efficientnet_lite0", image_size=32), 10, ROOT / "weights.lock").model
    classes = [f"class{i}" for i in range(10)]
    zoo.save_checkpoint(tmp_path / "ckpt", model, {"architecture": "efficientnet_lite0", "classes": classes,
                                                   "preprocessing": pre})
    export_onnx(model.eval(), pre, tmp_path / "model.onnx", opset=17)
    cmd = [sys.executable, "-m", "flows.serve", "--checkpoint", str(tmp_path / "ckpt"), "--onnx",
           str(tmp_path / "model.onnx"), "--port", "{port}", "--max-batch", "8", "--max-body-bytes", "200000"]
    with http_server(cmd, "/health", ROOT) as (base, health):
        assert health["status"] == "ok" and health["classes"] == classes

        images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
        status, body = _post(f"{base}/predict", json.dumps({"images": images.tolist()}).encode())
        assert status == 200, body
        expected = onnx_logits(tmp_path / "model.onnx", images, pre, batch_size=3).argmax(1)
        assert [p["label"] for p in body["predictions"]] == expected.tolist()
        assert all(0 < p["probability"] <= 1 and p["class"] == classes[p["label"]] for p in body["predictions"])

        status, body = _post(f"{base}/predict", json.dumps({"images": [[[0] * 28] * 20]}).encode())
        assert status == 422 and "shape [28, 28]" in body["detail"]
        status, body = _post(f"{base}/predict", json.dumps({"images": [[[0] * 28] * 28] * 9}).encode())
        assert status == 422 and "at most 8" in body["detail"]
        status, body = _post(f"{base}/predict", b"not json")
        assert status == 422
        status, body = _post(f"{base}/predict", b" " * 300_000)
        assert status == 413
