"""Record the pipeline run in MLflow and register the fine-tuned model. The only module that imports mlflow.
One parent run per pipeline run, a nested run per model (params, per-epoch metrics, test metrics,
confusion matrix); the fine-tuned model is registered under register.model_name with lineage tags, its
ONNX files and a model card. The promotion gate (minimum accuracy, gain over scratch judged by its CI,
ONNX parity, no regression against the current `champion`, and the continual-retraining guard: no
forgetting of the previous data version's test set, found through DVC) is recorded check by check as tags
gate.<check>.value / gate.<check>.passed and gate.passed; `challenger` is set only when every check passes.
Reads paths.prepared, paths.finetuned, paths.baselines, the training histories, paths.evaluate_*,
paths.onnx, paths.onnx_int8 and paths.export_metrics; writes the receipt paths.registered. Tracking store: $MLFLOW_TRACKING_URI, else SQLite at paths.mlflow_db.
Run: dvc repro register   (or: python -m stages.register)"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stages import zoo
from stages.data import load_split
from stages.evaluate import answer, candidate
from stages.files import read_json, sha256_file, write_json
from stages.params import RegisterParams, cli
from stages.registry import CHALLENGER, CHAMPION, FILE_TAGS, Store, use
from stages.stats import bootstrap_ci
from stages.train import predict


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


@dataclass(frozen=True)
class Check:
    """One promotion-gate check, recorded on the model version as tags gate.<name>.value / .passed."""

    name: str
    value: str
    rule: str
    passed: bool


def gate(report: dict, export: dict, champion_accuracy: float | None, p: RegisterParams, candidate: str = "finetuned"
         ) -> list[Check]:
    """The checks a version of `candidate` must pass to become `challenger` (and, unless forced, `champion`)."""
    acc = report[candidate]["accuracy"]
    # the candidate against the best of the other models the run trained, on the same test examples
    others = report["vs"] if candidate == "finetuned" else report["best_vs"]
    runner_up = max(others, key=lambda m: report[m]["accuracy"])
    low = others[runner_up]["gain_ci95"][0]
    checks = [
        Check("min_accuracy", f"{acc:.4f}", "test accuracy >= " + ("(not set)" if p.min_accuracy is None
              else f"{p.min_accuracy}"), p.min_accuracy is None or acc >= p.min_accuracy),
        Check("beats_alternatives", f"{low:+.4f}", f"95% CI of {candidate} - {runner_up} (the best other model) "
              f"lies above {p.min_gain}", low > p.min_gain),
        Check("onnx_parity", f"{export['worst_tolerance_use']:.2f}",
              "ONNX logits within the export tolerance (<= 1.00 of it) on the whole test set",
              bool(export.get("parity_passed")) and export["worst_tolerance_use"] <= 1),
    ]
    if champion_accuracy is None:
        checks.append(Check("vs_champion", "no champion", f"accuracy >= champion's - {p.max_regression}", True))
    else:
        delta = acc - champion_accuracy
        checks.append(Check("vs_champion", f"{delta:+.4f}", f"accuracy >= champion's - {p.max_regression} "
                            "on the same test set", delta >= -p.max_regression))
    return checks


def run(
    prepared: Path,
    finetuned: Path,
    baselines: Path,
    histories: dict[str, Path],
    evaluation: Path,
    plots: Path,
    exported: Path,
    onnx_files: dict[str, Path],
    out: Path,
    store: Store,
    p: RegisterParams,
    lineage: dict[str, str],
) -> dict[str, Any]:
    report, export = read_json(evaluation), read_json(exported)
    name = candidate(report, p.candidate)
    if export.get("model", "finetuned") != name:
        raise ValueError(f"{exported} holds the ONNX export of {export.get('model', 'finetuned')}, but the candidate "
                         f"is {name}: run the export stage first (dvc repro export)")
    model_dir = zoo.model_dirs(finetuned, baselines)[name]
    experiment_id = connect(store, p.experiment)
    client = MlflowClient()
    key = run_key(model_dir, evaluation, exported, lineage)
    earlier = _registered_for(client, experiment_id, p.model_name, key)
    latest = _latest_version(client, p.model_name)
    if earlier is None and latest is not None:  # before anything is logged: a refusal leaves the store as it was
        check_same_task(latest, p.model_name, model_dir)

    if earlier is None:
        with mlflow.start_run(experiment_id=experiment_id, run_name="pipeline") as parent:
            mlflow.set_tags({"headstart.role": "pipeline", **{f"headstart.{k}": v for k, v in lineage.items()}})
            mlflow.log_metrics({k: report[k] for k in ("transfer_gain", "mcnemar_p")})
            mlflow.log_metrics({"transfer_gain_ci95_low": report["transfer_gain_ci95"][0],
                                "transfer_gain_ci95_high": report["transfer_gain_ci95"][1]})
            mlflow.set_tag("verdict", report["verdict"])
            mlflow.log_artifact(str(evaluation))
            runs = {}
            for model, path in zoo.model_dirs(finetuned, baselines).items():
                runs[model] = _log_model_run(experiment_id, model, path, histories.get(model), report[model], plots)
            # Marks the run before the version exists: a rerun after a failure past this point finds the
            # version by it and completes that one instead of registering the same model twice.
            client.set_tag(runs[name], RUN_KEY, key)
            version = _register(client, runs[name], model_dir, p.model_name, report, lineage, name)
            _attach_onnx(client, runs[name], p.model_name, version, onnx_files, export)
        parent_id = parent.info.run_id
    else:
        version, runs = int(earlier.version), {name: earlier.run_id}
        parent_id = client.get_run(earlier.run_id).data.tags.get("mlflow.parentRunId", "")
        print(f"{p.model_name} version {version} was registered from this same model and evaluation by an earlier "
              "attempt; completing it instead of registering it again")
        _attach_onnx(client, earlier.run_id, p.model_name, version, onnx_files, export)

    champion_acc = _champion_accuracy(client, p.model_name, report, prepared, model_dir)
    checks = [*gate(report, export, champion_acc, p, name),
              previous_data_check(client, p.model_name, version, model_dir, allow_unchecked=p.allow_unchecked_previous_data)]
    ok = all(c.passed for c in checks)
    for c in checks:
        client.set_model_version_tag(p.model_name, version, f"gate.{c.name}.value", c.value)
        client.set_model_version_tag(p.model_name, version, f"gate.{c.name}.passed", str(c.passed).lower())
    client.set_model_version_tag(p.model_name, version, "gate.passed", str(ok).lower())
    failed = [c.name for c in checks if not c.passed]
    not_run = [f"{c.name} ({c.value})" for c in checks if c.value.startswith("not run")]
    reason = ("all gate checks passed" if ok else f"gate failed: {', '.join(failed)}") + (
        f"; not run: {', '.join(not_run)}" if not_run else "")
    client.set_model_version_tag(p.model_name, version, "challenger_decision", reason)
    meta = read_json(model_dir / "model.json")
    card = model_card(p.model_name, version, meta, report, export, checks, lineage, name)
    client.update_model_version(p.model_name, version, description=card)
    client.log_text(runs[name], card, "model_card.md")
    if ok:
        client.set_registered_model_alias(p.model_name, CHALLENGER, version)
    aliases = sorted(client.get_model_version(p.model_name, version).aliases)
    receipt = {"model_name": p.model_name, "version": version, "run_id": runs[name], "aliases": aliases,
               "candidate": name, "parent_run_id": parent_id, "tracking_uri": store.uri(),
               "challenger_reason": reason, "gate": [asdict(c) for c in checks]}
    write_json(out, receipt)
    print(f"registered {p.model_name} version {version} (aliases: {', '.join(aliases) or 'none'}): {reason}")
    return receipt


RUN_KEY = "headstart.run_key"
PREVIOUS_DATA_RULE = "accuracy on the previous data version's test set >= the lower end of that version's 95% CI there"


def previous_data_check(client: MlflowClient, name: str, version: int, finetuned: Path,
                        n_bootstrap: int = 2000, seed: int = 0, allow_unchecked: bool = False) -> Check:
    """The continual-retraining guard: when this version was trained on a newer data version than the
    versions before it, score it on the test set of the latest earlier data version (read from the DVC
    cache by the prepared data's hash, tag data_dvc_md5) next to the version registered from that data.
    It fails when the new model's accuracy there falls below that version's 95% CI: it forgot old data.
    It fails closed: when that test set is not in the DVC cache the check did not run, and it passes only
    when `allow_unchecked` (register.allow_unchecked_previous_data) says so."""
    this = client.get_model_version(name, str(version))
    md5 = this.tags.get("data_dvc_md5", "unknown")
    earlier = [v for v in client.search_model_versions(f"name='{name}'")
               if int(v.version) < version and v.tags.get("data_dvc_md5", "unknown") not in ("unknown", md5)]
    if md5 == "unknown" or not earlier:
        return Check("previous_data", "no earlier data version", PREVIOUS_DATA_RULE, True)
    old = max(earlier, key=lambda v: int(v.version))
    test = dvc_cached_split(old.tags["data_dvc_md5"], "test")
    if test is None:
        print(f"WARNING: the test set of version {old.version}'s data ({old.tags['data_dvc_md5']}) is not in the DVC "
              "cache, so the continual-retraining guard did not run: `dvc pull` brings it back"
              + (" (register.allow_unchecked_previous_data: true lets the gate pass without it)" if allow_unchecked
                 else "; the gate fails until then, or set register.allow_unchecked_previous_data: true"))
        return Check("previous_data", f"not run: v{old.version}'s test set is not in the DVC cache", PREVIOUS_DATA_RULE,
                     allow_unchecked)
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=old.run_id, artifact_path="checkpoint", dst_path=tmp)
        old_model, old_meta = zoo.load_checkpoint(Path(path))
        old_correct = predict(old_model, test.x, old_meta["preprocessing"]).argmax(1) == test.y
    new_model, new_meta = zoo.load_checkpoint(finetuned)
    new_acc = float((predict(new_model, test.x, new_meta["preprocessing"]).argmax(1) == test.y).mean())
    low, _ = bootstrap_ci(lambda i: old_correct[i].mean(), len(test.y), n_bootstrap, seed)
    print(f"continual-retraining guard: on version {old.version}'s test set ({len(test.y)} examples) this model "
          f"scores {new_acc:.4f}, version {old.version} {old_correct.mean():.4f} (95% CI from {low:.4f})")
    return Check("previous_data", f"{new_acc - float(old_correct.mean()):+.4f} vs v{old.version}", PREVIOUS_DATA_RULE,
                 new_acc >= low)


def dvc_cached_split(dir_md5: str, split: str, repo: Path = Path(".")) -> Any:
    """Split `split` of the prepared data whose DVC hash is `dir_md5` ("<md5>.dir"), read from the DVC cache
    (any data version DVC has seen here, current or not); None when the cache no longer holds it."""
    from dvc.repo import Repo

    from stages.data import Split

    cache = Repo(str(repo)).cache.local
    listing = Path(cache.oid_to_path(dir_md5))
    if not listing.exists():
        return None
    entries = {e["relpath"]: e["md5"] for e in json.loads(listing.read_text())}
    for suffix in (".safetensors", ".jsonl"):
        if f"{split}{suffix}" in entries:
            blob = Path(cache.oid_to_path(entries[f"{split}{suffix}"]))
            if not blob.exists():
                return None
            with tempfile.TemporaryDirectory() as tmp:  # the cache holds it under its hash, not its name
                shutil.copy(blob, Path(tmp) / f"{split}{suffix}")
                loaded: Split = load_split(Path(tmp), split)
            return loaded
    return None


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


def _registered_for(client: MlflowClient, experiment_id: str, name: str, key: str):
    """The model version an earlier attempt registered for this run key, or None."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY}` = '{key}'")
    for r in runs:
        found = client.search_model_versions(f"name='{name}' and run_id='{r.info.run_id}'")
        if found:
            return found[0]
    return None


