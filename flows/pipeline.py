"""The headstart pipeline as a Prefect flow: one task per DVC stage, each run through `dvc repro`, so DVC
decides what is out of date and dvc.lock stays the record; Prefect adds retries, logs and schedules.

Run:  python -m flows.pipeline                           (what `make run` does: the current task, image at first)
      python -m flows.pipeline --task text               (another task: tasks/text.yaml; make run NAME=text)
      python -m flows.pipeline --data ~/photos --task photos   (your data: creates tasks/photos.yaml once)
      python -m flows.pipeline --set finetune.epochs=3   (a setting for this run only)
      python -m flows.pipeline --preset presets/smoke.yaml   (a partial params file, for this run only)
The run's settings are composed by flows/compose.py into .headstart/params.yaml (git-ignored), which the
stages and dvc.yaml read; params.yaml, tasks/ and presets/ are read, never written (except a new task's file).
With PREFECT_API_URL set, the run is recorded on that server; otherwise Prefect starts a temporary local
one. When `dvc status` says nothing changed, the flow is not started at all: nothing would run, and
starting Prefect costs more than checking.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows import compose, tasks
from flows.summary import summary
from flows.workspace import WorkspaceBusy, workspace_lock
from stages.params import Params

STAGES = ("prepare", "select", "finetune", "baseline", "evaluate", "export", "register")
# Pre-training headstart does itself (pretrain/dvc.yaml), run after prepare and only for a task that
# uses its output: the paths.<key> it writes -> its stage.
PRETRAIN_STAGES = {"pretrained": "pretrain/dvc.yaml:pretrain", "dapt": "pretrain/dvc.yaml:dapt"}
# evaluate.seeds > 1: the extra training seeds (dvc.yaml's replicate entries), run just before evaluate
REPLICATE = "replicate@{}"
SEEDS_AT = STAGES.index("evaluate")
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


def replicate_stages(params: Params) -> list[str]:
    """The replicate entries evaluate.seeds asks for: one per training seed after the first."""
    return [REPLICATE.format(seed) for seed in range(1, params.evaluate.seeds)]


def stale_stages(params: Params | None = None) -> list[str]:
    """Stages whose code, params or inputs changed since dvc.lock was written (their downstream too),
    with the pre-training stages the task uses and the seeds it trains."""
    own = pretrain_stages(params) if params is not None else []
    seeds = replicate_stages(params) if params is not None else []
    res = dvc("status", "--json", "dvc.yaml", *(["pretrain/dvc.yaml"] if own else []))
    if res.returncode != 0:
        raise RuntimeError(f"dvc status failed:\n{res.stderr or res.stdout}")
    changed = set(json.loads(res.stdout or "{}"))
    return [s for s in (*own, *STAGES[:SEEDS_AT], *seeds, *STAGES[SEEDS_AT:]) if s in changed]


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
replicate_task = task(_repro, name="replicate")  # with_options(name=...) per extra seed


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
def pipeline(task: str | None = None, presets: list[str] | None = None, overrides: dict[str, Any] | None = None,
             sync: bool = False) -> dict[str, str]:
    """Run every out-of-date stage in order, on the settings of `task` (default: the current one) with
    `presets` and `overrides` ({"finetune.epochs": 3}) applied: composed into stages.params.RUN_PARAMS,
    which DVC reads, so dvc.lock records them like any other change; params.yaml is never written. With
    `sync` (scheduled runs), data and cache are pulled from the default DVC remote first and what the run
    made is pushed after it."""
    log = get_run_logger()
    with workspace_lock():
        # composed first: DVC reads its vars from the composed file, so not even a pull parses dvc.yaml before
        # it exists (a scheduled run starts from a fresh clone)
        composed = compose.compose(task or compose.current_task(), [Path(p) for p in presets or []], overrides)
        compose.write(composed)
        remote = default_remote()
        if sync:
            sync_with_remote("pull", remote)
        log.info("settings: %s", " + ".join(composed["composed_from"]))
        params = compose.settings(composed)
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
        done.update({name: TASKS[name](name, pull) for name in STAGES[1:SEEDS_AT]})
        for name in replicate_stages(params):  # evaluate.seeds > 1
            done[name] = replicate_task.with_options(name=name)(name, pull)
        done.update({name: TASKS[name](name, pull) for name in STAGES[SEEDS_AT:]})
        if sync:
            sync_with_remote("push", remote)
        return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=compose.PARAMS, help="params file (default: %(default)s)")
    parser.add_argument("--task", "--name", dest="task", metavar="NAME",
                        help="run this task (tasks/NAME.yaml): image, text, text-dapt, pretrain, or one of your own; "
                             "it stays the current task for later runs")
    parser.add_argument("--data", type=Path, metavar="PATH",
                        help="with --task: your data (an image folder, or a .csv/.jsonl/.parquet table); creates "
                             "tasks/NAME.yaml on first use")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting for this run only (e.g. finetune.epochs=3); with --data on first use, "
                             "task keys (e.g. prepare.label_column=topic) go into the new task's file")
    parser.add_argument("--preset", type=Path, action="append", default=[], metavar="FILE",
                        help="apply a partial params file (e.g. presets/smoke.yaml) for this run only")
    args = parser.parse_args(argv)
    try:
        overrides = compose.parse_overrides(args.overrides)
        composed = prepare_run(args.params, args.task, args.data, args.preset, overrides)
        with workspace_lock():
            compose.write(composed)
            params = compose.settings(composed)
            if stale_stages(params):
                pipeline(task=params.task, presets=[str(p) for p in args.preset], overrides=overrides)
            else:
                print("dvc status: data, code and params unchanged since the last run; nothing to retrain.")
            print(summary(params))
    except (tasks.TaskError, KeyError, ValueError, WorkspaceBusy) as e:
        message = str(e.args[0]) if isinstance(e, KeyError) else str(e)  # KeyError's str() adds quotes
        raise SystemExit("error: " + " ".join(line.strip() for line in message.splitlines())) from None


def prepare_run(params_file: Path, task: str | None, data: Path | None, presets: list[Path],
                overrides: dict[str, Any]) -> dict[str, Any]:
    """This run's composed settings (compose.compose): `task` (created from `data` first when new; default:
    the current task) with presets and overrides. Everything is checked before tasks/NAME.yaml is created,
    and nothing else is written: the caller writes the result to RUN_PARAMS."""
    current = compose.current_task(params_file=params_file)
    name = task or current
    if data is not None and task is None:
        raise tasks.TaskError("DATA= needs NAME=<task name>, e.g. make run DATA=~/photos NAME=photos")
    path = tasks.task_file(name)
    for_task = {k: v for k, v in overrides.items() if k in tasks.task_keys()}
    compose.compose(None, (), overrides, params_file=params_file)  # every override checked before anything is written
    if data is not None:
        if not path.exists():  # refuse bad data before writing anything
            tasks.infer(data, for_task.get("prepare.label_column", "label"), for_task.get("prepare.text_column", "text"))
        elif (source := tasks.load(name)["paths.source"]) != str(data):
            raise tasks.TaskError(f"task {name!r} already reads {source} ({path}); give this data another NAME, "
                                  f"or edit paths.source in {path}")
    elif not path.exists():
        tasks.load(name)  # the "no such task" message
    created = data is not None and not path.exists()
    if created:
        with workspace_lock():
            tasks.create(name, data, for_task)
        print(f"created {path} ({tasks.load(name)['prepare.dataset']}): this task's settings; edit it freely")
    composed = compose.compose(name, presets, overrides, params_file=params_file)
    if name != current:
        print(f"task {name} ({path}); the last run's was {current}")
    run_only = {k: v for k, v in overrides.items() if not (created and k in for_task)}  # the rest: in the new file
    if presets or run_only:
        print("for this run only: " + ", ".join([*(f"{k}={v}" for k, v in run_only.items()), *map(str, presets)]))
    return composed


if __name__ == "__main__":
    main()
