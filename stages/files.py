"""Writing outputs whole or not at all, and hashing inputs. An interrupted stage must leave the last good
outputs in place, so everything is written to a temporary sibling first and renamed into place."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success it replaces `target` (file or directory). A disk
    that fills meanwhile fails with an OSError that says so and keeps the previous `target` whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target)
    tmp = None
    try:
        writer = f".{target.name}.{_HOST}-{os.getpid()}."  # what remove_abandoned reads
        tmp = Path(tempfile.mkdtemp(prefix=writer, suffix=".tmp", dir=target.parent)) / target.name
        yield tmp
        if target.is_dir() and not target.is_symlink():
            # A directory cannot be renamed over a non-empty one: move the old aside, then the new in. A
            # crash between the two renames leaves the old output whole in the hidden temp folder beside
            # it; a crash at any other point leaves the old or the new one under the name, never a part.
            old = tmp.parent / f"{target.name}.old"
            os.replace(target, old)
            os.replace(tmp, target)
        else:
            os.replace(tmp, target)
    except Exception as e:
        # safetensors reports it as its own error type, carrying the OS's message
        if not (getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)):
            raise
        raise OSError(errno.ENOSPC, f"no space left on the disk holding {target.parent} while writing {target.name}; "
                      f"the previous {target.name} is kept. Free space there (df -h {target.parent}) or point "
                      "this path at a larger disk") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp.parent, ignore_errors=True)


_HOST = socket.gethostname().replace(".", "_")  # with the writer's pid, in each temporary folder's name


def remove_abandoned(target: Path) -> list[Path]:
    """Delete the temporary folders beside `target` that a writer on this host left when it was killed
    (kill -9, out of memory) before it could clean up, and return them. They are never read as data; a
    writer still running, or one on another host sharing the folder, keeps its own."""
    target = Path(target)
    gone = []
    for folder in target.parent.glob(f".{glob.escape(target.name)}.{glob.escape(_HOST)}-*.tmp"):
        pid = folder.name[len(f".{target.name}.{_HOST}-"):].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder)
    return gone


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: Path) -> Any:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first (dvc repro)")
    return json.loads(Path(path).read_text())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
