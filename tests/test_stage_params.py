"""A stage's DVC `params:` list names the settings it reads, so a change to one stage's settings reruns only
what depends on it. The finetune keys the scratch baseline and the label-efficiency curves read are found
from their code: each key is changed in turn, and what reaches `train.fit` is compared."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any

import pytest
import yaml

from stages import baseline, curves
from stages.params import RUN_PARAMS, FinetuneParams, Params
from stages.strategy import Plan
from stages.train import LOOP_SETTINGS, fit, loop_settings

from .conftest import ROOT
from .test_strategy import small_cnn, tiny_images

# for a setting that may be `auto` or names one of several choices: another value it may take
OTHER = {"epochs": 3, "lr": 0.02, "augment": "crop", "strategy": "partial", "keep": "last"}


def changed(name: str, value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 + 0.01
    if value is None or isinstance(value, list):
        return ["changed"] if value else [0.5]
    return OTHER[name] if value != OTHER[name] else "full"


def listed(stage: dict) -> set[str]:
    """The settings a dvc.yaml stage lists, as params.yaml keys (they are read from the composed run file)."""
    (entry,) = stage["params"]
    (keys,) = entry.values()
    assert next(iter(entry)) == str(RUN_PARAMS) and all(k.startswith("run.") for k in keys), entry
    return {k.removeprefix("run.") for k in keys}


def read_keys(section: Any, view) -> set[str]:
    """The fields of `section` whose change changes `view(section)`."""
    base = view(section)
    return {f.name for f in dataclasses.fields(section)
            if view(dataclasses.replace(section, **{f.name: changed(f.name, getattr(section, f.name))})) != base}


# what decides a stage's settings: dataset size (the auto rule's tiers), modality, baseline.augment
CASES = [(n, modality, same) for n in (1_000, 30_000) for modality in ("image", "text") for same in ("same", "none")]


def baseline_reads() -> set[str]:
    params = Params.load(ROOT / "params.yaml")
    keys: set[str] = set()
    for n, modality, same in CASES:
        b = dataclasses.replace(params.baseline, augment=same)
        # the scratch model's training, and the linear probe's inverse L2 strengths (baseline._linear_probe)
        keys |= read_keys(params.finetune, lambda ft: (loop_settings(baseline.scratch_settings(ft, b, n, modality)[0]),
                                                       ft.probe_c))
    return keys


def curve_reads() -> set[str]:
    params = Params.load(ROOT / "params.yaml")
    keys: set[str] = set()
    for n, modality, same in CASES:
        for model in ("finetuned", "scratch"):
            b = dataclasses.replace(params.baseline, augment=same)

            def view(ft=params.finetune, bl=b):
                return loop_settings(curves.settings(dataclasses.replace(params, finetune=ft, baseline=bl), model, n,
                                                     modality, seed=1))
            keys |= {f"finetune.{k}" for k in read_keys(params.finetune, lambda ft: view(ft=ft))}
            keys |= {f"baseline.{k}" for k in read_keys(b, lambda bl: view(bl=bl))}
    return keys


def test_fit_reads_the_loop_settings_and_no_other():
    """train.LOOP_SETTINGS (what model.json records, what the lists below are built from) is what fit reads."""

    class Recorder:
        def __init__(self, inner: FinetuneParams) -> None:
            self.inner, self.read = inner, set()

        def __getattr__(self, name: str) -> Any:
            self.read.add(name)
            return getattr(self.inner, name)

    model, pre = small_cnn()
    cfg = Recorder(FinetuneParams(epochs=1, batch_size=8, lr=1e-3, augment="flip"))
    fit(model, tiny_images(16, 0), tiny_images(6, 1), pre, cfg, Plan.of(model), desc="recorded")
    fields = {f.name for f in dataclasses.fields(FinetuneParams)}
    read = cfg.read & fields
    # checkpoint_every_steps is read only when fit is given a checkpoint folder
    assert read <= set(LOOP_SETTINGS) and set(LOOP_SETTINGS) - read <= {"checkpoint_every_steps"}, read


def test_baseline_lists_exactly_the_finetune_keys_it_reads():
    reads = baseline_reads()
    assert "lr" not in reads and "strategy" not in reads and "seed" not in reads  # its own lr and seed
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["baseline"]
    assert listed(stage) == {"model", "baseline"} | {f"finetune.{k}" for k in reads}


def test_each_curve_point_lists_exactly_the_finetune_and_baseline_keys_it_reads():
    stage = yaml.safe_load((ROOT / "curves" / "dvc.yaml").read_text())["stages"]["curve"]
    assert {p for p in listed(stage) if p.split(".")[0] in ("finetune", "baseline")} == curve_reads()


@pytest.mark.parametrize(("key", "value", "reruns"), [
    ("finetune.lr", 0.02, {"finetune", "replicate@1"}),
    ("finetune.strategy", "partial", {"finetune", "replicate@1"}),
    ("finetune.epochs", 3, {"finetune", "baseline", "replicate@1"}),
    ("baseline.scratch_lr", 0.01, {"baseline", "replicate@1"}),
    ("evaluate.n_bootstrap", 500, {"evaluate"}),
])
def test_dvc_reruns_only_the_stages_that_read_a_changed_key(tmp_path, key, value, reruns):
    """dvc status on a copy of the pipeline (its params lists, with stand-in commands) after one change."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"vars": [f"{RUN_PARAMS}:replicates"], "stages": {
        name: {"cmd": "true", "params": stage["params"], **{k: stage[k] for k in ("matrix",) if k in stage}}
        for name, stage in stages.items()}}))
    composed = tmp_path / RUN_PARAMS
    composed.parent.mkdir()
    # with evaluate.seeds: 2, so the one replicate entry is there to be checked too
    composed.write_text(yaml.safe_dump({"run": yaml.safe_load((ROOT / "params.yaml").read_text()), "replicates": [1]}))

    def dvc(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout

    dvc("init", "--no-scm", "-q")
    dvc("repro", "-q")
    raw = yaml.safe_load(composed.read_text())
    section, name = key.split(".")
    raw["run"][section][name] = value
    composed.write_text(yaml.safe_dump(raw))
    status = yaml.safe_load(dvc("status", "--json"))
    assert set(status) == reruns, status
