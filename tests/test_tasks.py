"""Each dataset is a task of its own: `--data PATH --task NAME` makes tasks/NAME.yaml once, a run composes
exactly the task keys over params.yaml without writing it, one-off settings apply to one run only, and bad
input is a one-line error that writes nothing."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows import compose, tasks
from flows.pipeline import prepare_run
from stages.params import Params

from .conftest import ROOT, sh


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """params.yaml and tasks/ as committed, in a folder of their own that is the working directory."""
    proj = tmp_path / "project"
    proj.mkdir()
    shutil.copy(ROOT / "params.yaml", proj / "params.yaml")
    shutil.copytree(ROOT / "tasks", proj / "tasks")
    monkeypatch.chdir(proj)
    return proj


def image_folder(root: Path, classes=("cat", "dog", "fox"), per_class=15) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def table(path: Path, per_class=20, label="label") -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", label])
        for i in range(per_class):
            w.writerow([f"a sentence about sports number {i}", "sport"])
            w.writerow([f"a sentence about cooking number {i}", "food"])
    return path


def run(params: Path, task: str | None, data: Path | None = None, overrides: dict | None = None) -> Params:
    """What `python -m flows.pipeline` composes and writes before it runs anything."""
    composed = prepare_run(params, task, data, [], overrides or {})
    compose.write(composed)
    return compose.settings(composed)


def test_a_task_is_created_from_the_data_and_owns_its_name_and_experiment(project, tmp_path):
    p = run(project / "params.yaml", "photos", image_folder(tmp_path / "photos"))
    assert p.task == "photos" and p.prepare.dataset == "image-folder" and p.paths.source == tmp_path / "photos"
    # split sizes from the smallest class (15): 9 training, 3 validation, the rest tested
    assert (p.prepare.per_class, p.prepare.val_per_class, p.prepare.test_per_class) == (9, 3, None)
    assert (p.register.model_name, p.register.experiment, p.register.min_accuracy) == (
        "headstart-photos", "headstart-photos", None)
    assert set(tasks.load("photos")) == tasks.task_keys()
    assert Params.load() == p  # what the stages read

    q = run(project / "params.yaml", "notes", table(tmp_path / "notes.csv"))
    assert (q.task, q.prepare.dataset, q.register.model_name) == ("notes", "text-table", "headstart-notes")
    text = Params.load(ROOT / "params.yaml")
    # modality-dependent settings come from the text demo's task, not from the image task before it
    assert (q.model.name, q.baseline.scratch_lr) == (tasks.load("text")["model.name"], tasks.load("text")["baseline.scratch_lr"])
    assert q.baseline.scratch_lr != text.baseline.scratch_lr


def test_settings_never_leak_from_one_task_to_the_next_and_params_yaml_is_never_written(project, tmp_path):
    params = project / "params.yaml"
    p = run(params, "photos", image_folder(tmp_path / "photos"), {"prepare.per_class": 5})
    assert p.prepare.per_class == 5 and "per_class: 5" in (project / "tasks/photos.yaml").read_text()
    p = run(params, "notes", table(tmp_path / "notes.csv"))
    assert p.prepare.per_class == 12 and p.register.model_name == "headstart-notes"
    assert run(params, None).task == "notes"  # the current task stays until another is named
    # back to the demo: exactly the committed settings; params.yaml and tasks/ as committed (git status clean)
    assert run(params, "image") == Params.load(ROOT / "params.yaml")
    assert params.read_text() == (ROOT / "params.yaml").read_text()
    assert all((project / "tasks" / f.name).read_text() == f.read_text() for f in (ROOT / "tasks").glob("*.yaml"))


def test_a_one_off_setting_applies_to_one_run_and_is_gone_after_it(project):
    params = project / "params.yaml"
    assert run(params, None, None, {"finetune.epochs": 3}).finetune.epochs == 3
    assert params.read_text() == (ROOT / "params.yaml").read_text()
    assert run(params, None).finetune.epochs == Params.load(ROOT / "params.yaml").finetune.epochs
    # a task key too: for this run, not written into the task's file
    assert run(params, "text", None, {"prepare.per_class": 7}).prepare.per_class == 7
    assert (project / "tasks/text.yaml").read_text() == (ROOT / "tasks/text.yaml").read_text()


def test_the_same_name_for_other_data_is_refused(project, tmp_path):
    run(project / "params.yaml", "photos", image_folder(tmp_path / "photos"))
    with pytest.raises(tasks.TaskError, match="already reads"):
        run(project / "params.yaml", "photos", image_folder(tmp_path / "other"))


@pytest.mark.parametrize(("args", "says"), [
    (["--data", "{tmp}/missing", "--task", "x"], "no such file or folder"),
    (["--data", "{tmp}/empty", "--task", "x"], "has no class folders"),
    (["--data", "{tmp}/nolabel.csv", "--task", "x"], "has no column 'label'"),
    (["--data", "{tmp}/empty", "--task", "my task"], "no spaces or path separators"),
    (["--data", "{tmp}/empty", "--task", "../x"], "no spaces or path separators"),
    (["--task", "nosuch"], "no task 'nosuch'"),
    (["--set", "finetune.epoch=3"], "no key 'epoch' under finetune"),
    (["--data", "{tmp}/photos", "--task", "x", "--set", "prepare.per_class=-1"], "prepare.per_class"),
])
def test_bad_input_is_one_line_that_says_what_to_do_and_writes_nothing(project, tmp_path, args, says):
    (tmp_path / "empty").mkdir()
    table(tmp_path / "nolabel.csv", label="category")
    image_folder(tmp_path / "photos")
    before = {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}
    res = sh([sys.executable, "-m", "flows.pipeline", *(a.format(tmp=tmp_path) for a in args)], project,
             {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr + res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], res.stderr
    assert {p: p.read_bytes() for p in project.rglob("*") if p.is_file()} == before