def _log_model_run(experiment_id: str, name: str, path: Path, history: Path | None, metrics: dict, plots: Path) -> str:
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


def _register(client: MlflowClient, run_id: str, model_dir: Path, name: str, report: dict, lineage: dict,
              candidate: str) -> int:
    model, meta = zoo.load_checkpoint(model_dir)
    pre = meta["preprocessing"]
    if zoo.modality(pre) == "text":
        # Tokens in, logits out (the tokenizer rides along in the checkpoint artifacts). Two texts of
        # different lengths so neither the batch nor the sequence axis is pinned by the example.
        from stages.data import to_model_input

        ids, mask = to_model_input(np.array(["a short text", "a somewhat longer text to read"], dtype=object), pre)
        example = (ids.numpy(), mask.numpy())
        output = model(ids, mask)
    else:
        size = pre["image_size"]
        example = np.zeros((2, pre["channels"], size, size), dtype=np.float32)
        output = model(torch.from_numpy(example))
    # A batch of 2: MLflow stores the model as a torch.export graph (pt2, no pickle) traced on this example,
    # and a batch of 1 would pin the batch axis to 1 (../shared/ENVIRONMENT.md). The signature records the
    # batch axis as -1 (any size).
    signature = mlflow.models.infer_signature(example if not isinstance(example, tuple) else None,
                                              output.detach().numpy())
    if isinstance(example, tuple):  # batch and sequence length both free (-1): torch.export keeps them dynamic
        from mlflow.types.schema import Schema, TensorSpec

        from stages.text import INPUTS

        signature.inputs = Schema([TensorSpec(np.dtype(np.int64), (-1, -1), name) for name in INPUTS])
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


