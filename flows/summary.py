"""What a person reads after a run (`summary`) and what machines read (paths.summaries/<task>/summary.json):
the answer in one sentence, accuracies with intervals, comparisons, time to accuracy, registration and ONNX
parity."""

from __future__ import annotations

import json
from pathlib import Path

from stages.params import Params


def summary(params: Params) -> str:
    """The few lines a person wants after a run: the answer in one sentence, accuracies with CIs, the
    fine-tuned model against each alternative, how much sooner it reached scratch's best, what was registered,
    parity. Also writes paths.summaries/<task>/summary.json."""
    from stages.evaluate import answer
    from stages.speedup import time_lines

    paths = params.paths
    if not paths.evaluate_metrics.exists():
        return "no results yet: run `make run`"
    ev = json.loads(paths.evaluate_metrics.read_text())
    if "vs" not in ev:
        return "the last evaluation predates this version of headstart: run `make run` to evaluate again"
    out = [answer(ev), f"{'model':<14}{'test accuracy':>14}  {'95% CI':<18}{'val accuracy':>12}"]
    for name in ("finetuned", "scratch", "linear_probe", "floor"):
        lo, hi = ev[name]["accuracy_ci95"]
        best = "  <- best" if name == ev["best"] else ""
        val = "-" if ev[name]["val_accuracy"] is None else f"{ev[name]['val_accuracy']:.4f}"
        out.append(f"{name:<14}{ev[name]['accuracy']:>14.4f}  [{lo:.4f}, {hi:.4f}]  {val:>11}{best}")
    seeds = ev.get("seeds", 1)  # absent from an evaluation made before seeds: one
    if seeds > 1:  # the table is seed 0's, the models that ship; the comparisons use every seed
        out.append("test accuracy per training seed: " + "; ".join(
            f"{m} {', '.join(f'{a:.4f}' for a in ev[m]['seed_accuracies'])}" for m in ("finetuned", "scratch")))
    for alt, c in ev["vs"].items():
        lo, hi = c["gain_ci95"]
        per_seed = f"; per seed {', '.join(f'{g:+.4f}' for g in c['seed_gains'])}" if "seed_gains" in c else ""
        out.append(f"fine-tuned - {alt}: {c['gain']:+.4f} [{lo:+.4f}, {hi:+.4f}], McNemar p = {c['mcnemar_p']:.2g}"
                   + per_seed + (" (seeds disagree)" if c.get("seeds_disagree") else ""))
    out.append(f"verdict (fine-tuned vs the best alternative, {ev['best_alternative']}): {ev['verdict']}; "
               f"transfer (fine-tuned vs scratch): {ev['transfer_verdict']}; "
               + (f"{seeds} training seeds (intervals over seeds, then test examples)" if seeds > 1 else
                  "1 training seed (evaluate.seeds: 3 puts seed variance into the verdict)"))
    out += time_lines(ev.get("time_to_accuracy") or {})  # absent from an evaluation made before it was measured
    out += _transfer_notes(params, ev)
    registered = json.loads(paths.registered.read_text()) if paths.registered.exists() else None
    if registered:
        out.append(f"registered: {registered['model_name']} version {registered['version']} "
                   f"({registered.get('candidate', 'finetuned')}), aliases: "
                   f"{', '.join(registered['aliases']) or 'none'} ({registered.get('challenger_reason', '')})")
    if paths.export_metrics.exists():
        e = json.loads(paths.export_metrics.read_text())
        out.append(f"ONNX ({e.get('model', 'finetuned')}): {e['onnx_path']}, top-1 agreement {e['top1_agreement']:.4%}, "
                   f"max |logit diff| {e['max_abs_diff']:.1e} ({e['worst_tolerance_use']:.0%} of the tolerance) on "
                   f"{e['n_examples']} test examples")
        out.append(f"ONNX int8: {e['onnx_int8_path']}, test accuracy {e['int8_accuracy']:.4f} vs fp32 "
                   f"{e['fp32_accuracy']:.4f} ({'accepted' if e['int8_accepted'] else 'rejected'}), "
                   f"{e['int8_size_bytes'] / 1e6:.1f} MB vs {e['size_bytes'] / 1e6:.1f} MB")
    out.append("Browse runs and the registry: make ui  (then open http://127.0.0.1:5000)")
    write_summary(paths.summaries / params.task / "summary.json", ev, registered, params.task)
    return "\n".join(out)


def write_summary(path: Path, ev: dict, registered: dict | None, task: str) -> None:
    """The run's result for machines (CI jobs, the PR report, scripts): every model, the best, the verdict,
    time to accuracy (evaluate's `time_to_accuracy`; None from an evaluation made before it was measured)."""
    from stages.files import write_json

    keys = ("accuracy", "accuracy_ci95", "val_accuracy")
    write_json(path, {
        "task": task,
        "models": {m: {k: ev[m][k] for k in keys} for m in ("finetuned", "scratch", "linear_probe", "floor")},
        "best": ev["best"],
        "best_alternative": ev["best_alternative"],
        "verdict": ev["verdict"],
        "transfer_verdict": ev["transfer_verdict"],
        "seeds": ev.get("seeds", 1),
        "vs": {m: {k: c[k] for k in ("gain", "gain_ci95", "mcnemar_p", "seed_gains", "seeds_disagree") if k in c}
               for m, c in ev["vs"].items()},
        "time_to_accuracy": ev.get("time_to_accuracy"),
        "registered": None if registered is None else {
            "model_name": registered["model_name"], "version": registered["version"],
            "aliases": registered["aliases"], "candidate": registered.get("candidate", "finetuned")},
        "n_test": ev["n_test"],
    })  # fmt: skip


def _transfer_notes(params: Params, ev: dict) -> list[str]:
    """Domain shift (measured by select before training), forgetting and drift, when the run has them;
    a warning when the shift is large and transfer did not clearly help (likely negative transfer)."""
    from stages.shift import LARGE_PAD

    out = []
    paths = params.paths
    if paths.select_metrics.exists() and paths.chosen_model.exists():
        used = json.loads(paths.chosen_model.read_text())["model"]
        shift = json.loads(paths.select_metrics.read_text())["candidates"].get(used, {}).get("domain_shift")
        if shift:
            out.append(f"domain shift, source -> target (before training): proxy A-distance "
                       f"{shift['proxy_a_distance']:.2f}, MMD^2 {shift['mmd2']:.4f} (p = {shift['mmd_p_value']:.3g})")
            if shift["proxy_a_distance"] > LARGE_PAD and ev["verdict"] != "positive":
                out.append(f"WARNING: the target data is far from {used}'s source (proxy A-distance "
                           f"{shift['proxy_a_distance']:.2f} > {LARGE_PAD}) and the verdict is {ev['verdict']}: "
                           "likely negative transfer. Try another pre-trained model (select.candidates), a "
                           "gentler strategy (lp_ft, l2sp), or more labels")
    if "forgetting" in ev:
        f = ev["forgetting"]
        lo, hi = f["forgetting_ci95"]
        out.append(f"source task: accuracy {f['source_accuracy_before']:.4f} before fine-tuning, "
                   f"{f['source_accuracy_after']:.4f} after (forgetting {f['forgetting']:+.4f} [{lo:+.4f}, {hi:+.4f}])")
    if "representation_drift" in ev:
        cka = ev["representation_drift"]["linear_cka"]
        out.append("representation drift, CKA per layer group from the input: " + " ".join(f"{v:.2f}" for v in cka.values()))
    return out
