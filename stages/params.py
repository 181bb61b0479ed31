"""The one schema for params.yaml. Every stage validates the whole file before doing any work, so a typo
or a bad value fails at once, naming the key, instead of an hour into training.

Plain frozen dataclasses checked by `validate` below, not pydantic: `python -m stages.finetune` must start
on GPU nodes that have only torch, torchvision, timm and transformers (../shared/ENVIRONMENT.md), and
pydantic is not among their dependencies. PyYAML is (through timm)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def _f(default: Any = dataclasses.MISSING, **bounds: Any) -> Any:
    """A field with optional bounds (ge, gt, le, lt) or a tuple of allowed `choices`."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=bounds)
    return field(default=default, metadata=bounds)


@dataclass(frozen=True)
class Paths:
    source: Path
    prepared: Path
    finetuned: Path
    baselines: Path
    finetune_history: Path
    scratch_history: Path
    replicates: Path
    evaluate_metrics: Path
    evaluate_plots: Path
    predictions: Path
    test_logits: Path
    registered: Path
    summaries: Path
    onnx: Path
    onnx_int8: Path
    serving: Path
    export_metrics: Path
    mlflow_db: Path
    mlflow_artifacts: Path
    checkpoints: Path
    weights_lock: Path
    quarantine: Path
    strategies: Path
    strategies_summary: Path
    strategies_plot: Path
    select_metrics: Path
    chosen_model: Path
    curves: Path = Path("metrics/curves")
    label_efficiency: Path = Path("metrics/label_efficiency.json")
    label_efficiency_plot: Path = Path("plots/label_efficiency.png")
    pretrained: Path = Path("models/pretrained")
    pretrain_metrics: Path = Path("metrics/pretrain.json")
    dapt: Path = Path("models/dapt")
    dapt_metrics: Path = Path("metrics/dapt.json")


# finetune.strategy: what stages/strategy.py implements (described there and in params.yaml)
STRATEGIES = ("full", "linear_probe", "partial", "gradual_unfreeze", "lp_ft", "lora")

DATASETS = ("fashion-mnist", "wordnet", "image-folder", "text-table")

# finetune.augment: what happens to each training batch of images (stages/augment.py)
AUGMENTS = ("none", "flip", "flip_shift", "crop")


@dataclass(frozen=True)
class PrepareParams:
    dataset: str = _f("fashion-mnist", choices=DATASETS)
    per_class: int = _f(100, ge=1)
    val_per_class: int = _f(30, ge=1)
    test_per_class: int | None = _f(None, ge=1)
    seed: int = 0
    download: bool = False
    image_size: int = _f(96, ge=8, le=1024)
    max_pixels: int = _f(50_000_000, ge=1)
    text_column: str = "text"
    label_column: str = "label"
    encoding: str = "utf-8"
    max_quarantined: float = _f(0.01, ge=0, le=1)
    leakage: str = _f("remove", choices=("remove", "fail"))
    near_duplicate_bits: int = _f(0, ge=0, le=64)
    classes: list[str] | None = None  # keep only these classes of the source (None: all)


@dataclass(frozen=True)
class ModelParams:
    name: str = "torchvision:mobilenet_v2"
    image_size: int = _f(80, ge=32, le=512)
    max_length: int = _f(64, ge=4, le=8192)
    pooling: str = _f("mean", choices=("mean", "cls", "last"))
    weights: Path | None = None
    allow_download: bool = False
    trust_remote_code: bool = False
    revision: str | None = None


@dataclass(frozen=True)
class FinetuneParams:
    # "auto": chosen from the number of training examples and the model's modality (stages/hyperrule.py)
    epochs: int | typing.Literal["auto"] = _f("auto", ge=1)
    batch_size: int = _f(32, ge=1)
    lr: float | typing.Literal["auto"] = _f("auto", gt=0)
    weight_decay: float = _f(0.01, ge=0)
    freeze_epochs: int = _f(0, ge=0)
    patience: int = _f(5, ge=1)
    keep: typing.Literal["best", "last"] = "best"  # which epoch's weights training ends with
    # one of AUGMENTS, or auto; true and false from older params files mean flip_shift and none
    augment: bool | typing.Literal[("auto", *AUGMENTS)] = "auto"
    crop_min_area: float = _f(0.35, gt=0, le=1)
    label_smoothing: float = _f(0.1, ge=0, lt=1)
    grad_clip: float = _f(0.0, ge=0)
    seed: int = 0
    strategy: str = _f("full", choices=STRATEGIES)
    freeze_groups: int = _f(0, ge=0)
    layer_decay: float = _f(1.0, gt=0, le=1)
    l2sp_alpha: float = _f(0.0, ge=0)
    l2sp_beta: float = _f(0.0, ge=0)
    wise_ft: bool = False
    lora_rank: int = _f(8, ge=1)
    lora_alpha: float = _f(16.0, gt=0)
    lora_dropout: float = _f(0.1, ge=0, lt=1)
    lora_targets: list[str] | None = None
    probe_c: list[float] = _f([0.01, 0.1, 1.0, 10.0], gt=0)
    compile: bool = False
    processes: int = _f(1, ge=1)
    peer_timeout_s: float = _f(600.0, gt=0)
    checkpoint_every_steps: int = _f(0, ge=0)

    def require_resolved(self) -> None:
        """The training loop takes these settings once nothing is left `auto` (stages/hyperrule.py decides)."""
        for k in ("epochs", "lr", "augment"):
            v = getattr(self, k)
            if isinstance(v, bool) or v == "auto":
                raise ValueError(f"finetune.{k} is {v!r}: pass the settings through stages.hyperrule.resolve first")


