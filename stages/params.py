"""The one schema for params.yaml. Every stage validates the whole file before doing any work, so a typo
or a bad value fails at once, naming the key, instead of an hour into training."""

from __future__ import annotations

import argparse
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    source: Path
    prepared: Path
    finetuned: Path
    baselines: Path
    finetune_history: Path
    scratch_history: Path
    evaluate_metrics: Path
    evaluate_plots: Path
    registered: Path
    onnx: Path
    export_metrics: Path
    mlflow_db: Path
    mlflow_artifacts: Path


class PrepareParams(Section):
    per_class: int = Field(100, ge=1)
    val_per_class: int = Field(30, ge=1)
    test_per_class: int | None = Field(None, ge=1)
    seed: int = 0
    download: bool = False


class ModelParams(Section):
    name: str = "efficientnet_lite0"
    image_size: int = Field(80, ge=32, le=512)


class FinetuneParams(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    freeze_epochs: int = Field(0, ge=0)
    patience: int = Field(5, ge=1)
    augment: bool = True
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    seed: int = 0


class BaselineParams(Section):
    scratch_lr: float = Field(3e-3, gt=0)
    probe_c: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0], min_length=1)
    floor_c: float = Field(0.1, gt=0)
    seed: int = 0

    @field_validator("probe_c")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(c <= 0 for c in v):
            raise ValueError(f"every value must be > 0, got {v}")
        return v


class EvaluateParams(Section):
    n_bootstrap: int = Field(2000, ge=100)
    seed: int = 0


class RegisterParams(Section):
    model_name: str = Field(min_length=1)
    experiment: str = Field(min_length=1)
    max_regression: float = Field(0.0, ge=0, le=1)


class ExportParams(Section):
    opset: int = Field(17, ge=13)
    atol: float = Field(1e-4, gt=0)
    rtol: float = Field(1e-4, ge=0)
    min_top1_agreement: float = Field(0.999, gt=0, le=1)
    batch_size: int = Field(256, ge=1)


with warnings.catch_warnings():
    # pydantic warns that the field `register` shadows ABCMeta.register on the class; instances (all we
    # use) resolve it to the field, and `register` is the stage's name, so we keep it.
    warnings.filterwarnings("ignore", message='Field name "register"')

    class Params(Section):
        paths: Paths
        prepare: PrepareParams
        model: ModelParams
        finetune: FinetuneParams
        baseline: BaselineParams
        evaluate: EvaluateParams
        register: RegisterParams
        export: ExportParams

        @classmethod
        def load(cls, path: Path = Path("params.yaml")) -> Params:
            return cls.from_dict(read_yaml(path), source=path)

        @classmethod
        def from_dict(cls, raw: Any, source: Path | str = "params.yaml") -> Params:
            try:
                return cls.model_validate(raw)
            except ValidationError as e:
                # One line per problem, as "prepare.per_clas: Extra inputs are not permitted", so the
                # person reading it sees the key to fix rather than pydantic's internals.
                lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
                raise ValueError(f"{source} is not valid:\n" + "\n".join(lines)) from None

        def digest(self) -> str:
            """sha256 of the validated settings: the same settings give the same hash whatever the YAML layout."""
            blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
            return hashlib.sha256(blob).hexdigest()


def read_yaml(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run from the project root, or pass the params file")
    with open(path) as f:
        return yaml.safe_load(f)


def cli(doc: str | None, argv: list[str] | None = None) -> Params:
    """The command line every stage shares: `python -m stages.<name> [--params FILE]`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    return Params.load(parser.parse_args(argv).params)
