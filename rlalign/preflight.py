"""What can be checked about a recipe without loading any weights, before a run starts.

`load_recipe` checks the recipe's own shape (keys, types, ranges, files it names). `preflight` checks
that the recipe fits the world around it: the objective's needs against the model section, reward
callables that import and are callable, a model folder or hub id that can be found without a download,
and LoRA target modules that exist in the model's structure (built on the meta device from its config,
so no weights are read). `rlalign validate` and `rlalign train` both call it; every failure is one
`RecipeError` line naming the key.
"""

from __future__ import annotations

from pathlib import Path

from rlalign.config import Recipe, RecipeError
from rlalign.config.plugins import load_callable
from rlalign.config.schema import ModelConfig
from rlalign.data import data_kind
from rlalign.models.structure import BUILTIN_TINY, check_lora_targets
from rlalign.objectives import is_rollout_class, objective_class


def preflight(
    recipe: Recipe, *, model_structure: bool = True, before_earlier_stages: bool = False
) -> list[str]:
    """Raise a one-line `RecipeError` for the first problem found; `model_structure` also builds the
    model's skeleton (meta device) to check LoRA targets. With `before_earlier_stages` (validate), a
    relative model path that does not exist yet (an earlier stage's output, as in the demo chain) is
    noted, not an error. Returns the notes."""
    check_objective_needs(recipe)
    check_attention(recipe.model)
    rollout = is_rollout_class(objective_class(recipe.objective.name))
    check_token_budget(recipe, rollout)
    for reward in recipe.objective.rewards if rollout else []:
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
    check_flex_attention(recipe.model)
    if model_structure and recipe.model.lora is not None:
        check_lora_targets(recipe.model, recipe.data)
    return []


def _later_output(name: str) -> bool:
    """A relative path with a folder part that does not exist here and cannot be a hub id (`org/name`)."""
    path = Path(name)
    return not path.is_absolute() and not name.startswith("~") and not path.exists() and name.count("/") >= 2


def check_token_budget(recipe: Recipe, rollout: bool) -> None:
    """`trainer.max_tokens_per_micro` sizes the micro-batches of supervised and preference objectives under
    engines whose accumulation length can change from step to step."""
    if not recipe.trainer.max_tokens_per_micro:
        return
    if rollout:
        raise RecipeError(
            f"trainer.max_tokens_per_micro: objective '{recipe.objective.name}' builds its micro-batches from "
            "rollouts (whole groups); set it to 0"
        )
    if recipe.distributed.backend == "deepspeed":
        raise RecipeError(
            "trainer.max_tokens_per_micro: DeepSpeed fixes the accumulation length when it starts; "
            "use distributed.backend ddp or fsdp2, or set it to 0"
        )


def check_objective_needs(recipe: Recipe) -> None:
    """The objective's declared needs against the model section and the data (columns, from schemas)."""
    name, model = recipe.objective.name, recipe.model
    cls = objective_class(name)
    settings = recipe.objective.settings
    if cls.requires_reference(settings) and model.reference == "none":
        raise RecipeError(
            f"model.reference: objective '{cls.name}' scores against a reference policy, but model.reference is "
            "'none' (use 'copy', or 'adapter_disabled' with model.lora)"
        )
    if model.reference == "adapter_disabled" and model.lora is None:
        raise RecipeError(
            "model.reference: 'adapter_disabled' needs model.lora (there is no adapter to disable)"
        )
    data_kind(cls.data_kind).check(recipe, cls)


def check_attention(cfg: ModelConfig) -> None:
    """The attention kernel the recipe names is installed."""
    import importlib.util

    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise RecipeError(
            "model.attn_implementation: 'flash_attention_2' needs the flash-attn package (pip install flash-attn), "
            "not installed here; 'sdpa' (the default) runs everywhere"
        )


def check_flex_attention(cfg: ModelConfig) -> None:
    """flex attention is a per-architecture opt-in of transformers (Qwen2-VL and Qwen2.5-VL have none in
    5.x): refused here in one line, not by a traceback when the weights load. Reads the config only (a
    local or cached checkpoint: `check_model_source` passed); the built-in model is a Llava, which has it."""
    if cfg.attn_implementation != "flex_attention" or cfg.name_or_path == BUILTIN_TINY:
        return
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:  # remote code: its class decides at load
        return
    model_class = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]
    if not model_class._supports_flex_attn:
        raise RecipeError(
            f"model.attn_implementation: 'flex_attention' has no path in transformers for "
            f"{model_class.__name__}; use 'sdpa' (the default) or 'eager'"
        )


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
