"""The headstart pipeline as a Prefect flow: one task per DVC stage, each run through `dvc repro`, so DVC
decides what is out of date and dvc.lock stays the record; Prefect adds retries, logs and schedules.

Run:  python -m flows.pipeline                           (what `make run` does: the task params.yaml holds)
      python -m flows.pipeline --task text               (another task: tasks/text.yaml; make run NAME=text)
      python -m flows.pipeline --data ~/photos --task photos   (your data: creates tasks/photos.yaml once)
      python -m flows.pipeline --set finetune.epochs=3   (a setting for this run only; task keys go to the task file)
      python -m flows.pipeline --preset presets/smoke.yaml   (apply a preset: a partial params.yaml)
With PREFECT_API_URL set, the run is recorded on that server; otherwise Prefect starts a temporary local
one. When `dvc status` says nothing changed, the flow is not started at all: nothing would run, and
starting Prefect costs more than checking.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task

from flows import tasks
from flows.summary import summary
from flows.workspace import WorkspaceBusy, workspace_lock
from stages.params import Params

STAGES = ("prepare", "select", "finetune", "baseline", "evaluate", "export", "register")
# Pre-training headstart does itself (pretrain/dvc.yaml), run after prepare and only for a task that
# uses its output: the paths.<key> it writes -> its stage.
PRETRAIN_STAGES = {"pretrained": "pretrain/dvc.yaml:pretrain", "dapt": "pretrain/dvc.yaml:dapt"}
# Training is deterministic: retrying a failure repeats it. Talking to a tracking store is not, so the
# stages that do are retried, and only for failures that look transient.
RETRIES = {"register": 2}
TRANSIENT = ("ConnectionError", "Connection refused", "Max retries exceeded", "database is locked",
             "timed out", "Read timed out", "503 Server Error", "502 Server Error", "504 Server Error")


def is_transient(message: str) -> bool:
    return any(marker in message for marker in TRANSIENT)


def _retry_if_transient(task, task_run, state) -> bool:
    return is_transient(str(state.result(raise_on_failure=False)))


def _env() -> dict[str, str]:
    """This environment's bin first on PATH, so `python -m stages.<name>` in dvc.yaml runs in it too."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def dvc(*args: str, capture: bool = True) -> subprocess.CompletedProcess:
    """Run the dvc of this Python environment."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=capture, text=True, env=_env())


def pretrain_stages(params: Params) -> list[str]:
    """The pretrain/dvc.yaml stages whose output model.name or a select candidate names."""
    named = {Path(n.removeprefix("random:").partition(":")[2]).resolve()
             for n in (params.model.name, *params.select.candidates) if ":" in n}
    return [stage for key, stage in PRETRAIN_STAGES.items() if Path(getattr(params.paths, key)).resolve() in named]


def stale_stages(params: Params | None = None) -> list[str]:
    """Stages whose code, params or inputs changed since dvc.lock was written (their downstream too),
    with the pre-training stages the task uses."""
    own = pretrain_stages(params) if params is not None else []
    res = dvc("status", "--json", "dvc.yaml", *(["pretrain/dvc.yaml"] if own else []))
    if res.returncode != 0:
        raise RuntimeError(f"dvc status failed:\n{res.stderr or res.stdout}")
    changed = set(json.loads(res.stdout or "{}"))
    return [s for s in (*own, *STAGES) if s in changed]


def _repro(name: str, pull: bool = False) -> str:
    """Run one stage through DVC, passing its output (progress bars too) through to the terminal. With `pull`,
    a stage DVC's run cache knows (this code, params and inputs ran before, perhaps on another machine) is
    restored with its outputs fetched from the remote instead of run again."""
    log = get_run_logger()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--single-item", name, *(["--pull"] if pull else [])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(),
    )  # fmt: skip
    raw = bytearray()
    for chunk in iter(lambda: proc.stdout.read1(4096), b""):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        raw += chunk
    code = proc.wait()
    text = raw.decode(errors="replace").replace("\r", "\n")
    lines = [ln for ln in text.splitlines() if ln.strip() and "it/s]" not in ln and "s/it]" not in ln]
    seconds = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(lines[-25:])
        raise RuntimeError(f"stage {name} failed (dvc repro exit {code}) after {seconds:.0f}s:\n{tail}")
    if any("didn't change, skipping" in ln for ln in lines):
        outcome = "up to date, skipped"
    elif any("is cached - skipping run" in ln for ln in lines):
        outcome = "restored from DVC's run cache"
    else:
        outcome = f"ran in {seconds:.0f}s"
    log.info("stage %s: %s", name, outcome)
    return outcome


TASKS = {
    name: task(_repro, name=name, retries=RETRIES.get(name, 0), retry_delay_seconds=10,
               retry_condition_fn=_retry_if_transient)
    for name in STAGES
}
pretrain_task = task(_repro, name="pretrain")  # with_options(name=...) per pretrain/dvc.yaml stage


def default_remote() -> str:
    """The DVC remote `dvc push` would use ("" when none is set as default)."""
    res = dvc("config", "core.remote")
    return res.stdout.strip() if res.returncode == 0 else ""


def sync_with_remote(direction: str, remote: str) -> None:
    """`dvc pull` or `dvc push` of data, outputs and the run cache to `remote` (the default one) (so another
    clone restores a stage this run made instead of running it again). A pull tolerates what the remote
    lacks: a stage nobody ran yet."""
    log = get_run_logger()
    if not remote:
        log.warning("no default DVC remote (dvc remote add -d NAME URL): nothing %s; this run's outputs stay on "
                    "this machine", "pulled" if direction == "pull" else "pushed")
        return
    start = time.perf_counter()
    res = dvc(direction, "--run-cache", *(["--allow-missing"] if direction == "pull" else []))
    if res.returncode != 0:
        raise RuntimeError(f"dvc {direction} (remote {remote}) failed: {(res.stderr or res.stdout).strip()[-2000:]}")
    last = (res.stdout.strip().splitlines() or ["done"])[-1]
    if direction == "push":
        last += f"; {push_run_outputs(remote)} uncached outputs of recorded runs"
    log.info("dvc %s, remote %s: %s (%.0fs)", direction, remote, last, time.perf_counter() - start)


def push_run_outputs(remote: str) -> int:
    """`dvc push --run-cache` sends the records of stage runs, but not the outputs they name that DVC keeps
    out of its cache (metrics files, committed to git instead): another clone would find the record and
    still run the stage, for want of its metrics. Push those objects too; returns how many were sent."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        runs = Path(repo.stage_cache.cache_dir)
        entries = [(p.parent.name, p.name) for p in runs.glob("*/*/*") if p.is_file()] if runs.is_dir() else []
        used = repo.stage_cache.get_used_objs(entries)
        return sum(len(repo.cloud.push(objs, remote=remote).transferred) for objs in used.values())


