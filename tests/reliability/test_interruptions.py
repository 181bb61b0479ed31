"""Killed mid-run, started twice, diverging: the stage resumes or fails clearly, and nothing good is lost."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from stages.params import Params

from ..conftest import ROOT, sh, tiny_params

pytestmark = pytest.mark.slow


def params_with(tmp_path: Path, source: Path, name: str, **finetune) -> Path:
    """tiny_params with its own outputs and checkpoints under tmp_path/name, sharing one prepared split."""
    base = tiny_params(tmp_path, source)
    raw = yaml.safe_load(base.read_text())
    raw["prepare"].update(per_class=6, val_per_class=2)
    raw["model"]["image_size"] = 48
    raw["finetune"].update(epochs=4, batch_size=8, patience=10, augment=True, **finetune)
    for key in ("finetuned", "finetune_history", "checkpoints"):
        raw["paths"][key] = str(tmp_path / name / key)
    out = tmp_path / f"params_{name}.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


def finetune(params: Path) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "stages.finetune", "--params", str(params)], ROOT)


def kill_when(cmd: list[str], ready, timeout: float = 300) -> int:
    """Start `cmd`, SIGKILL it as soon as `ready()` is true; return its exit status (-9 when killed)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    return proc.wait()


@pytest.fixture
def prepared(tiny_source, tmp_path) -> Path:
    params = params_with(tmp_path, tiny_source, "uninterrupted")
    sh([sys.executable, "-m", "stages.prepare", "--params", str(params)], ROOT)
    return params


def checkpoints_past(folder: Path, epoch: int, step: int = 0):
    def ready() -> bool:
        return folder.is_dir() and any(
            (p / "complete.json").exists() and (int(p.name[:4]), int(p.name[5:])) >= (epoch, step)
            for p in folder.iterdir() if p.is_dir() and p.name[:4].isdigit())
    return ready


@pytest.mark.parametrize("every_steps, kill_at", [(0, (3, 0)), (2, (2, 2))], ids=["after-epoch-2", "mid-epoch-2"])
def test_kill_9_during_training_then_rerun_ends_with_the_same_weights(prepared, tiny_source, tmp_path, every_steps, kill_at):
    """Checkpoints every epoch (and every N steps): killed by SIGKILL, the rerun resumes from the last
    complete checkpoint and ends with exactly the weights of a run that was never interrupted."""
    finetune(params_with(tmp_path, tiny_source, "uninterrupted", checkpoint_every_steps=every_steps))
    params = params_with(tmp_path, tiny_source, "killed", checkpoint_every_steps=every_steps)
    folder = tmp_path / "killed" / "checkpoints" / "finetune"
    status = kill_when([sys.executable, "-m", "stages.finetune", "--params", str(params)], checkpoints_past(folder, *kill_at))
    assert status == -signal.SIGKILL, "the run finished before it could be killed: the test proves nothing"
    assert not (tmp_path / "killed" / "finetuned").exists()  # no half-written output

    rerun = finetune(params)
    assert "resuming from the checkpoint at epoch" in rerun.stdout + rerun.stderr
    a = load_file(tmp_path / "uninterrupted" / "finetuned" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "finetuned" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= 1e-6, f"max |diff| {worst}"
    def history(name: str) -> list[list[str]]:  # epoch, loss, train and val accuracy (not the timings)
        return [row.split(",")[:4] for row in (tmp_path / name / "finetune_history").read_text().splitlines()]

    assert history("killed") == history("uninterrupted")
    assert not folder.exists()  # emptied once training completed


def test_a_checkpoint_of_other_settings_is_not_resumed(prepared, tiny_source, tmp_path):
    params = params_with(tmp_path, tiny_source, "other")
    folder = tmp_path / "other" / "checkpoints" / "finetune"
    assert kill_when([sys.executable, "-m", "stages.finetune", "--params", str(params)], checkpoints_past(folder, 2)) == -9
    raw = yaml.safe_load(params.read_text())
    raw["finetune"]["lr"] = 2.0e-3
    params.write_text(yaml.safe_dump(raw))
    res = finetune(params)
    assert "resuming" not in res.stdout + res.stderr
    assert "different training" in res.stdout + res.stderr


def test_an_incomplete_checkpoint_is_ignored(prepared, tiny_source, tmp_path):
    """A checkpoint folder without its completeness marker (a kill between writing and marking) is skipped."""
    params = params_with(tmp_path, tiny_source, "partial")
    folder = tmp_path / "partial" / "checkpoints" / "finetune" / "0003-000000"
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(b"half a file")
    res = finetune(params)
    assert "resuming" not in res.stdout + res.stderr
    assert (tmp_path / "partial" / "finetuned" / "model.safetensors").exists()


def test_killed_stage_leaves_the_previous_good_output_intact(prepared, tiny_source, tmp_path):
    params = params_with(tmp_path, tiny_source, "previous")
    finetune(params)
    model = tmp_path / "previous" / "finetuned" / "model.safetensors"
    before = model.read_bytes()
    raw = yaml.safe_load(params.read_text())
    raw["finetune"]["seed"] = 1  # a different training, so a finished write would change the file
    params.write_text(yaml.safe_dump(raw))
    folder = tmp_path / "previous" / "checkpoints" / "finetune"
    assert kill_when([sys.executable, "-m", "stages.finetune", "--params", str(params)], checkpoints_past(folder, 3)) == -9
    assert model.read_bytes() == before
    assert [p.name for p in model.parent.parent.iterdir() if p.name.startswith(".")] in ([], [f".{model.parent.name}.tmp"])


def test_nan_loss_fails_with_the_step_number_and_writes_nothing(prepared, tiny_source, tmp_path):
    params = params_with(tmp_path, tiny_source, "nan", lr=1.0e30)
    res = sh([sys.executable, "-m", "stages.finetune", "--params", str(params)], ROOT, check=False)
    assert res.returncode != 0
    assert "NaN or infinite at step" in res.stderr and "Lower the learning rate" in res.stderr
    assert not (tmp_path / "nan" / "finetuned").exists()


def test_a_second_pipeline_run_in_the_same_workspace_fails_fast_naming_the_first(tmp_path):
    from flows.workspace import workspace_lock

    lock = tmp_path / ".headstart.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "f.write('pid 4242, started earlier'); f.flush(); print('locked', flush=True); time.sleep(60)"), str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"another headstart pipeline run holds this workspace \(pid 4242"):
            with workspace_lock(lock):
                pass
        assert time.monotonic() - start < 2  # fails fast, does not wait
    finally:
        holder.kill()
        holder.wait()
    with workspace_lock(lock):  # released by the OS when the holder died
        with workspace_lock(lock):  # and re-entrant within one run
            assert f"pid {os.getpid()}" in lock.read_text()
    f = open(lock)
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again afterwards
    f.close()


def test_the_pipeline_command_refuses_to_start_while_another_run_holds_the_workspace(tmp_path):
    from ..conftest import copy_project, flow_env

    proj = copy_project(tmp_path / "proj")
    lock = proj / ".headstart.lock"
    f = open(lock, "a+")
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write("pid 1, started by the nightly schedule")
    f.flush()
    try:
        res = sh([sys.executable, "-m", "flows.pipeline"], proj, flow_env(proj), check=False)
    finally:
        f.close()
    assert res.returncode == 1
    assert "another headstart pipeline run holds this workspace (pid 1, started by the nightly schedule)" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (proj / "data" / "prepared").exists() and Params.load(proj / "params.yaml")
