"""Promotion in the MLflow UI has consequences: the webhook receiver (ops/hooks.py) checks signatures and
replays, the one promotion rule (stages/promotion.py) judges versions, and, end to end, a person setting
`champion` in the real MLflow web UI (headless Chromium) gets an audit trail, a flag and a revert for a
version that failed its gate, and a running model server that swaps at once."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ops.hooks import Receiver, Unverified, create_app, sign, verify
from stages.promotion import GATE_CHECKS, problems

from .conftest import ROOT, background, http_server

SECRET = "webhook-secret"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def signed(body: bytes, age: float = 0.0, secret: str = SECRET, delivery: str = "d-1") -> dict[str, str]:
    stamp = str(int(time.time() - age))
    return {"x-mlflow-delivery-id": delivery, "x-mlflow-timestamp": stamp,
            "x-mlflow-signature": sign(secret, delivery, stamp, body)}


def test_a_delivery_is_accepted_only_with_a_good_fresh_signature():
    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": "m", "alias": "champion", "version": "2"}}).encode()
    now = time.time()
    assert verify(SECRET, signed(body), body, now, 300) == "d-1"
    cases = {
        "wrong secret": (signed(body, secret="guess"), body, "does not match"),
        "altered body": (signed(body), body.replace(b'"2"', b'"3"'), "does not match"),
        "stale": (signed(body, age=301), body, "outside the 300 s replay window"),
        "from the future": (signed(body, age=-400), body, "replay window"),
        "missing signature": ({k: v for k, v in signed(body).items() if k != "x-mlflow-signature"}, body, "missing"),
        "no headers": ({}, body, "missing"),
        "bad timestamp": ({**signed(body), "x-mlflow-timestamp": "yesterday"}, body, "not a Unix time"),
    }
    for case, (headers, sent, reason) in cases.items():
        with pytest.raises(Unverified, match=reason):
            verify(SECRET, headers, sent, now, 300)
        assert case


def test_the_receiver_endpoint_refuses_unsigned_and_replayed_deliveries(tmp_path):
    from fastapi.testclient import TestClient

    receiver = Receiver(None, "champion", False, [], None, tmp_path / "log.jsonl")  # not started: events queue up
    app = TestClient(create_app(receiver, SECRET, 300))
    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": "m", "alias": "champion", "version": "2"}}).encode()
    assert app.post("/webhook", content=body).status_code == 401
    assert app.post("/webhook", content=body, headers=signed(body, secret="guess")).status_code == 401
    assert app.post("/webhook", content=body, headers=signed(body, age=600)).status_code == 401
    assert receiver.events.qsize() == 0
    headers = signed(body)
    assert app.post("/webhook", content=body, headers=headers).status_code == 202
    assert app.post("/webhook", content=body, headers=headers).status_code == 409  # the same delivery again
    assert receiver.events.get_nowait()["data"]["version"] == "2" and receiver.events.qsize() == 0


def passed(**extra: str) -> dict[str, str]:
    return {**{f"gate.{c}.passed": "true" for c in GATE_CHECKS}, "gate.passed": "true", "modality": "image",
            "classes": '["cat", "dog", "owl"]', **extra}


def test_the_promotion_rule():
    assert problems(passed()) == []
    assert problems(passed(), {"version": 1, "tags": passed()}) == []
    failed = problems(passed(**{"gate.beats_alternatives.passed": "false", "gate.passed": "false"}))
    assert failed == ["gate.beats_alternatives.passed is false", "gate.passed is false"]
    assert problems({"modality": "image"}) == [f"gate.{c}.passed is missing" for c in GATE_CHECKS] + ["gate.passed is missing"]
    text = passed(modality="text", classes='["animal", "food"]')
    assert problems(text) == []  # no previous holder: nothing to compare the task with
    assert problems(text, {"version": 4, "tags": passed()}) == [
        "another task: modality text where version 4 had image",
        'another task: classes ["animal", "food"] where version 4 had ["cat", "dog", "owl"]']
    assert problems(passed(), {"version": 1, "tags": {"gate.passed": "true"}}) == []  # untagged old version


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float = 45.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout} s")


@pytest.fixture(scope="module")
def chromium():
    """Headless Debian Chromium through Playwright; the test is skipped (saying why) only when it cannot start."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("/usr/bin/chromium is missing: apt-get install chromium")
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch_persistent_context(
                tempfile.mkdtemp(prefix="headstart-chromium-"), executable_path="/usr/bin/chromium",
                args=CHROMIUM_FLAGS, headless=True, viewport={"width": 1400, "height": 1000})
        except Exception as e:  # noqa: BLE001 - any launch failure is a reason to skip, reported
            pytest.skip(f"Chromium could not be launched: {str(e).splitlines()[0]}")
        yield browser
        browser.close()


def set_alias_in_the_ui(page, base: str, name: str, version: str, alias: str) -> float:
    """What a person does: the version's page -> Aliases: Add -> type the alias, Enter -> Save aliases.
    Returns the monotonic time of the click on Save."""
    page.goto(f"{base}/#/models/{name}/versions/{version}", timeout=60_000)
    page.locator('button[title="Add aliases"]').click(timeout=60_000)
    dialog = page.get_by_role("dialog")
    dialog.locator("input").first.fill(alias)
    page.keyboard.press("Enter")
    save = dialog.get_by_role("button", name="Save aliases")
    clicked = time.monotonic()
    save.click()
    dialog.wait_for(state="hidden", timeout=30_000)
    return clicked


