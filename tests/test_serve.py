"""The model server, as a user meets it: a real process on localhost, real HTTP requests."""

import json
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from flows.serve import ModelService, validate_images, validate_texts
from stages import text, zoo
from stages.params import ModelParams
from stages.export import export_onnx, onnx_logits

from .conftest import ROOT, http_server, tiny_hf_model


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


def test_text_validation_names_the_problem():
    ok = validate_texts(["a dog", "bread"], 4)
    assert ok.dtype == object and ok.tolist() == ["a dog", "bread"]
    with pytest.raises(ValueError, match="non-empty list"):
        validate_texts([], 4)
    with pytest.raises(ValueError, match="non-empty list"):
        validate_texts("a dog", 4)
    with pytest.raises(ValueError, match="at most 4"):
        validate_texts(["a"] * 5, 4)
    with pytest.raises(ValueError, match=r"texts\[1\] is int, not a string"):
        validate_texts(["a", 3], 4)
    with pytest.raises(ValueError, match=r"texts\[0\] is empty"):
        validate_texts(["  "], 4)


def _text_checkpoint(tmp_path):
    """A tiny random BERT classifier saved as the finetune stage saves one, and its ONNX export."""
    folder = tiny_hf_model(tmp_path / "bert", "bert")
    torch.manual_seed(0)
    model = text.TextClassifier(text.encoder(folder, pretrained=True), "mean", 3).eval()
    pre = zoo.text_preprocessing(folder, 16, "mean")
    classes = ["animal", "food", "feeling"]
    zoo.save_checkpoint(tmp_path / "ckpt", model, {"architecture": f"hf:{folder}", "classes": classes,
                                                   "preprocessing": pre})
    export_onnx(model, pre, tmp_path / "model.onnx", opset=17)
    return tmp_path / "ckpt", tmp_path / "model.onnx", pre, classes


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


@pytest.mark.slow
def test_server_answers_text_requests_with_the_checkpoints_tokenizer(tmp_path):
    ckpt, onnx_path, pre, classes = _text_checkpoint(tmp_path)
    cmd = [sys.executable, "-m", "flows.serve", "--checkpoint", str(ckpt), "--onnx", str(onnx_path),
           "--port", "{port}", "--max-batch", "4"]
    with http_server(cmd, "/health", ROOT) as (base, health):
        assert health["input"] == "texts" and health["max_length"] == 16 and health["classes"] == classes

        texts = ["a domestic animal that barks at the postman", "rye bread", "a feeling of deep sadness " * 10]
        status, body = _post(f"{base}/predict", json.dumps({"texts": texts}).encode())
        assert status == 200, body
        # the same logits offline, each text padded to the longest of the batch and the long one truncated
        expected = onnx_logits(onnx_path, np.array(texts, dtype=object), pre, batch_size=3).argmax(1)
        assert [p["label"] for p in body["predictions"]] == expected.tolist()
        assert all(p["class"] == classes[p["label"]] for p in body["predictions"])

        status, body = _post(f"{base}/predict", json.dumps({"images": [[[0] * 28] * 28]}).encode())
        assert status == 422 and "key 'texts'" in body["detail"] and "text model" in body["detail"]
        status, body = _post(f"{base}/predict", json.dumps({"texts": ["ok", None]}).encode())
        assert status == 422 and "texts[1] is NoneType" in body["detail"]
        status, body = _post(f"{base}/predict", json.dumps({"texts": ["a"] * 5}).encode())
        assert status == 422 and "at most 4" in body["detail"]


def test_a_registered_text_model_is_fetched_with_its_tokenizer_and_without_its_weights(tmp_path, mlflow_store):
    import mlflow
    from mlflow.tracking import MlflowClient

    from stages.register import fetch_alias

    ckpt, onnx_path, pre, classes = _text_checkpoint(tmp_path)
    mlflow.set_tracking_uri(mlflow_store.uri())
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(ckpt), artifact_path="checkpoint")
        mlflow.log_artifact(str(onnx_path), artifact_path="onnx")
    client = MlflowClient()
    client.create_registered_model("tiny-text")
    mv = client.create_model_version("tiny-text", source=f"{run.info.artifact_uri}/checkpoint", run_id=run.info.run_id)
    client.set_registered_model_alias("tiny-text", "champion", mv.version)

    version, checkpoint_json, onnx_file = fetch_alias(mlflow_store, "tiny-text", "champion", tmp_path / "served")
    assert version == str(mv.version) and onnx_file.name == "model.onnx"
    fetched = {p.name for p in checkpoint_json.parent.iterdir()}
    assert "tokenizer.json" in fetched and "config.json" in fetched and "model.safetensors" not in fetched

    service = ModelService(checkpoint_json, onnx_file, version)
    texts = np.array(["rye bread", "a dog"], dtype=object)
    got = [p["label"] for p in service.predict(texts)]
    assert got == onnx_logits(onnx_path, texts, pre, batch_size=2).argmax(1).tolist()


def test_a_text_checkpoint_without_its_tokenizer_does_not_start(tmp_path):
    ckpt, onnx_path, _, _ = _text_checkpoint(tmp_path)
    for f in ckpt.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            f.unlink()
    with pytest.raises(SystemExit, match="tokenizer files are not in"):
        ModelService(ckpt / "model.json", onnx_path)


@pytest.mark.slow
def test_serve_bench_times_a_text_model_and_keeps_other_models_results(tmp_path):
    """bench/serve.py on a tiny text model (few rounds: this checks that it runs, it measures nothing)."""
    import yaml

    from stages.data import Split, save_split
    from stages.export import quantize_int8

    ckpt, onnx_path, pre, _ = _text_checkpoint(tmp_path)
    words = np.array(["dog", "bread", "sad", "a", "the", "barks", "warm", "loaf", "joy", "cat"])
    rng = np.random.default_rng(0)
    texts = np.array([" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(70)], dtype=object)
    (tmp_path / "prepared").mkdir()
    save_split(tmp_path / "prepared", "test", Split(texts, rng.integers(0, 3, 70)))
    quantize_int8(onnx_path, tmp_path / "model_int8.onnx", texts[:8], pre)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"].update(finetuned=str(ckpt), prepared=str(tmp_path / "prepared"), onnx=str(onnx_path),
                        onnx_int8=str(tmp_path / "model_int8.onnx"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "serve.json"
    out.write_text(json.dumps({"efficientnet_lite0@80px": {"speedup_fp32_b1": 11.0}}))

    subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--params", str(tmp_path / "params.yaml"),
                    "--rounds", "3", "--batch-rounds", "2", "--warmup", "1", "--out", str(out)], check=True, cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["efficientnet_lite0@80px"] == {"speedup_fp32_b1": 11.0}  # another model's entry is kept
    assert set(result) == {"efficientnet_lite0@80px", "bert@16tok"}
    engines = result["bert@16tok"]["engines"]
    assert set(engines) == {"pytorch_eager", "onnx_fp32", "onnx_int8"}
    assert all(e["p50_ms_b1"] > 0 and e["throughput_b64"] > 0 for e in engines.values())
