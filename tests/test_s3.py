"""S3 for real: a SeaweedFS server (tests/conftest.py `s3`) as MLflow's artifact store behind a real
`mlflow server`, with a version registered there and served by alias. DVC remotes on the same server are
exercised by tests/test_schedule.py, where scheduled runs pull from and push to one."""

from __future__ import annotations

import numpy as np
import pytest

from .test_serve import get, image_folder, multipart, png, post, register_folder, server


def test_the_s3_server_refuses_wrong_keys(s3):
    from botocore.exceptions import ClientError

    s3.client().put_object(Bucket=s3.bucket, Key="probe/ok.txt", Body=b"ok")
    assert s3.client().get_object(Bucket=s3.bucket, Key="probe/ok.txt")["Body"].read() == b"ok"
    with pytest.raises(ClientError) as refused:
        s3.client(secret="not-the-secret").get_object(Bucket=s3.bucket, Key="probe/ok.txt")
    assert refused.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId")
    with pytest.raises(ClientError):
        s3.client(key="nobody", secret="nothing").list_objects_v2(Bucket=s3.bucket)


@pytest.mark.slow
def test_a_version_stored_on_s3_is_served_by_alias(s3, s3_mlflow_server, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    # the client side has the tracking server's URL and no S3 credentials: the server proxies artifacts
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(s3_mlflow_server)
    try:
        client, name = MlflowClient(s3_mlflow_server), "served-from-s3"
        experiment = client.create_experiment("s3-artifacts")
        client.create_registered_model(name)
        version = register_folder(client, name, image_folder(tmp_path / "v1"), experiment)
        client.set_registered_model_alias(name, "champion", version)
    finally:
        mlflow.set_tracking_uri(None)

    stored = s3.keys("mlartifacts/")
    assert any(k.endswith("/onnx/model.onnx") for k in stored), stored
    assert any(k.endswith("/onnx/serving.json") for k in stored), stored

    env = {"MLFLOW_TRACKING_URI": s3_mlflow_server}
    image = png(np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8))
    with server(["--model", name, "--alias", "champion"], env) as (base, _):
        status, body = post(f"{base}/predict", *multipart([("x.png", image)]))
        assert status == 200 and body["version"] == version and body["model"] == name, body
        assert f'"version":"{version}"' in get(f"{base}/metadata")[1].decode().replace(" ", "")
