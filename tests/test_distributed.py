"""Data-parallel fine-tuning for real: `python -m stages.finetune` with finetune.processes=2 restarts itself
under torchrun (2 CPU processes, gloo), and must write what a 1-process run writes and reach the same
validation accuracy within sampling noise on the same tiny task."""

from __future__ import annotations

import os
import sys

import pytest

from .conftest import ROOT, assert_same_accuracy, finetune_variant, finetuned_meta, sh

pytestmark = pytest.mark.slow


def test_two_gloo_processes_match_one_process(ddp_task, ddp_one_process):
    params, two_dir = finetune_variant(ddp_task, "p2", processes=2)
    res = sh([sys.executable, "-m", "stages.finetune", "--params", str(params)], ROOT)
    one_dir = ddp_one_process
    assert "running under torchrun" in res.stdout and "2 data-parallel processes" in res.stdout
    assert res.stdout.count("fine-tuning ") == 1  # rank 1 is silent
    assert sorted(p.name for p in (two_dir / "model").iterdir()) == sorted(p.name for p in (one_dir / "model").iterdir())
    assert (two_dir / "history.csv").read_text().splitlines()[0] == (one_dir / "history.csv").read_text().splitlines()[0]
    one, two = finetuned_meta(one_dir), finetuned_meta(two_dir)
    assert two["train"]["processes"] == 2 and one["train"]["processes"] == 1
    assert_same_accuracy(one, two, "2 processes")


STEP = """
import os, sys, torch, timm
from stages.distributed import distributed, sync_batchnorm
torch.manual_seed(0)
model = timm.create_model("efficientnet_lite0", num_classes=10, drop_rate=0.0)
x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
with distributed() as (rank, world):
    net = model
    if world > 1:
        sync_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(model)
        x, y = x[rank::world], y[rank::world]
    net.train()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    if rank == 0:
        torch.save({"grad": torch.cat([p.grad.flatten() for p in model.parameters()]),
                    "running_mean": model.bn1.running_mean.clone()}, sys.argv[1])
"""


def test_one_training_step_on_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    """Gradients and BatchNorm statistics of one step, DDP over 2 gloo processes (each with half the batch)
    vs 1 process: equal up to float rounding, so BatchNorm really sees the global batch."""
    import torch

    script = tmp_path / "step.py"
    script.write_text(STEP)
    sh([sys.executable, str(script), str(tmp_path / "one.pt")], ROOT, {**os.environ, "PYTHONPATH": str(ROOT)})
    sh([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
        str(tmp_path / "two.pt")], ROOT, {**os.environ, "PYTHONPATH": str(ROOT)})
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert torch.allclose(one["running_mean"], two["running_mean"], atol=1e-6)
    rel = (one["grad"] - two["grad"]).norm() / one["grad"].norm()
    assert rel < 1e-3, f"relative gradient difference {rel:.2e}"  # E[x^2] - E[x]^2 in fp32 vs torch's kernel
