"""The one training loop (fine-tuning and from-scratch training share it) and batched inference.
Plain PyTorch so every step can be read: AdamW, one-cycle schedule, optional frozen backbone for the
first epochs, early stopping on validation accuracy keeping the best weights.

Under `torchrun` (WORLD_SIZE > 1) the same loop is data-parallel: `distributed()` joins the process group
(NCCL on CUDA, gloo on CPU), each rank trains on its DistributedSampler shard of every epoch with
1/world of the batch (the global batch and the schedule stay as configured), gradients are averaged by
DDP, loss and accuracy are all-reduced, validation runs on rank 0 with rank 0's BatchNorm statistics and
its decision is broadcast, and only rank 0 prints and writes."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import pickle
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from stages.data import Split, batches, to_model_input
from stages.params import AUGMENTS

if TYPE_CHECKING:
    from stages.params import FinetuneParams
    from stages.strategy import Plan

# The settings `fit` reads (of FinetuneParams, which also holds the strategy's settings, read by a Plan, and
# the launcher's), in the order model.json records them; tests/test_consistency.py checks the list against fit.
LOOP_SETTINGS = ("epochs", "batch_size", "lr", "weight_decay", "patience", "seed", "augment", "crop_min_area",
                 "label_smoothing", "grad_clip", "compile", "checkpoint_every_steps", "keep")


def loop_settings(cfg: FinetuneParams) -> dict[str, Any]:
    """What a trained model's model.json records of the settings its training ran with."""
    return {k: getattr(cfg, k) for k in LOOP_SETTINGS}


@dataclass
class FitResult:
    best_epoch: int
    best_val_accuracy: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def device() -> torch.device:
    """Where every stage trains and runs its networks (fit and predict: select's features, evaluate, CKA,
    export's PyTorch side): $HEADSTART_DEVICE when set (cpu, cuda, cuda:1, mps, ...), else the GPU when
    there is one, else the CPU. Under torchrun a bare `cuda` is this process's GPU (LOCAL_RANK)."""
    name = os.environ.get("HEADSTART_DEVICE", "auto").strip() or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"HEADSTART_DEVICE={name!r} is not a device: use auto, cpu, cuda, cuda:<n> or mps") from None


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


