"""The settings of one run, composed and never written back: params.yaml, then the task's file
(tasks/<task>.yaml), then presets (partial params files, e.g. presets/smoke.yaml), then `--set key=value`,
a later one winning. The result goes to stages.params.RUN_PARAMS (git-ignored), where the stages and
dvc.yaml read it; the committed params.yaml, tasks/ and presets/ stay as they are.

Run:  python -m flows.compose                  (the current task's settings, as `make setup` does)
      python -m flows.compose --task text --preset presets/smoke.yaml --set finetune.epochs=1
After editing params.yaml or a task file, `make run` composes again by itself; before a bare `dvc repro`,
run this (or `make setup`)."""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from stages.files import write_text
from stages.params import RUN_PARAMS, Params, read_yaml

PARAMS = Path("params.yaml")
TASKS_DIR = Path("tasks")
HEADER = ("# The settings the current run uses: params.yaml, its task's file, presets and --set values, composed\n"
          "# by flows/compose.py. Generated (git ignores it): edit params.yaml or tasks/<task>.yaml instead.\n")


def read_partial(path: Path) -> dict[str, Any]:
    """A partial params file (a preset or a task's file) as dotted keys: {"finetune.epochs": 1}."""
    raw = yaml.safe_load(Path(path).read_text())  # read as params.yaml is read (Params.load)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a preset is a mapping of params.yaml sections, e.g. 'finetune: {{epochs: 1}}'")
    return flatten(raw)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`--set` arguments ("finetune.epochs=3") as dotted keys with YAML values ("3" -> 3, "true" -> True)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise KeyError(f"--set expects key=value (e.g. finetune.epochs=3), got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def with_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any], source: str = "params.yaml") -> dict[str, Any]:
    """A copy of the settings `raw` with dotted keys set; a key params.yaml does not have is an error."""
    out = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise KeyError(f"{source} has no {dotted} (no section {key!r})")
            node = node[key]
        if leaf not in node:
            raise KeyError(f"{source} has no {dotted} (no key {leaf!r} under {'.'.join(parents) or 'the top'})")
        node[leaf] = json.loads(json.dumps(value))
    return out


def compose(task: str | None = None, presets: Sequence[Path] = (), overrides: Mapping[str, Any] | None = None,
            params_file: Path = PARAMS, tasks_dir: Path = TASKS_DIR) -> dict[str, Any]:
    """params.yaml ⊕ tasks/<task>.yaml ⊕ presets ⊕ overrides as a plain dict, validated; `composed_from`
    names the layers. params.yaml holds its own task's settings (its `task`, image as committed), so its task
    file is not applied: an edit to params.yaml counts. `task=None` is params.yaml's own task too."""
    from flows import tasks

    raw = read_yaml(params_file)
    layers = [str(params_file)]
    if task is not None and task != raw.get("task", "image"):
        raw = with_overrides(raw, {**tasks.load(task, tasks_dir), "task": task}, str(params_file))
        layers.append(str(tasks.task_file(task, tasks_dir)))
    for preset in presets:
        raw = with_overrides(raw, read_partial(preset), str(params_file))
        layers.append(str(preset))
    if overrides:
        raw = with_overrides(raw, overrides, str(params_file))
        layers.append("--set " + " ".join(f"{k}={v}" for k, v in overrides.items()))
    params = Params.from_dict(raw, source=" + ".join(layers))  # a typo or a bad value fails here, naming the key
    # dvc.yaml's replicate stage has one entry per extra training seed, and DVC cannot count: the list
    return {"composed_from": layers, "run": raw, "replicates": list(range(1, params.evaluate.seeds))}


def with_settings(base: Params, overrides: Mapping[str, Any]) -> Params:
    """`base` with dotted keys set, in memory, validated like params.yaml (bench/ variants)."""
    return Params.from_dict(with_overrides(base.to_dict(), overrides), source=f"settings with {dict(overrides)}")


def settings(composed: Mapping[str, Any]) -> Params:
    return Params.from_dict(composed["run"], source=" + ".join(composed["composed_from"]))


def write(composed: Mapping[str, Any], path: Path = RUN_PARAMS) -> Path:
    """Write the composed settings where Params.load and dvc.yaml read them (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, HEADER + yaml.safe_dump(dict(composed), sort_keys=False, width=110))
    if Path(path).parts[-2:] == RUN_PARAMS.parts:  # a project's run settings: its replicate folder follows them
        ready_replicates(composed, Path(path).parents[1])
    return path


# what git ignores in paths.replicates: everything but this file (DVC tracks the seeds' outputs)
REPLICATES_GITIGNORE = ("# paths.replicates: each extra training seed's outputs (dvc.yaml replicate@<seed>), kept out of git\n"
                        "/*\n!.gitignore\n")


def ready_replicates(composed: Mapping[str, Any], root: Path) -> list[Path]:
    """paths.replicates as these settings' evaluate expects it: there (evaluate depends on the folder, and DVC
    refuses a missing dependency, even with evaluate.seeds: 1), with its .gitignore from the start, and
    without the outputs of seeds these settings do not train (left by a run with more seeds, or by another
    task's), which would make evaluate run again, and miss DVC's run cache, for nothing. DVC's cache keeps
    those: `dvc repro` restores them when a run asks for the seeds again. Returns the folders removed."""
    folder = root / composed["run"]["paths"]["replicates"]
    folder.mkdir(parents=True, exist_ok=True)
    ignore = folder / ".gitignore"
    if not ignore.exists():  # written before DVC would add one of its own, which would change the folder's hash
        write_text(ignore, REPLICATES_GITIGNORE)
    keep = {str(seed) for seed in composed.get("replicates", [])}
    gone = [d for d in folder.iterdir() if d.is_dir() and d.name.isdigit() and d.name not in keep]
    for d in gone:
        shutil.rmtree(d)
    return gone


def write_for_command(task: str | None, presets: Sequence[Path]) -> None:
    """Compose and write the settings of a flow started from the command line (`task`: default the current
    one), under the workspace lock; a bad key or value, or a busy workspace, is one line on stderr."""
    from flows.workspace import WorkspaceBusy, workspace_lock

    try:
        with workspace_lock():
            write(compose(task or current_task(), presets))
    except (KeyError, ValueError, WorkspaceBusy) as e:
        raise SystemExit("error: " + (str(e.args[0]) if isinstance(e, KeyError) else str(e))) from None


def current_task(path: Path = RUN_PARAMS, params_file: Path = PARAMS) -> str:
    """The task of the last composed run, else params.yaml's."""
    if path.exists():
        task = (read_yaml(path).get("run") or {}).get("task")
        if task:
            return task
    return Params.load(params_file).task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", help="the task (tasks/TASK.yaml; default: the current one)")
    parser.add_argument("--preset", type=Path, action="append", default=[], metavar="FILE")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        composed = compose(args.task or current_task(), args.preset, parse_overrides(args.overrides))
    except (KeyError, ValueError) as e:
        raise SystemExit("error: " + (str(e.args[0]) if isinstance(e, KeyError) else str(e))) from None
    print(f"{write(composed)}: " + " + ".join(composed["composed_from"]))


if __name__ == "__main__":
    main()
