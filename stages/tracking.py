"""MLflow, write side: the client code the register stage and the compare and curves flows record with.
An experiment in a store (`connect`), the lineage tags a run carries, one run per `make compare` or
`make curves`, and for a pipeline run: the parent run, a nested run per model, the candidate's registered
version (a torch.export graph, headstart's checkpoint, the ONNX files and their sha256 tags), found again by
its run key so a rerun completes it instead of registering it twice. Reading a version for serving is
stages/registry.py (no torch); deciding whether a version earns `challenger` is stages/register.py."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stages import zoo
from stages.files import read_json, sha256_file
from stages.modality import adapter
from stages.predict import predict
from stages.registry import CHAMPION, FILE_TAGS, Store, use
from stages.splits import load_split

RUN_KEY = "headstart.run_key"


def connect(store: Store, experiment: str) -> str:
    """Point mlflow at the store and return the experiment id, creating it on first use."""
    use(store)
    try:
        found = mlflow.get_experiment_by_name(experiment)
    except Exception as e:  # an HTTP error, a refused connection, a locked or unreadable database
        raise ConnectionError(
            f"cannot reach the MLflow tracking store at {store.uri()}: {str(e).splitlines()[0][:300]}. Nothing was "
            "registered; rerun when it is back (the flow retries this stage by itself)") from e
    if found is not None:
        return found.experiment_id
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else Path(store.artifacts).resolve().as_uri()
    return mlflow.create_experiment(experiment, artifact_location=location)


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


def log_comparison(store: Store, experiment: str, summary: Path, results: Path, plot: Path,
                   lineage: dict[str, str]) -> str:
    """Record a `make compare` as one parent run ("compare") with a nested run per strategy: its settings
    as params, its test accuracy and CI, seconds and trainable parameters as metrics, its per-epoch history.
    Returns the parent run id."""
    experiment_id = connect(store, experiment)
    gathered = read_json(summary)
    with mlflow.start_run(experiment_id=experiment_id, run_name="compare") as parent:
        mlflow.set_tags({"headstart.role": "compare", **{f"headstart.{k}": v for k, v in lineage.items()},
                         "best_on_validation": gathered["best_on_validation"]})
        mlflow.log_artifact(str(summary))
        if Path(plot).exists():
            mlflow.log_artifact(str(plot))
        for name, r in gathered["strategies"].items():
            detail = read_json(Path(results) / f"{name}.json")
            with mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=True):
                mlflow.set_tags({"headstart.role": "strategy", "headstart.strategy": name})
                mlflow.log_params({"strategy": name, **{f"finetune.{k}": v for k, v in r["settings"].items()}})
                rows = list(csv.DictReader(detail.get("history_csv", "").splitlines()))
                for row in rows:
                    step = int(float(row.pop("epoch")))
                    mlflow.log_metrics({k: float(v) for k, v in row.items() if v not in ("", None)}, step=step)
                mlflow.log_metrics({"test_accuracy": r["accuracy"], "test_accuracy_ci95_low": r["accuracy_ci95"][0],
                                    "test_accuracy_ci95_high": r["accuracy_ci95"][1],
                                    "train_seconds": r["train_seconds"], "trainable_params": r["trainable_params"],
                                    "val_accuracy": r["val_accuracy"]})
    return parent.info.run_id


def log_curves(store: Store, experiment: str, summary: Path, plot: Path, params_digest: str) -> str:
    """Record a `make curves` as one run ("curves"): each budget's mean accuracies as metrics (step = the
    budget), the label multiplier, the JSON and the plot. Returns the run id."""
    experiment_id = connect(store, experiment)
    r = read_json(summary)
    lm = r["label_multiplier"]
    with mlflow.start_run(experiment_id=experiment_id, run_name="curves") as run:
        mlflow.set_tags({"headstart.role": "curves", "headstart.params_sha256": params_digest, "model": r["model"]})
        mlflow.log_params({"budgets": r["budgets"], "seeds": r["seeds"], **r["settings"]})
        for b in r["budgets"]:
            mlflow.log_metrics({f"{m}_accuracy": r["curves"][m][str(b)]["mean"] for m in r["curves"]}, step=b)
        mlflow.log_metrics({k: v for k, v in (("label_multiplier", lm["multiplier"]),
                                              ("label_multiplier_more_than", lm["more_than"])) if v is not None})
        mlflow.log_artifact(str(summary))
        if Path(plot).exists():
            mlflow.log_artifact(str(plot))
    return run.info.run_id


def run_key(finetuned: Path, evaluation: Path, exported: Path, lineage: dict[str, str]) -> str:
    """Identifies one pipeline result: the same weights, evaluation, export and settings give the same key."""
    parts = [sha256_file(Path(finetuned) / "model.safetensors"), sha256_file(evaluation), sha256_file(exported),
             lineage.get("params_sha256", "")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def registered_for(client: MlflowClient, experiment_id: str, name: str, key: str):
    """The model version an earlier attempt registered for this run key, or None."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY}` = '{key}'")
    for r in runs:
        found = client.search_model_versions(f"name='{name}' and run_id='{r.info.run_id}'")
        if found:
            return found[0]
    return None


