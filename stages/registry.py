"""The MLflow registry, read side: where the tracking store is, which version an alias names, and fetching a
version's servable (its ONNX file and serving contract, each checked against the sha256 recorded on the
version at registration). MLflow, never torch: the model server imports this. Writing is elsewhere:
runs and versions in stages/tracking.py, the gate in stages/register.py, promotion in stages/promotion.py."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stages import servable

CHALLENGER, CHAMPION = "challenger", "champion"
# version tags holding the sha256 of each file a server may load, set by register from the exported files
FILE_TAGS = {"model.onnx": "onnx_sha256", "model_int8.onnx": "onnx_int8_sha256", servable.CONTRACT: "serving_sha256"}


@dataclass(frozen=True)
class Store:
    """Where MLflow keeps runs and artifacts when no tracking server is configured."""

    db: Path
    artifacts: Path

    def uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(self.db).resolve()}"


def use(store: Store) -> None:
    """Point MLflow at `store` (its registry follows the tracking URI). MLflow also exports the URI as
    MLFLOW_TRACKING_URI for subprocesses; left there, the next Store.uri() in this process would read the
    first store's URI back as if the user had set it (a second store was read through the first: "no
    version 1" of a model that has it). So the user's own setting is restored. No global registry URI is
    set: a client made with an explicit tracking URI would then read another store's registry."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(store.uri())
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


def describe_alias(store: Store, name: str, alias: str) -> dict[str, Any] | None:
    """The version holding `alias` now, as {"version", "run_id", "tags"}; None when no version holds it."""
    use(store)
    try:
        mv = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and "not found" in str(e):
            return None  # no such model, or no version holds the alias
        # anything else is the registry itself failing (unreachable, locked, or a URI this MLflow client
        # cannot read: mlflow-skinny, as in the serving image, reads a registry only through a server)
        raise ConnectionError(f"cannot read the model registry at {store.uri()}: {str(e).splitlines()[0][:300]}") from None
    return {"version": int(mv.version), "run_id": mv.run_id, "tags": dict(mv.tags)}


def fetch_servable(store: Store, name: str, alias: str, dst: Path, int8: bool = False,
                   version: dict[str, Any] | None = None, threads: int = 0) -> servable.Servable:
    """Resolve `models:/<name>@<alias>` (or take `version`, as describe_alias returns it), download the
    version's serving contract and ONNX file into `dst`/v<version>, and load them after checking both
    against the sha256 the version recorded at registration. A version whose promotion gate failed is
    refused unless its promotion to `alias` was forced with a reason (tag <alias>.forced). Raises
    LookupError when no version holds the alias, servable.NotServable when the version may not be served
    or its files are missing or altered."""
    version = version or describe_alias(store, name, alias)
    if version is None:
        raise LookupError(f"no version of {name} has the alias {alias!r}: set it in the MLflow UI (make ui) or "
                          f"with make promote")
    onnx_name = "model_int8.onnx" if int8 else "model.onnx"
    tags = version["tags"]
    missing = [FILE_TAGS[f] for f in (servable.CONTRACT, onnx_name) if FILE_TAGS[f] not in tags]
    if missing:
        raise servable.NotServable(
            f"{name} version {version['version']} has no {' or '.join(missing)} tag: it was registered before "
            "headstart recorded a serving contract; run the pipeline again to register a servable version")
    if tags.get("gate.passed") != "true" and tags.get(f"{alias}.forced") != "true":
        failed = sorted(k.split(".")[1] for k, v in tags.items() if k.startswith("gate.") and k.endswith(".passed")
                        and v != "true" and k != "gate.passed")
        raise servable.NotServable(
            f"{name} version {version['version']} holds {alias!r} but did not pass its promotion gate"
            f" ({', '.join(failed) or 'no gate recorded'}); a version that failed is served only when promoted with "
            f"a reason: python -m flows.promote {version['version']} --model {name} --alias {alias} --force "
            "--reason '...'")
    folder = Path(dst) / f"v{version['version']}"
    try:
        for f in (servable.CONTRACT, onnx_name):
            mlflow.artifacts.download_artifacts(run_id=version["run_id"], artifact_path=f"onnx/{f}", dst_path=str(folder))
    except (MlflowException, OSError) as e:
        raise servable.NotServable(f"{name} version {version['version']}: cannot download onnx/{onnx_name} "
                                   f"({str(e).splitlines()[0][:200]})") from None
    expected = {f: tags[FILE_TAGS[f]] for f in (servable.CONTRACT, onnx_name)}
    return servable.load(folder, onnx_name, expected, threads, name=name, version=str(version["version"]),
                         alias=alias)
