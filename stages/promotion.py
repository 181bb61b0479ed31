"""Promotion to an alias (`champion`): the one rule for whether a version may hold it, and what a promotion
writes to the registry. flows.promote applies the rule before it moves the alias; ops.hooks applies it
after someone moved the alias elsewhere (the MLflow UI), when the registry's webhook reports the move.
MLflow, never torch: the webhook receiver imports this.

The rule (`problems`): every gate check the register stage recorded (gate.<check>.passed) passed, and the
version is of the same task (tags `modality` and `classes`) as the version it takes the alias from."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stages.registry import CHAMPION, Store, describe_alias, use

GATE_CHECKS = ("min_accuracy", "beats_alternatives", "onnx_parity", "vs_champion")
WEBHOOK_EVENTS = ("model_version_alias.created", "model_version_alias.deleted")


class PromotionRefused(Exception):
    """The version's recorded gate does not allow promotion and it was not forced."""


def problems(tags: Mapping[str, str], replacing: Mapping[str, Any] | None = None) -> list[str]:
    """Why a version with `tags` should not hold the alias, one phrase each; empty when it may. `replacing`
    is the version that held the alias before ({"version", "tags"}), or None when none did."""
    found = [f"gate.{c}.passed is {tags.get(f'gate.{c}.passed', 'missing')}" for c in GATE_CHECKS
             if tags.get(f"gate.{c}.passed") != "true"]
    if tags.get("gate.passed") != "true":
        found.append(f"gate.passed is {tags.get('gate.passed', 'missing')}")
    if replacing:
        for key in ("modality", "classes"):  # a version registered before these tags existed is not judged on them
            theirs = replacing["tags"].get(key)
            if theirs is not None and tags.get(key) != theirs:
                found.append(f"another task: {key} {tags.get(key, 'missing')} where version {replacing['version']} "
                             f"had {theirs}")
    return found


def _version_tags(client: MlflowClient, name: str, version: int) -> dict[str, str]:
    try:
        return dict(client.get_model_version(name, str(version)).tags)
    except MlflowException:
        raise LookupError(f"{name} has no version {version}") from None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def promote_version(
    store: Store, name: str, version: int, alias: str = CHAMPION, force: bool = False, reason: str = "",
    by: str = "unknown",
) -> dict[str, Any]:
    """Point `alias` at `version` when `problems` finds none; otherwise refuse, unless forced with a reason,
    which is recorded on the version. Moving the alias back to an older version is a rollback. Returns
    what was done."""
    if force and not reason.strip():
        raise ValueError("--force needs --reason: say why this version is promoted despite its gate")
    use(store)
    client = MlflowClient()
    tags = _version_tags(client, name, version)
    before = describe_alias(store, name, alias)
    found = problems(tags, before if before and before["version"] != int(version) else None)
    if found and not force:
        raise PromotionRefused(
            f"refusing to make {name} version {version} {alias}: " + "; ".join(found)
            + ". Promote a version that passed, or use --force --reason '...' (recorded on the version)."
        )
    previous = before["version"] if before else None
    written = {f"{alias}.promoted_at": _now(), f"{alias}.promoted_by": by, f"{alias}.previous": str(previous)}
    if found:
        written.update({f"{alias}.forced": "true", f"{alias}.forced_reason": reason, f"{alias}.forced_over": "; ".join(found)})
    for k, v in written.items():
        client.set_model_version_tag(name, str(version), k, v)
    client.set_registered_model_alias(name, alias, str(version))
    return {"model_name": name, "version": int(version), "alias": alias, "previous": previous,
            "forced": bool(found), "reason": reason}


def record_move(store: Store, name: str, alias: str, version: int, previous: int | None, by: str) -> dict[str, Any]:
    """After `alias` moved to `version` (from `previous`) by some other hand: judge it with `problems` and
    record the audit trail on the version (tags promotion.by, promotion.at, promotion.previous, and
    promotion.flag naming the problems, or none). Returns {"problems", "forced", "holder"}, where holder is
    the version holding the alias now (it may have moved again since)."""
    use(store)
    client = MlflowClient()
    tags = _version_tags(client, name, version)
    replacing = None
    if previous is not None and previous != version:
        try:
            replacing = {"version": previous, "tags": _version_tags(client, name, previous)}
        except LookupError:  # deleted since: nothing to compare the task with
            replacing = None
    found = problems(tags, replacing)
    written = {"promotion.by": by, "promotion.at": _now(), "promotion.previous": str(previous)}
    if found:
        written["promotion.flag"] = "; ".join(found)
    for k, v in written.items():
        client.set_model_version_tag(name, str(version), k, v)
    if not found and "promotion.flag" in tags:  # an old flag from an earlier promotion would mislead
        client.delete_model_version_tag(name, str(version), "promotion.flag")
    holder = describe_alias(store, name, alias)
    return {"problems": found, "forced": tags.get(f"{alias}.forced") == "true",
            "holder": holder["version"] if holder else None}


def revert(store: Store, name: str, alias: str, flagged: int, to: int | None, reason: str) -> None:
    """Move `alias` off the `flagged` version back to `to` (or remove it when no version held it before),
    and record that on the flagged version (promotion.reverted_at, promotion.reverted_to, promotion.reverted_because)."""
    use(store)
    client = MlflowClient()
    # the alias first: the record then never says "reverted" before the registry does
    if to is None:
        client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, str(to))
    for k, v in {"promotion.reverted_at": _now(), "promotion.reverted_to": str(to),
                 "promotion.reverted_because": reason}.items():
        client.set_model_version_tag(name, str(flagged), k, v)


def alias_holders(store: Store, alias: str) -> dict[str, int]:
    """{registered model name: the version holding `alias`} for every registered model with that alias."""
    use(store)
    held = {}
    for m in MlflowClient().search_registered_models(max_results=1000):
        if alias in (m.aliases or {}):
            held[m.name] = int(m.aliases[alias])
    return held


def install_webhook(store: Store, name: str, url: str, secret: str) -> tuple[str, str]:
    """Create (or update, by `name`) the registry webhook that reports alias moves to `url`, signed with
    `secret`. Needs a SQL-backed registry (SQLite or PostgreSQL) or a tracking server on one. Returns
    (webhook id, "created" or "updated")."""
    use(store)
    client = MlflowClient()
    try:
        existing = next((w for w in client.list_webhooks() if w.name == name), None)
        if existing is not None:
            client.update_webhook(existing.webhook_id, url=url, events=list(WEBHOOK_EVENTS), secret=secret,
                                  status="ACTIVE")
            return existing.webhook_id, "updated"
        return client.create_webhook(name, url, list(WEBHOOK_EVENTS), secret=secret).webhook_id, "created"
    except MlflowException as e:
        raise ValueError(f"cannot install the webhook at {store.uri()}: {str(e).splitlines()[0][:300]}") from None