@contextlib.contextmanager
def distributed(timeout_s: float | None = None) -> Iterator[tuple[int, int]]:
    """Join the torchrun process group when started by torchrun (WORLD_SIZE > 1); yields (rank, world).
    A collective that waits more than `timeout_s` for another process fails (None: torch's default)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield rank_and_world()
        return
    cuda = device().type == "cuda"
    if cuda:
        torch.cuda.set_device(device())
    dist.init_process_group(backend="nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s) if timeout_s else None)
    rank, world = rank_and_world()
    try:
        yield rank, world
    except RuntimeError as e:
        # gloo reports a lost peer ("Connection closed by peer") or a timeout as a plain RuntimeError
        # naming its own source file; NCCL and the store raise DistError.
        if not (isinstance(e, dist.DistError) or "/gloo/" in str(e)):
            raise
        waited = f"the peer timeout ({timeout_s:g} s)" if timeout_s else "torch's default timeout"
        raise RuntimeError(
            f"process {rank} of {world} lost contact with the others: a node died or was stopped, the network "
            f"between nodes failed, or a process did not answer within {waited}. It stops here without "
            f"writing its outputs, and torchrun stops this node; start the job again on every node. ({e})") from e
    finally:
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    pre: dict,
    cfg: FinetuneParams,
    plan: Plan,
    desc: str = "train",
    checkpoints: Path | None = None,
) -> FitResult:
    """Train `model` in place; on return it holds the weights of the best validation epoch (on every rank),
    or of the last epoch with `cfg.keep == "last"` (which also never stops early). `cfg` is resolved
    (stages/hyperrule.py: no `auto` left); `plan` (stages/strategy.py) says which parameters train in which
    epoch, at which learning rate.

    With `checkpoints` (a folder), the whole training state is saved there after every epoch and every
    `cfg.checkpoint_every_steps` steps, and a run that finds a complete checkpoint of the same training
    (same settings, data and model) resumes from it: killed and restarted, it ends with the weights an
    uninterrupted run ends with (CPU, deterministic ops). The folder is emptied when training completes."""
    cfg.require_resolved()
    rank, world = rank_and_world()
    # Each process its own random stream (dropout, where a model has it); DDP copies rank 0's weights.
    seed_everything(cfg.seed + rank)
    lead = rank == 0
    dev = device()
    cuda = dev.type == "cuda"
    # channels_last: convolutions run faster on both tensor cores and oneDNN's CPU kernels (a training step of
    # EfficientNet-Lite0 at 80 px took 224 ms vs 340 ms on this 2-core CPU); a no-op for non-4D weights
    model.to(dev).to(memory_format=torch.channels_last)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # BatchNorm over the global batch, as one process computes it: each process's share of a batch of
        # 32 is small, and per-process statistics slowed learning markedly (measured on CPU: 0.62 vs 0.89).
        sync_batchnorm(model)
        net = DistributedDataParallel(model, device_ids=[dev.index] if cuda else None)
    if cfg.compile:
        net = torch.compile(net)

    x_train = to_model_input(train.x, pre)  # a few hundred examples: preprocess once, keep in memory
    y_train = torch.from_numpy(train.y)
    if cuda:  # pinned host memory: the copies below overlap with compute
        x_train, y_train = _map(x_train, lambda t: t.pin_memory()), y_train.pin_memory()
    per_rank_batch = math.ceil(cfg.batch_size / world)
    sampler = None
    if world > 1:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(len(y_train)), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    n_local = len(sampler) if sampler is not None else len(y_train)
    steps_per_epoch = math.ceil(n_local / per_rank_batch)
    opt = torch.optim.AdamW(plan.param_groups(model, cfg.lr, cfg.weight_decay))
    sched = schedule(opt, cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed + rank)  # each rank augments differently
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    anchors = plan.anchors(model)  # before any resume: the weights training started from

    best = FitResult(best_epoch=-1, best_val_accuracy=-1.0, seconds=0.0)
    best_state = None
    saver = Checkpoints(checkpoints, fingerprint(model, train, cfg, plan, desc)) if checkpoints and world == 1 else None
    resumed = saver.latest() if saver else None
    first_epoch, skip_steps, epoch_gen = 1, 0, None
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["opt"])
        sched.load_state_dict(resumed["sched"])
        torch.set_rng_state(resumed["torch_rng"])
        best_state, best.history = resumed["best_state"], resumed["history"]
        best.best_epoch, best.best_val_accuracy = resumed["best_epoch"], resumed["best_val_accuracy"]
        first_epoch, skip_steps = resumed["epoch"], resumed["step"]
        epoch_gen = resumed["epoch_gen"]
        gen.set_state(resumed["gen"])
        tqdm.write(f"{desc}: resuming from the checkpoint at epoch {first_epoch}, step {skip_steps} "
                   f"({checkpoints})")
    start = time.perf_counter() - (best.history[-1]["seconds"] if best.history else 0.0)
    for epoch in range(first_epoch, cfg.epochs + 1):
        trainable = plan.trainable(epoch)
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable)
        frozen = trainable == set(plan.head)
        net.train()
        resuming_mid_epoch = resumed is not None and epoch == first_epoch and skip_steps > 0
        if resuming_mid_epoch:  # the same order as the interrupted epoch, then the generator where it was
            now = gen.get_state()
            gen.set_state(epoch_gen)
        epoch_gen = gen.get_state()
        if sampler is not None:
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler))
        else:
            order = torch.randperm(len(y_train), generator=gen)
        if resuming_mid_epoch:
            gen.set_state(now)
            loss_sum = resumed["loss_sum"].to(dev)
            correct = resumed["correct"].to(dev)
        else:
            loss_sum = torch.zeros((), device=dev)
            correct = torch.zeros((), device=dev, dtype=torch.long)
        bad_step = torch.full((), -1, device=dev, dtype=torch.long)  # first step with a non-finite loss
        bar = tqdm(
            batches(len(order), per_rank_batch),
            total=steps_per_epoch,
            desc=f"{desc} {epoch}/{cfg.epochs}" + (" (head only)" if frozen else ""),
            leave=False,
            dynamic_ncols=True,
            disable=not lead,
        )
        for step, sl in enumerate(bar, 1):
            if resuming_mid_epoch and step <= skip_steps:
                continue
            idx = order[sl]
            xb = _map(take(x_train, idx), lambda t: t.to(dev, non_blocking=True))
            yb = y_train[idx].to(dev, non_blocking=True)
            if cfg.augment != "none" and not isinstance(xb, tuple):  # images only
                xb = augment(xb, gen, cfg.augment, cfg.crop_min_area)
            if not isinstance(xb, tuple):
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                logits = net(*_args(xb))
                loss = loss_fn(logits.float(), yb)
            penalty = plan.penalty(model, anchors)
            opt.zero_grad(set_to_none=True)
            (loss if penalty is None else loss + penalty).backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == yb).sum()
            # recorded on the device: no host sync per step; read at the next sync below
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()),
                                   (epoch - 1) * steps_per_epoch + step, bad_step)
            if step % 10 == 0 or step == steps_per_epoch:  # a host sync: only now and then
                if bad_step.item() >= 0:
                    raise FloatingPointError(
                        f"{desc}: the training loss became NaN or infinite at step {bad_step.item()} (epoch "
                        f"{epoch}); nothing was written. Lower the learning rate (now {cfg.lr}) or check the data")
                if lead:
                    seen = min(step * per_rank_batch, len(order))
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}")
            if saver and cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and step < steps_per_epoch:
                saver.save({"epoch": epoch, "step": step, "epoch_gen": epoch_gen, "loss_sum": loss_sum.cpu(),
                            "correct": correct.cpu(), **_state(model, opt, sched, gen, best, best_state)})
        bar.close()

        seen = torch.tensor([loss_sum.item(), correct.item(), len(order)], dtype=torch.float64)
        if world > 1:  # the epoch's loss and accuracy over every rank's examples
            dist.all_reduce(seen)
            for buf in model.buffers():  # rank 0's BatchNorm statistics everywhere, as DDP does each step
                dist.broadcast(buf, src=0)
        train_loss, train_acc = float(seen[0] / seen[2]), float(seen[1] / seen[2])
        val_acc = accuracy(model, val, pre) if lead else 0.0
        if world > 1:  # one decision for every rank: early stopping must stop them all at once
            decided = torch.tensor([val_acc], dtype=torch.float64)
            dist.broadcast(decided, src=0)
            val_acc = float(decided[0])
        row = {
            "epoch": epoch,
            "train_loss": round(train_loss, 6),
            "train_accuracy": round(train_acc, 6),
            "val_accuracy": round(val_acc, 6),
            "lr": opt.param_groups[-1]["lr"],  # the head's
            "seconds": round(time.perf_counter() - start, 2),
        }
        best.history.append(row)
        # A tie goes to the later epoch: it has trained longer, at the lower learning rate where one-cycle
        # does its best work, and a few hundred validation examples often cannot tell the two apart.
        improved = val_acc >= best.best_val_accuracy
        if improved or cfg.keep == "last":
            best.best_epoch, best.best_val_accuracy = epoch, val_acc
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        if lead:
            tqdm.write(
                f"{desc} epoch {epoch}/{cfg.epochs}: loss {train_loss:.4f}  train acc {train_acc:.3f}  "
                f"val acc {val_acc:.3f}{'  (best)' if improved and cfg.keep == 'best' else ''}"
            )
        stop = epoch - best.best_epoch >= cfg.patience  # never with keep "last": best_epoch is this epoch
        if saver and not stop and epoch < cfg.epochs:  # the next epoch starts from here
            saver.save({"epoch": epoch + 1, "step": 0, "epoch_gen": None, **_state(model, opt, sched, gen, best, best_state)})
        if stop:
            if lead:
                tqdm.write(f"{desc}: no better validation accuracy for {cfg.patience} epochs, stopping early")
            break

    for p in model.parameters():
        p.requires_grad_(True)
    model.load_state_dict(best_state)
    model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    best.seconds = round(time.perf_counter() - start, 2)
    if saver:
        saver.clear()  # the caller writes the model; a later run must not resume a finished training
    return best


def schedule(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle: a quarter of the steps warming up to each parameter group's lr, then annealing. OneCycleLR
    needs at least a full step in each phase, so very short runs (a handful of steps) warm up longer or keep
    the lr constant."""
    if total_steps < 4:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total_steps,
                                               pct_start=max(0.25, 1.5 / total_steps))


