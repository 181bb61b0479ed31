"""A markdown report of the last pipeline run, for a pull-request comment or for reading on its own:
the verdict on transfer, every model's accuracy with its CI, the metrics and params against a base run,
the run against the current `champion` in the registry, the promotion gate check by check, ONNX parity,
and the plots. The base is either a git revision (the metrics files committed there, and the settings its
dvc.lock records) or a folder holding another run's metrics files and composed settings at their workspace
paths (what the pull-request workflow downloads: main's last smoke run). Each side is named a smoke run when
its settings match presets/smoke.yaml, so a smoke run is never silently set against a full one.

Run:  python -m ops.report                                         # against HEAD, to reports/report.md
      python -m ops.report --base main --base-metrics base-smoke   # what the pull-request workflow does
The file is also printed, so `python -m ops.report > x.md` works too."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from stages.params import RUN_PARAMS, Params, run_settings

MODELS = ("finetuned", "scratch", "linear_probe", "floor")
# The metrics a reviewer looks at first; the rest (per-class accuracies, sizes, hashes) go in a fold.
HEADLINE = ("accuracy", "macro_f1", "transfer_gain", "mcnemar_p", "verdict", "top1_agreement", "max_abs_diff",
            "int8_accuracy", "n_test")
DEFAULT_OUT = Path("reports/report.md")
SMOKE_PRESET = Path("presets/smoke.yaml")
LOCK = Path("dvc.lock")
NO_TRACKING = ("No tracking server configured: MLFLOW_TRACKING_URI is not set; the champion comparison is skipped.")


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
    champion_note: str = NO_TRACKING,
    kinds: tuple[str, str | None] | None = None,
    no_base: str | None = None,
) -> str:
    """The report from what the run wrote (pure: every input is passed in, so it is easy to test).
    `champion_note` stands in for the champion when there is none to show; `kinds` names this run's and
    the base's settings ("smoke" or "full"; None when unknown); `no_base` says why the base is missing."""
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

    out += _gate_section(receipt)
    out += _champion_section(ev, receipt, champion, champion_note)
    out += _export_section(export)
    out += _base_section(metrics_diff, params_diff, base, kinds, no_base)

    if plots:
        out += ["", "### Plots", "In the run's workspace (the pull-request workflow uploads them as an artifact):",
                *[f"- `{p}`" for p in plots]]
    return "\n".join(out) + "\n"


def _gate_section(receipt: dict[str, Any] | None) -> list[str]:
    """The registered version and its promotion gate, check by check."""
    out = ["", "### Promotion gate"]
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
    return out


def _champion_section(ev: dict[str, Any], receipt: dict[str, Any] | None, champion: dict[str, Any] | None,
                      champion_note: str) -> list[str]:
    """This run against the version holding `champion`, compared only on the same test set."""
    out = ["", "### Against the champion"]
    if champion is None:
        out.append(champion_note)
    else:
        acc = ev[(receipt or {}).get("candidate", "finetuned")]["accuracy"]
        same = champion["tags"].get("test_sha256") == ev.get("test_sha256")
        champ_acc = float(champion["tags"].get("test_accuracy", "nan"))
        # accuracies on different test sets (a smoke run's 200 images, a full run's 10,000) have no useful difference
        delta = f" ({acc - champ_acc:+.4f})" if same else ", not comparable"
        out.append(f"`champion` is version {champion['version']}: test accuracy {champ_acc:.4f} "
                   f"({'the same' if same else 'a different'} test set), this run {acc:.4f}{delta}; "
                   f"the gate's `vs_champion` check compares them on this run's test set.")
    return out


