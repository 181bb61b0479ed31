"""The one training loop (fine-tuning and from-scratch training share it). Plain PyTorch so every step can
be read: AdamW, one-cycle schedule, optional frozen backbone for the first epochs, early stopping on
validation accuracy keeping the best weights.

Under `torchrun` (WORLD_SIZE > 1) the same loop is data-parallel (stages/distributed.py): each rank trains
on its DistributedSampler shard of every epoch with 1/world of the batch (the global batch and the schedule
stay as configured), gradients are averaged by DDP, loss and accuracy are all-reduced, validation runs on
rank 0 with rank 0's BatchNorm statistics and its decision is broadcast, and only rank 0 prints and writes.
Checkpoints to resume from: stages/resume.py; augmentation: stages/augment.py; inference: stages/predict.py."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from stages.augment import augment
from stages.distributed import rank_and_world, sync_batchnorm
from stages.predict import accuracy, as_args, device, map_inputs, take
from stages.resume import Checkpoints, fingerprint, restore, training_state
from stages.splits import Split, batches, to_model_input

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


@dataclass
class _Run:
    """What one `fit` holds while it trains: the model (and its DDP / compiled wrapper `net`), the training
    set on the host, the optimiser, schedule and random stream, and where checkpoints go."""

    model: nn.Module
    net: nn.Module
    cfg: FinetuneParams
    plan: Plan
    desc: str
    dev: torch.device
    lead: bool  # rank 0: prints, validates and writes
    world: int
    x: Any  # the preprocessed training inputs (predict.Inputs)
    y: torch.Tensor
    sampler: Any  # DistributedSampler under torchrun, else None
    per_rank_batch: int
    steps_per_epoch: int
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator  # this rank's stream for shuffling and augmentation
    loss_fn: nn.Module
    anchors: dict[str, torch.Tensor] | None  # L2-SP's starting weights
    saver: Checkpoints | None


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
    run = _start(model, train, pre, cfg, plan, desc, checkpoints, rank, world)
    best = FitResult(best_epoch=-1, best_val_accuracy=-1.0, seconds=0.0)
    best_state = None
    resumed = run.saver.latest() if run.saver else None
    first_epoch, skip_steps, epoch_gen = 1, 0, None
    if resumed is not None:
        best_state = restore(resumed, model, run.opt, run.sched, run.gen, best)
        first_epoch, skip_steps, epoch_gen = resumed["epoch"], resumed["step"], resumed["epoch_gen"]
        tqdm.write(f"{desc}: resuming from the checkpoint at epoch {first_epoch}, step {skip_steps} "
                   f"({checkpoints})")
    start = time.perf_counter() - (best.history[-1]["seconds"] if best.history else 0.0)
    for epoch in range(first_epoch, cfg.epochs + 1):
        mid_epoch = resumed if resumed is not None and epoch == first_epoch and skip_steps > 0 else None
        seen = _train_epoch(run, epoch, mid_epoch, epoch_gen, best, best_state)
        train_loss, train_acc, val_acc = _epoch_scores(run, seen, val, pre)
        best.history.append({
            "epoch": epoch,
            "train_loss": round(train_loss, 6),
            "train_accuracy": round(train_acc, 6),
            "val_accuracy": round(val_acc, 6),
            "lr": run.opt.param_groups[-1]["lr"],  # the head's
            "seconds": round(time.perf_counter() - start, 2),
        })
        # A tie goes to the later epoch: it has trained longer, at the lower learning rate where one-cycle
        # does its best work, and a few hundred validation examples often cannot tell the two apart.
        improved = val_acc >= best.best_val_accuracy
        if improved or cfg.keep == "last":
            best.best_epoch, best.best_val_accuracy = epoch, val_acc
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        if run.lead:
            tqdm.write(
                f"{desc} epoch {epoch}/{cfg.epochs}: loss {train_loss:.4f}  train acc {train_acc:.3f}  "
                f"val acc {val_acc:.3f}{'  (best)' if improved and cfg.keep == 'best' else ''}"
            )
        stop = epoch - best.best_epoch >= cfg.patience  # never with keep "last": best_epoch is this epoch
        if run.saver and not stop and epoch < cfg.epochs:  # the next epoch starts from here
            run.saver.save({"epoch": epoch + 1, "step": 0, "epoch_gen": None,
                            **training_state(model, run.opt, run.sched, run.gen, best, best_state)})
        if stop:
            if run.lead:
                tqdm.write(f"{desc}: no better validation accuracy for {cfg.patience} epochs, stopping early")
            break

    for p in model.parameters():
        p.requires_grad_(True)
    model.load_state_dict(best_state)
    model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    best.seconds = round(time.perf_counter() - start, 2)
    if run.saver:
        run.saver.clear()  # the caller writes the model; a later run must not resume a finished training
    return best


def _start(model: nn.Module, train: Split, pre: dict, cfg: FinetuneParams, plan: Plan, desc: str,
           checkpoints: Path | None, rank: int, world: int) -> _Run:
    """Everything a training run needs before its first step: the model on its device (wrapped for DDP under
    torchrun), the training set preprocessed once, the optimiser, schedule, random stream and checkpoints."""
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
        x_train, y_train = map_inputs(x_train, lambda t: t.pin_memory()), y_train.pin_memory()
    per_rank_batch = math.ceil(cfg.batch_size / world)
    sampler = None
    if world > 1:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(len(y_train)), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    n_local = len(sampler) if sampler is not None else len(y_train)
    steps_per_epoch = math.ceil(n_local / per_rank_batch)
    opt = torch.optim.AdamW(plan.param_groups(model, cfg.lr, cfg.weight_decay))
    return _Run(
        model=model, net=net, cfg=cfg, plan=plan, desc=desc, dev=dev, lead=rank == 0, world=world,
        x=x_train, y=y_train, sampler=sampler, per_rank_batch=per_rank_batch, steps_per_epoch=steps_per_epoch,
        opt=opt, sched=schedule(opt, cfg.epochs * steps_per_epoch),
        gen=torch.Generator().manual_seed(cfg.seed + rank),  # each rank augments differently
        loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        anchors=plan.anchors(model),  # before any resume: the weights training started from
        saver=Checkpoints(checkpoints, fingerprint(model, train, loop_settings(cfg), plan, desc)) if checkpoints and world == 1 else None,
    )


def _epoch_order(run: _Run, epoch: int, resume_gen: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's example order for `epoch`, and the generator state it was drawn from (saved with mid-epoch
    checkpoints). `resume_gen`: resuming mid-epoch, draw the interrupted epoch's order again, then put the
    generator back where it was."""
    if resume_gen is not None:
        now = run.gen.get_state()
        run.gen.set_state(resume_gen)
    epoch_gen = run.gen.get_state()
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
        order = torch.tensor(list(run.sampler))
    else:
        order = torch.randperm(len(run.y), generator=run.gen)
    if resume_gen is not None:
        run.gen.set_state(now)
    return order, epoch_gen


