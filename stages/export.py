"""Export the fine-tuned model to ONNX (dynamic batch axis, pinned opset), check the graph, and prove
parity with PyTorch on the real test set with onnxruntime: every logit within
export.atol + export.rtol * |logit| and top-1 agreement of at least export.min_top1_agreement, or the
stage fails and the previous export stays. The file is then logged to the MLflow run of the registered version.
Reads paths.finetuned, paths.prepared, paths.registered; writes paths.onnx and paths.export_metrics.
Run: dvc repro export   (or: python -m stages.export)"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from stages import zoo
from stages.data import batches, load_split, to_model_input
from stages.files import atomic_path, read_json, write_json
from stages.params import ExportParams, cli
from stages.train import predict


def export_onnx(model: torch.nn.Module, pre: dict, path: Path, opset: int) -> None:
    size = pre["image_size"]
    example = torch.zeros(2, pre["channels"], size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about tracing; the parity check is the real test
        torch.onnx.export(
            model, (example,), str(path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset, dynamo=False,
        )  # fmt: skip
    onnx.checker.check_model(str(path), full_check=True)


def parity(
    model: torch.nn.Module, onnx_path: Path, x_uint8: np.ndarray, pre: dict, batch_size: int, atol: float, rtol: float
) -> dict[str, Any]:
    torch_logits = predict(model, x_uint8, pre, batch_size=batch_size, desc="parity: torch")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_logits = np.concatenate([
        session.run(["logits"], {"input": to_model_input(x_uint8[sl], pre).numpy()})[0]
        for sl in batches(len(x_uint8), batch_size)
    ])  # fmt: skip
    diff = np.abs(onnx_logits - torch_logits)
    return {
        "max_abs_diff": float(diff.max()),
        # how much of the allowed |diff| <= atol + rtol * |torch| the worst logit uses (<= 1 passes)
        "worst_tolerance_use": float((diff / (atol + rtol * np.abs(torch_logits))).max()),
        "top1_agreement": float((onnx_logits.argmax(1) == torch_logits.argmax(1)).mean()),
        "n_examples": int(len(x_uint8)),
    }


def run(finetuned: Path, prepared: Path, registered: Path, out: Path, metrics: Path, p: ExportParams) -> dict:
    model, meta = zoo.load_checkpoint(finetuned)
    pre = meta["preprocessing"]
    test = load_split(prepared, "test")
    with atomic_path(out) as tmp:
        export_onnx(model, pre, tmp, p.opset)
        result = parity(model, tmp, test.x, pre, p.batch_size, p.atol, p.rtol)
        print(f"ONNX parity on {result['n_examples']} test images: max |diff| {result['max_abs_diff']:.2e}, "
              f"top-1 agreement {result['top1_agreement']:.4%}")
        if result["worst_tolerance_use"] > 1 or result["top1_agreement"] < p.min_top1_agreement:
            raise ValueError(
                f"ONNX export does not match PyTorch: max |diff| {result['max_abs_diff']:.3g} (allowed "
                f"{p.atol} + {p.rtol} * |logit|; the worst logit uses {result['worst_tolerance_use']:.2f}x of "
                f"that), top-1 agreement {result['top1_agreement']:.4%} (needed {p.min_top1_agreement:.2%}); "
                f"the previous {out} is kept. Try another export.opset."
            )
        receipt = read_json(registered)
        from stages.register import attach_onnx  # MLflow stays in the register module

        attach_onnx(receipt, tmp, result)
    result.update({"onnx_path": str(out), "opset": p.opset, "size_bytes": Path(out).stat().st_size,
                   "model_version": receipt["version"]})
    write_json(metrics, result)
    print(f"exported {out} ({result['size_bytes'] / 1e6:.1f} MB), logged to run {receipt['run_id']}")
    return result


def main(argv: list[str] | None = None) -> None:
    params = cli(__doc__, argv)
    paths = params.paths
    run(paths.finetuned, paths.prepared, paths.registered, paths.onnx, paths.export_metrics, params.export)


if __name__ == "__main__":
    main()
