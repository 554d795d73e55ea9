"""A model's module tree without its weights, and the checks that need only the tree (LoRA targets)."""

from __future__ import annotations

import re

import torch

from rlalign.config import RecipeError
from rlalign.config.schema import DataConfig, ModelConfig

BUILTIN_TINY = "builtin:tiny-llava"
ADAPTABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
"""Module types peft's LoRA can wrap; target names are matched against modules of these types."""


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
