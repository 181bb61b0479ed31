"""Fine-tune the pre-trained backbone with a new classifier head on the prepared training split, the way
finetune.strategy says (full, linear_probe, partial, gradual_unfreeze, lp_ft, lora; stages/strategy.py).
Reads paths.prepared, writes paths.finetuned (model.safetensors + model.json) and paths.finetune_history.
Run: dvc repro finetune   (or: python -m stages.finetune)

With finetune.processes > 1 it restarts itself under torchrun (DDP, see stages/train.py); started by
torchrun directly (e.g. across nodes) it joins that job. Only rank 0 writes.

Imports only torch, timm / transformers and the standard stack: it must run on a GPU box with no prefect/mlflow/dvc."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from stages import checkpoint, hyperrule, strategy, weights, zoo
from stages.distributed import distributed
from stages.files import read_json
from stages.modality import adapter
from stages.params import FinetuneParams, ModelParams, cli
from stages.predict import device
from stages.splits import load_split
from stages.train import FitResult, fit, loop_settings, seed_everything, write_history


def run(
    prepared: Path, out: Path, history: Path, model_p: ModelParams, p: FinetuneParams, weights_lock: Path,
    checkpoints: Path | None = None,
) -> FitResult:
    with distributed(p.peer_timeout_s) as (rank, world):
        return _run(prepared, out, history, model_p, p, weights_lock, rank, world, checkpoints)


def _run(prepared, out, history, model_p, p, weights_lock, rank: int, world: int, checkpoints) -> FitResult:
    began = time.perf_counter()
    classes = read_json(Path(prepared) / "manifest.json")["classes"]
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    seed_everything(p.seed)  # the new head's initial weights come from the global generator
    loaded = zoo.load(model_p, len(classes), weights_lock)
    model, pre = loaded.model, loaded.pre
    if rank == 0:
        print(f"fine-tuning {model_p.name} (pre-trained, {loaded.weights_sha256[:12]}) on {len(train.y)} examples, "
              f"device {device()}" + (f", {world} data-parallel processes" if world > 1 else ""))
    truncated = adapter(pre).truncated(train.x, pre)  # said once, and kept in model.json: long texts lose their end
    if rank == 0 and truncated:
        print(f"{truncated} of {len(train.y)} training texts are longer than model.max_length "
              f"({pre['max_length']} tokens) and are truncated")
    p, auto = hyperrule.resolve(p, len(train.y), zoo.modality(pre))
    if rank == 0 and auto:
        print(hyperrule.describe(auto))
    # what the rule and the strategy's own steps chose, kept in model.json
    done: dict = {"strategy": p.strategy, **({"auto": auto} if auto else {})}
    if p.strategy in ("linear_probe", "lp_ft"):
        done["probe_C"], done["probe_val_accuracy"] = strategy.linear_probe(model, train, val, pre, p.probe_c)
        if rank == 0:
            print(f"linear probe: validation accuracy {done['probe_val_accuracy']:.4f} (C={done['probe_C']})")
    start = {k: v.detach().clone() for k, v in model.state_dict().items()} if p.wise_ft else None
    if p.strategy == "lora":
        strategy.add_lora(model, p.lora_rank, p.lora_alpha, p.lora_dropout, p.lora_targets)
    plan = strategy.Plan.of(model, p)
    epochs = 1 if p.strategy == "linear_probe" else p.epochs
    done["trainable_params"] = plan.trainable_count(model, epochs)
    done["total_params"] = sum(t.numel() for t in model.parameters())
    if rank == 0:
        print(f"strategy {p.strategy}: {done['trainable_params']:,} of {done['total_params']:,} parameters train")
    if p.strategy == "linear_probe":  # nothing more to train: the probe is the model
        result = FitResult(best_epoch=0, best_val_accuracy=done["probe_val_accuracy"], seconds=0.0,
                           history=[{"epoch": 0, "val_accuracy": done["probe_val_accuracy"]}])
    else:
        result = fit(model, train, val, pre, p, plan, desc="finetune",
                     checkpoints=checkpoints / "finetune" if checkpoints else None)
    strategy.merge_lora(model)
    if start is not None:
        done["wise_alpha"], done["wise_val_accuracy"] = strategy.wise_ft(model, start, val, pre)
        if rank == 0:
            print(f"WiSE-FT: alpha {done['wise_alpha']} -> validation accuracy "
                  + ", ".join(f"{r['alpha']:g}: {r['val_accuracy']:.3f}" for r in done["wise_val_accuracy"]))
    result.seconds = round(time.perf_counter() - began, 2)
    meta = {
        "kind": "finetuned",
        "architecture": loaded.architecture,
        "init": "pretrained",
        "pretrained_from": weights.canonical(model_p.name),
        "pretrained_sha256": loaded.weights_sha256,
        "classes": classes,
        "preprocessing": pre,
        "train": {**loop_settings(p), **dataclasses.asdict(plan), "groups": len(plan.groups), "head": list(plan.head),
                  **done, "best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
                  "seconds": result.seconds, "n_train": int(len(train.y)), "processes": world,
                  **({"truncated_texts": truncated} if truncated is not None else {})},
    }
    if rank != 0:  # every rank holds the same weights; one writes
        return result
    checkpoint.save_checkpoint(out, model, meta)
    write_history(history, result.history)
    kept = "best validation accuracy" if p.keep == "best" else "validation accuracy of the last epoch,"
    print(f"{kept} {result.best_val_accuracy:.4f} at epoch {result.best_epoch} -> {out}")
    return result


@record  # under torchrun: the error's message, not "error_file: <N/A>", in torchrun's failure summary
def main(argv: list[str] | None = None) -> None:
    params = cli(__doc__, argv)
    # Started by a launcher (torchrun on each node, a PyTorchJob): join its job, never start another.
    if params.finetune.processes > 1 and "WORLD_SIZE" not in os.environ:
        # Restart under torchrun: N copies of this command, one per process, joined by torch.distributed.
        args = sys.argv[1:] if argv is None else argv
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={params.finetune.processes}", "-m", "stages.finetune", *args]
        print("running under torchrun: " + " ".join(cmd[1:]), flush=True)
        os.execv(sys.executable, cmd)
    paths = params.paths
    run(paths.prepared, paths.finetuned, paths.finetune_history, zoo.resolve(params.model, paths.chosen_model),
        params.finetune, paths.weights_lock,
        paths.checkpoints)


if __name__ == "__main__":
    main()
