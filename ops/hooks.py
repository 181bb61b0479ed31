"""Receive the MLflow registry's webhooks for alias moves, so that setting `champion` in the MLflow UI has
the consequences a checked promotion (flows.promote) has: an audit trail on the version, the rule of
stages/promotion.py applied (gate passed, same task as the version replaced), a loud flag when it fails,
the move undone when promotion.enforce is true, and the model servers told to swap at once.

Run:  make promotion-hook                                   (python -m ops.hooks serve; 127.0.0.1:8100)
      python -m ops.hooks serve --enforce --server http://127.0.0.1:8000
      python -m ops.hooks install --url http://127.0.0.1:8100/webhook   (once per registry)
The webhook secret comes from $HEADSTART_WEBHOOK_SECRET or --secret-file, never the command line; the
servers' admin token from $HEADSTART_ADMIN_TOKEN or --admin-token-file. The MLflow server must run on a
SQL backend with MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY set (else each server process encrypts secrets with
a key of its own) and, to deliver to a loopback or private address, MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https
and MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true.

Who promoted: MLflow's webhook carries no user. A move made by flows.promote has just written
<alias>.promoted_by on the version, which is used; any other move is recorded as made in the MLflow UI
or API by an unknown user (`promotion.by` = "mlflow-ui-or-api"). Each event is handled in order by one
thread and appended to promotion.log as one JSON object; a flagged move is also logged at ERROR and its
record says "result": "flagged" (or "reverted")."""

from __future__ import annotations

import argparse
import base64
import calendar
import hashlib
import hmac
import json
import logging
import os
import queue
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request  # module level: FastAPI resolves handler annotations here
from fastapi.responses import JSONResponse

SECRET_ENV, TOKEN_ENV = "HEADSTART_WEBHOOK_SECRET", "HEADSTART_ADMIN_TOKEN"
UNKNOWN_USER = "mlflow-ui-or-api"
FRESH_SECONDS = 120  # an <alias>.promoted_at this recent was written by the flows.promote that moved the alias
log = logging.getLogger("headstart.hooks")


class Unverified(Exception):
    """A delivery whose signature or timestamp does not hold."""


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature: v1,<base64 HMAC-SHA256 of "<delivery id>.<timestamp>.<body>">."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: Any, body: bytes, now: float, window: float) -> str:
    """Check a delivery's X-MLflow-Signature (constant time) and that its X-MLflow-Timestamp lies within
    `window` seconds of `now`; return its delivery id, or raise Unverified saying what is wrong."""
    delivery_id, stamp, given = (headers.get(h) for h in ("x-mlflow-delivery-id", "x-mlflow-timestamp",
                                                           "x-mlflow-signature"))
    if not (delivery_id and stamp and given):
        raise Unverified("missing X-MLflow-Signature, X-MLflow-Delivery-Id or X-MLflow-Timestamp")
    try:
        age = now - int(stamp)
    except ValueError:
        raise Unverified(f"X-MLflow-Timestamp {stamp[:20]!r} is not a Unix time") from None
    if not hmac.compare_digest(given.encode(), sign(secret, delivery_id, stamp, body).encode()):
        raise Unverified("the signature does not match (wrong secret, or the body was altered)")
    if abs(age) > window:
        raise Unverified(f"the delivery is {age:.0f} s old, outside the {window:.0f} s replay window")
    return delivery_id


