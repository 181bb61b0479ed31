"""dvc.yaml, the stage modules, the flow and params.yaml must describe the same pipeline."""

import dataclasses
import importlib
import re

import yaml

from flows.pipeline import SEEDS_AT, STAGES, TASKS
from stages.params import RUN_PARAMS, Params

from .conftest import ROOT


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_dvc_flow_and_modules_list_the_same_stages_in_order():
    """The flow runs dvc.yaml's stages in its order; the replicate entries (evaluate.seeds > 1) run where
    dvc.yaml has them, just before evaluate."""
    assert [name for name in dvc_stages() if name != "replicate"] == list(STAGES)
    assert list(dvc_stages()).index("replicate") == SEEDS_AT == STAGES.index("evaluate")
    assert list(TASKS) == list(STAGES)
    for name in (*STAGES, "replicate"):
        module = importlib.import_module(f"stages.{name}")
        assert callable(module.run) and callable(module.main), name


def test_each_dvc_stage_runs_its_own_module_and_depends_on_its_code():
    for name, stage in dvc_stages().items():
        args = " ${item.seed}" if "matrix" in stage else ""  # a matrix entry's own seed
        assert stage["cmd"] == f"python -m stages.{name}{args}"
        assert f"stages/{name}.py" in stage["deps"]


def stage_params(stage: dict) -> list[str]:
    """A stage's params keys, as params.yaml names them: DVC reads them under `run:` in the composed settings."""
    [entry] = stage["params"]
    [(path, keys)] = entry.items()
    assert path == str(RUN_PARAMS) and all(k.startswith("run.") for k in keys), entry
    return [k.removeprefix("run.") for k in keys]


def test_dvc_paths_and_params_come_from_params_yaml():
    params = Params.load(ROOT / "params.yaml")
    sections = {f.name for f in dataclasses.fields(Params)} - {"paths"}
    text = (ROOT / "dvc.yaml").read_text()
    for key in re.findall(r"\$\{run\.paths\.(\w+)\}", text):
        assert hasattr(params.paths, key), key
    for name, stage in dvc_stages().items():
        for entry in stage_params(stage):  # a whole section, or one key of one (register.candidate)
            section, _, key = entry.partition(".")
            assert section in sections and (not key or hasattr(getattr(params, section), key)), (name, entry)
    # no literal output path may hide in dvc.yaml
    for stage in dvc_stages().values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path = entry if isinstance(entry, str) else next(iter(entry))
                assert path.startswith("${run.paths."), path


def test_the_compare_pipeline_runs_its_module_with_the_same_dependencies_as_finetune():
    stage = yaml.safe_load((ROOT / "compare" / "dvc.yaml").read_text())["stages"]["compare"]["do"]
    assert stage["cmd"] == "python -m stages.compare ${key}" and stage["wdir"] == ".."
    needed = {f"stages/{m}.py" for m in _imported_stage_modules("compare") - {"params", "files"}}
    assert needed | {"stages/compare.py"} <= set(stage["deps"])
    assert set(dvc_stages()["finetune"]["deps"]) - {"${run.paths.source}"} <= set(stage["deps"]) | {"stages/finetune.py"}
    params = Params.load(ROOT / "params.yaml")
    for key in re.findall(r"\$\{run\.paths\.(\w+)\}", (ROOT / "compare" / "dvc.yaml").read_text()):
        assert hasattr(params.paths, key), key


def test_no_stage_imports_prefect_and_only_registry_code_imports_mlflow():
    for path in (ROOT / "stages").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+prefect", text, re.M), path.name
        # recording runs and versions, gating, reading for serving, promoting
        if path.name not in ("tracking.py", "register.py", "registry.py", "promotion.py"):
            assert not re.search(r"^\s*(import|from)\s+mlflow", text, re.M), path.name


def test_only_transient_failures_are_retried():
    from flows.pipeline import is_transient

    assert is_transient("requests.exceptions.ConnectionError: Max retries exceeded with url: /api/2.0/mlflow")
    assert is_transient("sqlite3.OperationalError: database is locked")
    assert not is_transient("ValueError: ONNX export does not match PyTorch: max |diff| 0.01")
    assert not is_transient("FloatingPointError: finetune: training loss became nan in epoch 2")


def _imported_stage_modules(name: str, seen: set[str] | None = None) -> set[str]:
    """stages.* modules that stages/<name>.py imports, directly or through each other."""
    seen = set() if seen is None else seen
    for mod in {n.split(".")[1] for n in _imports(ROOT / "stages" / f"{name}.py") if n.startswith("stages.")}:
        if mod not in seen:
            seen.add(mod)
            _imported_stage_modules(mod, seen)
    return seen


def test_every_module_that_shapes_a_stage_result_is_a_dvc_dependency():
    # params.py (validation) and files.py (atomic writes) shape no number, so editing them retrains nothing.
    plumbing = {"params", "files"}
    for name, stage in dvc_stages().items():
        needed = {f"stages/{m}.py" for m in _imported_stage_modules(name) - plumbing}
        missing = needed - set(stage["deps"])
        assert not missing, f"dvc.yaml stage {name} imports {sorted(missing)} but does not list them as deps"


