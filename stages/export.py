"""Export the candidate model (register.candidate: the run's best model by default, or the fine-tuned one)
to ONNX (dynamic batch axis, pinned opset), check the graph, and prove parity with PyTorch on the real test
set with onnxruntime: every example's logits within a tolerance derived from PyTorch's own fp32 rounding
error (see `parity`) and top-1 agreement of at least export.min_top1_agreement, or the stage fails and the
previous export stays. The register stage logs the files to MLflow.
Also writes an int8 model (images: static, calibrated on export.calibration_examples of the validation split;
texts: dynamic) and its test accuracy; it is marked accepted when its relative accuracy drop is within
export.int8_max_relative_drop.
Writes the serving contract beside them (paths.serving): what the model server reads instead of the checkpoint.
Reads paths.evaluate_metrics (which model won), paths.test_logits (PyTorch's logits, computed by evaluate),
paths.finetuned or paths.baselines, paths.prepared; writes paths.onnx,
paths.onnx_int8, paths.serving and paths.export_metrics.
Run: dvc repro export   (or: python -m stages.export)"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from stages import checkpoint, zoo
from stages.evaluate import candidate
from stages.files import atomic_path, read_json, sha256_file, write_json
from stages.modality import adapter
from stages.params import ExportParams, cli
from stages.predict import batch_order, folded, in_place, predict, read_logits
from stages.servable import safe_session
from stages.splits import batches, load_split, to_model_input


def export_onnx(model: torch.nn.Module, pre: dict, path: Path, opset: int) -> None:
    """Dynamic batch axis, and whatever other axes the modality leaves free (a text's length)."""
    inputs = adapter(pre)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about tracing; the parity check is the real test
        torch.onnx.export(
            model, inputs.example_inputs(pre), str(path), input_names=list(inputs.input_names(pre)),
            output_names=["logits"], dynamic_axes={**inputs.dynamic_axes(pre), "logits": {0: "batch"}},
            opset_version=opset, dynamo=False,
        )  # fmt: skip
    onnx.checker.check_model(str(path), full_check=True)


def onnx_feed(x: np.ndarray, pre: dict) -> dict[str, np.ndarray]:
    """The ONNX inputs for examples `x`, from the same preprocessing PyTorch gets."""
    inputs = to_model_input(x, pre)
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    return {name: t.numpy() for name, t in zip(adapter(pre).input_names(pre), inputs, strict=True)}


def onnx_logits(onnx_path: Path, x: np.ndarray, pre: dict, batch_size: int) -> np.ndarray:
    """In the batches PyTorch's logits were computed in (predict.batch_order), so a text pads alike in both."""
    session = safe_session(onnx_path)
    order = batch_order(x, pre)
    rows = [session.run(["logits"], onnx_feed(x[order[sl]], pre))[0] for sl in batches(len(x), batch_size)]
    return in_place(np.concatenate(rows), order)


def exact_logits(model: torch.nn.Module, x: np.ndarray, pre: dict, batch_size: int) -> np.ndarray:
    """The same network evaluated in float64: the reference that both fp32 implementations are measured against
    (BatchNorm folded, as predict runs fp32: in float64 the fold's own rounding is 1e-16, and it is 2x faster)."""
    wide = folded(copy.deepcopy(model).double().eval())
    as64 = lambda m, *inputs: m(*(t.double() if t.is_floating_point() else t for t in inputs))  # noqa: E731
    return predict(wide, x, pre, batch_size=batch_size, fn=as64)


def row_deviation(a: np.ndarray, b: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per example: the largest |a - b| over its logits, relative to the size of its logits (1 + max |logit|).
    Rounding error scales with the magnitudes a row's arithmetic carries, not with each logit, so a logit
    near zero beside large ones is allowed the same absolute error as they are."""
    return np.abs(a - b).max(1) / (1.0 + np.abs(reference).max(1))


def parity(
    model: torch.nn.Module, onnx_path: Path, x: np.ndarray, pre: dict, p: ExportParams,
    torch_logits: np.ndarray | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Compare ONNX Runtime with PyTorch on the same examples; also returns the ONNX logits.

    The rule is derived from fp32 itself, not from one machine: on `p.spread_examples` of the examples the
    network also runs in float64, and PyTorch fp32's own error against it (`fp32_spread`, per row, see
    row_deviation) is what this CPU's kernels legitimately vary by. Another kernel choice (AVX-512 vs AVX2
    vs SSE4.1, thread count, ONNX Runtime's fused graph) rounds differently by about that much, so the ONNX
    logits may differ from PyTorch's by up to `p.spread_factor` times the spread on every example, never
    less than `p.min_tolerance`. A wrong weight or op moves logits by orders of magnitude more. What gates
    besides: top-1 agreement (`p.min_top1_agreement`), and the ONNX model's own test accuracy downstream.
    `torch_logits`: PyTorch's logits on `x` when evaluate already computed them. They are checked, not
    trusted: on the sample rows PyTorch runs here too, and logits off by more than the tolerance from that
    are replaced by a full run here.
    """
    sample = np.unique(np.linspace(0, len(x) - 1, min(p.spread_examples, len(x))).round().astype(int))
    exact = exact_logits(model, x[sample], pre, p.batch_size)
    reused = torch_logits is not None
    if not reused:
        torch_logits = predict(model, x, pre, batch_size=p.batch_size, desc="parity: torch")
    fresh = predict(model, x[sample], pre, batch_size=p.batch_size) if reused else torch_logits[sample]
    spread = float(row_deviation(fresh, exact, exact).max())
    tolerance = max(p.min_tolerance, p.spread_factor * spread)
    stale = reused and (
        torch_logits.shape[0] != len(x) or row_deviation(torch_logits[sample], fresh, fresh).max() > tolerance
    )
    if stale:
        print("evaluate's PyTorch logits do not match this model on the test split: computing them again")
        torch_logits = predict(model, x, pre, batch_size=p.batch_size, desc="parity: torch")
    ort_logits = onnx_logits(onnx_path, x, pre, p.batch_size)
    deviation = row_deviation(ort_logits, torch_logits, torch_logits)
    return {
        "max_abs_diff": float(np.abs(ort_logits - torch_logits).max()),
        "max_row_deviation": float(deviation.max()),
        "fp32_spread": spread,  # PyTorch fp32 vs float64, per row as in row_deviation, on spread_examples rows
        "onnx_fp64_deviation": float(row_deviation(ort_logits[sample], exact, exact).max()),
        "spread_examples": int(len(sample)),
        "tolerance": tolerance,
        # how much of the allowed deviation the worst example uses (<= 1 passes)
        "worst_tolerance_use": float(deviation.max() / tolerance),
        "top1_agreement": float((ort_logits.argmax(1) == torch_logits.argmax(1)).mean()),
        "n_examples": int(len(x)),
    }, ort_logits


def serving_contract(meta: dict, name: str, stored: np.ndarray, max_pixels: int, onnx_files: dict[str, Path]) -> dict:
    """What the model server needs to turn a request into this model's input and its output into answers,
    with nothing else at hand (no checkpoint, no torch): the classes, the input contract (for images the
    decoding of a file to the size prepare stores, then the model's resize and normalisation; for texts
    the configured tokenizer itself), and the sha256 of each ONNX file, checked before one is served."""
    pre = meta["preprocessing"]
    contract = adapter(pre).serving_input(pre, stored, max_pixels)
    return {"format": SERVING_FORMAT, "model": name, "architecture": meta["architecture"],
            "modality": zoo.modality(pre), "classes": meta["classes"], "input": contract,
            "files": {Path(k).name: sha256_file(v) for k, v in onnx_files.items()}}


SERVING_FORMAT = "headstart-serving/1"


def run(model_dir: Path, prepared: Path, out: Path, out_int8: Path, metrics: Path, p: ExportParams,
        name: str = "finetuned", serving: Path | None = None, max_pixels: int = 50_000_000,
        test_logits: Path | None = None) -> dict:
    """Export the model in `model_dir` (the candidate `name`: finetuned, or the baseline that won), and write
    its serving contract (`serving`, default serving.json beside `out`). `test_logits`: evaluate's record
    of PyTorch's logits on the test split, reused when it is for this split."""
    model, meta = zoo.load_checkpoint(model_dir)
    pre = meta["preprocessing"]
    test, val = load_split(prepared, "test"), load_split(prepared, "val")
    test_sha256 = read_json(Path(prepared) / "manifest.json")["test_sha256"]
    reference = read_logits(test_logits, name, test_sha256) if test_logits is not None else None
    serving = Path(serving) if serving is not None else Path(out).with_name("serving.json")
    with atomic_path(out) as tmp, atomic_path(out_int8) as tmp_int8, atomic_path(serving) as tmp_serving:
        export_onnx(model, pre, tmp, p.opset)
        result, fp32_logits = parity(model, tmp, test.x, pre, p, reference)
        print(f"ONNX parity on {result['n_examples']} test examples: max |diff| {result['max_abs_diff']:.2e}, "
              f"worst row deviation {result['max_row_deviation']:.2e} ({result['worst_tolerance_use']:.0%} of the "
              f"tolerance {result['tolerance']:.1e} = max({p.min_tolerance:g}, {p.spread_factor:g} x PyTorch's own "
              f"fp32 spread {result['fp32_spread']:.1e})), top-1 agreement {result['top1_agreement']:.4%}")
        if result["worst_tolerance_use"] > 1 or result["top1_agreement"] < p.min_top1_agreement:
            raise ValueError(
                f"ONNX export does not match PyTorch: worst row deviation {result['max_row_deviation']:.3g} "
                f"(max |diff| {result['max_abs_diff']:.3g}) is {result['worst_tolerance_use']:.2f}x the tolerance "
                f"{result['tolerance']:.3g} ({p.spread_factor:g} x PyTorch's own fp32 spread "
                f"{result['fp32_spread']:.3g}, at least {p.min_tolerance:g}), top-1 agreement "
                f"{result['top1_agreement']:.4%} (needed {p.min_top1_agreement:.2%}); the previous {out} is kept. "
                "Try another export.opset."
            )
        calibration = val.x[np.random.default_rng(0).permutation(len(val.x))[: p.calibration_examples]]
        how = adapter(pre).quantize_int8(tmp, tmp_int8, calibration, pre)  # static QDQ (images), dynamic (text)
        int8_logits = onnx_logits(tmp_int8, test.x, pre, p.batch_size)
        fp32_acc = float((fp32_logits.argmax(1) == test.y).mean())
        int8_acc = float((int8_logits.argmax(1) == test.y).mean())
        drop = (fp32_acc - int8_acc) / fp32_acc
        result.update({
            "fp32_accuracy": fp32_acc, "int8_accuracy": int8_acc, "int8_relative_drop": drop,
            # int8 is offered for serving only within the allowed accuracy cost; fp32 is always there
            "int8_accepted": drop <= p.int8_max_relative_drop,
            "size_bytes": tmp.stat().st_size, "int8_size_bytes": tmp_int8.stat().st_size,
        })  # fmt: skip
        print(f"int8 ({how}): test accuracy {int8_acc:.4f} vs "
              f"fp32 {fp32_acc:.4f} (relative drop {drop:.2%}, allowed {p.int8_max_relative_drop:.2%}: "
              f"{'accepted' if result['int8_accepted'] else 'rejected'}); "
              f"{result['size_bytes'] / 1e6:.1f} MB -> {result['int8_size_bytes'] / 1e6:.1f} MB")
        contract = serving_contract(meta, name, test.x, max_pixels, {out: tmp, out_int8: tmp_int8})
        contract["int8_accepted"] = bool(result["int8_accepted"])
        tmp_serving.write_text(json.dumps(contract, indent=1) + "\n")
    result.update({"model": name, "parity_passed": True, "onnx_path": str(out), "onnx_int8_path": str(out_int8),
                   "serving_path": str(serving), "opset": p.opset})
    write_json(metrics, result)
    print(f"exported {name} to {out} and {out_int8}")
    return result


def main(argv: list[str] | None = None) -> None:
    params = cli(__doc__, argv)
    paths = params.paths
    name = candidate(read_json(paths.evaluate_metrics), params.register.candidate)
    model_dir = checkpoint.model_dirs(paths.finetuned, paths.baselines)[name]
    run(model_dir, paths.prepared, paths.onnx, paths.onnx_int8, paths.export_metrics, params.export, name,
        paths.serving, params.prepare.max_pixels, paths.test_logits)


if __name__ == "__main__":
    main()
