"""Model zoo: a model name -> the architecture with its pre-trained weights, the preprocessing it expects,
which parameters form the head and how the backbone divides into layer groups; and a checkpoint folder
(stages/checkpoint.py) rebuilt into a model.

Names (params.yaml `model.name`):
  timm:<architecture>         EfficientNet, ResNet, ... through timm (a bare name means timm)
  torchvision:<architecture>  resnet18/50, efficientnet_b0, ... through torchvision
  hf:<hub id or folder>       BERT, RoBERTa, DistilBERT, MiniLM, GPT-2, ... through transformers
  local:<checkpoint folder>   a headstart checkpoint (e.g. one headstart pre-trained itself)
  auto                        the select stage's choice among select.candidates (`resolve`)

Where the pre-trained weights come from and the lock that pins them: stages/weights.py. The checkpoint
format (writing, and what a checkpoint folder holds): stages/checkpoint.py."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.modality import adapter
from stages.weights import AUTO, PACKAGED, canonical, chosen_model, family_of, find_weights, verify

PIXEL_LINEAR = "pixel_linear"  # logistic regression on raw pixels, kept as a torch module like the rest
TFIDF_LINEAR = "tfidf_linear"  # logistic regression on TF-IDF of token ids (stages/text.py)
BASELINES = ("scratch", "linear_probe", "floor")  # checkpoints under paths.baselines, by these names
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def modality(pre: dict) -> str:
    return pre.get("modality", "image")


def resolve(model_p: Any, chosen: Path) -> Any:
    """`model_p` with `auto` replaced by the select stage's choice (paths.chosen_model)."""
    if model_p.name != AUTO:
        return model_p
    return dataclasses.replace(model_p, name=chosen_model(chosen))


@dataclass
class Loaded:
    model: nn.Module
    pre: dict[str, Any]  # the preprocessing block of model.json
    architecture: str  # what build() rebuilds it from
    weights_sha256: str | None  # None for random weights


