"""`rlalign plan RECIPE --gpus N [--nodes M]`: memory per rank for each backend, before launching.

The model is built on the meta device from its config (no weights are read; a hub id that is not in the
local cache falls back to the architecture of the known 7B checkpoints below), parameters are counted
(trainable ones after `freeze_vision` and LoRA), and per rank:
- weights: all of them (DDP, ZeRO-2) or a 1/world shard (ZeRO-3, FSDP2), in `model.dtype`;
- gradients: of the trainable parameters, full (DDP) or sharded (ZeRO-2/3, FSDP2), in `model.dtype`;
- optimizer: AdamW's two moments, in the parameter dtype under torch (DDP, FSDP2), in float32 plus a
  float32 master copy of low-precision weights under DeepSpeed; sharded except under DDP;
- reference: a frozen copy sharded like the policy (`model.reference: copy`), nothing for
  `adapter_disabled` / `none`;
- activations: an estimate for one micro-batch of `--seq-len` tokens (the recipe's `data.max_length` by
  default): 34 x tokens x hidden bytes per layer at 16 bits (Korthikanti et al. 2022, attention scores
  excluded: SDPA / flash never hold them), 2 x tokens x hidden per layer plus one layer's full set with
  gradient checkpointing; plus the scored positions' logits. Activations are an estimate, the rest exact.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Any

import torch

from rlalign.config import Recipe, RecipeError

KNOWN_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llava-hf/llava-1.5-7b-hf": ("llava", {"text_config": {"model_type": "llama", "vocab_size": 32064}}),
    "llava-hf/llava-v1.6-vicuna-7b-hf": (
        "llava_next",
        {"text_config": {"model_type": "llama", "vocab_size": 32064}},
    ),
    "llava-hf/llava-v1.6-mistral-7b-hf": (
        "llava_next",
        {
            "text_config": {
                "model_type": "mistral",
                "vocab_size": 32064,
                "num_key_value_heads": 8,
                "intermediate_size": 14336,
            }
        },
    ),
    "Qwen/Qwen2.5-VL-7B-Instruct": (
        "qwen2_5_vl",
        {
            "text_config": {
                "hidden_size": 3584,
                "intermediate_size": 18944,
                "num_hidden_layers": 28,
                "num_attention_heads": 28,
                "num_key_value_heads": 4,
                "vocab_size": 152064,
            },
            "vision_config": {
                "depth": 32,
                "hidden_size": 1280,
                "intermediate_size": 3420,
                "num_heads": 16,
                "out_hidden_size": 3584,
            },
        },
    ),
}
"""Architectures (model_type, config overrides) of shipped recipes' checkpoints, for planning offline."""
KNOWN_ARCHITECTURES["Qwen/Qwen2.5-VL-7B"] = KNOWN_ARCHITECTURES["Qwen/Qwen2.5-VL-7B-Instruct"]
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BACKENDS = ("ddp", "zero2", "zero3", "fsdp2")
GIB = 2**30


@dataclass(frozen=True)
class Counts:
    total: int
    """All parameters."""
    trainable: int
    """Parameters the optimizer updates (after freeze_vision and LoRA; LoRA adapters included)."""
    hidden: int
    layers: int
    vocab: int
    source: str
    """Where the architecture came from: the model folder / cache, the built-in tiny model, or the table."""


def skeleton(recipe: Recipe) -> tuple[torch.nn.Module, str]:
    """The recipe's model on the meta device (the built-in tiny one for real) and where its config came from."""
    from rlalign.models.structure import model_skeleton

    name = recipe.model.name_or_path
    try:
        return model_skeleton(recipe.model, recipe.data), name
    except RecipeError:
        if name not in KNOWN_ARCHITECTURES:
            raise
    from transformers import AutoConfig, AutoModelForImageTextToText

    model_type, overrides = KNOWN_ARCHITECTURES[name]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(model_type, **overrides))
    return model, f"{name} (architecture from rlalign.plan.KNOWN_ARCHITECTURES: not in the local cache)"


