"""Bring your own data and model, end to end on tiny real data: an RGB image folder of Fashion-MNIST
pictures and a CSV of WordNet glosses with the packaged MiniLM, each through the one-command own-data run
(DVC, Prefect, MLflow) and then served by alias, checked against evaluate's labels; the same CSV with a
tiny random RoBERTa through the stages in process."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from stages import baseline, evaluate, export, finetune, prepare, weights
from stages.sources import FASHION_MNIST_CLASSES, read_idx
from stages.sources import WORDNET_TOPICS

from .conftest import GIT, ROOT, copy_project, flow_env, sh, tiny_hf_model

pytestmark = pytest.mark.slow
FASHION = Path("/usr/share/datasets/fashion-mnist")
WORDNET = Path("/usr/share/wordnet/data.noun")


def write_params(tmp_path: Path, source: Path, **sections) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"] = {k: str(tmp_path / v) for k, v in raw["paths"].items()}
    raw["paths"].update(source=str(source), weights_lock=str(ROOT / "weights.lock"))
    raw["finetune"].update(epochs=2, batch_size=8)
    raw["evaluate"]["n_bootstrap"] = 200
    raw["finetune"]["probe_c"] = [1.0]
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)  # a section left to its defaults may be absent
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tiny_text_params(tmp_path: Path, model_type: str, rows_per_class: int, per_class: int, val_per_class: int) -> Path:
    """Params for WordNet glosses of three topics with a tiny random `model_type` encoder, locked like any weights."""
    folder = tiny_hf_model(tmp_path / f"tiny-{model_type}", model_type)
    lock = tmp_path / "weights.lock"
    weights.lock(weights.find_weights(f"hf:{folder}"), lock)
    params = write_params(tmp_path, gloss_table(tmp_path / "glosses.csv", rows_per_class),
                          prepare={"dataset": "text-table", "per_class": per_class, "val_per_class": val_per_class,
                                   "test_per_class": None},
                          model={"name": f"hf:{folder}", "max_length": 32}, finetune={"augment": False, "lr": 1.0e-3})
    raw = yaml.safe_load(params.read_text())
    raw["paths"]["weights_lock"] = str(lock)
    params.write_text(yaml.safe_dump(raw))
    return params


def run_stages(params: Path) -> tuple[dict, dict]:
    """The stages' real entry points, in process (the flow test below runs them through DVC)."""
    for stage in (prepare, finetune, baseline, evaluate, export):
        stage.main(["--params", str(params)])
    out = params.parent
    return json.loads((out / "metrics/evaluate.json").read_text()), json.loads((out / "metrics/export.json").read_text())


def gloss_table(path: Path, per_class: int, topics=("animal", "food", "plant")) -> Path:
    """Real WordNet glosses of three topics as a CSV with the default text/label columns."""
    wanted = {k: v for k, v in WORDNET_TOPICS.items() if v in topics}
    rows, counts = [], dict.fromkeys(topics, 0)
    for line in WORDNET.read_text().splitlines():
        if line.startswith("  "):
            continue
        fields, _, gloss = line.partition(" | ")
        topic = wanted.get(int(fields.split(" ")[1]))
        if topic and counts[topic] < per_class:
            counts[topic] += 1
            rows.append({"text": gloss.strip(), "label": topic})
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def check_contract(ev: dict, ex: dict, n_classes: int) -> None:
    for name in ("finetuned", "scratch", "linear_probe", "floor"):
        assert len(ev[name]["per_class_accuracy"]) == n_classes
        lo, hi = ev[name]["accuracy_ci95"]
        assert lo <= ev[name]["accuracy"] <= hi
    assert ev["verdict"] in ("positive", "negative", "inconclusive")
    assert ex["parity_passed"] and ex["top1_agreement"] >= 0.999 and ex["worst_tolerance_use"] <= 1


