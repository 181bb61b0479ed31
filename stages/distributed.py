"""Data-parallel training under `torchrun` (WORLD_SIZE > 1): this process's rank and the world size, the
process group (NCCL on CUDA, gloo on CPU) with an error that says what a lost peer means, and BatchNorm
over the global batch."""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from stages.predict import device


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
        # A collective's wait that times out says only "Application timeout caused pair closure".
        if not (isinstance(e, dist.DistError) or any(s in str(e) for s in ("/gloo/", "pair closure"))):
            raise
        waited = f"the peer timeout ({timeout_s:g} s)" if timeout_s else "torch's default timeout"
        raise RuntimeError(
            f"process {rank} of {world} lost contact with the others: a node died or was stopped, the network "
            f"between nodes failed, or a process did not answer within {waited}. It stops here without "
            f"writing its outputs, and torchrun stops this node; start the job again on every node. ({e})") from e
    finally:
        dist.destroy_process_group()


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