def count(recipe: Recipe) -> Counts:
    """Parameter counts of the recipe's policy, as `build_policy` would make it."""
    from rlalign.models.builder import VISION_PATTERN

    model, source = skeleton(recipe)
    cfg = recipe.model
    total = sum(p.numel() for p in model.parameters())
    vision = {n for n, _ in model.named_parameters() if re.fullmatch(VISION_PATTERN, n.rsplit(".", 1)[0])}
    if cfg.lora is None:
        trainable = sum(
            p.numel() for n, p in model.named_parameters() if not (cfg.freeze_vision and n in vision)
        )
    else:
        trainable = 0
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            if cfg.freeze_vision and re.fullmatch(VISION_PATTERN, name):
                continue
            if any(name == t or name.endswith(f".{t}") for t in cfg.lora.target_modules):
                trainable += cfg.lora.r * (module.in_features + module.out_features)
        total += trainable
    text = model.config.get_text_config()
    return Counts(total, trainable, text.hidden_size, text.num_hidden_layers, text.vocab_size, source)


def per_rank(recipe: Recipe, counts: Counts, world: int, seq_len: int) -> dict[str, dict[str, float]]:
    """Bytes per rank by backend: weights, gradients, optimizer, reference, activations, total."""
    b = BYTES[recipe.model.dtype]
    P, T = counts.total, counts.trainable
    micro = recipe.trainer.per_device_batch_size
    tokens = micro * seq_len
    if recipe.model.gradient_checkpointing:
        act = 2 * tokens * counts.hidden * counts.layers * 2 + 34 * tokens * counts.hidden
    else:
        act = 34 * tokens * counts.hidden * counts.layers
    act += (
        micro * min(seq_len, recipe.data.max_response_tokens * 2) * counts.vocab * 4
    )  # scored logits, float32
    out = {}
    for backend in BACKENDS:
        shard = 1 if backend in ("ddp", "zero2") else world
        grad_shard = 1 if backend == "ddp" else world
        if backend in ("zero2", "zero3"):
            optim = T * (12 if b < 4 else 8) / world
        else:
            optim = T * 2 * b / (1 if backend == "ddp" else world)
        reference = P * b / shard if recipe.model.reference == "copy" else 0.0
        row = {
            "weights": P * b / shard,
            "gradients": T * b / grad_shard,
            "optimizer": optim,
            "reference": reference,
            "activations": float(act),
        }
        row["total"] = sum(row.values())
        out[backend] = row
    return out


def run(argv: list[str]) -> int:
    from rlalign.recipe import load_recipe

    p = argparse.ArgumentParser(prog="rlalign plan", description=__doc__.split("\n")[0])
    p.add_argument("recipe")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default: data.max_length or 2048)"
    )
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU, to say what fits")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    recipe = load_recipe(a.recipe, a.overrides)
    world = a.gpus * a.nodes
    counts = count(recipe)
    seq_len = a.seq_len or recipe.data.max_length or 2048
    rows = per_rank(recipe, counts, world, seq_len)
    _print(recipe, counts, rows, world, seq_len, a.gpu_memory)
    return 0


def _print(recipe: Recipe, c: Counts, rows: dict, world: int, seq_len: int, gpu_gib: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"model: {c.source}")
    console.print(
        f"parameters: {c.total:,} ({c.trainable:,} trainable), {recipe.model.dtype}; "
        f"world {world}; micro-batch {recipe.trainer.per_device_batch_size} x {seq_len} tokens"
    )
    table = Table(title="GiB per rank (activations: estimate)")
    for col in (
        "backend",
        "weights",
        "gradients",
        "optimizer",
        "reference",
        "activations",
        "total",
        f"fits {gpu_gib:g}",
    ):
        table.add_column(col, justify="right")
    for backend, r in rows.items():
        fits = "yes" if r["total"] / GIB <= gpu_gib * 0.9 else "no"
        table.add_row(
            backend,
            *(
                f"{r[k] / GIB:.2f}"
                for k in ("weights", "gradients", "optimizer", "reference", "activations", "total")
            ),
            fits,
        )
    console.print(table)