def _train_epoch(run: _Run, epoch: int, resumed: dict | None, epoch_gen: torch.Tensor | None, best: FitResult,
                 best_state: dict | None) -> torch.Tensor:
    """One epoch of steps on this rank (from a mid-epoch checkpoint `resumed`: the steps it had not taken);
    returns (loss sum, correct, examples), float64 on the host."""
    cfg, model, dev = run.cfg, run.model, run.dev
    trainable = run.plan.trainable(epoch)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    frozen = trainable == set(run.plan.head)
    run.net.train()
    order, epoch_gen = _epoch_order(run, epoch, epoch_gen if resumed is not None else None)
    skip = resumed["step"] if resumed is not None else 0
    if resumed is not None:
        loss_sum, correct = resumed["loss_sum"].to(dev), resumed["correct"].to(dev)
    else:
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev, dtype=torch.long)
    bad_step = torch.full((), -1, device=dev, dtype=torch.long)  # first step with a non-finite loss
    bar = tqdm(
        batches(len(order), run.per_rank_batch),
        total=run.steps_per_epoch,
        desc=f"{run.desc} {epoch}/{cfg.epochs}" + (" (head only)" if frozen else ""),
        leave=False,
        dynamic_ncols=True,
        disable=not run.lead,
    )
    for step, sl in enumerate(bar, 1):
        if step <= skip:
            continue
        idx = order[sl]
        loss, logits, yb = _step(run, idx)
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(1) == yb).sum()
        # recorded on the device: no host sync per step; read at the next sync below
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()),
                               (epoch - 1) * run.steps_per_epoch + step, bad_step)
        if step % 10 == 0 or step == run.steps_per_epoch:  # a host sync: only now and then
            if bad_step.item() >= 0:
                raise FloatingPointError(
                    f"{run.desc}: the training loss became NaN or infinite at step {bad_step.item()} (epoch "
                    f"{epoch}); nothing was written. Lower the learning rate (now {cfg.lr}) or check the data")
            if run.lead:
                seen = min(step * run.per_rank_batch, len(order))
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}")
        if run.saver and cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 \
                and step < run.steps_per_epoch:
            run.saver.save({"epoch": epoch, "step": step, "epoch_gen": epoch_gen, "loss_sum": loss_sum.cpu(),
                            "correct": correct.cpu(),
                            **training_state(model, run.opt, run.sched, run.gen, best, best_state)})
    bar.close()
    return torch.tensor([loss_sum.item(), correct.item(), len(order)], dtype=torch.float64)


