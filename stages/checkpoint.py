"""The checkpoint format every stage shares: a folder holding `model.safetensors` (weights only, no pickled
code) and `model.json` (architecture, classes, preprocessing: how to rebuild and feed the model); a text
model's folder also holds its encoder config and tokenizer, and a checkpoint headstart pre-trained carries
held-out source examples (`source_test`). Written here; read back into a model by `zoo.load_checkpoint`
(rebuilding needs the zoo's architectures, and the zoo loads `local:` checkpoints through it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from stages.files import atomic_path
from stages.modality import adapter
from stages.zoo import BASELINES


def model_dirs(finetuned: Path, baselines: Path) -> dict[str, Path]:
    """Every model the pipeline trains, by name, and its checkpoint directory."""
    return {"finetuned": Path(finetuned), **{name: Path(baselines) / name for name in BASELINES}}


def save_checkpoint(out: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write `out/model.safetensors` + `out/model.json` together, atomically. A text model's folder also
    gets its encoder config and tokenizer, so it rebuilds from the folder alone."""
    from safetensors.torch import save_model

    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        if "preprocessing" in meta:  # a text model's tokenizer and encoder config, say
            meta = {**meta, "preprocessing": adapter(meta["preprocessing"]).save_files(model, meta["preprocessing"], tmp)}
        (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")


SOURCE_TEST = "source_test"  # held-out source-task examples a checkpoint headstart pre-trained carries


def source_test(checkpoint: Path) -> Any:
    """The held-out source examples a pre-trained checkpoint carries (a Split), or None (e.g. ImageNet
    weights): evaluate measures forgetting on them, select the domain shift (stages/pretrain.py writes them)."""
    from stages.splits import load_split

    return load_split(checkpoint, SOURCE_TEST) if (Path(checkpoint) / f"{SOURCE_TEST}.safetensors").exists() else None