def _export_section(export: dict[str, Any] | None) -> list[str]:
    """ONNX parity, sizes and the int8 model's accuracy."""
    if export is None:
        return []
    return ["", "### ONNX export",
            f"Parity on {export['n_examples']} test examples: top-1 agreement {export['top1_agreement']:.2%}, "
            f"max |logit diff| {export['max_abs_diff']:.1e} ({export['worst_tolerance_use']:.0%} of the "
            f"tolerance), {'passed' if export.get('parity_passed') else '**failed**'}. "
            f"fp32 {export['size_bytes'] / 1e6:.1f} MB; int8 {export['int8_size_bytes'] / 1e6:.1f} MB, accuracy "
            f"{export['int8_accuracy']:.4f} vs {export['fp32_accuracy']:.4f} "
            f"({'accepted' if export['int8_accepted'] else 'rejected'})."]


def _base_section(metrics_diff: dict | None, params_diff: dict | None, base: str,
                  kinds: tuple[str, str | None] | None, no_base: str | None) -> list[str]:
    """Metrics and params against the base run, saying whether the two are runs of the same kind."""
    kind, base_kind = kinds or (None, None)
    like = f": {kind} vs {base_kind}" if kind and base_kind else ""
    out = ["", f"### Against `{base}`{like}"]
    if metrics_diff is None:
        out.append(no_base or f"No comparison: `{base}` could not be read (not a git checkout, or the revision is "
                   "unknown).")
    else:
        if like and kind == base_kind:
            out += [f"Like with like: this run and `{base}`'s are both {kind} runs.", ""]
        elif like:
            out += [f"**Not like with like**: this run is a {kind} run, `{base}`'s a {base_kind} run; most of the "
                    f"differences below are the settings', not the code's.", ""]
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
    return out


def champion_of(params: Params) -> tuple[dict | None, str]:
    """The version holding `champion` now, with its tags, or None and a sentence saying why there is none.
    The champion lives on the tracking server (MLFLOW_TRACKING_URI); without one, the project's own SQLite
    store is read only when it exists, so a checkout with no store (a CI job) does not create one."""
    from_server = bool(os.environ.get("MLFLOW_TRACKING_URI"))
    if not from_server and not Path(params.paths.mlflow_db).exists():
        return None, NO_TRACKING
    from stages.registry import CHAMPION, Store, describe_alias

    store = Store(params.paths.mlflow_db, params.paths.mlflow_artifacts)
    try:
        champion = describe_alias(store, params.register.model_name, CHAMPION)
    except Exception as e:  # a report must still be written when the tracking server is down
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"The champion could not be read from {store.uri()}: {first}"
    if champion is not None:
        return champion, ""
    if from_server:
        return None, f"No version of `{params.register.model_name}` has the `champion` alias on {store.uri()} yet."
    return None, f"{NO_TRACKING} (The local store `{params.paths.mlflow_db}` has no `champion` either.)"


def flatten(d: Any, prefix: str = "", lists: bool = False) -> dict[str, Any]:
    """Nested mappings as dotted keys ({"finetuned": {"accuracy": 0.8}} -> {"finetuned.accuracy": 0.8}), as
    `dvc metrics diff` names them. Lists are values with `lists` (a setting such as probe_c), else left out
    (a metric's confidence interval has no single difference)."""
    if isinstance(d, dict):
        return {k: v for key, value in d.items() for k, v in flatten(value, f"{prefix}{key}.", lists).items()}
    return {} if isinstance(d, list) and not lists else {prefix[:-1]: d}


def run_kind(params: dict | None, preset: dict) -> str | None:
    """"smoke" when `params` (a params.yaml as a dict) carries every setting of the smoke preset `preset`,
    else "full"; None when unknown. Each side is judged by its own preset: a pull request that edits the
    preset still compares smoke with smoke (and its params table shows the edit)."""
    if params is None:
        return None
    mine = flatten(params, lists=True)
    return "smoke" if all(mine.get(k) == v for k, v in flatten(preset, lists=True).items()) else "full"