@dataclass(frozen=True)
class BaselineParams:
    scratch_lr: float = _f(3e-3, gt=0)
    augment: typing.Literal[("same", *AUGMENTS)] = "same"  # scratch's own, or the same as finetune's
    floor_c: float = _f(0.1, gt=0)
    seed: int = 0


@dataclass(frozen=True)
class EvaluateParams:
    n_bootstrap: int = _f(2000, ge=100)
    seed: int = 0
    # training seeds the verdict rests on: fine-tuned and scratch train once per seed (stages/replicate.py)
    seeds: int = _f(1, ge=1)
    drift_examples: int = _f(1000, ge=0)


@dataclass(frozen=True)
class RegisterParams:
    model_name: str
    experiment: str
    candidate: typing.Literal["best", "finetuned"] = "best"  # what export and register ship: the run's winner, or fine-tuned
    min_accuracy: float | None = _f(None, ge=0, le=1)  # opt-in absolute floor on the candidate's test accuracy
    min_gain: float = _f(0.0, ge=-1, le=1)
    max_regression: float = _f(0.0, ge=0, le=1)
    allow_unchecked_previous_data: bool = False  # the guard fails closed when the old test set is missing


@dataclass(frozen=True)
class ExportParams:
    opset: int = _f(17, ge=13)
    spread_factor: float = _f(30.0, gt=0)
    min_tolerance: float = _f(1e-5, gt=0)
    spread_examples: int = _f(512, ge=1)
    min_top1_agreement: float = _f(0.999, gt=0, le=1)
    int8_max_relative_drop: float = _f(0.01, ge=0, le=1)
    calibration_examples: int = _f(100, ge=1)
    batch_size: int = _f(256, ge=1)


@dataclass(frozen=True)
class SelectParams:
    # model names (as model.name), random:<name> for the same network untrained, tfidf for TF-IDF of the text
    candidates: list[str] = _f(["timm:efficientnet_lite0", "random:timm:efficientnet_lite0"])
    knn_k: int = _f(10, ge=1)
    seed: int = 0  # the random twins' weights and the k-NN hold-out


@dataclass(frozen=True)
class CompareParams:
    # name -> the finetune settings that strategy changes (checked against FinetuneParams in Params.from_dict)
    strategies: dict[str, dict[str, Any]] = field(default_factory=lambda: {"full": {}})


@dataclass(frozen=True)
class CurvesParams:
    budgets: list[int] = _f([10, 30, 100, 300, 1000], ge=1)  # labelled training examples per class
    seeds: list[int] = _f([0, 1, 2])
    val_per_class: int = _f(20, ge=1)
    test_per_class: int | None = _f(200, ge=1)  # None: the source's whole test split
    image_size: int = _f(48, ge=32, le=512)
    # auto: each point trains as finetune's auto rule says for its number of examples, with early stopping,
    # at most max_steps optimizer steps; steps: every point trains `steps` optimizer steps, no early stopping
    schedule: typing.Literal["auto", "steps"] = "auto"
    max_steps: int = _f(4000, ge=1)  # schedule auto: the cap on one point's optimizer steps
    steps: int = _f(300, ge=1)  # schedule steps: epochs = steps * batch / examples, at least 1
    multiplier_at: int = _f(100, ge=1)  # the budget the label multiplier is reported for


