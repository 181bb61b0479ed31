"""Tasks: each dataset is a task with its own settings file, registered model and MLflow experiment.

tasks/<name>.yaml holds a task's values of every task key (TASK_KEYS: the keys tasks/image.yaml sets: the
data, how it is split, the model, the baselines' settings that depend on the modality, the registered model
name). A run composes the current task's file over params.yaml (flows/compose.py) without writing either, so
nothing of the task before is left behind, and a task that ran before is found in DVC's run cache instead of
retraining.

`python -m flows.pipeline --data PATH --task NAME` (`make run DATA=PATH NAME=NAME`) creates tasks/NAME.yaml
on first use: the modality is inferred from PATH (a folder of class folders: images; a .csv, .jsonl or
.parquet file: texts), the split sizes from its smallest class, the rest from the demo of that modality."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

TASKS_DIR = Path("tasks")
TEMPLATES = {"image-folder": "image", "text-table": "text"}  # a new task starts from its modality's demo
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class TaskError(ValueError):
    """A task name, file or data path that cannot be used; the message says what to do."""


def task_file(name: str, tasks_dir: Path = TASKS_DIR) -> Path:
    if not NAME.fullmatch(name) or ".." in name:
        raise TaskError(f"task name {name!r}: use letters, digits, '-', '_' and '.' (no spaces or path separators), "
                        "e.g. NAME=my-photos")
    return tasks_dir / f"{name}.yaml"


def task_keys(tasks_dir: Path = TASKS_DIR) -> set[str]:
    """The keys every task file sets: those of the image demo's."""
    from flows.compose import read_partial

    return set(read_partial(tasks_dir / "image.yaml"))


def registered_name(task: str, tasks_dir: Path = TASKS_DIR) -> str:
    """The registered model name of `task` (its register.model_name), read without the pipeline's imports."""
    import yaml

    path = task_file(task, tasks_dir)
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in tasks_dir.glob("*.yaml")))
        raise TaskError(f"no task {task!r} ({path} does not exist); known tasks: {known}")
    name = (yaml.safe_load(path.read_text()).get("register") or {}).get("model_name")
    if not name:
        raise TaskError(f"{path} sets no register.model_name")
    return name


def load(name: str, tasks_dir: Path = TASKS_DIR) -> dict[str, Any]:
    """A task's settings as dotted keys, checked to set exactly the task keys."""
    from flows.compose import read_partial

    path = task_file(name, tasks_dir)
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in tasks_dir.glob("*.yaml")))
        raise TaskError(f"no task {name!r} ({path} does not exist); known tasks: {known}. A new one: "
                        f"make run DATA=<image folder or table file> NAME={name}")
    values = read_partial(path)
    keys = task_keys(tasks_dir)
    missing, extra = sorted(keys - set(values)), sorted(set(values) - keys)
    if missing or extra:
        raise TaskError(f"{path} must set exactly the task keys: " + "; ".join(
            part for part in (missing and f"missing {', '.join(missing)}", extra and
                              f"not task keys {', '.join(extra)} (put them in params.yaml, or pass --set for one run)")
            if part))
    return values


def infer(data: Path, label_column: str = "label", text_column: str = "text") -> tuple[str, dict[str, int]]:
    """(prepare.dataset, examples per class) for the data at `data`, checked enough that a task made from it
    can run: a folder of class folders of files, or a table with its text and label columns."""
    from stages import sources

    if not data.exists():
        raise TaskError(f"DATA={data}: no such file or folder. Give an image folder (one sub-folder of images per "
                        "class) or a table file (.csv, .jsonl, .parquet with 'text' and 'label' columns)")
    try:
        if data.is_dir() and not any((data / f"train{s}").exists() for s in sources.TABLE_SUFFIXES):
            root = data / "train" if (data / "train").is_dir() and (data / "test").is_dir() else data
            counts = {c: sum(1 for f in (root / c).rglob("*") if f.is_file() and not f.name.startswith("."))
                      for c in sources.class_folders(root)}
            return "image-folder", counts
        from types import SimpleNamespace

        train = sources._fixed_test(data, "file")[0]
        p = SimpleNamespace(text_column=text_column, label_column=label_column, encoding="utf-8")
        _, labels = sources._read_table(train, p, [])
    except (ValueError, FileNotFoundError) as e:
        hint = ("; name your columns: make run ... SET='prepare.text_column=<column> prepare.label_column=<column>' "
                "(or --set each)"
                if "has no column" in str(e) else "")
        raise TaskError(f"DATA={data}: {e}{hint}") from None
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    if len(counts) < 2:
        raise TaskError(f"DATA={data}: {len(counts)} class(es) found; a classifier needs at least two")
    return "text-table", counts


def create(name: str, data: Path, settings: dict[str, Any] | None = None, tasks_dir: Path = TASKS_DIR) -> Path:
    """Write tasks/<name>.yaml for the data at `data` (with task keys `settings` given on the command line);
    refuse when the data cannot make a task."""
    path = task_file(name, tasks_dir)
    settings = settings or {}
    dataset, counts = infer(data, settings.get("prepare.label_column", "label"),
                            settings.get("prepare.text_column", "text"))
    values = load(TEMPLATES[dataset], tasks_dir)
    smallest = min(counts.values())
    # Up to the demos' 100 training and 30 validation examples per class, and at least a fifth of the
    # smallest class left for the test set: small data gets a proportional split instead of a refusal.
    per_class, val = min(100, int(smallest * 0.6)), min(30, int(smallest * 0.2))
    if per_class < 2 or val < 1:
        raise TaskError(f"DATA={data}: its smallest class ({min(counts, key=counts.get)!r}) has {smallest} examples; "
                        "a task needs at least 5 per class (training, validation and test)")
    values.update({
        "paths.source": str(data),
        "prepare.dataset": dataset,
        "prepare.per_class": per_class,
        "prepare.val_per_class": val,
        "prepare.test_per_class": None,
        "prepare.classes": None,
        "register.model_name": f"headstart-{name}",
        "register.experiment": f"headstart-{name}",
        "register.min_accuracy": None,
        **{f"paths.{k}": v for k, v in _result_paths(name).items()},
        **settings,
    })  # fmt: skip
    _write(path, values, f"# Task {name}: {len(counts)} classes from {data} ({dataset}), created "
                         f"{time.strftime('%Y-%m-%d')} by `make run DATA={data} NAME={name}`.\n"
                         "# Edit freely: these values are this task's alone (every task file sets the same keys).\n")
    return path


def _result_paths(name: str) -> dict[str, str]:
    """Where make compare and make curves keep this task's results, beside the other tasks'."""
    return {"strategies": f"metrics/strategies-{name}", "strategies_summary": f"metrics/strategies-{name}.json",
            "strategies_plot": f"plots/strategies-{name}.png", "curves": f"metrics/curves-{name}",
            "label_efficiency": f"metrics/label_efficiency-{name}.json",
            "label_efficiency_plot": f"plots/label_efficiency-{name}.png"}


def _write(path: Path, values: dict[str, Any], header: str) -> None:
    import yaml

    from stages.files import write_text

    nested: dict[str, Any] = {}
    for dotted, value in json.loads(json.dumps(values)).items():  # plain values: lists, numbers, None
        node = nested
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    class Dumper(yaml.SafeDumper):
        """Sections and keys one per line; lists on one line, as params.yaml writes them."""

    Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, header + yaml.dump(nested, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=110))