@pytest.mark.slow
def test_setting_champion_in_the_mlflow_ui_is_audited_checked_enforced_and_served(tmp_path, chromium, monkeypatch):
    import urllib.request

    from cryptography.fernet import Fernet
    from mlflow.tracking import MlflowClient

    from ops.hooks import main as hooks

    from .test_serve import image_folder, register_folder, server

    # a real MLflow server on SQLite, allowed to deliver webhooks to this machine's loopback
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    mlflow_env = {**env, "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                  "MLFLOW_WEBHOOK_CACHE_TTL": "1", "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode()}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
           f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", (tmp_path / "artifacts").as_uri(),
           "--host", "127.0.0.1", "--port", "{port}", "--workers", "1"]
    with http_server(cmd, "/api/2.0/mlflow/experiments/get?experiment_id=0", ROOT,
                     mlflow_env, timeout=180) as (base, _):
        # this server for mlflow.start_run too, which keeps whatever store an earlier test set in this process
        monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
        monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", base)
        client, name = MlflowClient(base), "ui-promotion"
        experiment = client.create_experiment("ui-promotion")
        client.create_registered_model(name)
        versions = [register_folder(client, name, image_folder(tmp_path / f"m{i}", seed=i), experiment) for i in range(3)]
        v1, v2, v3 = versions
        for v in versions:
            for k, value in passed().items():
                client.set_model_version_tag(name, v, k, value)
        for k in ("gate.beats_alternatives.passed", "gate.passed"):  # v3 failed its gate
            client.set_model_version_tag(name, v3, k, "false")
        client.set_registered_model_alias(name, "champion", v1)

        hook_port = free_port()
        monkeypatch.setenv("HEADSTART_WEBHOOK_SECRET", SECRET)
        hooks(["install", "--url", f"http://127.0.0.1:{hook_port}/webhook"])  # the secret from the environment

        token, audit = "admin-token", tmp_path / "promotions.jsonl"
        served_env = {"MLFLOW_TRACKING_URI": base, "HEADSTART_ADMIN_TOKEN": token}
        # --poll-seconds 0: the server never looks by itself, so a swap can only come from the receiver
        with server(["--model", name, "--alias", "champion", "--poll-seconds", "0"], served_env) as (serve_base, _):
            def served() -> str:
                with urllib.request.urlopen(f"{serve_base}/metadata", timeout=10) as r:
                    return json.loads(r.read())["version"]

            assert served() == v1
            receiver_cmd = [sys.executable, "-m", "ops.hooks", "serve", "--port", str(hook_port), "--enforce",
                            "--server", serve_base, "--log", str(audit)]
            receiver_env = {**env, **served_env, "HEADSTART_WEBHOOK_SECRET": SECRET}
            with background(receiver_cmd, ROOT, receiver_env) as receiver:
                wait_for("the receiver answering /health", lambda: _answers(f"http://127.0.0.1:{hook_port}/health"), 60)
                page = chromium.new_page()

                # a gate-passed version, promoted in the UI: audited, accepted, and served at once
                clicked = set_alias_in_the_ui(page, base, name, v2, "champion")
                page.wait_for_timeout(500)
                shot = Path(os.environ.get("TMP", tempfile.gettempdir())) / "headstart-ui-alias.png"
                page.screenshot(path=str(shot), full_page=True)
                tags = wait_for("audit tags on version 2", lambda: (
                    (t := client.get_model_version(name, v2).tags).get("promotion.at") and t))
                audited = time.monotonic() - clicked
                assert tags["promotion.by"] == "mlflow-ui-or-api" and tags["promotion.previous"] == v1
                assert "promotion.flag" not in tags
                wait_for("the server serving version 2", lambda: served() == v2)
                swapped = time.monotonic() - clicked

                # a gate-failed version, promoted in the UI: flagged, and with enforce moved back to version 2
                clicked = set_alias_in_the_ui(page, base, name, v3, "champion")
                tags = wait_for("the flag on version 3", lambda: (
                    (t := client.get_model_version(name, v3).tags).get("promotion.reverted_to") and t))
                flagged = time.monotonic() - clicked
                assert "gate.beats_alternatives.passed is false" in tags["promotion.flag"], tags
                assert tags["promotion.reverted_to"] == v2 and tags["promotion.previous"] == v2
                assert client.get_model_version_by_alias(name, "champion").version == v2
                records = wait_for("three audit records", lambda: (
                    len(r := [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []) >= 3
                    and r))
                assert served() == v2
                output = receiver.output()
            page.close()
    assert [(r["version"], r["result"]) for r in records] == [(int(v2), "accepted"), (int(v3), "reverted"),
                                                              (int(v2), "revert confirmed")], records
    assert records[0]["servers"][0]["version"] == v2 and records[1]["problems"][0].startswith("gate.")
    assert "ERROR FLAGGED" in output and "ERROR REVERTED" in output, output[-2000:]
    print(f"\nclick on Save -> audit tags on the version: {audited:.1f} s; -> the model server answering with "
          f"version {v2}: {swapped:.1f} s; gate-failed version {v3}: flagged and moved back to {v2} in {flagged:.1f} s; "
          f"screenshot: {shot}")


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False