def _state(model, opt, sched, gen, best: FitResult, best_state) -> dict[str, Any]:
    return {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
            "torch_rng": torch.get_rng_state(), "best_state": best_state, "history": best.history,
            "best_epoch": best.best_epoch, "best_val_accuracy": best.best_val_accuracy}


def fingerprint(model: nn.Module, train: Split, cfg: FinetuneParams, plan: Plan, desc: str) -> str:
    """What must match for a checkpoint to be resumed: the settings, the training data and the model's shape."""
    h = hashlib.sha256(json.dumps([desc, loop_settings(cfg), dataclasses.asdict(plan)], sort_keys=True,
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


def sync_batchnorm(model: nn.Module) -> None:
    """Make every BatchNorm of `model` normalise with the mean and variance of the global batch (all
    processes) in training, in place. torch's SyncBatchNorm is CUDA-only, so this does the same with an
    autograd-aware all-reduce of per-channel sums, which works on gloo too; eval mode is unchanged. timm's
    BatchNormAct2d (norm, then dropout and activation) is a BatchNorm2d and keeps its activation."""
    from torch.distributed.nn.functional import all_reduce

    def forward(bn: nn.modules.batchnorm._BatchNorm, local_forward: Callable, x: torch.Tensor) -> torch.Tensor:
        if not bn.training:
            return local_forward(x)
        c = x.shape[1]
        dims = [d for d in range(x.ndim) if d != 1]
        count = torch.full((1,), x.numel() / c, dtype=torch.float32, device=x.device)
        xf = x.float()
        stats = all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        if bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked += 1
                m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), m)
                bn.running_var.lerp_((var * n / (n - 1)).to(bn.running_var.dtype), m)
        shape = [1, c] + [1] * (x.ndim - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var + bn.eps).view(shape)
        if bn.affine:
            y = y * bn.weight.view(shape) + bn.bias.view(shape)
        y = y.to(x.dtype)
        if hasattr(bn, "act"):  # timm BatchNormAct2d
            y = bn.act(bn.drop(y))
        return y

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.forward = functools.partial(forward, module, module.forward)


