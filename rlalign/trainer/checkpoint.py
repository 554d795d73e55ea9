"""Checkpoints that are complete or absent, and resume that continues the same run.

A checkpoint is written into `step-XXXXXXX.tmp` and renamed to `step-XXXXXXX` by the main process
only after every rank has finished writing and the `COMPLETE` marker is in place; a crash at any
moment leaves either the previous checkpoints or a `.tmp` folder that resume ignores and removes.

Contents: model weights (safetensors, full state dict), optimizer state (torch.save of tensors and
numbers, read back with `weights_only=True`; under DeepSpeed, DeepSpeed's own per-rank shards),
scheduler and trainer state (JSON), every rank's RNG states (JSON + safetensors) and the resolved
recipe. Resume restores all of it, and the data position is the step itself (the sampler is a
pure function of the step).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlalign.trainer.runtime import Runtime

log = logging.getLogger(__name__)

MARKER = "COMPLETE"


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    world_size: int = 1
    engine: str = "single"


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        if v.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    save_file(out, str(path))


def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    np_state = np.random.get_state()
    py = random.getstate()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return meta, tensors


def _set_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


class Checkpointer:
    def __init__(self, output_dir: str | Path, runtime: Runtime, keep_last: int):
        self.root = Path(output_dir) / "checkpoints"
        self.runtime = runtime
        self.keep_last = keep_last

    # -- finding --------------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [
            p
            for p in self.root.iterdir()
            if p.is_dir() and p.name.startswith("step-") and ".tmp" not in p.name
        ]
        return sorted((p for p in found if (p / MARKER).is_file()), key=lambda p: p.name)

    def resolve(self, resume: str) -> Path | None:
        """`none` -> None, `auto` -> latest complete checkpoint or None, else that path (must be complete)."""
        if resume == "none":
            return None
        if resume == "auto":
            done = self.complete()
            return done[-1] if done else None
        path = Path(resume)
        if not (path / MARKER).is_file():
            raise FileNotFoundError(f"trainer.resume: {path} is not a complete checkpoint (no {MARKER} file)")
        return path

    # -- saving ---------------------------------------------------------------------------------
    def save(
        self, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: TrainState, recipe_yaml: str
    ) -> Path:
        rt = self.runtime
        final = self.root / f"step-{state.step:07d}"
        tmp = self.root / f"step-{state.step:07d}.tmp"
        if rt.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        rt.barrier()
        model_sd = self.model_state(model)
        if rt.backend == "deepspeed":
            model.save_checkpoint(str(tmp / "deepspeed"), tag="state")
        else:
            optim_sd = self.optimizer_state(model, optimizer)
            if rt.is_main:
                torch.save(optim_sd, tmp / "optimizer.pt")
        meta, tensors = _rng_state()
        (tmp / "rng" / f"rank-{rt.rank}.json").write_text(json.dumps(meta))
        save_tensors(tensors, tmp / "rng" / f"rank-{rt.rank}.safetensors")
        if rt.is_main:
            save_tensors(model_sd, tmp / "model.safetensors")
            (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
            (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
            (tmp / "recipe.yaml").write_text(recipe_yaml)
        rt.barrier()
        if rt.is_main:
            (tmp / MARKER).write_text(json.dumps({"step": state.step, "world_size": rt.world_size}))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint saved: %s", final)
        rt.barrier()
        return final

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        rt = self.runtime
        if rt.backend == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        if rt.backend == "deepspeed":
            return rt.accelerator.get_state_dict(model)
        return rt.unwrap(model).state_dict() if rt.is_main else {}

    def optimizer_state(self, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
        if self.runtime.backend == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(model, optimizer, options=opts)
        return optimizer.state_dict()

    # -- loading --------------------------------------------------------------------------------
    def load(self, path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> TrainState:
        """Restore everything but the RNG (call `restore_rng` last, right before the loop)."""
        rt = self.runtime
        state = TrainState(**json.loads((path / "trainer_state.json").read_text()))
        if rt.backend == "deepspeed":
            model.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=True)
        else:
            model_sd = load_file(str(path / "model.safetensors"))
            optim_sd = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
            if rt.backend == "fsdp2":
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_model_state_dict,
                    set_optimizer_state_dict,
                )

                set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True))
                # parameters that never got a gradient (e.g. an unused final norm) have no AdamW state
                opts = StateDictOptions(full_state_dict=True, strict=False)
                set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
            else:
                rt.unwrap(model).load_state_dict(model_sd)
                optimizer.load_state_dict(optim_sd)
        scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
        log.info("resumed from %s at step %d", path, state.step)
        return state

    def restore_rng(self, path: Path) -> None:
        rank = self.runtime.rank
        meta_file = path / "rng" / f"rank-{rank}.json"
        if not meta_file.is_file():
            log.warning("no RNG state for rank %d in %s (world size changed?); RNG not restored", rank, path)
            return
        _set_rng_state(
            json.loads(meta_file.read_text()), load_file(str(path / "rng" / f"rank-{rank}.safetensors"))
        )

    def clean_partial(self) -> None:
        if self.runtime.is_main and self.root.is_dir():
            for p in self.root.glob("step-*.tmp"):
                shutil.rmtree(p, ignore_errors=True)
