"""What can be checked about a recipe without loading any weights, before a run starts.

`load_recipe` checks the recipe's own shape (keys, types, ranges, files it names). `preflight` checks
that the recipe fits the world around it: the objective's needs against the model section, reward
callables that import and are callable, a model folder or hub id that can be found without a download,
and LoRA target modules that exist in the model's structure (built on the meta device from its config,
so no weights are read). `rlalign validate` and `rlalign train` both call it; every failure is one
`RecipeError` line naming the key.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlalign.config import Recipe, RecipeError
from rlalign.config.schema import DataConfig, ModelConfig

BUILTIN_TINY = "builtin:tiny-llava"
ADAPTABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
"""Module types peft's LoRA can wrap; target names are matched against modules of these types."""


def preflight(
    recipe: Recipe, *, model_structure: bool = True, before_earlier_stages: bool = False
) -> list[str]:
    """Raise a one-line `RecipeError` for the first problem found; `model_structure` also builds the
    model's skeleton (meta device) to check LoRA targets. With `before_earlier_stages` (validate), a
    relative model path that does not exist yet (an earlier stage's output, as in the demo chain) is
    noted, not an error. Returns the notes."""
    check_objective_needs(recipe)
    for reward in recipe.objective.rewards if recipe.objective.name in ("scst", "grpo") else []:
        if ":" in reward.name:
            load_callable(reward.name, where=f"objective.rewards: '{reward.name}'")
    name = recipe.model.name_or_path
    if before_earlier_stages and _later_output(name):
        return [f"model.name_or_path '{name}' does not exist yet (an earlier stage's output?): not checked"]
    try:
        note = check_model_source(recipe.model)
    except ModelNotCached as missing:
        if not before_earlier_stages:
            raise
        note = str(missing)
    if note:  # no local copy to read the structure from
        return [f"{note} (LoRA targets not checked)" if recipe.model.lora else note]
    if model_structure and recipe.model.lora is not None:
        check_lora_targets(recipe.model, recipe.data)
    return []


def _later_output(name: str) -> bool:
    """A relative path with a folder part that does not exist here and cannot be a hub id (`org/name`)."""
    path = Path(name)
    return not path.is_absolute() and not name.startswith("~") and not path.exists() and name.count("/") >= 2


def check_objective_needs(recipe: Recipe) -> None:
    """The objective's declared needs against the model section."""
    from rlalign.objectives import OBJECTIVES

    name, model = recipe.objective.name, recipe.model
    cls = OBJECTIVES[name]
    if cls.requires_reference(getattr(recipe.objective, name)) and model.reference == "none":
        raise RecipeError(
            f"model.reference: objective '{name}' scores against a reference policy, but model.reference is "
            "'none' (use 'copy', or 'adapter_disabled' with model.lora)"
        )
    if model.reference == "adapter_disabled" and model.lora is None:
        raise RecipeError(
            "model.reference: 'adapter_disabled' needs model.lora (there is no adapter to disable)"
        )


def load_callable(spec: str, *, where: str) -> Callable[..., Any]:
    """`package.module:function` imported (the working directory is importable, as for a script) and
    checked to be callable; `where` prefixes the one-line error."""
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise RecipeError(f"{where}: expected 'package.module:function'")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as err:
        raise RecipeError(
            f"{where}: module '{err.name}' not found (looked in the working directory too)"
        ) from None
    except AttributeError:
        raise RecipeError(f"{where}: module '{module}' has no attribute '{name}'") from None
    except Exception as err:  # the user's module failed while importing: say how, in one line
        raise RecipeError(f"{where}: importing '{module}' failed: {type(err).__name__}: {err}") from None
    if not callable(fn):
        raise RecipeError(f"{where}: '{name}' is not callable (it is {type(fn).__name__} {fn!r:.40})")
    return fn


class ModelNotCached(RecipeError):
    """A hub id that is not in the local cache: fatal for a run while offline, a note for `validate`."""


def check_model_source(cfg: ModelConfig) -> str | None:
    """A local model folder with a config, or a hub id present in the local cache when offline; a note
    when a hub id will be downloaded."""
    name = cfg.name_or_path
    if name == BUILTIN_TINY:
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RecipeError(f"model.name_or_path: {name}: folder has no config.json (not a saved model)")
        return None
    if name.startswith(("/", ".", "~")) or path.exists():
        raise RecipeError(f"model.name_or_path: model folder not found: {name}")
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except HFValidationError:
        raise RecipeError(
            f"model.name_or_path: '{name}' is neither a local folder nor a valid hub id"
        ) from None
    if isinstance(cached, str):
        return None
    where = f"model.name_or_path: '{name}' is not a local folder and not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise ModelNotCached(
            f"{where}; nothing is downloaded while HF_HUB_OFFLINE=1 (fetch it first with `hf download {name}`, "
            "or give a folder)"
        )
    return f"{where}; it is downloaded when the run starts"


def model_skeleton(cfg: ModelConfig, data: DataConfig) -> torch.nn.Module:
    """The model's module tree without weights: the built-in tiny model is built for real (it is
    small), a checkpoint's architecture on the meta device from its config alone."""
    from rlalign.models.builder import load_base

    if cfg.name_or_path == BUILTIN_TINY:
        return load_base(cfg, data)[0]
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RecipeError(
            f"model.name_or_path: '{cfg.name_or_path}': cannot read its config ({first})"
        ) from None
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, trust_remote_code=cfg.trust_remote_code)


def check_lora_targets(cfg: ModelConfig, data: DataConfig, model: torch.nn.Module | None = None) -> None:
    """Every `model.lora.target_modules` entry names (as a suffix, as peft matches it) at least one
    adaptable module; the error lists the names that exist."""
    import re

    from rlalign.models.builder import VISION_PATTERN

    model = model if model is not None else model_skeleton(cfg, data)
    names = [n for n, m in model.named_modules() if isinstance(m, ADAPTABLE)]
    if cfg.freeze_vision:  # a frozen tower gets no adapters (see build_policy)
        names = [n for n in names if not re.fullmatch(VISION_PATTERN, n)]
    for target in cfg.lora.target_modules:
        if not any(n == target or n.endswith(f".{target}") for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise RecipeError(
                f"model.lora.target_modules: '{target}' matches no module of {type(model).__name__} "
                f"(adaptable module names: {', '.join(leaves)})"
            )
