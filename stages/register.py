"""Record the pipeline run in MLflow and register the fine-tuned model. The only module that imports mlflow.
One parent run per pipeline run, a nested run per model (params, per-epoch metrics, test metrics,
confusion matrix); the fine-tuned model is registered under register.model_name with lineage tags, and
the alias `challenger` is set only for a positive verdict when the model is not worse than the current
`champion` on the same test set.
Reads paths.prepared, paths.finetuned, paths.baselines, the training histories and paths.evaluate_*;
writes the receipt paths.registered. Tracking store: $MLFLOW_TRACKING_URI, else SQLite at paths.mlflow_db.
Run: dvc repro register   (or: python -m stages.register)"""

from __future__ import annotations

import csv
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stages import zoo
from stages.data import load_split
from stages.files import read_json, sha256_file, write_json
from stages.params import RegisterParams, cli
from stages.train import predict

CHALLENGER, CHAMPION = "challenger", "champion"


@dataclass(frozen=True)
class Store:
    """Where MLflow keeps runs and artifacts when no tracking server is configured."""

    db: Path
    artifacts: Path

    def uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(self.db).resolve()}"


def connect(store: Store, experiment: str) -> str:
    """Point mlflow at the store and return the experiment id, creating it on first use."""
    mlflow.set_tracking_uri(store.uri())
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else Path(store.artifacts).resolve().as_uri()
    return mlflow.create_experiment(experiment, artifact_location=location)


def challenger_decision(
    verdict: str, accuracy: float, champion_accuracy: float | None, max_regression: float
) -> tuple[bool, str]:
    """Whether the candidate earns `challenger`, and why, in words that go on the model version."""
    if verdict != "positive":
        return False, f"verdict is {verdict}: transfer not shown to beat scratch"
    if champion_accuracy is None:
        return True, "verdict positive; no champion yet"
    if accuracy < champion_accuracy - max_regression:
        return False, f"accuracy {accuracy:.4f} is below the champion's {champion_accuracy:.4f} on the same test set"
    return True, f"verdict positive; accuracy {accuracy:.4f} vs champion {champion_accuracy:.4f} on the same test set"


def run(
    prepared: Path,
    finetuned: Path,
    baselines: Path,
    histories: dict[str, Path],
    evaluation: Path,
    plots: Path,
    out: Path,
    store: Store,
    p: RegisterParams,
    lineage: dict[str, str],
) -> dict[str, Any]:
    report = read_json(evaluation)
    experiment_id = connect(store, p.experiment)
    client = MlflowClient()

    with mlflow.start_run(experiment_id=experiment_id, run_name="pipeline") as parent:
        mlflow.set_tags({"headstart.role": "pipeline", **{f"headstart.{k}": v for k, v in lineage.items()}})
        mlflow.log_metrics({k: report[k] for k in ("transfer_gain", "mcnemar_p")})
        mlflow.log_metrics({"transfer_gain_ci95_low": report["transfer_gain_ci95"][0],
                            "transfer_gain_ci95_high": report["transfer_gain_ci95"][1]})
        mlflow.set_tag("verdict", report["verdict"])
        mlflow.log_artifact(str(evaluation))
        runs = {}
        for name, path in zoo.model_dirs(finetuned, baselines).items():
            runs[name] = _log_model_run(experiment_id, name, path, histories.get(name), report[name], plots)
        version = _register(client, runs["finetuned"], finetuned, p.model_name, report, lineage)

    champion_acc = _champion_accuracy(client, p.model_name, report, prepared)
    ok, reason = challenger_decision(report["verdict"], report["finetuned"]["accuracy"], champion_acc, p.max_regression)
    client.set_model_version_tag(p.model_name, version, "challenger_decision", reason)
    if ok:
        client.set_registered_model_alias(p.model_name, CHALLENGER, version)
    aliases = sorted(client.get_model_version(p.model_name, version).aliases)
    receipt = {"model_name": p.model_name, "version": version, "run_id": runs["finetuned"], "aliases": aliases,
               "parent_run_id": parent.info.run_id, "tracking_uri": store.uri(), "challenger_reason": reason}
    write_json(out, receipt)
    print(f"registered {p.model_name} version {version} (aliases: {', '.join(aliases) or 'none'}): {reason}")
    return receipt


def _log_model_run(experiment_id: str, name: str, path: Path, history: Path | None, metrics: dict, plots: Path) -> str:
    meta = read_json(Path(path) / "model.json")
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=True) as r:
        mlflow.set_tags({"headstart.role": "model", "headstart.model": name, "architecture": meta["architecture"],
                         "init": meta["init"]})
        mlflow.log_params({"architecture": meta["architecture"], "image_size": meta["preprocessing"]["image_size"],
                           **{f"train.{k}": v for k, v in meta["train"].items()}})
        if history is not None and Path(history).exists():
            with open(history) as f:
                for row in csv.DictReader(f):
                    step = int(row.pop("epoch"))
                    mlflow.log_metrics({k: float(v) for k, v in row.items()}, step=step)
        mlflow.log_metrics({
            "test_accuracy": metrics["accuracy"],
            "test_accuracy_ci95_low": metrics["accuracy_ci95"][0],
            "test_accuracy_ci95_high": metrics["accuracy_ci95"][1],
            "test_macro_f1": metrics["macro_f1"],
        })  # fmt: skip
        confusion = Path(plots) / f"confusion_{name}.png"
        if confusion.exists():
            mlflow.log_artifact(str(confusion))
        return r.info.run_id


