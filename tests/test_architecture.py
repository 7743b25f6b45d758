"""The layers of docs/architecture.md, checked on the code: imports between packages run downhill."""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).parents[1] / "src" / "lorasmith"
LAYER = {
    "errors": 0,
    "paths": 0,
    "atomic": 0,
    "progress": 0,
    "distributed": 0,
    "runs": 0,
    "config": 1,
    "data": 2,
    "models": 3,
    "evaluation": 4,
    "report": 5,
    "training": 6,
    "serving": 7,
    "bench": 7,
    "export": 7,
    "commands": 8,
    "cli": 9,
}
"""A package may import packages of a lower layer only (data before models: models/loss.py takes data's batch)."""


def package_imports() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for file in ROOT.rglob("*.py"):
        src = file.relative_to(ROOT).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorasmith."):
                edges[src].add(node.module.split(".")[1])
            elif isinstance(node, ast.ImportFrom) and node.module == "lorasmith":
                edges[src].update(alias.name for alias in node.names if alias.name in LAYER)
    return edges


def test_imports_run_downhill():
    wrong = [
        f"{src} -> {dst}"
        for src, dsts in package_imports().items()
        for dst in dsts
        if src in LAYER
        and dst in LAYER
        and src != dst
        # Utilities (layer 0) may use each other; every other package only what lies below it.
        and (LAYER[dst] > LAYER[src] or (LAYER[dst] == LAYER[src] and LAYER[src] > 0))
    ]
    assert not wrong, wrong


def test_every_package_has_a_layer():
    packages = {p.name.removesuffix(".py") for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert packages - {"__init__", "__main__", "recipes"} <= set(LAYER)


def test_the_architecture_doc_names_every_package():
    """docs/architecture.md's package table has a row for each package and top-level module."""
    import re

    doc = (ROOT.parents[1] / "docs" / "architecture.md").read_text()
    rows = set(re.findall(r"^\| `([a-z_]+)(?:/|\.py)` \|", doc, flags=re.M))
    packages = {p.name.removesuffix(".py") for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    packages |= {"recipes"}
    missing = packages - {"__init__", "__main__"} - rows
    assert not missing, f"docs/architecture.md has no row for {sorted(missing)}"