GPU_NODE_BLOCKER = """
import runpy, sys
BLOCKED = {"prefect", "mlflow", "dvc", "pydantic", "sklearn", "scipy", "matplotlib", "onnx", "onnxruntime",
           "ruamel", "pandas"}
for name in BLOCKED:  # what an absent package looks like: `import` fails, importlib.util.find_spec is None
    sys.modules[name] = None
sys.argv = ["stages.finetune", "--params", sys.argv[1]]
runpy.run_module("stages.finetune", run_name="__main__")
"""


def test_finetune_runs_with_only_the_training_stack(tiny_source, tmp_path):
    """GPU nodes have torch, torchvision, timm, transformers and their dependencies, nothing else."""
    import subprocess
    import sys

    from stages.params import Params
    from stages.prepare import run as prepare

    from .conftest import tiny_params

    params_file = tiny_params(tmp_path, tiny_source)
    params = Params.load(params_file)
    prepare(params.paths.source, params.paths.prepared, params.prepare)
    res = subprocess.run([sys.executable, "-c", GPU_NODE_BLOCKER, str(params_file)], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (params.paths.finetuned / "model.safetensors").exists()


def test_entry_points_run_main_last():
    # `python -m` executes the module top to bottom: a function defined below `main()` does not exist yet
    for path in [*(ROOT / "stages").glob("*.py"), *(ROOT / "flows").glob("*.py"), *(ROOT / "ops").glob("*.py")]:
        text = path.read_text()
        if '\nif __name__ == "__main__":' in text:
            assert text.rstrip().endswith('if __name__ == "__main__":\n    main()'), path.name


def test_the_curves_pipeline_runs_a_point_per_model_budget_and_seed_with_its_code_as_deps():
    stage = yaml.safe_load((ROOT / "curves" / "dvc.yaml").read_text())["stages"]["curve"]
    assert stage["cmd"] == "python -m stages.curves point ${item.model} ${item.budget} ${item.seed}"
    assert stage["matrix"] == {"model": ["finetuned", "scratch"], "budget": "${run.curves.budgets}",
                               "seed": "${run.curves.seeds}"}
    needed = {f"stages/{m}.py" for m in _imported_stage_modules("curves") - {"params", "files"}}
    assert needed | {"stages/curves.py"} <= set(stage["deps"])
    # which points exist is not a setting of any point: extending the ladder must not retrain the rest
    assert not {"curves", "curves.budgets", "curves.seeds"} & set(stage_params(stage))
    params = Params.load(ROOT / "params.yaml")
    for key in re.findall(r"\$\{run\.paths\.(\w+)\}", (ROOT / "curves" / "dvc.yaml").read_text()):
        assert hasattr(params.paths, key), key


def test_the_pretrain_pipeline_runs_each_module_with_its_code_as_deps():
    from flows.pipeline import PRETRAIN_STAGES

    stages = yaml.safe_load((ROOT / "pretrain" / "dvc.yaml").read_text())["stages"]
    assert {f"pretrain/dvc.yaml:{name}" for name in stages} == set(PRETRAIN_STAGES.values())
    params = Params.load(ROOT / "params.yaml")
    for name, stage in stages.items():
        assert stage["cmd"] == f"python -m stages.{name}" and stage["wdir"] == ".."
        needed = {f"stages/{m}.py" for m in _imported_stage_modules(name) - {"params", "files"}}
        assert needed | {f"stages/{name}.py"} <= set(stage["deps"]), name
        # it writes the weights lock, so depending on it would make it stale after every run of its own
        assert "${run.paths.weights_lock}" not in stage["deps"], name
        out = next(iter(stage["outs"]))
        assert out.startswith("${run.paths.") and hasattr(params.paths, out[len("${run.paths."):-1]), name


def _imports(path) -> set[str]:
    """Top-level package names and project modules a file imports, lazy imports inside functions included
    (`from stages import zoo` gives "stages" and "stages.zoo"); imports for type hints only (if TYPE_CHECKING:)
    run no code and are left out."""
    import ast

    tree = ast.parse(path.read_text())
    for block in ast.walk(tree):
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING":
            block.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_the_import_rules_of_docs_architecture_hold():
    """stages/ imports no flows or ops; flows/ imports no ops; ops/ takes only flows.tasks from flows/."""
    for package, banned in (("stages", ("flows", "ops", "prefect")), ("flows", ("ops",)), ("ops", ("flows",))):
        for path in (ROOT / package).glob("*.py"):
            for name in _imports(path):
                top = name.split(".")[0]
                if package == "ops" and (name == "flows" or name.startswith("flows.tasks")):
                    continue  # `from flows import tasks`: a task's registered name
                assert top not in banned, f"{path.relative_to(ROOT)} imports {name}"


def test_every_module_is_in_the_architecture_map():
    text = (ROOT / "docs" / "architecture.md").read_text()
    for package in ("stages", "flows", "ops"):
        for path in (ROOT / package).glob("*.py"):
            if path.name != "__init__.py":
                assert f"`{path.name}`" in text, f"{package}/{path.name} is missing from docs/architecture.md"
