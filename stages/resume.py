"""Resumable training: the whole state of a `train.fit` run saved to a folder after every epoch (and every
few steps, when asked), and read back only by a run of the same training (settings, data and model), so a
killed and restarted run ends with the weights an uninterrupted one ends with."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stages.splits import Split

if TYPE_CHECKING:
    from stages.strategy import Plan
    from stages.train import FitResult


def fingerprint(model: nn.Module, train: Split, settings: dict[str, Any], plan: Plan, desc: str) -> str:
    """What must match for a checkpoint to be resumed: the loop's settings (train.loop_settings), the training
    data and the model's shape."""
    h = hashlib.sha256(json.dumps([desc, settings, dataclasses.asdict(plan)], sort_keys=True,
                                  default=str).encode())
    h.update(json.dumps(train.x.tolist()).encode() if train.x.dtype == object else np.ascontiguousarray(train.x).tobytes())
    h.update(np.ascontiguousarray(train.y).tobytes())
    h.update(json.dumps([(k, list(v.shape)) for k, v in model.state_dict().items()]).encode())
    return h.hexdigest()


class Checkpoints:
    """Training state in `folder`/<epoch>-<step>/: `state.pt` plus `complete.json` (its sha256 and the
    fingerprint of the training). Each is built in a temporary folder and renamed into place, so a kill at
    any moment leaves either the previous checkpoint or the new one, never half of one. Loaded with
    `torch.load(weights_only=True)`: tensors and plain values only, no code."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder, self.fingerprint = Path(folder), fingerprint

    def save(self, state: dict[str, Any]) -> None:
        from stages.files import atomic_path, sha256_file

        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"{state['epoch']:04d}-{state['step']:06d}"
        with atomic_path(target) as tmp:
            tmp.mkdir()
            torch.save(state, tmp / "state.pt")
            marker = {"sha256": sha256_file(tmp / "state.pt"), "fingerprint": self.fingerprint,
                      "epoch": state["epoch"], "step": state["step"]}
            (tmp / "complete.json").write_text(json.dumps(marker))
        for old in self.folder.iterdir():  # only the newest is needed
            if old.is_dir() and old.name != target.name and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> dict[str, Any] | None:
        """The newest complete checkpoint of this same training, or None."""
        from stages.files import sha256_file

        if not self.folder.is_dir():
            return None
        for path in sorted((p for p in self.folder.iterdir() if p.is_dir()), reverse=True):
            try:
                marker = json.loads((path / "complete.json").read_text())
            except (OSError, ValueError):
                continue  # no marker: not a complete checkpoint
            if marker.get("fingerprint") != self.fingerprint:
                tqdm.write(f"ignoring checkpoint {path}: it is from a different training (settings, data or model)")
                continue
            if marker.get("sha256") != sha256_file(path / "state.pt"):
                tqdm.write(f"ignoring checkpoint {path}: state.pt does not match its recorded sha256")
                continue
            try:
                return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise ValueError(f"{path}/state.pt holds more than tensors and plain values (refused to unpickle "
                                 f"it, nothing in it ran); delete {self.folder} to start training afresh") from e
        return None

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def training_state(model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                   gen: torch.Generator, best: FitResult, best_state: dict | None) -> dict[str, Any]:
    """What a checkpoint holds besides where in training it was taken (epoch, step: the caller adds them)."""
    return {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
            "torch_rng": torch.get_rng_state(), "best_state": best_state, "history": best.history,
            "best_epoch": best.best_epoch, "best_val_accuracy": best.best_val_accuracy}


def restore(state: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator, best: FitResult) -> dict | None:
    """Put a checkpoint's training state back in place (the inverse of `training_state`); returns the best
    weights so far."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    torch.set_rng_state(state["torch_rng"])
    best.history = state["history"]
    best.best_epoch, best.best_val_accuracy = state["best_epoch"], state["best_val_accuracy"]
    gen.set_state(state["gen"])
    return state["best_state"]
