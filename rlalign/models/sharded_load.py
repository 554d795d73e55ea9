"""A checkpoint loaded straight into FSDP2 shards: no rank ever holds the whole model.

The model is built on the meta device (`from_config` inside accelerate's
`init_empty_weights(include_buffers=False)`: parameters take no memory, buffers such as rotary
`inv_freq` stay real, computed as a normal load computes them), then frozen / checkpointed / adapted as
a whole load is (`models.builder.build_policy`), then sharded (the runtime's `fully_shard`), and each
rank allocates only its own shards (`to_empty`). `set_model_state_dict(..., broadcast_from_rank0=True)`
fills them: rank 0 holds the checkpoint's tensors memory-mapped (safetensors), and each tensor is
broadcast, cast to the model's dtype and cut to the local slice one at a time.

Which parameter a checkpoint tensor fills is decided on the bare model, by the renamings
`from_pretrained` applies (`get_model_conversion_mapping`; Llava's checkpoints, for one, say
`language_model.model.*` for `model.language_model.*`), and kept by parameter identity, so LoRA's
`base_layer` names and tied weights (one parameter, two names) need nothing more. A checkpoint that is
not safetensors, a family whose tensors are converted at load (fused or split), or a checkpoint lacking
a parameter is loaded whole instead, with a warning (`WholeLoadNeeded`).

LoRA: peft moves new adapters onto the device of the layer they adapt, and on the meta device their
seeded initial values would be lost; under `cpu_placeholders` they stay on the CPU, drawn exactly as in
a whole load, and rank 0 sends them with the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

log = logging.getLogger(__name__)

Sources = dict[int, tuple[Path, str]]
"""`id(parameter)` of the bare model -> (safetensors file, checkpoint key) that fills it."""


class WholeLoadNeeded(Exception):
    """The checkpoint cannot be filled shard by shard; the message says why."""


def empty_model(name_or_path: str, dtype: torch.dtype, *, trust_remote_code: bool, attn: str | None):
    """The model `from_pretrained` would build, parameters on the meta device, buffers real; tied, in eval
    mode and with the checkpoint's generation config, as `from_pretrained` leaves it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForImageTextToText.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn
        )
    model.tie_weights()  # from_pretrained ties after loading; from_config leaves the two parameters apart
    with contextlib.suppress(OSError):  # no generation_config.json: the one from_config derived stays
        model.generation_config = GenerationConfig.from_pretrained(name_or_path)
    return model.eval()


def checkpoint_sources(model: torch.nn.Module, folder: str) -> Sources:
    """Where each meta parameter of the bare `model` comes from in the checkpoint `folder`; raises
    `WholeLoadNeeded` where that cannot be said by renaming alone."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise WholeLoadNeeded(f"{folder} holds no *.safetensors file")
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    named = model.state_dict(keep_vars=True)
    sources: Sources = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, named)
            if name not in named and key in named:  # as from_pretrained: the key was right already
                name, converter = key, None
            if converter is not None:
                raise WholeLoadNeeded(f"checkpoint tensor {key} is converted at load ({converter})")
            if name in named:
                sources[id(named[name])] = (file, key)
    missing = [name for name, t in named.items() if t.is_meta and id(t) not in sources]
    if missing:
        raise WholeLoadNeeded(f"{len(missing)} parameters not in the checkpoint (first: {missing[0]})")
    return sources


@contextlib.contextmanager
def cpu_placeholders(model: torch.nn.Module) -> Iterator[None]:
    """While LoRA adapters are added to a meta `model`: each meta parameter stands in as a CPU tensor of its
    shape and dtype holding one element (an expanded scalar), so peft, which puts new adapters where the
    adapted weight is, leaves them on the CPU with their seeded values; afterwards the meta parameters are
    put back, with the `requires_grad` peft gave their stand-ins (it freezes the base)."""
    swapped = [
        (module, name, p)
        for module in model.modules()
        for name, p in module._parameters.items()
        if p is not None and p.is_meta
    ]
    for module, name, p in swapped:
        stand_in = torch.zeros((), dtype=p.dtype).expand(p.shape)
        module._parameters[name] = torch.nn.Parameter(stand_in, requires_grad=p.requires_grad)
    try:
        yield
    finally:
        for module, name, p in swapped:
            p.requires_grad_(module._parameters[name].requires_grad)
            module._parameters[name] = p


def shard_and_fill(
    model: torch.nn.Module, sources: Sources, shard: Callable[[torch.nn.Module], None]
) -> None:
    """Shard the meta `model` (`shard`: `fully_shard`, then each rank's shards allocated with `to_empty`),
    then fill every shard: checkpoint tensors for the meta parameters, the values held before sharding
    for everything real (LoRA adapters; buffers absent from the checkpoint). Rank 0 reads the checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    named = model.state_dict(keep_vars=True)
    plan = {name: sources[id(t)] for name, t in named.items() if id(t) in sources}
    real = {name: t.detach() for name, t in named.items() if not t.is_meta and name not in plan}
    unknown = [name for name, t in named.items() if t.is_meta and name not in plan]
    if unknown:  # added after the checkpoint was planned, and never given a value
        raise RuntimeError(
            f"{len(unknown)} parameters on the meta device have no value (first: {unknown[0]})"
        )
    buffers = [
        (module, name, buf)
        for module in model.modules()
        for name, buf in module._buffers.items()
        if buf is not None
    ]
    shard(model)
    for module, name, buf in buffers:  # to_empty left them uninitialised
        module._buffers[name] = buf.to(module._buffers[name].device)
    state: dict[str, torch.Tensor] = {}
    if dist.get_rank() == 0:
        with contextlib.ExitStack() as files:
            opened = {
                file: files.enter_context(safe_open(str(file), framework="pt"))
                for file in {file for file, _ in plan.values()}
            }
            state = {name: opened[file].get_tensor(key) for name, (file, key) in plan.items()}
        state.update(real)
    set_model_state_dict(
        model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    log.info("FSDP2: %d checkpoint tensors loaded into the shards", len(plan))
