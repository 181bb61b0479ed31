"""Data-parallel fine-tuning for real: `python -m stages.finetune` with finetune.processes=2 restarts itself
under torchrun (2 CPU processes, gloo), and must write what a 1-process run writes and reach the same
validation accuracy within sampling noise on the same tiny task."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.data import FASHION_MNIST_FILES

from .conftest import ROOT, sh, tiny_params, write_idx

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """An easy 10-class task, each class brightening its own block of a 2 x 5 grid; 20 train + 10 val per
    class. Easy on purpose: both runs should converge, so a gap would point at the distributed path."""
    tmp = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(1)
    src = tmp / "source"
    src.mkdir()
    for split, per_class in (("train", 30), ("test", 4)):
        y = np.repeat(np.arange(10), per_class)
        x = rng.integers(0, 60, (len(y), 28, 28))
        for i, c in enumerate(y):
            x[i, (c // 5) * 14 : (c // 5 + 1) * 14, (c % 5) * 5 : (c % 5 + 1) * 5 + 3] += 180
        write_idx(src / FASHION_MNIST_FILES[f"{split}_images"], x)
        write_idx(src / FASHION_MNIST_FILES[f"{split}_labels"], y)
    params = tiny_params(tmp, src)
    raw = yaml.safe_load(params.read_text())
    raw["prepare"].update(per_class=20, val_per_class=10)
    raw["finetune"].update(epochs=10, batch_size=32, lr=1.0e-3, augment=False)
    params.write_text(yaml.safe_dump(raw))
    sh([sys.executable, "-m", "stages.prepare", "--params", str(params)], ROOT)
    return params


def finetune(params: Path, processes: int) -> tuple[Path, dict]:
    raw = yaml.safe_load(params.read_text())
    out = params.parent / f"p{processes}"
    raw["finetune"]["processes"] = processes
    raw["paths"].update(finetuned=str(out / "model"), finetune_history=str(out / "history.csv"))
    p = params.parent / f"params_{processes}.yaml"
    p.write_text(yaml.safe_dump(raw))
    res = sh([sys.executable, "-m", "stages.finetune", "--params", str(p)], ROOT)
    return out, {"stdout": res.stdout, "meta": json.loads((out / "model" / "model.json").read_text())}


def test_two_gloo_processes_match_one_process(prepared):
    one_dir, one = finetune(prepared, 1)
    two_dir, two = finetune(prepared, 2)
    assert "running under torchrun" in two["stdout"] and "2 data-parallel processes" in two["stdout"]
    assert two["stdout"].count("fine-tuning ") == 1  # rank 1 is silent
    assert sorted(p.name for p in (two_dir / "model").iterdir()) == sorted(p.name for p in (one_dir / "model").iterdir())
    assert (two_dir / "history.csv").read_text().splitlines()[0] == (one_dir / "history.csv").read_text().splitlines()[0]
    assert two["meta"]["train"]["processes"] == 2 and one["meta"]["train"]["processes"] == 1
    acc1, acc2 = one["meta"]["train"]["best_val_accuracy"], two["meta"]["train"]["best_val_accuracy"]
    assert acc1 > 0.5, f"the tiny task was not learned ({acc1}): the comparison would mean nothing"
    # The two runs see their batches in another order (one sampler vs DistributedSampler) and round BatchNorm's
    # statistics differently, so they are two training runs, not one computed twice: what DDP guarantees is
    # checked exactly below (one step's gradients). Here the accuracies must agree within sampling noise of
    # the validation split, 3 standard errors of the difference (one example is 1/n of it), on any CPU.
    n = 10 * 10
    bound = 3 * ((acc1 * (1 - acc1) + acc2 * (1 - acc2)) / n) ** 0.5
    print(f"best validation accuracy: 1 process {acc1:.3f}, 2 processes {acc2:.3f} (allowed gap {bound:.3f})")
    assert acc2 > 0.5 and abs(acc1 - acc2) <= bound, (acc1, acc2, bound)


STEP = """
import os, sys, torch, timm
from stages.train import distributed, sync_batchnorm
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