def metrics_files(params: Params, dvc_yaml: Path = Path("dvc.yaml")) -> list[Path]:
    """The pipeline's metrics files, as dvc.yaml declares them (`${paths.<name>}` resolved from params)."""
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    out = []
    for stage in stages.values():
        for entry in stage.get("metrics", []):
            path = next(iter(entry)) if isinstance(entry, dict) else entry
            out.append(Path(re.sub(r"\$\{(?:run\.)?paths\.(\w+)\}", lambda m: str(getattr(params.paths, m.group(1))), path)))
    return out


def read_values(path: Path) -> Any:
    """A metrics (JSON) or settings (YAML: params files, dvc.lock) file's content; {} when it does not exist."""
    if not path.exists():
        return {}
    return parse(path, path.read_text())


def parse(path: Path, text: str) -> Any:
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def values_diff(files: list[Path], old: Callable[[Path], Any]) -> dict[str, dict[str, dict]]:
    """What `dvc metrics diff --all --json` gives: every metric of each file, as `old(file)` has it and as the
    workspace has it: {file: {key: {"old", "new", "diff"}}}."""
    out: dict[str, dict[str, dict]] = {}
    for file in files:
        entries = diff_entries(flatten(old(file)), flatten(read_values(file)), changed_only=False)
        if entries:
            out[str(file)] = entries
    return out


def folder_diff(base_dir: Path, files: list[Path]) -> dict[str, dict[str, dict]]:
    """The metrics files against those `base_dir` holds at the same relative paths."""
    return values_diff(files, lambda file: read_values(base_dir / file))


def git_diff(base: str, files: list[Path]) -> dict[str, dict[str, dict]] | None:
    """The metrics files against those committed at revision `base` (metrics go to git, not to DVC's cache);
    None when `base` is not a revision here. Read from git, not with `dvc metrics diff`: DVC cannot parse
    another revision's dvc.yaml, whose composed settings (its `vars`) were never committed."""
    if subprocess.run(["git", "rev-parse", "--verify", "-q", f"{base}^{{commit}}"], capture_output=True).returncode:
        return None
    return values_diff(files, lambda file: file_at(base, file) or {})


def file_at(base: str, path: Path) -> Any:
    """A metrics or settings file as the git revision `base` has it, or None when it cannot be read."""
    res = subprocess.run(["git", "show", f"{base}:{path.as_posix()}"], capture_output=True, text=True)
    return parse(path, res.stdout) if res.returncode == 0 else None


def locked_settings(lock: Any) -> dict[str, Any] | None:
    """The settings a dvc.lock records its stages ran with, as dotted params.yaml keys; None without a lock.
    (Read from the lock, not from a params file: a run's composed settings are not committed, its lock is.)"""
    if not isinstance(lock, dict):
        return None
    out: dict[str, Any] = {}
    for stage in (lock.get("stages") or {}).values():
        for values in (stage.get("params") or {}).values():
            for key, value in values.items():
                out |= {k.removeprefix("run."): v for k, v in flatten({key: value}, lists=True).items()}
    return out


def settings_diff(old: dict[str, Any], new: dict[str, Any], label: str) -> dict[str, dict[str, dict]]:
    """The settings that differ, as `dvc params diff --json` gives them: {label: {key: {"old", "new", "diff"}}}."""
    entries = diff_entries(old, new, changed_only=True)
    return {label: entries} if entries else {}


def diff_entries(old: dict[str, Any], new: dict[str, Any], changed_only: bool) -> dict[str, dict]:
    """Flat values old vs new, key by key: {key: {"old", "new", "diff"}} ("diff" for numbers only)."""
    entries = {}
    for key in sorted(old.keys() | new.keys()):
        o, n = old.get(key), new.get(key)
        if changed_only and o == n:
            continue
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (o, n))
        entries[key] = {"old": o, "new": n, **({"diff": n - o} if numeric else {})}
    return entries