def _step(run: _Run, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimiser step on the examples `idx`; returns (loss, logits, labels)."""
    cfg, dev = run.cfg, run.dev
    xb = map_inputs(take(run.x, idx), lambda t: t.to(dev, non_blocking=True))
    yb = run.y[idx].to(dev, non_blocking=True)
    if cfg.augment != "none" and not isinstance(xb, tuple):  # images only
        xb = augment(xb, run.gen, cfg.augment, cfg.crop_min_area)
    if not isinstance(xb, tuple):
        xb = xb.contiguous(memory_format=torch.channels_last)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        logits = run.net(*as_args(xb))
        loss = run.loss_fn(logits.float(), yb)
    penalty = run.plan.penalty(run.model, run.anchors)
    run.opt.zero_grad(set_to_none=True)
    (loss if penalty is None else loss + penalty).backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.opt.step()
    run.sched.step()
    return loss, logits, yb


def _epoch_scores(run: _Run, seen: torch.Tensor, val: Split, pre: dict) -> tuple[float, float, float]:
    """(train loss, train accuracy, validation accuracy) of the epoch, the same on every rank."""
    if run.world > 1:  # the epoch's loss and accuracy over every rank's examples
        dist.all_reduce(seen)
        for buf in run.model.buffers():  # rank 0's BatchNorm statistics everywhere, as DDP does each step
            dist.broadcast(buf, src=0)
    train_loss, train_acc = float(seen[0] / seen[2]), float(seen[1] / seen[2])
    val_acc = accuracy(run.model, val, pre) if run.lead else 0.0
    if run.world > 1:  # one decision for every rank: early stopping must stop them all at once
        decided = torch.tensor([val_acc], dtype=torch.float64)
        dist.broadcast(decided, src=0)
        val_acc = float(decided[0])
    return train_loss, train_acc, val_acc


def schedule(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle: a quarter of the steps warming up to each parameter group's lr, then annealing. OneCycleLR
    needs at least a full step in each phase, so very short runs (a handful of steps) warm up longer or keep
    the lr constant."""
    if total_steps < 4:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total_steps,
                                               pct_start=max(0.25, 1.5 / total_steps))


def write_history(path, rows: list[dict[str, float]]) -> None:
    """Per-epoch metrics as CSV, the format `dvc plots` draws."""
    from stages.files import write_text

    cols = list(rows[0])
    write_text(path, "\n".join([",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]) + "\n")
