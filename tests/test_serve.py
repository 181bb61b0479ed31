"""The model server, as a user meets it: a real process on localhost, real HTTP requests with real files,
a real MLflow registry whose alias moves while requests flow."""

import base64
import contextlib
import http.client
import io
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import checkpoint, servable, textnet, zoo
from stages.export import export_onnx, onnx_logits, serving_contract
from stages.inputs import decode_image
from stages.registry import FILE_TAGS

from .conftest import ROOT, background, tiny_hf_model

STORED, SIZE, CLASSES = 12, 8, ["cat", "dog", "owl"]


def image_folder(folder: Path, seed: int = 0, stored: int = STORED, classes: list[str] = CLASSES) -> Path:
    """A servable folder as export writes one: a tiny pixel-linear RGB model (8 px, images stored at 12)."""
    folder.mkdir(parents=True)
    pre = zoo.preprocessing(zoo.PIXEL_LINEAR, SIZE, 3)
    torch.manual_seed(seed)
    model = zoo.build(zoo.PIXEL_LINEAR, len(classes), pre).eval()
    export_onnx(model, pre, folder / "model.onnx", opset=17)
    meta = {"architecture": zoo.PIXEL_LINEAR, "classes": classes, "preprocessing": pre}
    contract = serving_contract(meta, "floor", np.zeros((1, stored, stored, 3), np.uint8), 50_000_000,
                                {folder / "model.onnx": folder / "model.onnx"})
    (folder / "serving.json").write_text(json.dumps(contract))
    return folder


