"""Build the policy VLM (and its reference) from the recipe.

`builtin:tiny-llava` builds the demo model; anything else is a directory or hub id loaded through
`AutoModelForImageTextToText` + `AutoProcessor` (offline when HF_HUB_OFFLINE=1). Options: dtype,
gradient checkpointing, a frozen vision tower, LoRA through peft, dropout off (`model.disable_dropout`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from rlalign.config import RecipeError
from rlalign.config.schema import DataConfig, ModelConfig
from rlalign.models.sharded_load import (
    Sources,
    WholeLoadNeeded,
    checkpoint_sources,
    cpu_placeholders,
    empty_model,
    shard_and_fill,
)
from rlalign.models.tiny import build_tiny_llava
from rlalign.shapes import ShapesConfig

log = logging.getLogger(__name__)

BUILTIN_TINY = "builtin:tiny-llava"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_INIT_SEED = 0
"""Seed of the LoRA adapters' initial weights for hub / local checkpoints (the built-in model uses its init_seed)."""
# Submodule names that hold the vision side across the HF families we load.
VISION_MODULES = ("vision_tower", "visual", "vision_model", "multi_modal_projector", "connector", "merger")
Shard = Callable[[torch.nn.Module], None]
"""Shards a model built on the meta device and allocates this rank's shards (`Runtime.shard_at_load`)."""


def load_base(
    cfg: ModelConfig, data: DataConfig | None = None, *, empty: bool = False
) -> tuple[torch.nn.Module, Any]:
    """The bare pretrained (or built-in) model and processor, before LoRA/freezing; `empty`: a checkpoint's
    model with its parameters on the meta device (`sharded_load.empty_model`), to be filled once sharded."""
    if cfg.name_or_path == BUILTIN_TINY:
        shapes = ShapesConfig(seed=data.seed if data else 0, image_size=data.image_size if data else 48)
        model, processor = build_tiny_llava(cfg.tiny, shapes)
        model.set_attn_implementation(cfg.attn_implementation)
        return model.to(DTYPES[cfg.dtype]), processor
    from transformers import AutoModelForImageTextToText

    from rlalign.models.families import load_processor

    try:
        processor = load_processor(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
        if empty:
            model = empty_model(
                cfg.name_or_path,
                DTYPES[cfg.dtype],
                trust_remote_code=cfg.trust_remote_code,
                attn=cfg.attn_implementation,
            )
        else:
            model = AutoModelForImageTextToText.from_pretrained(
                cfg.name_or_path,
                dtype=DTYPES[cfg.dtype],
                trust_remote_code=cfg.trust_remote_code,
                attn_implementation=cfg.attn_implementation,
            )
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(f"model.name_or_path: '{cfg.name_or_path}': could not load ({first})") from None
    return model, processor


def load_unsharded(
    cfg: ModelConfig, data: DataConfig | None, shard: Shard | None
) -> tuple[torch.nn.Module, Any, Sources | None]:
    """`load_base`, or, given `shard`, the model on the meta device and where its checkpoint tensors are
    (`shard_and_fill` fills it once LoRA and the rest are applied); loaded whole, with a warning, where the
    checkpoint cannot be filled shard by shard."""
    if shard is None:
        return (*load_base(cfg, data), None)
    model, processor = load_base(cfg, data, empty=True)
    try:
        return model, processor, checkpoint_sources(model, cfg.name_or_path)
    except WholeLoadNeeded as why:
        log.warning("model.name_or_path: %s: loading the whole model on every rank, sharded afterwards", why)
        return (*load_base(cfg, data), None)


# peft `exclude_modules` pattern (full match on the module name) for everything under a vision module.
VISION_PATTERN = rf"(.*\.)?({'|'.join(VISION_MODULES)})(\..*)?"


def vision_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = []
    for name, module in model.named_modules():
        if name.split(".")[-1] in VISION_MODULES:
            params += list(module.parameters())
    return params


def build_policy(
    cfg: ModelConfig, data: DataConfig | None = None, shard: Shard | None = None
) -> tuple[torch.nn.Module, Any]:
    """The trainable policy: base model + freezing + gradient checkpointing + LoRA, in train mode; given
    `shard`, built on the meta device, then sharded and filled from the checkpoint (`models.sharded_load`)."""
    model, processor, sources = load_unsharded(cfg, data, shard)
    if cfg.freeze_vision:
        frozen = vision_parameters(model)
        if not frozen:
            raise RecipeError(f"model.freeze_vision: no vision module found in {type(model).__name__}")
        for p in frozen:
            p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        from rlalign.models.structure import check_lora_targets

        check_lora_targets(cfg, data, model)

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            # A frozen vision tower gets no adapters either (CLIP's q/k/v_proj match the default targets).
            exclude_modules=VISION_PATTERN if cfg.freeze_vision else None,
        )
        # Adapter A matrices are random: seed them so every rank and every run starts from the same adapter
        # (FSDP2 shards each rank's own copy, it does not broadcast rank 0's).
        seed = cfg.tiny.init_seed if cfg.name_or_path == BUILTIN_TINY else LORA_INIT_SEED
        stand_ins = cpu_placeholders(model) if sources is not None else contextlib.nullcontext()
        with torch.random.fork_rng(devices=[]), stand_ins:
            torch.manual_seed(seed)
            model = get_peft_model(model, lora)
    if cfg.disable_dropout:
        log.info("model.disable_dropout: %d dropout probabilities set to 0", disable_dropout(model))
    model.train()
    if sources is not None:
        shard_and_fill(model, sources, shard)
    return model, processor


