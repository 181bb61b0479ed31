import os
import re
import signal
import subprocess
import sys

import pytest

from stages.files import atomic_path, write_json

from .conftest import ROOT


def test_a_failed_write_leaves_the_previous_directory_intact(tmp_path):
    out = tmp_path / "model"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("good")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (out / "weights").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folder left behind


def test_a_successful_write_replaces_the_whole_directory(tmp_path):
    out = tmp_path / "model"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "old_only").write_text("x")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["new"]


def test_files_are_replaced_atomically(tmp_path):
    write_json(tmp_path / "m.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json(tmp_path / "m.json", {"a": object()})  # not serialisable: fails before the rename
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 1\n}\n'


def test_a_writer_killed_mid_write_leaves_the_old_output_and_the_next_write_clears_its_remains(tmp_path):
    """kill -9 in the middle of writing a directory (a real SIGKILL: no finally, no cleanup runs): the old
    output is still whole under its name, the half-written folder is never read, and the next write
    deletes it. A folder whose writer is still alive is left alone."""
    from stages.files import remove_abandoned

    out = tmp_path / "prepared"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "train.safetensors").write_text("good")
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys; from stages.files import atomic_path\n"
        f"with atomic_path({str(out)!r}) as tmp:\n"
        "    tmp.mkdir(); (tmp / 'train.safetensors').write_text('ha')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")], cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL
    (left,) = [p for p in tmp_path.iterdir() if p.name != "prepared"]
    assert (out / "train.safetensors").read_text() == "good"
    dead = re.search(r"-(\d+)\.[^.]+\.tmp$", left.name)[1]
    alive = tmp_path / left.name.replace(f"-{dead}.", f"-{os.getpid()}.")  # the same, by a running writer
    alive.mkdir()
    assert remove_abandoned(out) == [left] and alive.exists()
    alive.rmdir()
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "train.safetensors").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]