def latest_version(client: MlflowClient, name: str):
    """The highest-numbered version of registered model `name`, or None when it has none."""
    found = client.search_model_versions(f"name='{name}'")
    return max(found, key=lambda v: int(v.version)) if found else None


def check_same_task(version, name: str, model_dir: Path) -> None:
    """Refuse, naming both, when a registered `version` of `name` is of another modality or class list than
    the model in `model_dir`: versions of one registered model are one task's, compared on its test set."""
    ours = read_json(Path(model_dir) / "model.json")
    with tempfile.TemporaryDirectory() as tmp:
        theirs = read_json(Path(mlflow.artifacts.download_artifacts(
            run_id=version.run_id, artifact_path="checkpoint/model.json", dst_path=tmp)))
    mine = (zoo.modality(ours["preprocessing"]), ours["classes"])
    held = (zoo.modality(theirs["preprocessing"]), theirs["classes"])
    if mine != held:
        raise ValueError(
            f"register.model_name {name!r}: its version {version.version} is a model of {held[0]}s, classes {held[1]}; "
            f"this run's model is of {mine[0]}s, classes {mine[1]}; a registered model holds one task's "
            "versions. Give this task its own register.model_name (make run DATA=... NAME=... does)")


@contextmanager
def pipeline_run(experiment_id: str, report: dict, evaluation: Path, lineage: dict[str, str]) -> Iterator[str]:
    """The parent run of one pipeline run, open for the block (its model runs nest in it); yields its id."""
    with mlflow.start_run(experiment_id=experiment_id, run_name="pipeline") as parent:
        mlflow.set_tags({"headstart.role": "pipeline", **{f"headstart.{k}": v for k, v in lineage.items()}})
        mlflow.log_metrics({k: report[k] for k in ("transfer_gain", "mcnemar_p")})
        mlflow.log_metrics({"transfer_gain_ci95_low": report["transfer_gain_ci95"][0],
                            "transfer_gain_ci95_high": report["transfer_gain_ci95"][1]})
        mlflow.set_tag("verdict", report["verdict"])
        mlflow.log_artifact(str(evaluation))
        yield parent.info.run_id