def augment(
    x: torch.Tensor, gen: torch.Generator, how: str = "flip_shift", crop_min_area: float = 0.35
) -> torch.Tensor:
    """Label-preserving changes to a batch of images, the cheapest defence against memorising a few hundred:
      flip        random horizontal flip;
      flip_shift  flip, and a shift of up to 1/16 of the side (a 1/8 shift left fine-tuning underfitting in
                  10 epochs: train accuracy 0.87);
      crop        random resized crop (Inception / BiT style: a box of crop_min_area..1 of the image with an
                  aspect ratio in 3/4..4/3, scaled back to full size), and flip. Stronger: for longer schedules.
    Each is one batched operation, so a GPU sees a few kernels rather than a loop over images."""
    if how not in AUGMENTS:
        raise ValueError(f"unknown augmentation {how!r}: one of {', '.join(AUGMENTS)}")
    if how == "none":
        return x
    if how == "crop":
        return random_resized_crop(x, gen, crop_min_area)
    n, c, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1).to(x.device), x.flip(3), x)
    if how == "flip":
        return x
    pad = max(1, h // 16)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_resized_crop(x: torch.Tensor, gen: torch.Generator, min_area: float) -> torch.Tensor:
    """Random resized crop + horizontal flip of every image in the batch at once: one affine sampling grid
    per image (crop box and flip as a scale and a translation), one bilinear grid_sample for the batch."""
    n = x.shape[0]
    area = min_area + (1 - min_area) * torch.rand(n, generator=gen)
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(n, generator=gen)
    ratio = log_ratio.exp()
    # box sides as fractions of the image's; a box that would stick out is clipped to the image
    sx, sy = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    # the box centre, in grid_sample's [-1, 1] coordinates, anywhere that keeps the box inside
    tx = (1 - sx) * (2 * torch.rand(n, generator=gen) - 1)
    ty = (1 - sy) * (2 * torch.rand(n, generator=gen) - 1)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, tx, sy, ty
    grid = torch.nn.functional.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def predict(
    model: nn.Module,
    x: np.ndarray,
    pre: dict,
    batch_size: int = 64,  # on this CPU 1.5x faster than 256: activations stay in the allocator's cache
    fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    desc: str | None = None,
) -> np.ndarray:
    """Logits (or `fn(model, *inputs)`, e.g. features) for images or texts, batch by batch, in fp32, on
    device(); the model is back where it was, in its memory format, afterwards."""
    dev, home = device(), next(model.parameters()).device
    was_training = model.training
    conv = next((w for w in model.parameters() if w.ndim == 4), None)
    was_format = torch.channels_last if conv is not None and not conv.is_contiguous() else torch.contiguous_format
    model.eval().to(dev, memory_format=torch.channels_last)  # as in fit: 1.8x faster inference on this CPU
    out = []
    it = batches(len(x), batch_size)
    if desc:
        it = tqdm(it, total=math.ceil(len(x) / batch_size), desc=desc, leave=False, dynamic_ncols=True)
    # Scores and parity references are fp32: TF32, cuDNN's default for convolutions on recent GPUs, moved
    # logits by up to 0.3 on an H200 and failed export's parity with ONNX Runtime's fp32 (99.43% top-1)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            for sl in it:
                args = _args(_map(to_model_input(x[sl], pre), lambda t: _on(t, dev)))
                out.append((fn(model, *args) if fn else model(*args)).float().cpu().numpy())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        model.train(was_training).to(home, memory_format=was_format)  # contiguous is what safetensors can save
    return np.concatenate(out)


def _on(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    t = t.to(dev)
    return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t


Inputs = torch.Tensor | tuple[torch.Tensor, ...]  # an image batch, or (input_ids, attention_mask)


def _args(x: Inputs) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def _map(x: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    return tuple(fn(t) for t in x) if isinstance(x, tuple) else fn(x)


def take(x: Inputs, idx: torch.Tensor) -> Inputs:
    """Rows `idx` of a preprocessed set. Token batches lose the padding columns none of their rows needs:
    the set is padded to its longest text, most batches are much shorter."""
    if not isinstance(x, tuple):
        return x[idx]
    ids, mask = x[0][idx], x[1][idx]
    width = max(int(mask.sum(1).max()), 1)
    return ids[:, :width], mask[:, :width]


def accuracy(model: nn.Module, split: Split, pre: dict) -> float:
    return float((predict(model, split.x, pre).argmax(1) == split.y).mean())


def write_history(path, rows: list[dict[str, float]]) -> None:
    """Per-epoch metrics as CSV, the format `dvc plots` draws."""
    from stages.files import write_text

    cols = list(rows[0])
    write_text(path, "\n".join([",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]) + "\n")
