"""One pipeline run per workspace at a time: `workspace_lock()` around anything that writes the run's settings,
dvc.lock or the outputs (the pipeline, compare and curves flows)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds this workspace."""


LOCK_FILE = Path(".headstart.lock")  # in the project root, beside dvc.yaml
_held = 0  # re-entrant within one process: main() holds it around the flow, which takes it too


@contextlib.contextmanager
def workspace_lock(path: Path = LOCK_FILE) -> Iterator[None]:
    """One pipeline run per workspace at a time. A second run (a scheduler firing twice, a person running
    `make run` during the nightly run) fails at once, naming the holder, instead of interleaving writes
    to the run settings, dvc.lock and the outputs. The OS releases the lock when its holder dies, even by kill -9."""
    global _held
    if _held:
        _held += 1
        try:
            yield
        finally:
            _held -= 1
        return
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise WorkspaceBusy(f"another headstart pipeline run holds this workspace ({holder}); wait for it to finish "
                           f"or stop it, then run again. Lock file: {path.resolve()}") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    f.flush()
    _held = 1
    try:
        yield
    finally:
        _held = 0
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