@dataclass(frozen=True)
class PretrainParams:
    architecture: str = "timm:efficientnet_lite0"
    classes: list[str] | None = None  # the source task: these classes of paths.source (None: all)
    per_class: int = _f(1000, ge=1)
    val_per_class: int = _f(100, ge=1)
    test_per_class: int = _f(200, ge=1)  # kept with the checkpoint: forgetting and domain shift use them
    image_size: int = _f(80, ge=32, le=512)
    epochs: int = _f(5, ge=1)
    batch_size: int = _f(64, ge=1)
    lr: float = _f(3e-3, gt=0)
    weight_decay: float = _f(0.01, ge=0)
    seed: int = 0


@dataclass(frozen=True)
class DaptParams:
    base: str = "hf:sentence-transformers/all-MiniLM-L6-v2"  # the text encoder whose pre-training continues
    head_steps: int = _f(100, ge=0)  # the new MLM head alone first (the encoder frozen), at head_lr
    head_lr: float = _f(1e-3, gt=0)
    steps: int = _f(400, ge=1)  # then everything, at lr
    batch_size: int = _f(32, ge=1)
    lr: float = _f(5e-5, gt=0)
    max_length: int = _f(64, ge=8)
    mask_probability: float = _f(0.15, gt=0, lt=1)
    eval_texts: int = _f(500, ge=1)  # held out of training: the masked-token loss before and after
    seed: int = 0


@dataclass(frozen=True)
class ScheduleParams:
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    work_pool: str = "headstart"
    deployment: str = "nightly"
    repository: str = ""  # the git URL workers clone; "" = this checkout's `origin` remote
    branch: str = ""  # "" = the branch checked out here
    workdir: str = ""  # where a process worker keeps its clone between runs; "" = a fresh directory per run
    image: str = "headstart-worker:0.1.0"  # the container image of a Kubernetes pool's flow-run Jobs


@dataclass(frozen=True)
class PromotionParams:
    alias: str = "champion"  # the alias whose moves the webhook receiver (ops/hooks.py) checks
    enforce: bool = False  # move the alias back when the rule (stages/promotion.py) finds problems
    servers: list[str] = _f([])  # model servers (ops/serve.py) told to reload at once: base URLs
    log: Path = Path("reports/promotions.jsonl")  # the receiver's audit log, one JSON object per event
    replay_window: float = _f(300.0, gt=0, le=3600)  # seconds: older signed deliveries are refused