@flow(name="headstart-pipeline", log_prints=True)
def pipeline(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None,
             sync: bool = False) -> dict[str, str]:
    """Run every out-of-date stage in order; `overrides` ({"finetune.epochs": 3}) are written to params.yaml
    first, so DVC records them in dvc.lock like any other change. With `sync` (scheduled runs), data and
    cache are pulled from the default DVC remote first and what the run made is pushed after it."""
    log = get_run_logger()
    with workspace_lock():
        remote = default_remote()
        if sync:
            sync_with_remote("pull", remote)
        if overrides:
            apply_overrides(Path(params_file), overrides)
            log.info("params.yaml updated: %s", overrides)
        params = Params.load(Path(params_file))
        stale = stale_stages(params)
        if not stale:
            log.info("dvc status: data, code and params unchanged; nothing to retrain")
            return {name: "up to date, skipped" for name in STAGES}
        log.info("out of date: %s", ", ".join(stale))
        pull = bool(remote)
        done = {"prepare": TASKS["prepare"]("prepare", pull)}
        for stage in pretrain_stages(params):  # the model the task fine-tunes from, locked in the weights lock
            short = stage.rsplit(":", 1)[1]
            done[short] = pretrain_task.with_options(name=short)(stage, pull)
        done.update({name: TASKS[name](name, pull) for name in STAGES[1:]})
        if sync:
            sync_with_remote("push", remote)
        return done


def apply_overrides(params_file: Path, overrides: dict[str, Any], *, write: bool = True, validate: bool = True) -> None:
    """Set dotted keys in params.yaml, keeping its comments; the result is validated before it is written.
    `write=False` only checks; `validate=False` is for a partial params file (a task's)."""
    from ruamel.yaml import YAML

    from stages.files import atomic_path

    rt = YAML()
    rt.preserve_quotes = True  # the file should change only where a value does
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(params_file.read_text())
    for dotted, value in overrides.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for key in parents:
            if key not in node:
                raise KeyError(f"--set {dotted}: {params_file.name} has no section {key!r}")
            node = node[key]
        if leaf not in node:
            raise KeyError(f"--set {dotted}: {params_file.name} has no key {leaf!r} under "
                           f"{'.'.join(parents) or 'the top'}")
        if node[leaf] != value or isinstance(node[leaf], bool) != isinstance(value, bool):
            node[leaf] = value  # an equal value keeps its written form (1.0e-3 stays 1.0e-3)
    if validate:
        Params.from_dict(json.loads(json.dumps(doc)), source=f"{params_file} with {overrides}")
    if write:
        with atomic_path(params_file) as tmp, open(tmp, "w") as f:
            rt.dump(doc, f)


def apply_presets(params_file: Path, presets: list[Path]) -> None:
    """Apply partial params files to params_file in order (a later one wins), holding the workspace lock."""
    if presets:
        with workspace_lock():
            apply_overrides(Path(params_file), {k: v for f in presets for k, v in read_preset(f).items()})


def parse_overrides(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value (e.g. finetune.epochs=3), got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)  # "3" -> 3, "1.0e-3" -> 0.001, "true" -> True
    return overrides


