"""The model a server answers with, and keeping it on the version that holds an alias: polled, or at once
on POST /admin/reload. A new version is downloaded, verified and warmed up beside the one serving, then
swapped in with one reference assignment; a version that fails its checks, or is of another task without
a forced promotion, is refused and the previous one keeps serving."""

from __future__ import annotations

import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.servable import NotServable, Servable

if TYPE_CHECKING:
    from ops.serving_app import Metrics


@dataclass
class Current:
    """The servable answering requests now. A request takes `model` once and uses that object to the end,
    so a swap (one reference assignment) never mixes two versions within a request."""

    model: Servable
    folder: Path | None = None  # where its files were downloaded (removed once it is swapped out)


def other_task(serving: Servable, new: Servable) -> str:
    """How `new` differs in task from the model being served ("" when it does not): its modality or classes."""
    if new.modality != serving.modality:
        return f"{new.modality}s where version {serving.version} takes {serving.modality}s"
    if new.classes != serving.classes:
        return f"classes {new.classes} where version {serving.version} has {serving.classes}"
    return ""


class Follower:
    """Keeps `current` on the version that holds the alias: polled, or at once via refresh()."""

    def __init__(self, current: Current, store: Any, name: str, alias: str, downloads: Path, int8: bool,
                 threads: int, metrics: Metrics) -> None:
        self.current, self.store, self.name, self.alias = current, store, name, alias
        self.downloads, self.int8, self.threads, self.metrics = downloads, int8, threads, metrics
        self.lock = threading.Lock()  # one refresh at a time: the poller and the admin endpoint may race
        self.last_error: str | None = None

    def refresh(self) -> dict[str, Any]:
        from stages.registry import describe_alias, fetch_servable

        with self.lock:
            serving = self.current.model.version
            try:
                found = describe_alias(self.store, self.name, self.alias)
            except Exception as e:  # the registry is down: keep serving what we have
                return self._failed(f"cannot reach the registry: {str(e).splitlines()[0][:200]}", serving)
            if found is None:
                return self._failed(f"no version holds {self.alias!r} now; still serving version {serving}", serving)
            if str(found["version"]) == serving:
                return {"changed": False, "version": serving}
            try:
                model = fetch_servable(self.store, self.name, self.alias, self.downloads, self.int8, found, self.threads)
                switch = other_task(self.current.model, model)
                if switch and found["tags"].get(f"{self.alias}.forced") != "true":
                    shutil.rmtree(self.downloads / f"v{model.version}", ignore_errors=True)
                    raise NotServable(
                        f"it is another task ({switch}) than version {serving}, "
                        f"which clients of {self.name}@{self.alias} send their inputs for; to switch tasks, promote "
                        f"it with a reason: python -m flows.promote {found['version']} --model {self.name} "
                        f"--alias {self.alias} --force --reason '...'")
                model.warm_up()
            except (NotServable, LookupError, OSError, ValueError) as e:
                return self._failed(f"version {found['version']} refused: {e}", serving)
            old = self.current.folder
            self.current.model, self.current.folder = model, self.downloads / f"v{model.version}"
            self.metrics.swapped(model)
            self.last_error = None
            print(f"{self.name}@{self.alias}: now serving version {model.version} (was {serving})", flush=True)
            if old is not None and old != self.current.folder:
                shutil.rmtree(old, ignore_errors=True)  # its session holds the model in memory already
            return {"changed": True, "version": model.version, "previous": serving}

    def _failed(self, reason: str, serving: str | None) -> dict[str, Any]:
        self.metrics.reload_failures.inc()
        if reason != self.last_error:
            print(f"{self.name}@{self.alias}: {reason}", file=sys.stderr, flush=True)
        self.last_error = reason
        return {"changed": False, "version": serving, "error": reason}

    def poll(self, seconds: float, stop: threading.Event) -> None:
        while not stop.wait(seconds):
            self.refresh()