class Receiver:
    """Judges and records each alias move, in arrival order, on one worker thread."""

    def __init__(self, store: Any, alias: str, enforce: bool, servers: list[str], token: str | None, log_file: Path):
        self.store, self.alias, self.enforce, self.servers, self.token = store, alias, enforce, servers, token
        self.log_file = Path(log_file)
        self.holders: dict[str, int | None] = {}
        self.reverting: dict[str, int | None] = {}  # model -> the version this receiver moved the alias back to
        self.events: queue.Queue = queue.Queue()
        self.handled = 0

    def start(self) -> None:
        from stages.promotion import alias_holders

        self.holders.update(alias_holders(self.store, self.alias))
        threading.Thread(target=self._work, daemon=True).start()

    def _work(self) -> None:
        while True:
            event = self.events.get()
            try:
                record = self.handle(event)
            except Exception as e:  # noqa: BLE001 - one bad event must not stop the receiver
                record = {"event": event, "result": "error", "error": f"{type(e).__name__}: {e}"}
                log.error("handling %s failed: %s", event.get("data"), record["error"])
            self._append(record)
            self.handled += 1

    def handle(self, event: dict) -> dict[str, Any]:
        """One delivery's consequences; returns the record written to the log."""
        from stages.promotion import record_move, revert

        data, action = event["data"], event.get("action")
        name, alias = data["name"], data["alias"]
        record: dict[str, Any] = {"received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  "model": name, "alias": alias, "action": action, "mlflow_timestamp": event.get("timestamp")}
        if alias != self.alias:
            return {**record, "result": "ignored", "why": f"only {self.alias!r} moves are checked"}
        previous = self.holders.get(name)
        if action == "deleted":
            self.holders[name] = None
            return {**record, "previous": previous, "result": "removed", "servers": self._reload()}
        version = int(data["version"])
        record.update(version=version, previous=previous)
        self.holders[name] = version
        if name in self.reverting and self.reverting[name] == version:  # our own revert coming back
            del self.reverting[name]
            return {**record, "result": "revert confirmed"}
        by = self._who(name, version)
        found = record_move(self.store, name, alias, version, previous, by)
        record.update(by=by, problems=found["problems"])
        if not found["problems"]:
            record["result"] = "accepted"
        elif found["forced"] and by != UNKNOWN_USER:
            record["result"] = "forced"  # flows.promote --force: a person gave a reason, recorded on the version
            log.warning("%s version %s holds %s although %s (forced)", name, version, alias, "; ".join(found["problems"]))
        else:
            record["result"] = "flagged"
            log.error("FLAGGED: %s version %s was made %s by %s although %s", name, version, alias, by,
                      "; ".join(found["problems"]))
            if self.enforce and found["holder"] == version:  # not when the alias has moved on since
                reason = "; ".join(found["problems"])
                self.reverting[name] = previous
                revert(self.store, name, alias, version, previous, reason)
                self.holders[name] = previous
                record.update(result="reverted", reverted_to=previous)
                log.error("REVERTED: %s@%s moved back from version %s to %s", name, alias, version, previous)
        record["servers"] = self._reload()
        return record

    def _who(self, name: str, version: int) -> str:
        from stages.registry import describe_alias

        held = describe_alias(self.store, name, self.alias)
        tags = held["tags"] if held and held["version"] == version else {}
        stamp = tags.get(f"{self.alias}.promoted_at")
        if stamp and time.time() - calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) < FRESH_SECONDS:
            return f"{tags.get(f'{self.alias}.promoted_by', 'unknown')} (flows.promote)"
        return UNKNOWN_USER

    def _reload(self) -> list[dict[str, Any]]:
        """POST /admin/reload on each model server; what each answered (the version it serves, or why not)."""
        answers = []
        for url in self.servers:
            req = urllib.request.Request(url.rstrip("/") + "/admin/reload", data=b"", method="POST",
                                         headers={"authorization": f"Bearer {self.token}"} if self.token else {})
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    body = json.loads(r.read())
                answers.append({"url": url, "status": r.status, "version": body.get("version"), "error": body.get("error")})
            except urllib.error.HTTPError as e:
                answers.append({"url": url, "status": e.code, "error": e.read().decode(errors="replace")[:300]})
            except OSError as e:
                answers.append({"url": url, "status": None, "error": str(e)[:300]})
                log.error("could not tell the model server at %s to reload: %s", url, e)
        return answers

    def _append(self, record: dict) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("%s", json.dumps(record))


