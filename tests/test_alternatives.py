"""Every alternative counts, on data the demos do not cover: each baseline scores on the test split what it
scored on validation (within sampling noise) on an RGB image folder and on a text table, and where a
baseline beats fine-tuning, the verdict says so and the baseline is what is exported and registered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import register, zoo
from stages.evaluate import answer

from .test_byo_e2e import run_stages, tiny_text_params, write_params

pytestmark = pytest.mark.slow
MODELS = ("finetuned", *zoo.BASELINES)


def rgb_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    """Three classes told apart by colour and where it sits (red left half, green top half, blue blob in the
    middle) over RGB noise, 40 x 40 PNGs: colour is in the channels, so a model that mixes up channel order
    between fitting and scoring fails on it."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(("red-left", "green-top", "blue-centre")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            x = rng.integers(0, 120, (40, 40, 3))
            region = [np.s_[:, :20], np.s_[:20, :], np.s_[10:30, 10:30]][c]
            x[region + (c,)] += 120
            Image.fromarray(x.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def within_noise(val: float, test: float, n_val: int, n_test: int) -> bool:
    """Validation and test accuracy of one model agree within 3 standard errors of their difference (pooled
    binomial), plus one validation example for the discreteness of small splits."""
    p = (val * n_val + test * n_test) / (n_val + n_test)
    return abs(val - test) <= 3 * (p * (1 - p) * (1 / n_val + 1 / n_test)) ** 0.5 + 1 / n_val


def check_every_model_consistent(ev: dict, n_val: int) -> None:
    for m in MODELS:
        assert within_noise(ev[m]["val_accuracy"], ev[m]["accuracy"], n_val, ev["n_test"]), (m, ev[m])


def test_every_baseline_scores_on_test_what_it_scored_on_validation_on_rgb_images(tmp_path):
    root = rgb_folder(tmp_path / "pictures", 40)
    params = write_params(tmp_path, root, prepare={"dataset": "image-folder", "per_class": 20, "val_per_class": 10,
                                                   "test_per_class": None, "image_size": 32},
                          model={"image_size": 32})
    ev, ex = run_stages(params)
    check_every_model_consistent(ev, 30)
    # pixels separate these classes: the floor (logistic regression on pixels) is near perfect on both splits
    assert ev["floor"]["val_accuracy"] >= 0.9 and ev["floor"]["accuracy"] >= 0.9, ev["floor"]
    assert ex["model"] == ev["best"]


def test_every_baseline_scores_on_test_what_it_scored_on_validation_on_a_text_table(tmp_path):
    params = tiny_text_params(tmp_path, "bert", rows_per_class=40, per_class=20, val_per_class=10)
    ev, _ = run_stages(params)
    check_every_model_consistent(ev, 30)


def test_when_a_baseline_beats_fine_tuning_it_is_the_answer_and_what_ships(tmp_path, mlflow_store):
    """Pixels alone separate the classes, and fine-tuning gets almost no budget (1 epoch at a tiny lr): the
    logistic regression on pixels wins, the verdict is not positive, and the floor is exported and registered."""
    root = rgb_folder(tmp_path / "pictures", 40)
    params = write_params(tmp_path, root, prepare={"dataset": "image-folder", "per_class": 20, "val_per_class": 10,
                                                   "test_per_class": None, "image_size": 32},
                          model={"image_size": 32}, finetune={"epochs": 1, "lr": 1.0e-7, "augment": False})
    ev, ex = run_stages(params)
    assert ev["best"] != "finetuned" and ev["verdict"] != "positive", {m: ev[m]["accuracy"] for m in MODELS}
    assert ev[ev["best"]]["accuracy"] > ev["finetuned"]["accuracy"]
    assert answer(ev).startswith(("Fine-tuning loses", "Fine-tuning does not clearly beat")) and ev["best"] in answer(ev)
    assert ex["model"] == ev["best"] and ex["parity_passed"]

    out = params.parent
    receipt = register.run(
        out / "data/prepared", out / "models/finetuned", out / "models/baselines", {}, out / "metrics/evaluate.json",
        out / "plots/evaluate", out / "metrics/export.json",
        {"fp32": out / "models/onnx/model.onnx", "int8": out / "models/onnx/model_int8.onnx"}, out / "registered.json",
        mlflow_store, register.RegisterParams(model_name="pixels-win", experiment="alternatives"),
        {"git_commit": "abc"},
    )  # fmt: skip
    assert receipt["candidate"] == ev["best"]
    from mlflow.tracking import MlflowClient

    version = MlflowClient().get_model_version("pixels-win", receipt["version"])
    meta = json.loads((out / "models/baselines" / ev["best"] / "model.json").read_text())
    assert version.tags["candidate"] == ev["best"] and version.tags["architecture"] == meta["architecture"]
    assert version.description.startswith(f"# pixels-win version {receipt['version']}: {ev['best']}")