def colour_pictures(root: Path, per_class: dict[str, int], size: int = 40) -> dict[str, list[Path]]:
    """Real Fashion-MNIST pictures as RGB files of another size: each tinted its own colour, 40x40, saved
    as PNG, JPEG and WebP in turn, one folder per class under `root`/train and `root`/test."""
    x, y = read_idx(FASHION / "t10k-images-idx3-ubyte.gz"), read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(0)
    written: dict[str, list[Path]] = {}
    for c in (0, 1, 7):  # T-shirt/top, Trouser, Sneaker
        name = FASHION_MNIST_CLASSES[c].replace("/", "-")
        picks = iter(np.flatnonzero(y == c))
        for split, n in per_class.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                tint = rng.uniform(0.6, 1.0, 3)
                rgb = (x[next(picks)][..., None] * tint).astype(np.uint8)
                im = Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR)
                path = folder / f"{i:03d}.{('png', 'jpg', 'webp')[i % 3]}"
                im.save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
                written.setdefault(split, []).append(path)
    return written


def served_labels(project: Path, model_name: str, version: int, requests: list) -> list[str]:
    """Serve `model_name` as champion (set to `version`) from the project's registry and post `requests`
    (each: the multipart body and content type, or a JSON body); the labels, in order."""
    from stages.promotion import promote_version
    from stages.registry import Store

    from .conftest import http_server
    from .test_serve import post

    # tiny data can fail the gate (e.g. the floor wins): then the promotion is forced, with a reason
    receipt = json.loads((project / "reports/registered.json").read_text())
    passed = receipt["challenger_reason"].startswith("all gate checks passed")
    promote_version(Store(project / "mlflow.db", project / "mlartifacts"), model_name, version, force=not passed,
                    reason="" if passed else "end-to-end test of serving a tiny model")
    cmd = [sys.executable, "-m", "ops.serve", "--model", model_name, "--alias", "champion", "--port", "{port}"]
    labels = []
    with http_server(cmd, "/health", project, flow_env(project)) as (base, health):
        assert health["version"] == str(version)
        for req in requests:
            status, body = post(f"{base}/predict", *req)
            assert status == 200 and body["version"] == str(version), body
            labels += [p["label"] for p in body["predictions"]]
    return labels


def evaluated_labels(project: Path, model: str) -> list[str]:
    with open(project / "metrics/predictions.csv") as f:
        return [row[model] for row in csv.DictReader(f)]


def test_your_rgb_image_folder_in_one_command_is_served_as_evaluate_scored_it(tmp_path):
    """make run DATA=<folder> NAME=<task> on RGB pictures of another size, with a test folder of their own;
    then the registered model served by alias: 102 test image files posted as files get exactly the labels
    the evaluate stage gave them."""
    from .test_serve import multipart

    project = copy_project(tmp_path / "project")
    files = colour_pictures(project / "data" / "garments", {"train": 10, "test": 34})
    sets = {"prepare.image_size": 48, "model.image_size": 32, "finetune.epochs": 2, "finetune.batch_size": 8,
            "finetune.probe_c": [1.0], "evaluate.n_bootstrap": 200}
    args = [sys.executable, "-m", "flows.pipeline", "--data", "data/garments", "--task", "garments"]
    res = sh(args + [f"--set={k}={v}" for k, v in sets.items()], project, flow_env(project))
    assert "created tasks/garments.yaml (image-folder)" in res.stdout
    manifest = json.loads((project / "data/prepared/manifest.json").read_text())
    assert manifest["classes"] == ["Sneaker", "T-shirt-top", "Trouser"] and manifest["modality"] == "image"
    ev = json.loads((project / "metrics/evaluate.json").read_text())
    assert ev["n_test"] == 102  # the test folder, whole
    # decoded right: frozen ImageNet features separate three very different garments from 6 labels each
    assert ev["linear_probe"]["accuracy"] > 0.5
    receipt = json.loads((project / "reports/registered.json").read_text())
    assert receipt["model_name"] == "headstart-garments"
    # the prepared test split holds the test folder's files class by class, each class's files sorted
    test_files = sorted(files["test"], key=lambda p: (p.parent.name, p.name))
    requests = [multipart([(p.name, p.read_bytes()) for p in test_files[i:i + 64]]) for i in range(0, 102, 64)]
    served = served_labels(project, receipt["model_name"], receipt["version"], requests)
    assert served == evaluated_labels(project, receipt["candidate"])