def create_app(receiver: Receiver, secret: str, window: float) -> FastAPI:
    app = FastAPI(title="headstart promotion webhook receiver")
    seen: OrderedDict[str, None] = OrderedDict()  # delivery ids inside the replay window: a replay is refused

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "handled": receiver.handled, "queued": receiver.events.qsize()}

    @app.post("/webhook", status_code=202)
    async def webhook(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            delivery = verify(secret, request.headers, body, time.time(), window)
        except Unverified as e:
            log.warning("refused a delivery: %s", e)
            return JSONResponse({"detail": str(e)}, status_code=401)
        if delivery in seen:
            return JSONResponse({"detail": f"delivery {delivery} was already received"}, status_code=409)
        seen[delivery] = None
        while len(seen) > 10_000:
            seen.popitem(last=False)
        try:
            event = json.loads(body)
            if event.get("entity") != "model_version_alias" or not {"name", "alias"} <= set(event.get("data", {})):
                return JSONResponse({"detail": "not a model_version_alias event: nothing to do"}, status_code=200)
        except (ValueError, AttributeError):
            return JSONResponse({"detail": "the body is not a JSON object"}, status_code=400)
        receiver.events.put(event)
        return JSONResponse({"accepted": delivery}, status_code=202)

    return app


def _secret(path: Path | None, env: str, what: str, required: bool) -> str | None:
    value = path.read_text().strip() if path else os.environ.get(env, "").strip()
    if required and not value:
        raise SystemExit(f"error: no {what}: set ${env} or pass --{what.replace(' ', '-')}-file")
    return value or None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="receive webhook deliveries and act on them")
    serve.add_argument("--host", default="127.0.0.1", help="default %(default)s: this machine only")
    serve.add_argument("--port", type=int, default=8100)
    serve.add_argument("--enforce", action=argparse.BooleanOptionalAction, default=None,
                       help="undo refused moves (default: params.yaml promotion.enforce)")
    serve.add_argument("--server", action="append", default=None,
                       help="a model server's base URL to tell to reload (repeatable; default: promotion.servers)")
    serve.add_argument("--log", type=Path, help="the JSON-lines audit log (default: promotion.log)")
    serve.add_argument("--admin-token-file", type=Path, help=f"the model servers' admin token (else ${TOKEN_ENV})")
    install = sub.add_parser("install", help="register the webhook with the MLflow registry (once)")
    install.add_argument("--url", required=True, help="where MLflow delivers, e.g. http://127.0.0.1:8100/webhook")
    install.add_argument("--name", default="headstart-promotion")
    for p in (serve, install):
        p.add_argument("--params", type=Path, default=Path("params.yaml"), help="for the tracking store and promotion:")
        p.add_argument("--secret-file", type=Path, help=f"a file holding the webhook secret (else ${SECRET_ENV})")
    args = ap.parse_args(argv)

    from stages.params import Params
    from stages.registry import Store

    params = Params.load(args.params)
    store = Store(params.paths.mlflow_db, params.paths.mlflow_artifacts)
    secret = _secret(args.secret_file, SECRET_ENV, "secret", required=True)
    if args.command == "install":
        from stages.promotion import install_webhook

        try:
            webhook_id, done = install_webhook(store, args.name, args.url, secret)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        print(f"webhook {args.name} ({webhook_id}) {done}: alias moves at {store.uri()} go to {args.url}")
        return

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    p = params.promotion
    receiver = Receiver(store, p.alias, p.enforce if args.enforce is None else args.enforce,
                        p.servers if args.server is None else args.server,
                        _secret(args.admin_token_file, TOKEN_ENV, "admin token", required=False), args.log or p.log)
    receiver.start()
    import uvicorn

    print(f"receiving {p.alias} moves at {store.uri()} on http://{args.host}:{args.port}/webhook "
          f"(enforce: {receiver.enforce}; servers: {', '.join(receiver.servers) or 'none'}; log: {receiver.log_file})",
          flush=True)
    uvicorn.run(create_app(receiver, secret, p.replay_window), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
