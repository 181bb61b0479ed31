"""Register the pipeline's candidate model in MLflow and decide whether it earns `challenger`: the stage,
the promotion gate and its continual-retraining guard, and the model card. One parent run per pipeline run,
a nested run per model (params, per-epoch metrics, test metrics, confusion matrix); the candidate is
registered under register.model_name with lineage tags, its ONNX files and a model card (the MLflow client
code that writes them is stages/tracking.py). The promotion gate (minimum accuracy, gain over the other
models judged by its CI, ONNX parity, no regression against the current `champion`, and the
continual-retraining guard: no forgetting of the previous data version's test set, found through DVC) is
recorded check by check as tags gate.<check>.value / gate.<check>.passed and gate.passed; `challenger` is
set only when every check passes.
Reads paths.prepared, paths.finetuned, paths.baselines, the training histories, paths.evaluate_*,
paths.onnx, paths.onnx_int8 and paths.export_metrics; writes the receipt paths.registered. Tracking store: $MLFLOW_TRACKING_URI, else SQLite at paths.mlflow_db.
Run: dvc repro register   (or: python -m stages.register)"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from stages import checkpoint, tracking, zoo
from stages.evaluate import answer, candidate, score
from stages.files import read_json, write_json
from stages.modality import adapter
from stages.params import RegisterParams, cli
from stages.predict import predict
from stages.registry import CHALLENGER, Store
from stages.speedup import time_lines
from stages.splits import load_split
from stages.stats import bootstrap_ci


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
    runner_up = max(others, key=lambda m: score(report, m))
    low = others[runner_up]["gain_ci95"][0]
    disagree = bool(others[runner_up].get("seeds_disagree"))  # then no interval makes the gain trustworthy
    seeds = report.get("seeds", 1)
    checks = [
        Check("min_accuracy", f"{acc:.4f}", "test accuracy >= " + ("(not set)" if p.min_accuracy is None
              else f"{p.min_accuracy}"), p.min_accuracy is None or acc >= p.min_accuracy),
        Check("beats_alternatives", f"{low:+.4f}" + (", seeds disagree" if disagree else ""),
              f"95% CI of {candidate} - {runner_up} (the best other model"
              + (f"; over {seeds} training seeds, which agree on the sign" if seeds > 1 else "")
              + f") lies above {p.min_gain}", low > p.min_gain and not disagree),
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
    model_dir = checkpoint.model_dirs(finetuned, baselines)[name]
    experiment_id = tracking.connect(store, p.experiment)
    client = MlflowClient()
    key = tracking.run_key(model_dir, evaluation, exported, lineage)
    earlier = tracking.registered_for(client, experiment_id, p.model_name, key)
    latest = tracking.latest_version(client, p.model_name)
    if earlier is None and latest is not None:  # before anything is logged: a refusal leaves the store as it was
        tracking.check_same_task(latest, p.model_name, model_dir)

    if earlier is None:
        with tracking.pipeline_run(experiment_id, report, evaluation, lineage) as parent_id:
            runs = {model: tracking.log_model_run(experiment_id, model, path, histories.get(model), report[model], plots)
                    for model, path in checkpoint.model_dirs(finetuned, baselines).items()}
            # Marks the run before the version exists: a rerun after a failure past this point finds the
            # version by it and completes that one instead of registering the same model twice.
            client.set_tag(runs[name], tracking.RUN_KEY, key)
            version = tracking.register_model(client, runs[name], model_dir, p.model_name, report, lineage, name)
            tracking.attach_onnx(client, runs[name], p.model_name, version, onnx_files, export)
    else:
        version, runs = int(earlier.version), {name: earlier.run_id}
        parent_id = client.get_run(earlier.run_id).data.tags.get("mlflow.parentRunId", "")
        print(f"{p.model_name} version {version} was registered from this same model and evaluation by an earlier "
              "attempt; completing it instead of registering it again")
        tracking.attach_onnx(client, earlier.run_id, p.model_name, version, onnx_files, export)

    champion_acc = tracking.champion_accuracy(client, p.model_name, report, prepared, model_dir)
    checks = [*gate(report, export, champion_acc, p, name),
              previous_data_check(client, p.model_name, version, model_dir, allow_unchecked=p.allow_unchecked_previous_data)]
    ok, reason = record_gate(client, p.model_name, version, checks)
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


def record_gate(client: MlflowClient, name: str, version: int, checks: list[Check]) -> tuple[bool, str]:
    """Tag the version with each check (gate.<check>.value / .passed), gate.passed and the reason for the
    decision (challenger_decision); returns (passed, reason)."""
    ok = all(c.passed for c in checks)
    for c in checks:
        client.set_model_version_tag(name, version, f"gate.{c.name}.value", c.value)
        client.set_model_version_tag(name, version, f"gate.{c.name}.passed", str(c.passed).lower())
    client.set_model_version_tag(name, version, "gate.passed", str(ok).lower())
    failed = [c.name for c in checks if not c.passed]
    not_run = [f"{c.name} ({c.value})" for c in checks if c.value.startswith("not run")]
    reason = ("all gate checks passed" if ok else f"gate failed: {', '.join(failed)}") + (
        f"; not run: {', '.join(not_run)}" if not_run else "")
    client.set_model_version_tag(name, version, "challenger_decision", reason)
    return ok, reason


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
    with tracking.downloaded_checkpoint(old.run_id) as path:
        old_model, old_meta = zoo.load_checkpoint(path)
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

    from stages.splits import Split

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


def _inputs(pre: dict) -> str:
    return adapter(pre).describe(pre)


def model_card(
    name: str, version: int, meta: dict, report: dict, export: dict, checks: list[Check], lineage: dict,
    candidate: str = "finetuned",
) -> str:
    """A short markdown card: which model won and by how much, how much sooner fine-tuning reached scratch's
    best, where it came from, and the gate's verdict."""
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
    # absent from an evaluation made before time to accuracy was measured
    speed = "".join(f"{line[0].upper()}{line[1:]}.\n" for line in time_lines(report.get("time_to_accuracy") or {}))
    seeds = report.get("seeds", 1)
    over_seeds, resampled = (f" (mean over {seeds} seeds)", ", seeds then examples") if seeds > 1 else ("", "")
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
{speed}Scored on {report['n_test']} test examples (test set sha256 `{report['test_sha256'][:16]}`).

| model | test accuracy | 95% CI | macro-F1 |
|---|---|---|---|
{rows}

| comparison | accuracy gain{over_seeds} | 95% CI (paired bootstrap{resampled}) | McNemar p |
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


def main(argv: list[str] | None = None) -> None:
    params = cli(__doc__, argv)
    paths = params.paths
    run(
        paths.prepared, paths.finetuned, paths.baselines,
        {"finetuned": paths.finetune_history, "scratch": paths.scratch_history},
        paths.evaluate_metrics, paths.evaluate_plots, paths.export_metrics,
        {"fp32": paths.onnx, "int8": paths.onnx_int8, "serving": paths.serving}, paths.registered,
        Store(paths.mlflow_db, paths.mlflow_artifacts), params.register,
        tracking.lineage(paths.prepared, params.digest()),
    )  # fmt: skip


if __name__ == "__main__":
    main()