def _register(client: MlflowClient, run_id: str, finetuned: Path, name: str, report: dict, lineage: dict) -> int:
    model, meta = zoo.load_checkpoint(finetuned)
    size = meta["preprocessing"]["image_size"]
    example = np.zeros((2, meta["preprocessing"]["channels"], size, size), dtype=np.float32)
    # A batch of 2: MLflow stores the model as a torch.export graph (pt2, no pickle) traced on this example,
    # and a batch of 1 would pin the batch axis to 1 (../shared/ENVIRONMENT.md). The signature records the
    # batch axis as -1 (any size).
    signature = mlflow.models.infer_signature(example, model(torch.from_numpy(example)).detach().numpy())
    with mlflow.start_run(run_id=run_id, nested=True):
        # Our own checkpoint format rides along, so later runs can re-score this version with headstart's
        # preprocessing (the champion comparison below) without unpickling anything.
        mlflow.log_artifacts(str(finetuned), artifact_path="checkpoint")
        info = mlflow.pytorch.log_model(
            model, name="model", signature=signature, input_example=example, serialization_format="pt2",
            registered_model_name=name,
        )
    version = int(info.registered_model_version)
    tags = {
        **lineage,
        "verdict": report["verdict"],
        "transfer_gain": f"{report['transfer_gain']:.6f}",
        "transfer_gain_ci95": "[{:.6f}, {:.6f}]".format(*report["transfer_gain_ci95"]),
        "test_accuracy": f"{report['finetuned']['accuracy']:.6f}",
        "test_sha256": report["test_sha256"],
        "pretrained_sha256": meta["pretrained_sha256"] or "",
        "architecture": meta["architecture"],
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    return version


def _champion_accuracy(client: MlflowClient, name: str, report: dict, prepared: Path) -> float | None:
    """The current champion's accuracy on *this* test set: from its tags when it was scored on the same
    test set, otherwise by scoring its checkpoint here."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    if champion.tags.get("test_sha256") == report["test_sha256"] and "test_accuracy" in champion.tags:
        return float(champion.tags["test_accuracy"])
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=champion.run_id, artifact_path="checkpoint", dst_path=tmp)
        model, meta = zoo.load_checkpoint(Path(path))
        test = load_split(prepared, "test")
        return float((predict(model, test.x, meta["preprocessing"]).argmax(1) == test.y).mean())


def lineage(prepared: Path, params_digest: str, dvc_lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """What a model version must say about where it came from."""
    return {
        "git_commit": _git_commit(),
        "data_dvc_md5": _dvc_out_md5(dvc_lock, "prepare", prepared),
        "data_manifest_sha256": sha256_file(Path(prepared) / "manifest.json"),
        "params_sha256": params_digest,
    }


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def _dvc_out_md5(lock: Path, stage: str, out: Path) -> str:
    """The hash DVC recorded for a stage output (what `dvc status` compares), or 'unknown' outside DVC."""
    import yaml

    if not Path(lock).exists():
        return "unknown"
    outs = (yaml.safe_load(Path(lock).read_text()) or {}).get("stages", {}).get(stage, {}).get("outs", [])
    return next((o.get("md5", "unknown") for o in outs if Path(o["path"]) == Path(out)), "unknown")


def main(argv: list[str] | None = None) -> None:
    params = cli(__doc__, argv)
    paths = params.paths
    run(
        paths.prepared, paths.finetuned, paths.baselines,
        {"finetuned": paths.finetune_history, "scratch": paths.scratch_history},
        paths.evaluate_metrics, paths.evaluate_plots, paths.registered,
        Store(paths.mlflow_db, paths.mlflow_artifacts), params.register,
        lineage(paths.prepared, params.digest()),
    )  # fmt: skip


if __name__ == "__main__":
    main()


def attach_onnx(receipt: dict[str, Any], files: dict[str, Path], report: dict[str, Any]) -> None:
    """Log the exported ONNX files to the run of the registered version and tag the version with their
    parity, accuracy and size. Called by the export stage, so that MLflow stays in this module."""
    mlflow.set_tracking_uri(receipt["tracking_uri"])
    client = MlflowClient()
    for path in files.values():
        client.log_artifact(receipt["run_id"], str(path), artifact_path="onnx")
    keys = ("max_abs_diff", "worst_tolerance_use", "top1_agreement", "fp32_accuracy", "int8_accuracy",
            "int8_relative_drop", "int8_accepted", "size_bytes", "int8_size_bytes")
    for k in keys:
        client.set_model_version_tag(receipt["model_name"], receipt["version"], f"onnx_{k}", str(report[k]))
    for k in ("fp32_accuracy", "int8_accuracy", "size_bytes", "int8_size_bytes"):
        client.log_metric(receipt["run_id"], f"onnx_{k}", float(report[k]))


def fetch_alias(store: Store, name: str, alias: str, dst: Path, int8: bool = False) -> tuple[str, Path, Path]:
    """Resolve `models:/<name>@<alias>` to a concrete version now, and download what serving it needs:
    the version, its checkpoint JSON (classes, preprocessing) and its ONNX file."""
    mlflow.set_tracking_uri(store.uri())
    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        raise LookupError(f"no version of {name} has the alias {alias!r}: set it in the MLflow UI (make ui)") from None
    if int8 and version.tags.get("onnx_int8_accepted") != "True":
        raise ValueError(f"{name} version {version.version}: its int8 model was not accepted by export; serve fp32")
    fetch = lambda path: Path(mlflow.artifacts.download_artifacts(  # noqa: E731
        run_id=version.run_id, artifact_path=path, dst_path=str(dst)))
    onnx_file = "model_int8.onnx" if int8 else "model.onnx"
    return str(version.version), fetch("checkpoint/model.json"), fetch(f"onnx/{onnx_file}")
