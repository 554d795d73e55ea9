"""YAML recipe -> validated `Recipe`: `base:` inheritance, `a.b.c=value` overrides, typed checks.

Every error is a `RecipeError` whose one-line message names the file and the key path, e.g.
`recipes/demo/x.yaml: trainer.max_stpes: unknown key (did you mean 'max_steps'?)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from rlalign.config.schema import Recipe

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
RECIPES_DIR = PACKAGE_DIR / "recipes"
LAUNCH_DIR = PACKAGE_DIR / "launch"


class RecipeError(ValueError):
    """A recipe that cannot run; the message is one line naming the file and key."""


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    if path in chain:
        raise RecipeError(f"{path}: base: inheritance cycle through {' -> '.join(map(str, chain))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}:{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping at the top level")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = resolve_recipe_path(str(base), relative_to=path.parent)
    if not base_path.is_file():
        raise RecipeError(f"{path}: base: recipe file not found: {base}")
    return _merge(_read_yaml(base_path, (*chain, path)), raw)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_recipe_path(name: str, relative_to: Path | None = None) -> Path:
    """A recipe path as given, relative to the including file, or under the shipped `recipes/`."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name)
    candidates += [RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in `tree`; the value is parsed as YAML (`3`, `true`, `[1, 2]`, `null`)."""
    if "=" not in override:
        raise RecipeError(f"override '{override}': expected key.path=value")
    key, _, text = override.partition("=")
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override '{override}': '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except RecipeError:
                if len(args) == 2:
                    raise
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return [_convert(v, get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads `3e-3` (no dot) as a string
    if tp is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if tp is Any or (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    open_sections = getattr(cls, "OPEN_SECTIONS", None)
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if open_sections and key not in fields and isinstance(value, dict | None):
            kwargs.setdefault(open_sections, {})[key] = value or {}
            continue
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (valid: {', '.join(fields)})"
            raise RecipeError(f"{path}: unknown key{hint}")
        if key == open_sections:
            raise RecipeError(f"{path}: unknown key (write the sections directly under {where or 'the top'})")
        kwargs[key] = _convert(value, hints[key], path)
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in kwargs:
            raise RecipeError(f"{path}: missing required key")
        if name not in kwargs and dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(
                hints[name], {}, path
            )  # so required keys inside an absent section are named
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise RecipeError(f"{where or 'recipe'}: {err}") from None


def build_section(cls: type, data: Any, where: str) -> Any:
    """A config dataclass from a recipe mapping; errors are one `RecipeError` line naming `where.key`."""
    return _build(cls, data, where)


def _check_references(recipe: Recipe) -> None:
    local = recipe.data.source == "local" and recipe.data.path.startswith(("/", ".", "~"))
    if (
        local and not Path(recipe.data.path).expanduser().exists()
    ):  # relative paths: the user's, checked at load
        raise RecipeError(f"data.path: file not found: {recipe.data.path}")
    name = recipe.model.name_or_path
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        raise RecipeError(f"model.name_or_path: directory not found: {name}")


def read_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, inherit, override, type-check and validate a recipe, all but the plug-in sections (the objective's
    settings stay raw in `objective.sections`: `rlalign.recipe.load_recipe` resolves them)."""
    file = resolve_recipe_path(str(path))
    tree = _read_yaml(file)
    for override in overrides:
        apply_override(tree, override)
    try:
        recipe = _build(Recipe, tree, "")
        _check_references(recipe)
    except RecipeError as err:
        raise RecipeError(f"{file}: {err}") from None
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (saved beside checkpoints, sent to the tracker), in the recipe's
    own layout: objective sections sit under `objective` by name."""
    tree = dataclasses.asdict(recipe)
    objective = tree["objective"]
    objective.pop("settings")
    objective.update(objective.pop("sections"))
    return tree


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