def load_reference(
    cfg: ModelConfig, data: DataConfig | None = None, shard: Shard | None = None
) -> torch.nn.Module:
    """The `copy` reference loaded from the checkpoint again, as the policy starts: the base model with
    dropout off as in the policy (sharded as it loads, given `shard`). A fresh LoRA adapter adds nothing
    (its B matrices are zero), so the base alone computes what the initial policy computes."""
    model, _, sources = load_unsharded(cfg, data, shard)
    if cfg.disable_dropout:
        disable_dropout(model)
    if sources is not None:
        shard_and_fill(model, sources, shard)
    return model


def disable_dropout(model: torch.nn.Module) -> int:
    """Every dropout probability of `model` set to 0 (as TRL's `disable_dropout_in_model`), also those HF
    attention modules keep as plain floats (`attention_dropout`, `dropout`) and apply functionally in
    training mode; LoRA dropout is an `nn.Dropout` module. Returns how many were above 0. The reference
    copy is made from the policy afterwards, so it inherits them."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            changed += module.p > 0
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            value = module.__dict__.get(name)  # plain attributes only, never a submodule
            if isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
                changed += 1
    return changed


class ReferenceModel:
    """The frozen reference policy later objectives score against.

    `copy`: a frozen copy of the initial policy, sharded like it (ZeRO-3 engine / FSDP2).
    `adapter_disabled`: the policy itself with its LoRA adapter switched off (no extra memory).
    """

    def __init__(self, mode: str, policy: torch.nn.Module, runtime: Any):
        self.mode = mode
        self.policy = policy
        self.runtime = runtime
        self.model: torch.nn.Module | None = None
        self.forward_calls = 0

    @classmethod
    def build(
        cls,
        mode: str,
        initial_policy: torch.nn.Module,
        runtime: Any,
        load: Callable[[], torch.nn.Module] | None = None,
    ) -> ReferenceModel:
        """Call before the policy is prepared: `copy` snapshots the initial weights, or, given `load`,
        loads them again (a policy partitioned at load cannot be copied whole)."""
        ref = cls(mode, initial_policy, runtime)
        if mode == "copy":
            model = load() if load is not None else copy.deepcopy(runtime.unwrap(initial_policy))
            ref.model = runtime.prepare_frozen(model)
        return ref

    def attach(self, prepared_policy: torch.nn.Module) -> None:
        self.policy = prepared_policy

    def modules(self) -> Iterator[torch.nn.Module]:
        """The modules of the model that runs (the copy, or the policy): for family logic that reads the
        model, such as its M-RoPE positions (`rlalign.models.packing`)."""
        return (self.model if self.mode == "copy" else self.policy).modules()

    @torch.no_grad()
    def __call__(self, **inputs: torch.Tensor) -> Any:
        self.forward_calls += 1
        if self.mode == "copy":
            return self.model(**inputs)
        if self.mode == "adapter_disabled":
            return self._adapter_disabled(**inputs)
        raise RuntimeError("model.reference is 'none': this objective needs a reference model")

    def _adapter_disabled(self, **inputs: torch.Tensor) -> Any:
        """The policy without its adapter, in eval mode like the `copy` reference (no dropout), then
        every module back in the mode it was in."""
        model = self.runtime.unwrap(self.policy)
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with model.disable_adapter():
                return self.policy(**inputs)
        finally:
            for m, training in modes:
                m.training = training
