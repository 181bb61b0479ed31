"""The pull-request report, rendered from what a run writes (a report from a real run: test_pipeline_e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.report import (NO_TRACKING, diff_table, flatten, folder_diff, git_diff, locked_settings, render,
                        run_kind, settings_diff)
from stages.params import run_settings

from .conftest import ROOT


def evaluation(gain_ci=(0.05, 0.15), verdict="positive") -> dict:
    model = lambda acc: {"accuracy": acc, "accuracy_ci95": [acc - 0.01, acc + 0.01], "macro_f1": acc - 0.001}  # noqa: E731
    return {"finetuned": model(0.85), "scratch": model(0.75), "linear_probe": model(0.78), "floor": model(0.79),
            "transfer_gain": 0.10, "transfer_gain_ci95": list(gain_ci), "mcnemar_p": 1e-9, "verdict": verdict,
            "n_test": 1000, "test_sha256": "abc"}


EXPORT = {"n_examples": 1000, "top1_agreement": 1.0, "max_abs_diff": 1e-4, "worst_tolerance_use": 0.5,
          "parity_passed": True, "size_bytes": 13_000_000, "int8_size_bytes": 4_000_000, "int8_accuracy": 0.849,
          "fp32_accuracy": 0.85, "int8_accepted": True}
GATE = [{"name": "min_accuracy", "value": "0.8500", "rule": "test accuracy >= 0.8", "passed": True},
        {"name": "vs_champion", "value": "-0.0100", "rule": "accuracy >= champion's - 0.0", "passed": False}]
RECEIPT = {"model_name": "m", "version": 4, "aliases": [], "challenger_reason": "gate failed: vs_champion", "gate": GATE}


def test_verdict_models_gate_and_onnx_are_all_in_the_report():
    text = render(evaluation(), EXPORT, RECEIPT, None, {}, {}, "origin/main", ["plots/evaluate/confusion_finetuned.png"])
    assert "**Transfer verdict: positive**" in text and "+0.1000 (95% CI [+0.0500, +0.1500]" in text
    for m in ("finetuned", "scratch", "linear_probe", "floor"):
        assert f"| {m} |" in text
    assert "version 4 (aliases: none): gate failed: vs_champion" in text
    assert "| vs_champion | -0.0100 | accuracy >= champion's - 0.0 | **FAIL** |" in text
    assert "| min_accuracy | 0.8500 | test accuracy >= 0.8 | pass |" in text
    assert "top-1 agreement 100.00%" in text and "passed" in text
    assert NO_TRACKING in text  # no tracking server given: said, not an empty section
    assert "- `plots/evaluate/confusion_finetuned.png`" in text


def test_champion_comparison_says_whether_the_test_sets_match():
    champ = {"version": 2, "tags": {"test_accuracy": "0.860000", "test_sha256": "abc"}}
    text = render(evaluation(), None, None, champ, None, None, "main", [])
    assert "`champion` is version 2: test accuracy 0.8600 (the same test set), this run 0.8500 (-0.0100)" in text
    champ["tags"]["test_sha256"] = "other"
    other = render(evaluation(), None, None, champ, None, None, "main", [])
    assert "(a different test set), this run 0.8500, not comparable" in other and "-0.0100" not in other
    assert "Not registered" in render(evaluation(), None, None, None, None, None, "main", [])


def test_metrics_against_base_headline_first_and_params_changes_flagged():
    metrics = {"metrics/evaluate.json": {
        "finetuned.accuracy": {"old": 0.84, "new": 0.85, "diff": 0.01},
        "finetuned.per_class_accuracy.Bag": {"old": 0.9, "new": 0.95, "diff": 0.05},
        "verdict": {"old": "inconclusive", "new": "positive"}}}
    params = {"params.yaml": {"finetune.epochs": {"old": 10, "new": 1}}}
    text = render(evaluation(), None, None, None, metrics, params, "origin/main", [])
    head, fold = text.split("<details>")
    assert "| metrics/evaluate.json | finetuned.accuracy | 0.84 | 0.85 | 0.01 |" in head
    assert "| metrics/evaluate.json | verdict | inconclusive | positive |  |" in head
    assert "per_class_accuracy.Bag" in fold and "per_class_accuracy" not in head
    assert "| params.yaml | finetune.epochs | 10 | 1 |  |" in text
    assert "comparison of settings, not of code alone" in text
    unchanged = render(evaluation(), None, None, None, metrics, {}, "origin/main", [])
    assert "Params: unchanged." in unchanged and "comparison of settings" not in unchanged


def test_an_unreadable_base_is_said_not_hidden():
    text = render(evaluation(), None, None, None, None, None, "origin/main", [])
    assert "`origin/main` could not be read" in text


@pytest.mark.parametrize("value, cell", [(None, "–"), (0.123456, "0.1235"), ("a|b", "a\\|b"), (3, "3")])
def test_table_cells(value, cell):
    rows = diff_table({"f": {"k": {"old": value, "new": value}}}, "base")
    assert rows[2] == f"| f | k | {cell} | {cell} |  |"


def test_smoke_against_smoke_is_labelled_and_a_missing_base_is_said():
    text = render(evaluation(), None, None, None, {}, {}, "main", [], kinds=("smoke", "smoke"))
    assert "### Against `main`: smoke vs smoke" in text and "Like with like" in text
    mixed = render(evaluation(), None, None, None, {}, {}, "main", [], kinds=("smoke", "full"))
    assert "### Against `main`: smoke vs full" in mixed and "**Not like with like**" in mixed
    missing = render(evaluation(), None, None, None, None, None, "main", [], kinds=("smoke", None),
                     no_base="No smoke run of `main` to compare with: ...")
    assert "### Against `main`\nNo smoke run of `main` to compare with" in missing


def test_run_kind_is_smoke_only_with_every_smoke_setting():
    import yaml

    from ops.report import SMOKE_PRESET

    preset = yaml.safe_load((ROOT / SMOKE_PRESET).read_text())
    params = yaml.safe_load((ROOT / SMOKE_PRESET).read_text())
    params["finetune"]["lr"] = 1.0e-3  # a setting the preset leaves alone
    assert run_kind(params, preset) == "smoke"
    params["finetune"]["probe_c"] = [0.1, 1.0]  # a list setting counts too
    assert run_kind(params, preset) == "full"
    assert run_kind(None, preset) is None


def test_folder_diff_gives_what_dvc_diff_gives(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base/metrics").mkdir(parents=True)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "base/metrics/e.json").write_text('{"a": {"accuracy": 0.5, "ci": [0.4, 0.6]}, "verdict": "x", '
                                                  '"ok": true}')
    (tmp_path / "metrics/e.json").write_text('{"a": {"accuracy": 0.75, "ci": [0.7, 0.8]}, "verdict": "y", "ok": true}')
    diff = folder_diff(tmp_path / "base", [Path("metrics/e.json")])
    assert diff == {"metrics/e.json": {"a.accuracy": {"old": 0.5, "new": 0.75, "diff": 0.25},
                                       "ok": {"old": True, "new": True}, "verdict": {"old": "x", "new": "y"}}}
    assert flatten({"a": {"b": [1]}}) == {} and flatten({"a": {"b": [1]}}, lists=True) == {"a.b": [1]}


def test_settings_come_from_the_composed_run_file_or_a_lock():
    """A run's settings: the composed file's `run` (or a plain params.yaml); a git base's: what its dvc.lock
    records, old (params.yaml: finetune) and composed (.headstart/params.yaml: run.finetune.lr) alike."""
    composed = {"composed_from": ["params.yaml", "presets/smoke.yaml"], "run": {"f": {"epochs": 5, "c": [1.0]}}}
    assert run_settings(composed) == {"f": {"epochs": 5, "c": [1.0]}} and run_settings({"f": {}}) == {"f": {}}
    lock = {"schema": "2.0", "stages": {
        "a": {"params": {".headstart/params.yaml": {"run.f": {"epochs": 5, "c": [1.0, 2.0]}, "run.model": {"n": 1}}}},
        "b": {"params": {"params.yaml": {"f.lr": 1.0e-3}}}, "c": {"cmd": "true"}}}
    settings = locked_settings(lock)
    assert settings == {"f.epochs": 5, "f.c": [1.0, 2.0], "model.n": 1, "f.lr": 1.0e-3}
    assert locked_settings(None) is None
    old = {"f.epochs": 10, "f.c": [1.0], "f.lr": 1.0e-3}
    assert settings_diff(old, settings, "dvc.lock") == {"dvc.lock": {
        "f.c": {"old": [1.0], "new": [1.0, 2.0]}, "f.epochs": {"old": 10, "new": 5, "diff": -5},
        "model.n": {"old": None, "new": 1}}}
    assert settings_diff(old, old, "dvc.lock") == {}


def test_git_diff_reads_the_metrics_committed_at_a_revision(tmp_path, monkeypatch):
    """Against a git revision, from the files committed there (DVC cannot parse an old dvc.yaml whose vars
    file was never committed); a file the revision lacks has no old values; an unknown revision gives None."""
    import subprocess

    monkeypatch.chdir(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], check=True)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/e.json").write_text('{"a": {"accuracy": 0.5}, "verdict": "x"}')
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "base"], check=True)
    (tmp_path / "metrics/e.json").write_text('{"a": {"accuracy": 0.75}, "verdict": "y"}')
    (tmp_path / "metrics/new.json").write_text('{"n": 3}')
    assert git_diff("HEAD", [Path("metrics/e.json"), Path("metrics/new.json")]) == {
        "metrics/e.json": {"a.accuracy": {"old": 0.5, "new": 0.75, "diff": 0.25}, "verdict": {"old": "x", "new": "y"}},
        "metrics/new.json": {"n": {"old": None, "new": 3}}}
    assert git_diff("no-such-rev", [Path("metrics/e.json")]) is None