def read_preset(path: Path) -> dict[str, Any]:
    """A preset is a partial params.yaml; flattened to dotted keys ({"finetune.epochs": 1}) for apply_overrides."""
    def flatten(node: Any, prefix: str) -> dict[str, Any]:
        if isinstance(node, dict):
            return {k: v for key, sub in node.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): node}

    from ruamel.yaml import YAML

    # Round-trip loading keeps each value's written form (1.0e-3, [a, b]), so it lands in params.yaml as written.
    raw = YAML().load(Path(path).read_text())
    if not isinstance(raw, dict):
        raise SystemExit(f"{path}: a preset is a mapping of params.yaml sections, e.g. 'finetune: {{epochs: 1}}'")
    return flatten(raw, "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--task", "--name", dest="task", metavar="NAME",
                        help="run this task (tasks/NAME.yaml): image, text, text-dapt, pretrain, or one of your own")
    parser.add_argument("--data", type=Path, metavar="PATH",
                        help="with --task: your data (an image folder, or a .csv/.jsonl/.parquet table); creates "
                             "tasks/NAME.yaml on first use")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting: a task key (e.g. prepare.per_class=50) is written into the task's "
                             "file; any other (e.g. finetune.epochs=3) applies to this run only")
    parser.add_argument("--preset", type=Path, action="append", default=[], metavar="FILE",
                        help="apply a partial params file (e.g. presets/smoke.yaml) to params.yaml before running")
    args = parser.parse_args(argv)
    try:
        run_only = prepare_run(Path(args.params), args.task, args.data, args.preset, parse_overrides(args.overrides))
    except (tasks.TaskError, KeyError, ValueError, WorkspaceBusy) as e:
        message = str(e.args[0]) if isinstance(e, KeyError) else str(e)  # KeyError's str() adds quotes
        raise SystemExit("error: " + " ".join(line.strip() for line in message.splitlines())) from None
    params_file = Path(args.params)
    try:
        with workspace_lock(), one_run(params_file, run_only):
            if stale_stages(Params.load(params_file)):
                pipeline(params_file=str(params_file))
            else:
                print("dvc status: data, code and params unchanged since the last run; nothing to retrain.")
            print(summary(Params.load(params_file)))
    except WorkspaceBusy as e:
        raise SystemExit(f"error: {e}") from None


def prepare_run(params_file: Path, task: str | None, data: Path | None, presets: list[Path],
                overrides: dict[str, Any]) -> dict[str, Any]:
    """Switch params.yaml to `task` (creating it from `data` first), apply presets, and write the overrides
    that are task keys into the task's file. Returns the overrides that apply to this run only. Everything
    is checked before anything is written."""
    current = Params.load(params_file).task  # a bad params file fails here, before anything starts
    name = task or current
    if data is not None and task is None:
        raise tasks.TaskError("DATA= needs NAME=<task name>, e.g. make run DATA=~/photos NAME=photos")
    keys = tasks.task_keys()
    for_task = {k: v for k, v in overrides.items() if k in keys}
    run_only = {k: v for k, v in overrides.items() if k not in keys}
    path = tasks.task_file(name)
    if data is not None:
        if not path.exists():  # refuse bad data before writing anything
            tasks.infer(data, for_task.get("prepare.label_column", "label"), for_task.get("prepare.text_column", "text"))
        elif (source := tasks.load(name)["paths.source"]) != str(data):
            raise tasks.TaskError(f"task {name!r} already reads {source} ({path}); give this data another NAME, "
                                  f"or edit paths.source in {path}")
    elif not path.exists():
        tasks.load(name)  # the "no such task" message
    # every override checked now, task keys too: a typo or a bad value fails before anything is written
    apply_overrides(params_file, overrides, write=False)
    with workspace_lock():
        if data is not None and not path.exists():
            tasks.create(name, data, for_task)
            print(f"created {path} ({tasks.load(name)['prepare.dataset']}): this task's settings; edit it freely")
        elif for_task:
            tasks.update(name, for_task)
            print(f"{path}: " + ", ".join(f"{k}={v}" for k, v in for_task.items()) + " (this task's settings from now on)")
        if task is not None or for_task:
            apply_overrides(params_file, {**tasks.load(name), "task": name})
            if name != current:
                print(f"switched params.yaml from task {current} to {name} (tasks/{name}.yaml)")
        for preset in presets:
            apply_overrides(params_file, read_preset(preset))
        if presets and for_task:  # --set wins over a preset, as over the task file
            apply_overrides(params_file, for_task)
    if run_only:
        print("for this run only: " + ", ".join(f"{k}={v}" for k, v in run_only.items()))
    return run_only


@contextlib.contextmanager
def one_run(params_file: Path, overrides: dict[str, Any]):
    """`overrides` written into params.yaml for the run, and the file as it was afterwards: a one-off setting
    never carries over into the next run or task (dvc.lock still records what this run used)."""
    if not overrides:
        yield
        return
    before = params_file.read_text()
    apply_overrides(params_file, overrides)
    try:
        yield
    finally:
        from stages.files import write_text

        write_text(params_file, before)


if __name__ == "__main__":
    main()