def preprocessing(name: str, image_size: int, channels: int = 1) -> dict[str, Any]:
    """The preprocessing an image model expects, written into its JSON so every consumer feeds it alike."""
    if name == PIXEL_LINEAR:
        return {"modality": "image", "image_size": image_size, "channels": channels, "mean": [0.0] * channels,
                "std": [1.0] * channels}
    family, _, ref = canonical(name).partition(":")
    if family == "timm":
        import timm

        # Normalisation comes from the pre-trained config of the architecture: one source of truth.
        cfg = timm.get_pretrained_cfg(ref)
        if cfg is None:
            raise ValueError(f"model.name {name!r}: timm knows no pre-trained config for it")
        return {"modality": "image", "image_size": image_size, "channels": 3, "mean": list(cfg.mean),
                "std": list(cfg.std)}
    if family == "torchvision":
        return {"modality": "image", "image_size": image_size, "channels": 3, "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD}
    raise ValueError(f"{name} is not an image model")


def text_preprocessing(files: Path, max_length: int, pooling: str) -> dict[str, Any]:
    return {"modality": "text", "files": str(files), "max_length": max_length, "pooling": pooling}


def load(m: Any, num_classes: int, lock_path: Path, pretrained: bool = True) -> Loaded:
    """The model `m` (ModelParams) names, with a fresh `num_classes` head: pre-trained backbone weights, or
    the same architecture with random weights (`pretrained=False`; text models still need the tokenizer)."""
    name = canonical(m.name)
    family = family_of(name)
    if not pretrained and family in ("timm", "torchvision"):
        pre = preprocessing(name, m.image_size)
        model = build(name, num_classes, pre)
        # The head made exactly as a pre-trained model's new head (below), or the comparison is unfair: timm's
        # EfficientNet initialises its classifier for ImageNet (uniform +-1/sqrt(classes)), which at 10
        # classes starts from logits 11x larger (std 3.0 vs 0.28 on random inputs), at 5 from a first-epoch
        # loss of 4.1 instead of 1.6
        reset_head(model, num_classes)
        return Loaded(model, pre, name, None)
    w = find_weights(name, m.weights, m.allow_download, m.revision)
    sha = verify(w, lock_path)
    if family == "local":
        source, meta = load_checkpoint(w.path, weights=pretrained)
        pre = meta["preprocessing"]
        pre = adapter(pre).configure(pre, m)
        reset_head(source, num_classes)
        return Loaded(source, pre, meta["architecture"], sha if pretrained else None)
    if family == "hf":
        from stages import textnet

        kwargs = textnet.load_kwargs(m.trust_remote_code, m.revision)
        pre = text_preprocessing(w.path, m.max_length, m.pooling)
        model = textnet.TextClassifier(textnet.encoder(w.path, pretrained, **kwargs), m.pooling, num_classes)
        return Loaded(model, pre, name, sha if pretrained else None)
    pre = preprocessing(name, m.image_size)  # timm / torchvision, pre-trained (random weights returned above)
    model = _image_arch(name, None)  # the source's head, so every tensor has a twin
    state = _read_state(w.path)
    if name in PACKAGED and PACKAGED[name].positional:
        state = map_by_position(state, model.state_dict())
    model.load_state_dict(state)
    reset_head(model, num_classes)
    return Loaded(model, pre, name, sha)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs on load


def _image_arch(name: str, num_classes: int | None) -> nn.Module:
    family, _, ref = canonical(name).partition(":")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if family == "timm":
        import timm

        try:
            return timm.create_model(ref, pretrained=False, **kwargs)
        except RuntimeError as e:  # timm says "Unknown model (...)"
            raise ValueError(f"model.name {name!r} is not a timm architecture: {e}") from None
    import torchvision

    try:
        return torchvision.models.get_model(ref, weights=None, **kwargs)
    except ValueError as e:
        raise ValueError(f"model.name {name!r} is not a torchvision architecture: {e}") from None


def build(name: str, num_classes: int, pre: dict[str, Any]) -> nn.Module:
    """The architecture with random weights."""
    if name == PIXEL_LINEAR:
        return nn.Sequential(nn.Flatten(), nn.Linear(pre["channels"] * pre["image_size"] ** 2, num_classes))
    if name == TFIDF_LINEAR:
        from stages.text import tokenizer
        from stages.textnet import TfidfLinear

        return TfidfLinear(len(tokenizer(str(pre["files"]))), num_classes)
    if family_of(name) == "hf":
        from stages import textnet

        return textnet.TextClassifier(textnet.encoder(Path(pre["files"]), pretrained=False), pre["pooling"],
                                      num_classes)
    return _image_arch(name, num_classes)


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


def head_name(model: nn.Module) -> str:
    """The module name of the classifier head (the rest is the backbone): timm's classifier, our text
    and floor models' head, otherwise the last Linear layer (torchvision's fc / classifier.N)."""
    if hasattr(model, "pretrained_cfg"):  # timm
        return model.pretrained_cfg["classifier"]
    if hasattr(model, "head") and isinstance(model.head, nn.Linear):
        return "head"
    linears = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear layer to use as its head")
    return linears[-1]


def head_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters that form the classifier head."""
    prefix = head_name(model) + "."
    return [n for n, _ in model.named_parameters() if n.startswith(prefix)]


def layer_groups(model: nn.Module) -> list[list[str]]:
    """The backbone's parameter names (the head left out) in layer groups, input side first. Strategies
    freeze, unfreeze and scale learning rates by these groups. timm models know their own stages (stem,
    then one group per stage: EfficientNet's `blocks.N`, ResNet's `layerN`). Otherwise: a group per indexed
    block (the name up to its first number: BERT's `encoder.layer.3`, GPT-2's `h.3`), one for the
    parameters before the first block (embeddings) and one for those after the last (pooler, final norm)."""
    head = set(head_parameters(model))
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        grouped = group_parameters(model, model.group_matcher(coarse=True))
        return [g for g in ([n for n in names if n not in head] for names in grouped.values()) if g]
    groups: dict[str, list[str]] = {}
    seen_block = False
    for name, _ in model.named_parameters():
        if name in head:
            continue
        parts = name.split(".")
        at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if at is None:
            key = "<after blocks>" if seen_block else "<before blocks>"
        else:
            key, seen_block = ".".join(parts[: at + 1]), True
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def reset_head(model: nn.Module, num_classes: int) -> None:
    """Replace the classifier head with a freshly initialised one for `num_classes`."""
    if hasattr(model, "reset_classifier"):  # timm
        model.reset_classifier(num_classes)
        return
    *parents, leaf = head_name(model).split(".")
    owner = model.get_submodule(".".join(parents)) if parents else model
    old = getattr(owner, leaf)
    setattr(owner, leaf, nn.Linear(old.in_features, num_classes))


def features(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """Pooled backbone features: whatever the head receives, captured on its way in."""
    captured = []
    hook = model.get_submodule(head_name(model)).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        model(*inputs)
    finally:
        hook.remove()
    return captured[0].flatten(1)


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """A checkpoint directory's model.json, with a text model's `"files": "."` (its config and tokenizer,
    saved beside the weights) made the directory's absolute path."""
    path = Path(path)
    if not (path / "model.json").exists():
        raise FileNotFoundError(f"{path}/model.json not found: is {path} a headstart checkpoint?")
    meta = json.loads((path / "model.json").read_text())
    if meta["preprocessing"].get("files") == ".":
        meta["preprocessing"]["files"] = str(path.resolve())
    return meta


def load_checkpoint(path: Path, weights: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint directory, in eval mode."""
    from safetensors.torch import load_model

    path = Path(path)
    meta = checkpoint_meta(path)
    model = build(meta["architecture"], len(meta["classes"]), meta["preprocessing"])
    if weights:
        load_model(model, str(path / "model.safetensors"))
    return model.eval(), meta


