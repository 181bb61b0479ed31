"""A servable model: an ONNX file and the serving contract export wrote beside it (serving.json), checked
before anything is served, and the prediction they make together. numpy, Pillow, `tokenizers`, onnx and
onnxruntime only: the model server runs this without torch.

A folder is servable when serving.json's recorded sha256 of the ONNX file matches the file; a version
fetched from the registry is also checked against the sha256 recorded on the version at registration
(stages/registry.py), so a swapped file in the artifact store is refused, not served."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.files import sha256_file
from stages.inputs import decode_image
from stages.modality import Adapter, adapter

CONTRACT = "serving.json"


class NotServable(Exception):
    """The folder is not a model headstart can serve: missing, altered or unreadable files."""


def safe_session(onnx_path: Path, threads: int = 0):
    """An ONNX Runtime session for a model file whose external data (if any) stays inside its own folder.
    An ONNX file may name other files to read its weights from; a path that escapes the folder
    ("../../etc/...", an absolute path) is how a crafted model reads files it should not, so it is refused."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path), load_external_data=False)
    folder = Path(onnx_path).resolve().parent
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(folder):
            raise ValueError(f"{onnx_path}: tensor {tensor.name!r} reads external data from {location!r}, outside "
                             f"the model's folder {folder}; refusing to load this model")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


@dataclass
class Servable:
    """One model ready to answer: its contract, its ONNX session, and where it came from."""

    contract: dict
    session: Any
    onnx_file: str
    name: str = ""  # the registered model's name, when it came from the registry
    version: str | None = None
    alias: str | None = None
    # examples -> the ONNX inputs, built once from the contract by the modality's adapter
    feed: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.feed is None:
            self.feed = self.adapter.serving_feed(self.contract["input"])

    @property
    def classes(self) -> list[str]:
        return self.contract["classes"]

    @property
    def modality(self) -> str:
        return self.contract["modality"]

    @property
    def adapter(self) -> Adapter:
        """What differs by modality: the request fields accepted, how requests are batched (stages/modality.py)."""
        return adapter(self.modality)

    def decode(self, data: bytes) -> np.ndarray:
        """An image file's bytes -> uint8 (stored, stored, 3), as prepare decoded the training images."""
        d = self.contract["input"]["decode"]
        return decode_image(data, d["size"], d["max_pixels"])

    def logits(self, examples: np.ndarray | list[str]) -> np.ndarray:
        """Decoded images (N, H, W[, 3]) uint8, or texts -> logits (N, classes)."""
        return self.session.run(["logits"], self.feed(examples))[0]

    def predict(self, examples: np.ndarray | list[str]) -> list[dict[str, Any]]:
        logits = self.logits(examples).astype(np.float64)
        z = np.exp(logits - logits.max(1, keepdims=True))
        probs = z / z.sum(1, keepdims=True)
        return [{"label": self.classes[int(p.argmax())], "score": float(p.max()),
                 "probabilities": dict(zip(self.classes, map(float, p), strict=True))} for p in probs]

    def warm_up(self) -> None:
        """One prediction before the first request: the first session.run allocates and is slow."""
        self.predict(self.adapter.warm_up_examples(self.contract["input"]))


def load(folder: Path, onnx_name: str = "model.onnx", expected: dict[str, str] | None = None, threads: int = 0,
         **origin: Any) -> Servable:
    """The servable in `folder` (serving.json and the ONNX file `onnx_name`), after checking every sha256:
    the ONNX file against serving.json, and both against `expected` ({file name: sha256}, what the registry
    recorded) when given. Raises NotServable saying what does not match."""
    folder = Path(folder)
    contract_path, onnx_path = folder / CONTRACT, folder / onnx_name
    for path in (contract_path, onnx_path):
        if not path.is_file():
            raise NotServable(f"{path} not found: serve a folder the export stage wrote (models/onnx) or a version "
                              "registered with its serving contract")
    actual = {CONTRACT: sha256_file(contract_path), onnx_name: sha256_file(onnx_path)}
    for name, want in (expected or {}).items():
        if name in actual and actual[name] != want:
            raise NotServable(f"{name}: sha256 {actual[name][:16]}... but {want[:16]}... was recorded at registration; "
                              "the file was altered after it was registered, refusing to serve it")
    try:
        contract = json.loads(contract_path.read_text())
    except (OSError, ValueError) as e:
        raise NotServable(f"{contract_path} is not readable JSON ({e})") from None
    recorded = contract.get("files", {}).get(onnx_name)
    if recorded != actual[onnx_name]:
        raise NotServable(f"{onnx_path}: sha256 {actual[onnx_name][:16]}... but {CONTRACT} records "
                          f"{(recorded or 'none')[:16]}...; the file is not the one export checked, refusing to serve it")
    if onnx_name != "model.onnx" and not contract.get("int8_accepted", False):
        raise NotServable(f"{onnx_name}: export did not accept the int8 model (its accuracy drop is over "
                          "export.int8_max_relative_drop); serve model.onnx")
    try:
        session = safe_session(onnx_path, threads)
    except Exception as e:  # onnxruntime raises its own types for an unreadable model
        raise NotServable(f"{onnx_path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from None
    return Servable(contract, session, str(onnx_path), **origin)
