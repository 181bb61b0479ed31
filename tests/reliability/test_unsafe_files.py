"""Files that would run code or read outside their folder are refused before anything in them runs."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from stages import checkpoint, zoo
from stages.resume import Checkpoints


class Payload:
    """Unpickling this runs os.system: what a malicious checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_in_place_of_model_safetensors_is_refused_without_running_it(tmp_path):
    ckpt = tmp_path / "ckpt"
    pre = zoo.preprocessing(zoo.PIXEL_LINEAR, 28)
    checkpoint.save_checkpoint(ckpt, zoo.build(zoo.PIXEL_LINEAR, 10, pre), {
        "architecture": zoo.PIXEL_LINEAR, "classes": [str(i) for i in range(10)], "preprocessing": pre})
    marker = tmp_path / "pwned"
    (ckpt / "model.safetensors").write_bytes(pickle.dumps({"weight": Payload(marker)}))
    with pytest.raises(Exception):  # safetensors: not a safetensors header
        zoo.load_checkpoint(ckpt)
    assert not marker.exists()


def test_a_training_checkpoint_with_a_pickle_payload_is_refused_without_running_it(tmp_path):
    """Even with a valid completeness marker (right sha256 and fingerprint), unpickling code is refused."""
    from stages.files import sha256_file

    marker = tmp_path / "pwned"
    folder = tmp_path / "checkpoints" / "0002-000000"
    folder.mkdir(parents=True)
    torch.save({"model": Payload(marker)}, folder / "state.pt")
    (folder / "complete.json").write_text(json.dumps({"sha256": sha256_file(folder / "state.pt"), "fingerprint": "f"}))
    with pytest.raises(ValueError, match="refused to unpickle"):
        Checkpoints(tmp_path / "checkpoints", "f").latest()
    assert not marker.exists()


def test_pretrained_weights_are_loaded_with_weights_only(tmp_path):
    """The loader zoo.load uses (after the sha256 check) refuses pickled code as well."""
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pth"
    torch.save({"conv.weight": Payload(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=True)  # the call in zoo._read_state
    assert "weights_only=True" in Path(zoo.__file__).read_text()
    assert not marker.exists()


def _onnx_with_external(folder: Path, location: str) -> Path:
    """A one-node model (y = x + w) whose initializer w lives in an external file at `location`."""
    w = numpy_helper.from_array(np.ones(4, dtype=np.float32), "w")
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("raw_data")
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w])
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnx_external_data_outside_the_model_folder_is_refused(tmp_path):
    from stages.servable import safe_session

    (tmp_path / "secret.bin").write_bytes(np.full(4, 7, dtype=np.float32).tobytes())
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for location in ("../secret.bin", str(tmp_path / "secret.bin")):
        with pytest.raises(ValueError, match="outside the model's folder"):
            safe_session(_onnx_with_external(model_dir, location))
    # the same model with its data beside it loads and runs
    (model_dir / "w.bin").write_bytes(np.full(4, 2, dtype=np.float32).tobytes())
    session = safe_session(_onnx_with_external(model_dir, "w.bin"))
    assert session.run(None, {"x": np.ones(4, dtype=np.float32)})[0].tolist() == [3.0] * 4