@contextmanager
def downloaded_checkpoint(run_id: str) -> Iterator[Path]:
    """The checkpoint folder register_model logged with run `run_id`, downloaded for the block's duration."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint", dst_path=tmp))


def log_model_run(experiment_id: str, name: str, path: Path, history: Path | None, metrics: dict, plots: Path) -> str:
    """One model's nested run: its settings as params, its per-epoch history and test metrics, its confusion
    matrix. Returns the run id."""
    meta = read_json(Path(path) / "model.json")
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=True) as r:
        mlflow.set_tags({"headstart.role": "model", "headstart.model": name, "architecture": meta["architecture"],
                         "init": meta["init"]})
        mlflow.log_params({"architecture": meta["architecture"], **_input_params(meta["preprocessing"]),
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


def _input_params(pre: dict) -> dict[str, Any]:
    return adapter(pre).input_params(pre)


def register_model(client: MlflowClient, run_id: str, model_dir: Path, name: str, report: dict, lineage: dict,
                   candidate: str) -> int:
    """Log the checkpoint in `model_dir` to run `run_id` as a torch.export model and headstart's own
    checkpoint, register it under `name` and tag the version with its lineage and results. Returns the version."""
    model, meta = zoo.load_checkpoint(model_dir)
    pre = meta["preprocessing"]
    inputs = adapter(pre).example_inputs(pre)
    output = model(*inputs)
    example = tuple(x.numpy() for x in inputs) if len(inputs) > 1 else inputs[0].numpy()
    # A batch of 2: MLflow stores the model as a torch.export graph (pt2, no pickle) traced on this example,
    # and a batch of 1 would pin the batch axis to 1 (../shared/ENVIRONMENT.md). The signature records the
    # batch axis as -1 (any size).
    signature = mlflow.models.infer_signature(example if not isinstance(example, tuple) else None,
                                              output.detach().numpy())
    if isinstance(example, tuple):  # batch and sequence length both free (-1): torch.export keeps them dynamic
        from mlflow.types.schema import Schema, TensorSpec

        signature.inputs = Schema([TensorSpec(np.dtype(np.int64), (-1, -1), name)
                                   for name in adapter(pre).input_names(pre)])
    with mlflow.start_run(run_id=run_id, nested=True):
        # Our own checkpoint format rides along, so later runs can re-score this version with headstart's
        # preprocessing (the champion comparison below) without unpickling anything.
        mlflow.log_artifacts(str(model_dir), artifact_path="checkpoint")
        # The requirements named, not inferred: MLflow infers them by loading the model in a subprocess (8 s
        # of this stage's 22 s), and the pt2 graph needs torch and numpy to load, nothing else of ours.
        info = mlflow.pytorch.log_model(
            model, name="model", signature=signature, input_example=example, serialization_format="pt2",
            registered_model_name=name, pip_requirements=[f"torch=={torch.__version__}", f"numpy=={np.__version__}"],
        )
    version = int(info.registered_model_version)
    tags = {
        **lineage,
        "verdict": report["verdict"],
        "transfer_gain": f"{report['transfer_gain']:.6f}",
        "transfer_gain_ci95": "[{:.6f}, {:.6f}]".format(*report["transfer_gain_ci95"]),
        "candidate": candidate,
        "best": report["best"],
        "test_accuracy": f"{report[candidate]['accuracy']:.6f}",
        "test_sha256": report["test_sha256"],
        "modality": zoo.modality(pre),
        "classes": json.dumps(meta["classes"]),
        "pretrained_sha256": meta["pretrained_sha256"] or "",
        "architecture": meta["architecture"],
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    return version


def attach_onnx(client: MlflowClient, run_id: str, name: str, version: int, files: dict[str, Path], export: dict) -> None:
    """Log the exported ONNX files and their serving contract to the version's run; tag the version with
    each file's sha256 (what a server checks before serving it), their parity, accuracy and size."""
    for path in files.values():
        client.log_artifact(run_id, str(path), artifact_path="onnx")
        if Path(path).name in FILE_TAGS:
            client.set_model_version_tag(name, version, FILE_TAGS[Path(path).name], sha256_file(path))
    keys = ("max_abs_diff", "worst_tolerance_use", "top1_agreement", "fp32_accuracy", "int8_accuracy",
            "int8_relative_drop", "int8_accepted", "size_bytes", "int8_size_bytes")
    for k in keys:
        client.set_model_version_tag(name, version, f"onnx_{k}", str(export[k]))
    for k in ("fp32_accuracy", "int8_accuracy", "size_bytes", "int8_size_bytes"):
        client.log_metric(run_id, f"onnx_{k}", float(export[k]))


def champion_accuracy(client: MlflowClient, name: str, report: dict, prepared: Path, model_dir: Path
                       ) -> float | None:
    """The current champion's accuracy on *this* test set: from its tags when it was scored on the same
    test set, otherwise by scoring its checkpoint here. A champion of another modality or class list is no
    baseline for this model: registering under its name is refused, naming both."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    check_same_task(champion, name, model_dir)
    if champion.tags.get("test_sha256") == report["test_sha256"] and "test_accuracy" in champion.tags:
        return float(champion.tags["test_accuracy"])
    with downloaded_checkpoint(champion.run_id) as path:
        model, meta = zoo.load_checkpoint(path)
        test = load_split(prepared, "test")
        return float((predict(model, test.x, meta["preprocessing"]).argmax(1) == test.y).mean())
