"""A markdown report of the last pipeline run, for a pull-request comment or for reading on its own:
the verdict on transfer, every model's accuracy with its CI, the metrics and params against a base git
revision (`dvc metrics diff` / `dvc params diff`), the run against the current `champion` in the registry,
the promotion gate check by check, ONNX parity, and the plots.

Run:  python -m flows.report                      # against HEAD, written to reports/report.md
      python -m flows.report --base origin/main   # what the pull-request workflow does
The file is also printed, so `python -m flows.report > x.md` works too."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from stages.params import Params

MODELS = ("finetuned", "scratch", "linear_probe", "floor")
# The metrics a reviewer looks at first; the rest (per-class accuracies, sizes, hashes) go in a fold.
HEADLINE = ("accuracy", "macro_f1", "transfer_gain", "mcnemar_p", "verdict", "top1_agreement", "max_abs_diff",
            "int8_accuracy", "n_test")
DEFAULT_OUT = Path("reports/report.md")


def _ci(v: list[float], sign: str = "") -> str:
    return f"[{v[0]:{sign}.4f}, {v[1]:{sign}.4f}]"


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def diff_table(diff: dict[str, dict[str, dict]], base: str, keep: Any = lambda key: True) -> list[str]:
    """Rows of `dvc metrics/params diff --json` as a markdown table (old, new, change), one file after another."""
    rows = [f"| file | key | {base} | this run | change |", "|---|---|---|---|---|"]
    for file, entries in sorted(diff.items()):
        for key, e in sorted(entries.items()):
            if keep(key):
                change = "" if e.get("diff") is None else _cell(e["diff"])
                rows.append(f"| {file} | {key} | {_cell(e.get('old'))} | {_cell(e.get('new'))} | {change} |")
    return rows if len(rows) > 2 else []


def render(
    evaluation: dict[str, Any],
    export: dict[str, Any] | None,
    receipt: dict[str, Any] | None,
    champion: dict[str, Any] | None,
    metrics_diff: dict | None,
    params_diff: dict | None,
    base: str,
    plots: list[str],
    title: str = "headstart pipeline report",
) -> str:
    """The report from what the run wrote (pure: every input is passed in, so it is easy to test)."""
    ev = evaluation
    lo, hi = ev["transfer_gain_ci95"]
    out = [f"## {title}", ""]
    if "vs" in ev:  # evaluations before the comparison with every alternative had only the scratch one
        from stages.evaluate import answer

        out += [f"**Verdict: {ev['verdict']}** — {answer(ev)}", ""]
    out += [f"**Transfer verdict: {ev.get('transfer_verdict', ev['verdict'])}** — fine-tuned minus from-scratch "
            f"accuracy {ev['transfer_gain']:+.4f} (95% CI [{lo:+.4f}, {hi:+.4f}], McNemar p = {ev['mcnemar_p']:.2g}) "
            f"on {ev['n_test']} test examples.", "",
           "| model | test accuracy | 95% CI | macro-F1 |", "|---|---|---|---|"]
    out += [f"| {m} | {ev[m]['accuracy']:.4f} | {_ci(ev[m]['accuracy_ci95'])} | {ev[m]['macro_f1']:.4f} |"
            for m in MODELS if m in ev]

    out += ["", "### Promotion gate"]
    if receipt is None:
        out.append("Not registered: the register stage has not run.")
    else:
        aliases = ", ".join(f"`{a}`" for a in receipt["aliases"]) or "none"
        out.append(f"Registered `{receipt['model_name']}` version {receipt['version']} (aliases: {aliases}): "
                   f"{receipt.get('challenger_reason', '')}.")
        if receipt.get("gate"):
            out += ["", "| check | value | rule | result |", "|---|---|---|---|"]
            out += [f"| {c['name']} | {c['value']} | {c['rule']} | {'pass' if c['passed'] else '**FAIL**'} |"
                    for c in receipt["gate"]]

    out += ["", "### Against the champion"]
    if champion is None:
        out.append("No version has the `champion` alias in this tracking store yet.")
    else:
        acc = ev[(receipt or {}).get("candidate", "finetuned")]["accuracy"]
        same = champion["tags"].get("test_sha256") == ev.get("test_sha256")
        champ_acc = float(champion["tags"].get("test_accuracy", "nan"))
        out.append(f"`champion` is version {champion['version']}: test accuracy {champ_acc:.4f} "
                   f"({'the same' if same else 'a different'} test set), this run {acc:.4f} "
                   f"({acc - champ_acc:+.4f}); the gate's `vs_champion` check compares them on this run's test set.")

    if export is not None:
        out += ["", "### ONNX export",
                f"Parity on {export['n_examples']} test examples: top-1 agreement {export['top1_agreement']:.2%}, "
                f"max |logit diff| {export['max_abs_diff']:.1e} ({export['worst_tolerance_use']:.0%} of the "
                f"tolerance), {'passed' if export.get('parity_passed') else '**failed**'}. "
                f"fp32 {export['size_bytes'] / 1e6:.1f} MB; int8 {export['int8_size_bytes'] / 1e6:.1f} MB, accuracy "
                f"{export['int8_accuracy']:.4f} vs {export['fp32_accuracy']:.4f} "
                f"({'accepted' if export['int8_accepted'] else 'rejected'})."]

    out += ["", f"### Against `{base}`"]
    if metrics_diff is None:
        out.append(f"No comparison: `{base}` could not be read (not a git checkout, or the revision is unknown).")
    else:
        is_headline = lambda k: k.rsplit(".", 1)[-1] in HEADLINE and "per_class" not in k  # noqa: E731
        out += diff_table(metrics_diff, base, keep=is_headline) or [f"No metrics recorded at `{base}` or here."]
        rest = diff_table(metrics_diff, base, keep=lambda k: not is_headline(k))
        if rest:
            out += ["", "<details><summary>all other metrics (per-class accuracy, sizes, hashes)</summary>", "",
                    *rest, "", "</details>"]
        changed = diff_table(params_diff or {}, base)
        out += ["", "Params changed:" if changed else "Params: unchanged.", *([""] + changed if changed else [])]
        if changed:
            out += ["", "Different params make the metrics above a comparison of settings, not of code alone."]

    if plots:
        out += ["", "### Plots", "In the run's workspace (the pull-request workflow uploads them as an artifact):",
                *[f"- `{p}`" for p in plots]]
    return "\n".join(out) + "\n"


def dvc_diff(kind: str, base: str, unchanged: bool) -> dict | None:
    """`dvc metrics diff` / `dvc params diff` against `base` as a dict (with the unchanged entries when
    `unchanged`), or None when it cannot be computed."""
    cmd = [sys.executable, "-m", "dvc", kind, "diff", *(["--all"] if unchanged else []), "--json", base]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return None
    try:
        return json.loads(res.stdout or "{}")
    except json.JSONDecodeError:
        return None


def champion_of(params: Params) -> dict | None:
    """The version holding `champion` now, with its tags; None when there is none or no store is reachable."""
    from stages.registry import CHAMPION, Store, describe_alias

    store = Store(params.paths.mlflow_db, params.paths.mlflow_artifacts)
    try:
        return describe_alias(store, params.register.model_name, CHAMPION)
    except Exception as e:  # a report must still be written when the tracking server is down
        print(f"warning: could not read the champion from {store.uri()}: {e}", file=sys.stderr)
        return None


def build(params: Params, base: str, with_champion: bool = True) -> str:
    paths = params.paths
    if not paths.evaluate_metrics.exists():
        raise SystemExit(f"{paths.evaluate_metrics} not found: run the pipeline first (make run)")
    read = lambda p: json.loads(Path(p).read_text()) if Path(p).exists() else None  # noqa: E731
    plots = sorted(str(p) for p in [paths.finetune_history, paths.scratch_history,
                                    *sorted(Path(paths.evaluate_plots).glob("*.png"))] if Path(p).exists())
    return render(
        read(paths.evaluate_metrics), read(paths.export_metrics), read(paths.registered),
        champion_of(params) if with_champion else None,
        # every headline metric, changed or not; only the params that changed
        dvc_diff("metrics", base, unchanged=True), dvc_diff("params", base, unchanged=False), base, plots,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD", help="git revision to compare metrics and params with (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the report (default: %(default)s)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--no-champion", action="store_true", help="do not ask the tracking store for the champion")
    args = ap.parse_args(argv)
    from stages.files import write_text

    text = build(Params.load(args.params), args.base, with_champion=not args.no_champion)
    write_text(args.out, text)
    print(text)
    print(f"(written to {args.out})", file=sys.stderr)


if __name__ == "__main__":
    main()
