"""Recipes: every shipped recipe validates; inheritance and overrides; one-line errors naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, rlalign

from rlalign.config import RecipeError
from rlalign.config.loader import RECIPES_DIR
from rlalign.recipe import load_recipe

SHIPPED = sorted(RECIPES_DIR.rglob("*.yaml"))


def test_recipes_are_found():
    """Recipes live in the package (so a wheel ships them); the checkout's `recipes/` points there."""
    assert len(SHIPPED) >= 10 and RECIPES_DIR == ROOT / "rlalign" / "recipes"
    assert (ROOT / "recipes").resolve() == RECIPES_DIR and (
        ROOT / "launch"
    ).resolve() == ROOT / "rlalign" / "launch"


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(RECIPES_DIR)) for p in SHIPPED])
def test_every_shipped_recipe_validates_and_opens_with_its_launch_command(path):
    load_recipe(path)
    head = path.read_text().splitlines()[:6]
    assert head[0].startswith("#") and any(
        "rlalign" in line or "accelerate launch" in line for line in head
    ), head


def test_base_inheritance_and_overrides():
    r = load_recipe(
        ROOT / "recipes/test/tiny-xe.yaml",
        [
            "trainer.max_steps=7",
            "optim.betas=[0.8, 0.95]",
            "tracking.run_name=null",
            "model.tiny.heads=2",
            "optim.eps=3e-7",
        ],
    )
    assert r.model.name_or_path == "builtin:tiny-llava"  # from the base
    assert r.model.tiny.vision_hidden == 32 and r.model.tiny.heads == 2  # child, then override, deep-merged
    assert r.trainer.max_steps == 7 and r.optim.betas == [0.8, 0.95] and r.tracking.run_name is None
    assert r.optim.lr == 1e-3 and isinstance(r.optim.lr, float)
    assert r.optim.eps == 3e-7  # YAML 1.1 reads 3e-7 as a string; float fields accept it


def _write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "overrides", "needles"),
    [
        (
            "trainer:\n  output_dir: x\n  max_stpes: 3\n",
            [],
            ["trainer.max_stpes", "unknown key", "max_steps"],
        ),
        ("trainer:\n  output_dir: x\n  max_steps: ten\n", [], ["trainer.max_steps", "expected int", "'ten'"]),
        ("trainer:\n  output_dir: x\noptim:\n  lr: -1\n", [], ["optim", "lr must be > 0"]),
        (
            "trainer:\n  output_dir: x\nobjective:\n  name: ppo\n",
            [],
            ["objective.name", "'ppo'", "valid: ", "xe"],
        ),
        ("model:\n  name_or_path: builtin:tiny-llava\n", [], ["trainer.output_dir", "missing required key"]),
        (
            "trainer:\n  output_dir: x\ndata:\n  source: local\n  path: /nope/data.parquet\n",
            [],
            ["data.path", "not found", "/nope/data.parquet"],
        ),
        ("base: missing-base.yaml\ntrainer:\n  output_dir: x\n", [], ["missing-base.yaml", "not found"]),
        (
            "trainer:\n  output_dir: x\n",
            ["trainer.per_device_batch_size=0"],
            ["per_device_batch_size must be >= 1"],
        ),
        ("trainer:\n  output_dir: x\n", ["model.dtype=fp8"], ["model.dtype", "'fp8'", "'bfloat16'"]),
        ("trainer: [1, 2]\n", [], ["trainer", "expected a mapping"]),
        ("trainer:\n  output_dir: x\n  bad: [\n", [], ["not valid YAML"]),
    ],
    ids=[
        "typo",
        "type",
        "range",
        "objective",
        "required",
        "data-file",
        "base-file",
        "override-range",
        "literal",
        "section",
        "yaml",
    ],
)
def test_bad_recipes_fail_with_one_line_naming_file_and_key(tmp_path, text, overrides, needles):
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, overrides)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "trainer:\n  output_dir: x\n  max_stpes: 3\n",
            "trainer.max_stpes: unknown key (did you mean 'max_steps'?)",
        ),
        pytest.param(
            "trainer:\n  output_dir: x\n  max_steps: ten\n",
            "trainer.max_steps: expected int",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "trainer:\n  output_dir: x\nobjective:\n  name: ppo\n",
            "objective.name: unknown objective 'ppo'",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_cli_exits_2_with_one_line(tmp_path, text, needle):
    path = _write(tmp_path, text)
    for command in (["train", str(path)], ["validate", str(path)]):
        proc = rlalign(*command, check=False)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and needle in lines[0], proc.stderr


def test_cli_missing_recipe_file(tmp_path):
    proc = rlalign("train", str(tmp_path / "nope.yaml"), check=False)
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: recipe file not found"
    )


def test_ls_lists_shipped_recipes():
    out = rlalign("ls").stdout
    assert "demo/shapes-xe.yaml" in out and "test/tiny-xe.yaml" in out
    assert {"xe", "dpo", "rdpo"} <= set(rlalign("ls", "--objectives").stdout.split())