def text_folder(tmp_path: Path) -> tuple[Path, dict]:
    """A servable folder of a tiny random BERT classifier with the packaged MiniLM tokenizer, and its preprocessing."""
    hf = tiny_hf_model(tmp_path / "bert", "bert")
    torch.manual_seed(0)
    model = textnet.TextClassifier(textnet.encoder(hf, pretrained=True), "mean", 3).eval()
    pre = zoo.text_preprocessing(hf, 16, "mean")
    folder = tmp_path / "served"
    folder.mkdir()
    export_onnx(model, pre, folder / "model.onnx", opset=17)
    meta = {"architecture": f"hf:{hf}", "classes": ["animal", "food", "feeling"], "preprocessing": pre}
    contract = serving_contract(meta, "finetuned", None, 0, {folder / "model.onnx": folder / "model.onnx"})
    (folder / "serving.json").write_text(json.dumps(contract))
    return folder, pre


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def multipart(files: list[tuple[str, bytes]], field: str = "files") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(url: str, body: bytes, content_type: str = "application/json", headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"content-type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read()


@contextlib.contextmanager
def server(args: list[str], env: dict | None = None, timeout: float = 90):
    """`python -m ops.serve ARGS` on a free port; yields (base URL, the process) once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "ops.serve", *args, "--port", str(port)]
    with background(cmd, ROOT, {**os.environ, **(env or {})}) as proc:
        deadline = time.monotonic() + timeout
        while True:
            try:
                get(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(f"the server exited: {proc.output()[-3000:]}") from None
                assert time.monotonic() < deadline, f"the server did not answer in {timeout}s: {proc.output()[-2000:]}"
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}", proc


def raw_request(port: int, head: bytes, chunks: list[bytes] = (), pause: float = 0.0) -> tuple[int, dict]:
    """Send `head` then `chunks` on one socket (pausing between them), and read the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        for c in chunks:
            time.sleep(pause)
            try:
                s.sendall(c)
            except OSError:  # the server answered and closed before the client finished: that is the point
                break
        reply = http.client.HTTPResponse(s)
        reply.begin()
        return reply.status, json.loads(reply.read())


def test_served_predictions_are_evaluates_on_the_same_files(tmp_path):
    """In process: a file decoded as prepare decodes it, then the model's own preprocessing, equals the ONNX
    model on the prepared array (what evaluate and export score)."""
    folder = image_folder(tmp_path / "m")
    model = servable.load(folder)
    rng = np.random.default_rng(0)
    files = [png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((12, 12), (30, 50), (64, 20))]
    prepared = np.stack([decode_image(f, STORED, 10**6) for f in files])  # what prepare stores
    offline = onnx_logits(folder / "model.onnx", prepared, servable.load(folder).contract["input"], 8)
    served = model.logits(np.stack([model.decode(f) for f in files]))
    np.testing.assert_array_equal(served, offline)
    answers = model.predict(prepared)
    assert [a["label"] for a in answers] == [CLASSES[i] for i in offline.argmax(1)]
    assert all(abs(sum(a["probabilities"].values()) - 1) < 1e-6 and a["score"] == max(a["probabilities"].values())
               for a in answers)


def test_a_folder_whose_onnx_file_changed_after_export_is_not_served(tmp_path):
    folder = image_folder(tmp_path / "m")
    with open(folder / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(servable.NotServable, match="sha256 .* but serving.json records"):
        servable.load(folder)
    with pytest.raises(servable.NotServable, match="not found"):
        servable.load(tmp_path / "nothing")


@pytest.mark.slow
def test_bad_input_gets_a_reason_and_the_server_stays_healthy(tmp_path):
    from PIL import Image

    folder = image_folder(tmp_path / "m")
    good = png(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    huge = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(huge, format="PNG")  # 100 megapixels in a few kB
    args = ["--folder", str(folder), "--max-batch", "4", "--max-body-bytes", "300000", "--read-timeout", "2",
            "--max-inflight", "1"]
    with server(args) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        # the server process never loaded torch: its memory maps no libtorch
        assert "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text()
        bad = {
            "wrong content type": post(f"{base}/predict", b"hello", "text/plain"),
            "empty multipart": post(f"{base}/predict", *multipart([], "files")),
            "a non-image file": post(f"{base}/predict", *multipart([("good.png", good), ("notes.txt", b"hello")])),
            "a truncated PNG": post(f"{base}/predict", *multipart([("cut.png", good[: len(good) // 2])])),
            "a 100-megapixel PNG": post(f"{base}/predict", *multipart([("huge.png", huge.getvalue())])),
            "too many files": post(f"{base}/predict", *multipart([("a.png", good)] * 5)),
            "invalid base64": post(f"{base}/predict", json.dumps({"images_b64": ["not base64!"]}).encode()),
            "texts to an image model": post(f"{base}/predict", json.dumps({"texts": ["a dog"]}).encode()),
            "an unknown key": post(f"{base}/predict", json.dumps({"pictures": []}).encode()),
            "an array of another size": post(f"{base}/predict", json.dumps({"images": [[[0] * 5] * 5]}).encode()),
            "broken JSON": post(f"{base}/predict", b"{\"images_b64\": ["),
            "a body over the limit": post(f"{base}/predict", b" " * 300_001),
            "a chunked body over the limit": raw_request(
                port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n", [b"10000\r\n" + b" " * 65536 + b"\r\n"] * 6),
        }
        expected = {"wrong content type": (415, "content type 'text/plain'"), "empty multipart": (422, "no parts"),
                    "a non-image file": (422, "files[1] (notes.txt) is not a usable image"),
                    "a truncated PNG": (422, "files[0] (cut.png) is not a usable image"),
                    "a 100-megapixel PNG": (422, "files[0] (huge.png) is not a usable image: ValueError: 10000x10000 pixels exceeds"),
                    "too many files": (422, "at most 4"), "invalid base64": (422, "images_b64[0] is not valid base64"),
                    "texts to an image model": (422, "images_b64 or images"), "an unknown key": (422, "pictures"),
                    "an array of another size": (422, "[12, 12]"), "broken JSON": (422, "invalid JSON"),
                    "a body over the limit": (413, "over 300000 bytes"),
                    "a chunked body over the limit": (413, "over 300000 bytes")}
        for case, (code, reason) in expected.items():
            assert bad[case][0] == code and reason in bad[case][1]["detail"], (case, bad[case])

        # a client that sends its headers and then nothing holds the one predict slot: a second request is
        # refused with 503 at once, and the slow one is cut off with 408 after --read-timeout
        slow = {}
        t = threading.Thread(target=lambda: slow.update(r=raw_request(port, (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"))))
        t.start()
        time.sleep(0.5)
        status, body = post(f"{base}/predict", json.dumps({"images_b64": [base64.b64encode(good).decode()]}).encode())
        assert status == 503 and "--max-inflight" in body["detail"]
        t.join(10)
        assert slow["r"][0] == 408 and "--read-timeout" in slow["r"][1]["detail"]

        # still healthy, and right
        status, body = post(f"{base}/predict", *multipart([("good.png", good), ("again.png", good)]))
        assert status == 200 and len(body["predictions"]) == 2, body
        expected_label = servable.load(folder).predict(decode_image(good, STORED, 10**6)[None])[0]["label"]
        assert body["predictions"][0]["label"] == expected_label and body["version"] is None
        assert proc.poll() is None
        metrics = get(f"{base}/metrics")[1].decode()
        assert 'headstart_requests_total{code="422",endpoint="/predict"}' in metrics
        assert 'headstart_requests_total{code="503",endpoint="/predict"} 1.0' in metrics
        assert "headstart_request_seconds_bucket" in metrics
        schema = json.loads(get(f"{base}/openapi.json")[1])
        assert set(schema["paths"]["/predict"]["post"]["requestBody"]["content"]) == {
            "multipart/form-data", "application/json"}
        meta = json.loads(get(f"{base}/metadata")[1])
        assert meta["classes"] == CLASSES and meta["input"]["decode"]["size"] == STORED and meta["input"]["image_size"] == SIZE


@pytest.mark.slow
def test_a_text_model_is_served_with_its_recorded_tokenizer(tmp_path):
    folder, pre = text_folder(tmp_path)
    texts = ["a domestic animal that barks at the postman", "rye bread", "a feeling of deep sadness " * 10]
    with server(["--folder", str(folder), "--max-batch", "64"]) as (base, proc):
        assert "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text()
        status, body = post(f"{base}/predict", json.dumps({"texts": texts}).encode())
        assert status == 200, body
        # offline: the same texts through the training code path (transformers' tokenizer) and ONNX Runtime
        expected = onnx_logits(folder / "model.onnx", np.array(texts, dtype=object), pre, batch_size=3).argmax(1)
        assert [p["label"] for p in body["predictions"]] == [["animal", "food", "feeling"][i] for i in expected]
        for payload, reason in (({"texts": ["ok"] * 10_000}, "at most 64"), ({"texts": ["ok", ""]}, "texts[1] is empty"),
                                ({"texts": ["ok", None]}, "texts.1"), ({"images_b64": ["aGk="]}, "exactly one of texts")):
            status, body = post(f"{base}/predict", json.dumps(payload).encode())
            assert status == 422 and reason in body["detail"], (payload.keys(), body)
        status, body = post(f"{base}/predict", *multipart([("a.png", b"x")]))
        assert status == 422 and "text model" in body["detail"]
        assert get(f"{base}/health")[0] == 200


def register_folder(client, name: str, folder: Path, experiment_id: str) -> str:
    """Log a servable folder as a run's onnx/ artifacts and register it, tagged as register tags it."""
    import mlflow

    from stages.files import sha256_file

    with mlflow.start_run(experiment_id=experiment_id) as run:
        for f in ("serving.json", "model.onnx"):
            mlflow.log_artifact(str(folder / f), artifact_path="onnx")
    mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/onnx", run_id=run.info.run_id)
    for f in ("serving.json", "model.onnx"):
        client.set_model_version_tag(name, mv.version, FILE_TAGS[f], sha256_file(folder / f))
    client.set_model_version_tag(name, mv.version, "gate.passed", "true")
    return str(mv.version)


@pytest.mark.slow
def test_a_promotion_while_requests_flow_fails_none_and_swaps_in_order(tmp_path, mlflow_store):
    import mlflow
    from mlflow.tracking import MlflowClient

    from stages.tracking import connect

    experiment = connect(mlflow_store, "serve-promotion")  # artifacts in the test's store
    client, name = MlflowClient(), "serve-promotion"
    client.create_registered_model(name)
    v1, v2, v3 = (register_folder(client, name, image_folder(tmp_path / x, seed=i), experiment)
                  for i, x in enumerate("abc"))
    # v3's file is altered in the artifact store after registration: it must never be served
    artifact_root = client.get_run(client.get_model_version(name, v3).run_id).info.artifact_uri.removeprefix("file://")
    with open(Path(artifact_root) / "onnx" / "model.onnx", "ab") as f:
        f.write(b"\0")
    client.set_registered_model_alias(name, "champion", v1)

    env = {"MLFLOW_TRACKING_URI": mlflow_store.uri(), "HEADSTART_ADMIN_TOKEN": "s3cret"}
    image = png(np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8))
    with server(["--model", name, "--alias", "champion", "--poll-seconds", "0.5"], env) as (base, proc):
        seen, stop = [], threading.Event()

        def client_loop():
            while not stop.is_set():
                sent = time.monotonic()
                status, body = post(f"{base}/predict", *multipart([("x.png", image)]))
                seen.append((status, body, sent, time.monotonic()))

        threads = [threading.Thread(target=client_loop) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        client.set_registered_model_alias(name, "champion", v2)
        deadline = time.monotonic() + 30
        while not any(r[1].get("version") == v2 for r in list(seen)) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(30)
        failed = [r for r in seen if r[0] != 200]
        assert not failed and len(seen) > 10, (failed[:3], len(seen))
        versions = [r[1]["version"] for r in seen]
        assert set(versions) == {v1, v2}
        # in order: a request sent after some client already received v2 is never answered by v1. Arrival order
        # across the three clients is not serving order: a request v1 answered can arrive after another's v2.
        first_v2 = min(received for _, body, _, received in seen if body["version"] == v2)
        late_v1 = [sent - first_v2 for _, body, sent, _ in seen if body["version"] == v1 and sent > first_v2]
        assert not late_v1, f"{len(late_v1)} requests sent after the swap was seen were answered by v1"
        print(f"{len(seen)} requests during the promotion, none failed: {versions.count(v1)} answered by version "
              f"{v1}, then {versions.count(v2)} by version {v2}")

        # a version that failed its gate is refused unless forced, and v2 keeps serving
        v4 = register_folder(client, name, image_folder(tmp_path / "d", seed=3), experiment)
        client.set_model_version_tag(name, v4, "gate.passed", "false")
        client.set_model_version_tag(name, v4, "gate.beats_alternatives.passed", "false")
        client.set_registered_model_alias(name, "champion", v4)
        status, body = post(f"{base}/admin/reload", b"", headers={"authorization": "Bearer s3cret"})
        assert status == 200 and body["version"] == v2 and "did not pass its promotion gate (beats_alternatives)" in body["error"]
        # the altered version is refused and v2 keeps serving; the admin endpoint needs the token
        client.set_registered_model_alias(name, "champion", v3)
        assert post(f"{base}/admin/reload", b"")[0] == 401
        status, body = post(f"{base}/admin/reload", b"", headers={"authorization": "Bearer s3cret"})
        assert status == 200 and body["version"] == v2 and "sha256" in body["error"], body
        # another task's version (other classes) under the same name is refused; promoted with a reason, served
        v5 = register_folder(client, name, image_folder(tmp_path / "e", seed=4, classes=["ant", "bee", "elk"]), experiment)
        client.set_registered_model_alias(name, "champion", v5)
        status, body = post(f"{base}/admin/reload", b"", headers={"authorization": "Bearer s3cret"})
        assert status == 200 and body["version"] == v2 and "another task (classes" in body["error"], body
        status, body = post(f"{base}/predict", *multipart([("x.png", image)]))
        assert status == 200 and body["version"] == v2 and body["model"] == name
        client.set_model_version_tag(name, v5, "champion.forced", "true")
        status, body = post(f"{base}/admin/reload", b"", headers={"authorization": "Bearer s3cret"})
        assert status == 200 and body["version"] == v5 and body["changed"], body
        metrics = get(f"{base}/metrics")[1].decode()
        assert f'headstart_model_version{{model="{name}"}} {float(v5)}' in metrics
        assert "headstart_model_swaps_total 2.0" in metrics  # to v2, then to the forced v5


@pytest.mark.slow
def test_serve_bench_times_a_text_model_and_keeps_other_models_results(tmp_path):
    """bench/serve.py on a tiny text model (few rounds: this checks that it runs, it measures nothing)."""
    import subprocess

    import yaml

    from stages.modality import adapter
    from stages.splits import Split, save_split

    hf = tiny_hf_model(tmp_path / "bert", "bert")
    torch.manual_seed(0)
    model = textnet.TextClassifier(textnet.encoder(hf, pretrained=True), "mean", 3).eval()
    pre = zoo.text_preprocessing(hf, 16, "mean")
    checkpoint.save_checkpoint(tmp_path / "ckpt", model, {"architecture": f"hf:{hf}", "classes": ["a", "b", "c"],
                                                   "preprocessing": pre})
    export_onnx(model, pre, tmp_path / "model.onnx", opset=17)
    words = np.array(["dog", "bread", "sad", "a", "the", "barks", "warm", "loaf", "joy", "cat"])
    rng = np.random.default_rng(0)
    texts = np.array([" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(70)], dtype=object)
    (tmp_path / "prepared").mkdir()
    save_split(tmp_path / "prepared", "test", Split(texts, rng.integers(0, 3, 70)))
    adapter(pre).quantize_int8(tmp_path / "model.onnx", tmp_path / "model_int8.onnx", texts[:8], pre)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"].update(finetuned=str(tmp_path / "ckpt"), prepared=str(tmp_path / "prepared"),
                        onnx=str(tmp_path / "model.onnx"), onnx_int8=str(tmp_path / "model_int8.onnx"))
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


def test_a_registry_that_cannot_be_read_is_an_error_not_a_missing_alias(tmp_path, monkeypatch, mlflow_store):
    from stages.registry import Store, describe_alias

    assert describe_alias(mlflow_store, "no-such-model", "champion") is None  # truly absent: None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unsupported-scheme://nowhere")
    with pytest.raises(ConnectionError, match="cannot read the model registry at unsupported-scheme://nowhere"):
        describe_alias(Store(tmp_path / "x.db", tmp_path / "a"), "any", "champion")