def _latest_version(client: MlflowClient, name: str):
    found = client.search_model_versions(f"name='{name}'")
    return max(found, key=lambda v: int(v.version)) if found else None


def _champion_accuracy(client: MlflowClient, name: str, report: dict, prepared: Path, model_dir: Path
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
        paths.evaluate_metrics, paths.evaluate_plots, paths.export_metrics,
        {"fp32": paths.onnx, "int8": paths.onnx_int8, "serving": paths.serving}, paths.registered,
        Store(paths.mlflow_db, paths.mlflow_artifacts), params.register,
        lineage(paths.prepared, params.digest()),
    )  # fmt: skip



def _attach_onnx(client: MlflowClient, run_id: str, name: str, version: int, files: dict[str, Path], export: dict) -> None:
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


def _input_params(pre: dict) -> dict[str, Any]:
    keys = ("max_length", "pooling") if zoo.modality(pre) == "text" else ("image_size",)
    return {k: pre[k] for k in keys if k in pre}


def _inputs(pre: dict) -> str:
    if zoo.modality(pre) == "text":
        return f"texts of up to {pre['max_length']} tokens ({pre.get('pooling', 'tf-idf')} pooling)"
    return f"images at {pre['image_size']} px"


def model_card(
    name: str, version: int, meta: dict, report: dict, export: dict, checks: list[Check], lineage: dict,
    candidate: str = "finetuned",
) -> str:
    """A short markdown card: which model won and by how much, where it came from, and the gate's verdict."""
    def ci(v: list[float]) -> str:
        return f"[{v[0]:.4f}, {v[1]:.4f}]"

    rows = "\n".join(
        f"| {m}{' (this version)' if m == candidate else ''} | {report[m]['accuracy']:.4f} | "
        f"{ci(report[m]['accuracy_ci95'])} | {report[m]['macro_f1']:.4f} |"
        for m in ("finetuned", *zoo.BASELINES)
    )
    others = report["vs"] if candidate == "finetuned" else report["best_vs"]
    vs_rows = "\n".join(f"| {candidate} - {m} | {c['gain']:+.4f} | {ci(c['gain_ci95'])} | {c['mcnemar_p']:.2g} |"
                         for m, c in others.items())
    gate_rows = "\n".join(f"| {c.name} | {c.value} | {c.rule} | {'pass' if c.passed else 'FAIL'} |" for c in checks)
    paid = ("transfer paid" if report["transfer_verdict"] == "positive" else "transfer did not clearly pay")
    passed = all(c.passed for c in checks)
    decision = ("gate passed" if passed else
                f"GATE FAILED ({', '.join(c.name for c in checks if not c.passed)}): do not promote")
    pre = meta["preprocessing"]
    return f"""# {name} version {version}: {candidate}, {decision}

**{'Gate passed' if passed else 'GATE FAILED: do not promote this version'}** ({zoo.modality(pre)} model,
{len(meta['classes'])} classes: {', '.join(meta['classes'][:6])}{', ...' if len(meta['classes']) > 6 else ''}).

**{answer(report)}** This version is the **{candidate}** model ({meta['architecture']}, {meta['init']} weights{
    f" sha256 `{meta['pretrained_sha256']}`" if meta.get('pretrained_sha256') else ""}, trained on
{meta['train'].get('n_train', 'the')} labelled examples) for {_inputs(meta['preprocessing'])}; classes: {', '.join(meta['classes'])}.
Fine-tuned vs the same network from random weights: {report['transfer_gain']:+.4f}
(95% CI {ci(report['transfer_gain_ci95'])}, McNemar p = {report['mcnemar_p']:.2g}): {paid}.
Scored on {report['n_test']} test examples (test set sha256 `{report['test_sha256'][:16]}`).

| model | test accuracy | 95% CI | macro-F1 |
|---|---|---|---|
{rows}

| comparison | accuracy gain | 95% CI (paired bootstrap) | McNemar p |
|---|---|---|---|
{vs_rows}

## Gate: {'passed' if all(c.passed for c in checks) else 'FAILED'}

| check | value | rule | result |
|---|---|---|---|
{gate_rows}

## Deployment

ONNX fp32: {export['size_bytes'] / 1e6:.1f} MB, parity with PyTorch: max |logit diff| {export['max_abs_diff']:.1e},
top-1 agreement {export['top1_agreement']:.4%}. ONNX int8: {export['int8_size_bytes'] / 1e6:.1f} MB, test accuracy
{export['int8_accuracy']:.4f} vs fp32 {export['fp32_accuracy']:.4f} ({'accepted' if export['int8_accepted'] else 'rejected'}).

## Lineage

{chr(10).join(f"- {k}: `{v}`" for k, v in lineage.items())}
"""


if __name__ == "__main__":
    main()