@dataclass(frozen=True)
class Params:
    paths: Paths
    prepare: PrepareParams
    model: ModelParams
    finetune: FinetuneParams
    baseline: BaselineParams
    evaluate: EvaluateParams
    register: RegisterParams
    export: ExportParams
    select: SelectParams = field(default_factory=SelectParams)
    compare: CompareParams = field(default_factory=CompareParams)
    curves: CurvesParams = field(default_factory=CurvesParams)
    pretrain: PretrainParams = field(default_factory=PretrainParams)
    dapt: DaptParams = field(default_factory=DaptParams)
    schedule: ScheduleParams = field(default_factory=ScheduleParams)
    promotion: PromotionParams = field(default_factory=PromotionParams)
    task: str = "image"  # the task these settings are for: tasks/<task>.yaml holds its own keys

    @classmethod
    def load(cls, path: Path | None = None) -> Params:
        """`path`, or by default the settings of the current run (RUN_PARAMS, what dvc.yaml reads), else
        params.yaml itself (a checkout where no run composed them yet)."""
        path = path or (RUN_PARAMS if RUN_PARAMS.exists() else Path("params.yaml"))
        return cls.from_dict(run_settings(read_yaml(path)), source=path)

    @classmethod
    def from_dict(cls, raw: Any, source: Path | str = "params.yaml") -> Params:
        errors: list[str] = []
        params = validate(cls, raw, "", errors)
        if params is not None:
            for name, changes in params.compare.strategies.items():
                params.finetune_for(name, errors)
        if errors:
            raise ValueError(f"{source} is not valid:\n" + "\n".join(f"  {e}" for e in errors))
        return params

    def finetune_for(self, strategy: str, errors: list[str] | None = None) -> FinetuneParams:
        """The finetune settings with compare.strategies[strategy]'s changes applied (and checked)."""
        if strategy not in self.compare.strategies:
            raise KeyError(f"{strategy!r} is not in compare.strategies (there: {', '.join(self.compare.strategies)})")
        own: list[str] = []
        changes = self.compare.strategies[strategy] or {}
        merged = validate(FinetuneParams, {**dataclasses.asdict(self.finetune), **changes},
                          f"compare.strategies.{strategy}.", own)
        if errors is not None:
            errors.extend(own)
        elif own:
            raise ValueError("\n".join(own))
        return merged

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def digest(self) -> str:
        """sha256 of the validated settings: the same settings give the same hash whatever the YAML layout."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def validate(cls: type, raw: Any, where: str, errors: list[str]) -> Any:
    """Build dataclass `cls` from `raw`, appending one line per problem ("finetune.lr: must be > 0, got -1")."""
    if not isinstance(raw, dict):
        errors.append(f"{where.rstrip('.') or 'the file'}: expected a mapping of keys, got {type(raw).__name__}")
        return None
    before = len(errors)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw.keys() - fields.keys():
        near = difflib.get_close_matches(str(key), fields, n=1)
        errors.append(f"{where}{key}: unknown key" + (f" (did you mean {near[0]}?)" if near else ""))
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        path = f"{where}{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{path}: required")
            continue
        values[name] = _value(hints[name], raw[name], path, errors)
        choices = f.metadata.get("choices")
        if choices and values[name] not in choices:
            errors.append(f"{path}: must be one of {', '.join(choices)}, got {values[name]!r}")
        else:
            _check_bounds(values[name], {k: v for k, v in f.metadata.items() if k != "choices"}, path, errors)
    return cls(**values) if len(errors) == before else None


def _value(tp: Any, v: Any, path: str, errors: list[str]) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return validate(tp, v, f"{path}.", errors)
    if origin is typing.Literal:
        if v in args and type(v) in {type(a) for a in args}:
            return v
        errors.append(f"{path}: expected {' or '.join(repr(a) for a in args)}, got {v!r}")
        return v
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        # the first alternative that takes the value wins; when none does, say what each expected
        tried: list[str] = []
        for alt in (a for a in args if a is not type(None)):
            own: list[str] = []
            value = _value(alt, v, path, own)
            if not own:
                return value
            tried.extend(e.removeprefix(f"{path}: ") for e in own)
        got = f", got {v!r}"
        if all(t.startswith("expected ") and t.endswith(got) for t in tried):  # "expected int or 'auto', got 'x'"
            errors.append(f"{path}: expected {' or '.join(t[len('expected '):-len(got)] for t in tried)}{got}")
        else:
            errors.append(f"{path}: " + "; or ".join(tried))
        return v
    if origin is dict:
        if not isinstance(v, dict):
            errors.append(f"{path}: expected a mapping, got {v!r}")
            return v
        return {str(k): _value(args[1], item, f"{path}.{k}", errors) for k, item in v.items()}
    if tp is Any or (origin is dict and not args):
        return v
    if origin is list:
        if not isinstance(v, list):
            errors.append(f"{path}: expected a list, got {v!r}")
            return v
        return [_value(args[0], item, f"{path}[{i}]", errors) for i, item in enumerate(v)]
    if tp is float and isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    if tp is float and isinstance(v, str):
        errors.append(f"{path}: expected a number, got the string {v!r} (YAML needs a dot: write 2.0e-5, not 2e-5)")
        return v
    if tp is Path and isinstance(v, str):
        return Path(v)
    if tp in (int, bool, str) and type(v) is tp:
        return v
    errors.append(f"{path}: expected {getattr(tp, '__name__', tp)}, got {v!r}")
    return v


def _check_bounds(v: Any, bounds: Any, path: str, errors: list[str]) -> None:
    checks = {"ge": (lambda a, b: a >= b, ">="), "gt": (lambda a, b: a > b, ">"),
              "le": (lambda a, b: a <= b, "<="), "lt": (lambda a, b: a < b, "<")}  # fmt: skip
    for item in v if isinstance(v, list) else [v]:
        if not isinstance(item, int | float) or isinstance(item, bool):
            continue
        for name, bound in bounds.items():
            ok, sign = checks[name]
            if not ok(item, bound):
                errors.append(f"{path}: must be {sign} {bound}, got {item}")


# params.yaml with the current task's file, presets and --set values applied (flows/compose.py writes it,
# git ignores it): committed settings are read, never rewritten, and DVC reads its `vars` and stage params here.
RUN_PARAMS = Path(".headstart/params.yaml")


def run_settings(raw: Any) -> Any:
    """The settings a params file holds: a run's composed file (flows/compose.py) has them under `run`."""
    return raw.get("run") or {} if isinstance(raw, dict) and "composed_from" in raw else raw


def read_yaml(path: Path) -> Any:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} not found: run from the project root, or pass the params file")
    with open(path) as f:
        return yaml.safe_load(f)


def cli(doc: str | None, argv: list[str] | None = None) -> Params:
    """The command line every stage shares: `python -m stages.<name> [--params FILE]`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, help=f"params file (default: {RUN_PARAMS} when a run composed it, "
                                                    "else params.yaml)")
    return Params.load(parser.parse_args(argv).params)
