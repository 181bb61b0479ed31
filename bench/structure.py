"""Figures of the code's shape, for the house redesign: the largest module and the longest function
outside tests, modality branches outside the adapters, README lines and params.yaml bytes.

Run:  python bench/structure.py   (prints a table, writes bench/results/structure.json)"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stages", "flows", "ops", "bench")
ADAPTERS = {"stages/modality.py", "stages/image.py", "stages/text.py"}
BRANCH = re.compile(r"""(==|!=)\s*["'](text|image)["']|["'](text|image)["']\s*(==|!=)""")


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES if (ROOT / pkg).is_dir() for p in (ROOT / pkg).rglob("*.py"))


def longest_functions(paths: list[Path], n: int = 5) -> list[tuple[int, str]]:
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.name}"))
    return sorted(found, reverse=True)[:n]


def branches(paths: list[Path]) -> list[str]:
    hits = []
    for path in paths:
        rel = str(path.relative_to(ROOT))
        if rel in ADAPTERS or rel.startswith("bench/"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if BRANCH.search(line.split("#")[0]):
                hits.append(f"{rel}:{i}")
    return hits


def main() -> None:
    paths = modules()
    sizes = sorted(((len(p.read_text().splitlines()), str(p.relative_to(ROOT))) for p in paths), reverse=True)
    figures = {
        "largest_modules": sizes[:5],
        "longest_functions": longest_functions(paths),
        "functions_over_80_lines": [f for f in longest_functions(paths, 1000) if f[0] > 80],
        "modality_branches_outside_adapters": branches(paths),
        "readme_lines": len((ROOT / "README.md").read_text().splitlines()),
        "params_yaml_bytes": (ROOT / "params.yaml").stat().st_size,
    }
    for key, value in figures.items():
        if isinstance(value, list):
            print(f"{key}: {len(value)}")
            for item in value:
                print(f"    {item}")
        else:
            print(f"{key}: {value}")
    if "--json" in sys.argv:
        out = ROOT / "bench" / "results" / "structure.json"
        out.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