def build(params: Params, base: str, with_champion: bool = True, base_metrics: Path | None = None,
          params_file: Path = RUN_PARAMS) -> str:
    """`params_file` holds this run's settings (the composed run file by default; a plain params.yaml works)."""
    paths = params.paths
    if not paths.evaluate_metrics.exists():
        raise SystemExit(f"{paths.evaluate_metrics} not found: run the pipeline first (make run)")
    read = lambda p: json.loads(Path(p).read_text()) if Path(p).exists() else None  # noqa: E731
    plots = sorted(str(p) for p in [paths.finetune_history, paths.scratch_history,
                                    *sorted(Path(paths.evaluate_plots).glob("*.png"))] if Path(p).exists())
    preset = yaml.safe_load(SMOKE_PRESET.read_text())
    own = flatten(run_settings(read_values(params_file)), lists=True)
    kind = run_kind(own, preset)
    no_base = None
    if base_metrics is None:
        # every headline metric, changed or not; only the settings that changed, as each side's dvc.lock has them
        metrics_diff = git_diff(base, metrics_files(params))
        base_lock, own_lock = locked_settings(file_at(base, LOCK)), locked_settings(read_values(LOCK))
        params_diff = settings_diff(base_lock, own_lock, str(LOCK)) if base_lock and own_lock else None
        base_kind = run_kind(base_lock, file_at(base, SMOKE_PRESET) or preset)
    elif not (base_metrics / paths.evaluate_metrics).exists():
        metrics_diff = params_diff = base_kind = None
        no_base = (f"No {kind} run of `{base}` to compare with: `{base_metrics}` holds no {paths.evaluate_metrics} "
                   f"(the workflow keeps each run of `{base}` as the artifact pipeline-smoke; none was found).")
    else:
        metrics_diff = folder_diff(base_metrics, metrics_files(params))
        # the base run's composed settings; an artifact from before runs composed them holds its params.yaml
        base_file = next((f for f in (base_metrics / RUN_PARAMS, base_metrics / "params.yaml") if f.exists()), None)
        theirs = flatten(run_settings(read_values(base_file)), lists=True) if base_file else None
        params_diff = settings_diff(theirs, own, str(params_file)) if theirs is not None else None
        base_preset = base_metrics / SMOKE_PRESET
        base_kind = run_kind(theirs, yaml.safe_load(base_preset.read_text()) if base_preset.exists() else preset)
    champion, note = champion_of(params) if with_champion else (None, "Not asked for (--no-champion).")
    return render(
        read(paths.evaluate_metrics), read(paths.export_metrics), read(paths.registered), champion,
        metrics_diff, params_diff, base, plots, champion_note=note, kinds=(kind, base_kind), no_base=no_base,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD", help="git revision to compare metrics and settings with; with "
                    "--base-metrics only the base's name in the report (default: %(default)s)")
    ap.add_argument("--base-metrics", type=Path, metavar="DIR",
                    help=f"compare with the run whose metrics files and {RUN_PARAMS} DIR holds at their workspace paths")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the report (default: %(default)s)")
    ap.add_argument("--params", type=Path, default=RUN_PARAMS,
                    help="the run's settings (default: %(default)s, what the last run composed)")
    ap.add_argument("--no-champion", action="store_true", help="do not ask the tracking store for the champion")
    ap.add_argument("--summary", type=Path, metavar="FILE",
                    help="also append the report to FILE (GitHub Actions' $GITHUB_STEP_SUMMARY: the job's summary)")
    args = ap.parse_args(argv)
    from stages.files import write_text

    if not args.params.exists():
        raise SystemExit(f"{args.params} not found: run the pipeline first (make run), or pass --params")
    text = build(Params.load(args.params), args.base, with_champion=not args.no_champion,
                 base_metrics=args.base_metrics, params_file=args.params)
    write_text(args.out, text)
    if args.summary:
        with open(args.summary, "a") as f:
            f.write(text)
    print(text)
    print(f"(written to {args.out})", file=sys.stderr)


if __name__ == "__main__":
    main()
