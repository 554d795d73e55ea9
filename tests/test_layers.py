"""Imports run downward only: each module of the package sits in a layer, and may import (at module level
or inside a function) only from its own package or from lower layers. The layer table is the package map
of DESIGN.md; a new package gets a row here."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rlalign"

LAYERS: dict[str, int] = {
    # 0: no rlalign imports but each other's: settings, small helpers, numerical kernels
    "rlalign.utils": 0,
    "rlalign.config": 0,
    "rlalign.ops": 0,
    # 1: processes, metrics sinks, the generated shapes world
    "rlalign.runtime": 1,
    "rlalign.tracking": 1,
    "rlalign.shapes": 1,
    # 2: models (families, packing layouts) and rewards; 3: data (rows, collators), which packs per family
    "rlalign.models": 2,
    "rlalign.rewards": 2,
    "rlalign.data": 3,
    # 4: what uses models and data: retrieval, rollouts, evaluation metrics
    "rlalign.retrieval": 4,
    "rlalign.rollout": 4,
    "rlalign.evaluation": 5,
    # 6: objectives, pairs; 7: the trainer; 8: entry points
    "rlalign.objectives": 6,
    "rlalign.pairs": 6,
    "rlalign.trainer": 7,
    "rlalign.recipe": 8,
    "rlalign.preflight": 8,
    "rlalign.plan": 9,
    "rlalign.bench": 9,
    "rlalign.demo": 9,
    "rlalign.sweep": 9,
    "rlalign.launcher": 9,
    "rlalign.cli": 10,
}


def layer_of(module: str) -> tuple[str, int]:
    """The table row a module belongs to (longest matching prefix)."""
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len, default=None)
    if best is None:
        raise KeyError(f"{module}: no layer (add its package to LAYERS in tests/test_layers.py)")
    return best, LAYERS[best]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every rlalign import in the file, wherever it stands (TYPE_CHECKING blocks too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names[:1] if n.startswith("rlalign")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("rlalign")]
    return found


def upward_imports() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        if me == "rlalign":
            continue
        row, level = layer_of(me)
        for line, target in imports(path):
            if target == "rlalign":
                continue
            their_row, their_level = layer_of(target)
            if their_row != row and their_level >= level:
                bad.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {row} (layer {level}) imports "
                    f"{target} (layer {their_level})"
                )
    return bad


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        if module_name(path) != "rlalign":
            layer_of(module_name(path))


def test_imports_run_downward():
    bad = upward_imports()
    assert not bad, "imports that run upward or sideways:\n" + "\n".join(bad)


def test_checker_sees_an_upward_import(tmp_path):
    """The checker itself: a config module importing an objective is reported."""
    source = "def f():\n    from rlalign.objectives import OBJECTIVES\n"
    path = tmp_path / "m.py"
    path.write_text(source)
    assert imports(path) == [(2, "rlalign.objectives")]
    assert layer_of("rlalign.objectives.dpo") == ("rlalign.objectives", LAYERS["rlalign.objectives"])
    assert LAYERS["rlalign.objectives"] > LAYERS["rlalign.config"]


if __name__ == "__main__":
    print("\n".join(upward_imports()))