def test_csv_texts_with_a_tiny_roberta_end_to_end(tmp_path):
    params = tiny_text_params(tmp_path, "roberta", rows_per_class=14, per_class=6, val_per_class=2)
    folder = tmp_path / "tiny-roberta"
    ev, ex = run_stages(params)
    check_contract(ev, ex, 3)
    meta = json.loads((tmp_path / "models/finetuned/model.json").read_text())
    assert meta["architecture"] == f"hf:{folder}" and meta["preprocessing"]["files"] == "."
    assert (tmp_path / "models/finetuned/tokenizer.json").exists()
    assert json.loads((tmp_path / "models/baselines/floor/model.json").read_text())["architecture"] == "tfidf_linear"


def test_csv_texts_through_the_flow_record_the_data_version(tmp_path):
    """`dvc add` the user's CSV, point paths.source at it, run the flow: the packaged MiniLM is fine-tuned,
    the model registered, and dvc.lock names the CSV's md5 as the data version."""
    project = copy_project(tmp_path / "project")
    data = project / "data" / "raw"
    data.mkdir(parents=True)
    gloss_table(data / "glosses.csv", 42)
    sh([sys.executable, "-m", "flows.compose"], project)  # as `make setup` does: dvc reads its vars there
    sh([sys.executable, "-m", "dvc", "add", "-q", "data/raw/glosses.csv"], project)
    sh(GIT + ["add", "-A"], project)
    sh(GIT + ["commit", "-qm", "my data"], project)
    sets = {"prepare.per_class": 6, "prepare.val_per_class": 2, "prepare.test_per_class": 34,
            "finetune.epochs": 2, "finetune.batch_size": 8, "finetune.lr": 1.0e-4, "finetune.augment": False,
            "finetune.probe_c": [1.0], "evaluate.n_bootstrap": 200, "register.model_name": "my-topics"}
    args = [sys.executable, "-m", "flows.pipeline", "--data", "data/raw/glosses.csv", "--task", "topics"]
    res = sh(args + [f"--set={k}={v}" for k, v in sets.items()], project, flow_env(project))
    assert "verdict" in res.stdout and "created tasks/topics.yaml (text-table)" in res.stdout
    assert "for this run only: finetune.epochs=2" in res.stdout
    task = yaml.safe_load((project / "tasks/topics.yaml").read_text())
    assert task["prepare"]["per_class"] == 6 and task["model"]["name"] == "hf:sentence-transformers/all-MiniLM-L6-v2"
    assert "epochs: auto" in (project / "params.yaml").read_text()  # params.yaml is never written
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    dvc_file = yaml.safe_load((data / "glosses.csv.dvc").read_text())
    dep = next(d for d in lock["stages"]["prepare"]["deps"] if d["path"] == "data/raw/glosses.csv")
    assert dep["md5"] == dvc_file["outs"][0]["md5"]
    receipt = json.loads((project / "reports/registered.json").read_text())
    assert receipt["model_name"] == "my-topics" and receipt["version"] == 1
    ex = json.loads((project / "metrics/export.json").read_text())
    assert ex["parity_passed"] and ex["n_examples"] == 102
    # served by alias: the 102 test texts posted as texts get exactly the labels evaluate gave them
    from stages.splits import load_split

    texts = load_split(project / "data/prepared", "test").x.tolist()
    requests = [(json.dumps({"texts": texts[i:i + 64]}).encode(),) for i in range(0, len(texts), 64)]
    served = served_labels(project, "my-topics", 1, requests)
    assert served == evaluated_labels(project, receipt["candidate"])
