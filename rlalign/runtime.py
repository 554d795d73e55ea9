"""One place for rank logic and sharding: DDP, DeepSpeed ZeRO-2/3 and FSDP2 behind one object.

The backend is what `accelerate launch` set up (its config file in `launch/`) unless the recipe
names one. Three departures from a plain `Accelerator()`, each because the plain path silently
falls back on CPU (see NOTES-ENV): DDP on CPU needs `cpu=True`; DeepSpeed on CPU needs a gloo
process group (not `cpu=True`, which drops DeepSpeed); FSDP2 is applied here with torch's
`fully_shard` on every backend, because accelerate's FSDP plugin leaves the model unwrapped over
gloo. The trainer and objectives only see `Runtime`; ZeRO-3 / FSDP2 full-parameter access hides
behind `full_parameters()`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from rlalign.config.schema import DistributedConfig

log = logging.getLogger(__name__)

SHARDED_DIR = "sharded"
"""Checkpoint subfolder of a sharded (torch.distributed.checkpoint) model + optimizer state."""
_FSDP_ENV = [k for k in os.environ if k.startswith("FSDP_")] + ["ACCELERATE_USE_FSDP"]


def detect_backend(cfg: DistributedConfig) -> str:
    """`single`, `ddp`, `deepspeed` or `fsdp2`, from the recipe or the launcher's environment."""
    if cfg.backend != "auto":
        return cfg.backend
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp2"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


GLOO_SETTLE_S = 0.5
"""How long a gloo rank's exit leaves its collective threads to finish (`_settle_gloo_at_exit`)."""
_settle_registered = False


def _settle_gloo_at_exit() -> None:
    """Under a gloo process group, give the group's worker threads the GIL for a moment when the interpreter
    starts to exit (atexit runs while it is still whole). A worker frees a finished collective's tensors
    right after the collective, and freeing a tensor that Python made needs the GIL: if the last collective
    ended just before the script did, the worker asked for the GIL during interpreter teardown and the
    process aborted ('terminate called without an active exception', 1 run in 8 of a 2-process script whose
    last line followed an all-reduce). `rlalign` commands exit through `os._exit` instead
    (`rlalign.cli._leave_worker`); this covers scripts that use `Runtime` themselves."""
    global _settle_registered
    import torch.distributed as dist

    if _settle_registered or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() != "gloo" or dist.get_world_size() == 1:
        return
    import atexit
    import time

    atexit.register(time.sleep, GLOO_SETTLE_S)
    _settle_registered = True


@dataclass(frozen=True)
class StepOutcome:
    grad_norm: float
    finite: bool
    """The loss on every rank and the gradient norm were finite."""
    applied: bool
    """The optimizer update happened."""


@dataclass(frozen=True)
class ParamShard:
    name: str
    shape: tuple[int, ...]
    local: torch.Tensor
    replicated: bool


@dataclass
class Runtime:
    accelerator: Accelerator
    backend: str
    """`single`, `ddp`, `deepspeed` or `fsdp2` (what was asked for)."""
    cfg: DistributedConfig
    grad_accum_steps: int
    param_gathers: int = 0
    """Times `full_parameters` gathered sharded parameters (ZeRO-3 / FSDP2), for tests and metrics."""
    _ds_skipped: int = 0
    """DeepSpeed's skipped-step count before the engine's last step (to tell whether it refused the update)."""

    @classmethod
    def create(
        cls, cfg: DistributedConfig, *, grad_accum_steps: int = 1, log_with: str | None = None
    ) -> Runtime:
        backend = detect_backend(cfg)
        cuda = torch.cuda.is_available()
        kwargs: dict[str, Any] = {
            "gradient_accumulation_steps": grad_accum_steps,
            "mixed_precision": cfg.mixed_precision,
            "log_with": log_with,
        }
        if backend == "deepspeed":
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            if not cuda:
                import deepspeed.ops

                # The shared-memory comm op would be compiled on first CPU use (~45 s); gloo does the job.
                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
                kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:
            for key in _FSDP_ENV:  # FSDP2 is applied by `prepare`, not by accelerate's plugin
                os.environ.pop(key, None)
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
            kwargs["cpu"] = not cuda
            kwargs["kwargs_handlers"] = [
                DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)
            ]
        accelerator = Accelerator(**kwargs)
        if backend == "ddp" and accelerator.num_processes == 1:
            backend = "single"
        _settle_gloo_at_exit()
        return cls(accelerator=accelerator, backend=backend, cfg=cfg, grad_accum_steps=grad_accum_steps)

    @classmethod
    def for_tools(cls) -> Runtime:
        """Ranks and collectives for work that trains nothing (pair building, embedding, evaluation): plain
        data parallelism over whatever `accelerate launch` / torchrun started, one process otherwise."""
        return cls.create(DistributedConfig(backend="ddp"))

    # -- who am I -------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def zero_stage(self) -> int:
        if self.backend != "deepspeed":
            return 0
        return int(
            self.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get(
                "stage", 0
            )
        )

    @property
    def engine(self) -> str:
        """What really runs: single, ddp, zero1/2/3 or fsdp2."""
        return f"zero{self.zero_stage}" if self.backend == "deepspeed" else self.backend

    # -- preparing ------------------------------------------------------------------------------
    @property
    def partitions_at_load(self) -> bool:
        """Whether checkpoints load partitioned (ZeRO-3 inside `model_init`, FSDP2 through `shard_at_load`):
        each rank holds only its share of the weights from the first moment, never the whole model."""
        return (self.backend == "deepspeed" and self.zero_stage == 3) or self.backend == "fsdp2"

    def shard_at_load(self, *, frozen: bool) -> Callable[[torch.nn.Module], None] | None:
        """FSDP2: what shards a model built on the meta device (as `prepare`, or `prepare_frozen` when
        `frozen`, would shard it) and allocates this rank's shards, for `models.sharded_load` to fill;
        None on the other backends."""
        if self.backend != "fsdp2":
            return None

        def shard(model: torch.nn.Module) -> None:
            self._shard(model, frozen=frozen)
            model.to_empty(device=self.device)

        return shard

    def loaded_partitioned(self, model: torch.nn.Module) -> bool:
        """Whether `model`, loaded with `partitions_at_load`, really is: under FSDP2 a checkpoint that
        cannot be filled shard by shard is loaded whole (with a warning) and sharded in `prepare`."""
        from torch.distributed.fsdp import FSDPModule

        return self.backend != "fsdp2" or isinstance(model, FSDPModule)

    def _shard(self, model: torch.nn.Module, *, frozen: bool) -> None:
        """FSDP2's `fully_shard`, once: a model sharded at load is left as it is."""
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            return
        reshard = True if frozen else self.cfg.fsdp_reshard_after_forward
        shard_fsdp2(
            model, self.world_size, self.device, reshard=reshard, mixed_precision=self.cfg.mixed_precision
        )

    @contextlib.contextmanager
    def model_init(self, partitioned: bool = False) -> Iterator[None]:
        """Where models are built. `partitioned` under ZeRO-3: `from_pretrained` runs inside
        `deepspeed.zero.Init` (transformers' own ZeRO-3 path): parameters are partitioned as they are
        created, then filled module by module from the checkpoint, which rank 0 reads memory-mapped,
        each module gathered only while it is filled. Otherwise models are built whole on every rank:
        transformers' ZeRO-3 init of random weights differs from the plain one, so the built-in model's
        weights would depend on the engine; `deepspeed.initialize` partitions it later."""
        if self.backend != "deepspeed":
            yield
            return
        if partitioned and self.zero_stage == 3:
            self.accelerator.state.deepspeed_plugin.set_deepspeed_weakref()
            yield
            return
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            self.accelerator.state.deepspeed_plugin.set_deepspeed_weakref()

    def prepare(
        self,
        model: torch.nn.Module,
        make_optimizer: Callable[[list], torch.optim.Optimizer],
        make_scheduler: Callable[[torch.optim.Optimizer], Any],
        *,
        micro_batch_size: int,
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
        """Shard the model, then build the optimizer over the parameters that really train
        (FSDP2 replaces parameters with DTensors) and the scheduler over the bare optimizer."""
        if self.backend == "fsdp2":
            self._shard(model, frozen=False)
            optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
            return model, optimizer, make_scheduler(optimizer)
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        scheduler = make_scheduler(optimizer)
        if self.backend == "deepspeed":
            ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = micro_batch_size
            ds["train_batch_size"] = micro_batch_size * self.world_size * self.grad_accum_steps
            ds["gradient_accumulation_steps"] = self.grad_accum_steps
        model, optimizer = self.accelerator.prepare(model, optimizer)
        return model, optimizer, scheduler

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen model (the reference) sharded like the policy, in eval mode."""
        model.requires_grad_(False).eval()
        if self.backend == "fsdp2":
            self._shard(model, frozen=True)
            return model
        if self.backend == "deepspeed" and self.zero_stage == 3:
            import deepspeed

            ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
            config = {
                # built before the policy is prepared, when the launch file's value may still be "auto"
                "train_micro_batch_size_per_gpu": ds["train_micro_batch_size_per_gpu"]
                if isinstance(ds["train_micro_batch_size_per_gpu"], int)
                else 1,
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                "bf16": ds.get("bf16", {"enabled": False}),
                "fp16": ds.get("fp16", {"enabled": False}),
            }
            engine, *_ = deepspeed.initialize(model=model, config=config)
            engine.eval()
            return engine
        return model.to(self.device)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model) if self.backend != "fsdp2" else model

    # -- steps ----------------------------------------------------------------------------------
    def accumulate(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        return self.accelerator.accumulate(model)

    def begin_update(self, micro_batches: int) -> None:
        """The next optimizer update accumulates `micro_batches` micro-batches (the same on every rank): the
        gradients synchronise, and the loss is divided by that count, on its last. Token-budget steps vary
        it; DeepSpeed fixed it at `prepare`."""
        if self.backend == "deepspeed":
            if micro_batches != self.grad_accum_steps:
                raise ValueError(
                    f"DeepSpeed accumulates {self.grad_accum_steps} micro-batches per update, got {micro_batches}"
                )
            return
        self.accelerator.gradient_accumulation_steps = micro_batches
        self.accelerator.step = 0

    @property
    def sync_gradients(self) -> bool:
        return self.accelerator.sync_gradients

    def backward(self, loss: torch.Tensor) -> None:
        """Backward; under DeepSpeed also the engine's step on the last micro-batch (see `step`)."""
        if self.backend == "deepspeed" and self.sync_gradients:
            self._ds_skipped = self.accelerator.deepspeed_engine_wrapped.engine.skipped_steps
        self.accelerator.backward(loss)

    def step(self, model: torch.nn.Module, optimizer: Any, max_norm: float, loss_finite: bool) -> StepOutcome:
        """Clip and apply the update unless the loss on some rank or the global gradient norm is non-finite;
        then no optimizer step is taken (the caller zeroes the gradients). Every rank gets the same verdict.

        A gradient overflow under fp16 loss scaling is the scaler's business (it skips the step and lowers
        the scale), so there only the loss counts. Under DeepSpeed the engine stepped inside `backward`;
        its own check refuses non-finite gradients (fp32, fp16, ZeRO-3; bf16 ZeRO-1/2 only with
        `check_grad_overflow`), and its skipped-step count tells whether it applied the update."""
        if self.backend == "deepspeed":
            raw = model.get_global_grad_norm()
            norm = float(raw) if raw is not None else float("nan")
            scaled = model.fp16_enabled()
        else:
            norm = self.clip_grad_norm(model, max_norm)
            scaled = self.accelerator.scaler is not None
        ok = loss_finite and (scaled or math.isfinite(norm))
        finite = not self.any(not ok)
        if self.backend == "deepspeed":
            return StepOutcome(norm, finite, applied=model.skipped_steps == self._ds_skipped)
        if finite:
            optimizer.step()
        return StepOutcome(norm, finite, applied=finite)

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float:
        """Clip and return the global gradient norm (DeepSpeed clips inside its step)."""
        if self.backend == "deepspeed":
            norm = model.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        params = [p for p in model.parameters() if p.grad is not None]
        if self.backend == "fsdp2":
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if max_norm > 0:
            return float(self.accelerator.clip_grad_norm_(params, max_norm))
        return float(torch.nn.utils.clip_grad_norm_(params, float("inf")))

    @contextlib.contextmanager
    def full_parameters(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Every parameter whole on every rank for the duration (ZeRO-3 gather / FSDP2 unshard), once."""
        if self.backend == "deepspeed" and self.zero_stage == 3:
            import deepspeed

            self.param_gathers += 1
            # hooks detached: else every sub-module forward (every generated token) gathers again
            with (
                deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None),
                _zero3_hooks_detached(model),
            ):
                yield model
        elif self.backend == "fsdp2":
            from torch.distributed.fsdp import FSDPModule

            self.param_gathers += 1
            # the root must initialise first: generate() may call a sharded child (the vision tower) directly
            model._get_fsdp_state()._lazy_init()
            modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
            for m in modules:
                m.unshard()
                m.set_reshard_after_forward(False)  # else each forward inside frees the gathered weights
            try:
                yield model
            finally:
                for m in modules:
                    m.set_reshard_after_forward(self.cfg.fsdp_reshard_after_forward)
                    m.reshard()
        else:
            yield model

    # -- checkpoint state ----------------------------------------------------------------------
    def model_state(self, model: torch.nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The full (unsharded) model state dict on the main process; other ranks may get an empty dict.
        `trainable_only`: the parameters that train (LoRA adapters), not the frozen base. A collective under
        ZeRO-3 and FSDP2: every rank calls it."""
        if self.backend == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        elif self.backend == "deepspeed" and self.zero_stage == 3 and trainable_only:
            import deepspeed

            # only the adapters are gathered, never the frozen base
            named = [
                (n.removeprefix("module."), p)
                for n, p in self.unwrap(model).named_parameters()
                if p.requires_grad
            ]
            with deepspeed.zero.GatheredParameters([p for _, p in named]):
                return {n: p.detach().cpu().clone() for n, p in named} if self.is_main else {}
        elif self.backend == "deepspeed":
            state = self.accelerator.get_state_dict(model) or {}  # None on the other ranks under ZeRO-3
        else:
            state = self.unwrap(model).state_dict() if self.is_main else {}
        if trainable_only:
            keep = self.trainable_names(model)
            state = {k: v for k, v in state.items() if k in keep}
        return state

    def trainable_names(self, model: torch.nn.Module) -> set[str]:
        """State-dict names of the parameters that train."""
        return {
            n.removeprefix("module.") for n, p in self.unwrap(model).named_parameters() if p.requires_grad
        }

    def frozen_fingerprint(self, model: torch.nn.Module) -> dict[str, Any]:
        """Count and digest of the frozen parameters (names, shapes, float64 sums over ranks): the same under any
        sharding, different for other base weights. A collective."""
        import hashlib

        trainable = self.trainable_names(model)
        names, sums = self.parameter_sums(model, skip=lambda name: name in trainable)
        digest = hashlib.sha256("\n".join(names).encode())
        digest.update(" ".join(f"{v:.9g}" for v in sums.flatten().tolist()).encode())
        frozen = sum(math.prod(s.shape) for s in self.local_shards(model) if s.name not in trainable)
        return {"parameters": frozen, "fingerprint": digest.hexdigest()[:16]}

    def save_optimizer(
        self, model: torch.nn.Module, optimizer: Any, folder: Path, *, trainable_only: bool = False
    ) -> None:
        """The optimizer's state into `folder` (DeepSpeed: its engine checkpoint under `deepspeed/`, which
        holds the module too; otherwise `optimizer.pt`, full, from the main process). Every rank calls it."""
        if self.backend == "deepspeed":
            model.save_checkpoint(
                str(folder / "deepspeed"), tag="state", exclude_frozen_parameters=trainable_only
            )
            return
        if self.backend == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_optimizer_state_dict(model, optimizer, options=opts)
        else:
            state = optimizer.state_dict()
        if self.is_main:
            torch.save(state, folder / "optimizer.pt")

    @property
    def sharded_checkpoints(self) -> bool:
        """Checkpoints are written by every rank as shards (`save_sharded`), the model never gathered."""
        return self.backend == "fsdp2" and self.cfg.fsdp_checkpoint == "sharded"

    def save_sharded(
        self, model: torch.nn.Module, optimizer: Any, folder: Path, *, trainable_only: bool = False
    ) -> None:
        """Model and optimizer state into `folder` with torch.distributed.checkpoint: each rank writes the
        shards it holds (`__<rank>_0.distcp`) and rank 0 the metadata; nothing is gathered. Every rank calls it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        if trainable_only:
            keep = self.trainable_names(model)
            model_sd = {k: v for k, v in model_sd.items() if k in keep}
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder))

    def _load_sharded(
        self, model: torch.nn.Module, optimizer: Any, folder: Path, *, trainable_only: bool
    ) -> None:
        """The counterpart of `save_sharded`, resharded onto this run's ranks (any number, any sharding but
        DeepSpeed's)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)  # initialises the optimizer state to fill
        if trainable_only:
            keep = self.trainable_names(model)
            model_sd = {k: v for k, v in model_sd.items() if k in keep}
        dcp.load({"model": model_sd}, checkpoint_id=str(folder))  # every weight must be there
        # parameters that never got a gradient (e.g. an unused final norm) have no saved AdamW state: theirs
        # stays as initialised, and AdamW skips them as before
        dcp.load(
            {"optimizer": optim_sd},
            checkpoint_id=str(folder),
            planner=dcp.DefaultLoadPlanner(allow_partial_load=True),
        )
        set_state_dict(
            model,
            optimizer,
            model_state_dict=model_sd,
            optim_state_dict=optim_sd,
            options=StateDictOptions(strict=not trainable_only),
        )

    def load_training_state(
        self, model: torch.nn.Module, optimizer: Any, folder: Path, *, trainable_only: bool = False
    ) -> None:
        """Model and optimizer state back from a checkpoint folder written by `model_state` (saved as
        `model.safetensors`) and `save_optimizer`, onto this run's sharding. `trainable_only`: the folder holds
        the trainable parameters only (the frozen base is this run's own); every one of them must be there."""
        if self.backend == "deepspeed":
            model.load_checkpoint(
                str(folder / "deepspeed"), tag="state", load_module_strict=not trainable_only
            )
            return
        if (folder / SHARDED_DIR).is_dir():
            self._load_sharded(model, optimizer, folder / SHARDED_DIR, trainable_only=trainable_only)
            return
        from safetensors.torch import load_file

        model_sd = load_file(str(folder / "model.safetensors"))
        optim_sd = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
        if trainable_only and set(model_sd) != self.trainable_names(model):
            differ = sorted(set(model_sd) ^ self.trainable_names(model))[:3]
            raise ValueError(
                f"{folder}: adapter weights do not match this model's trainable parameters ({differ})"
            )
        if self.backend == "fsdp2":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, strict=not trainable_only)
            set_model_state_dict(model, model_sd, options=opts)
            # parameters that never got a gradient (e.g. an unused final norm) have no AdamW state
            opts = StateDictOptions(full_state_dict=True, strict=False)
            set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
        else:
            self.unwrap(model).load_state_dict(model_sd, strict=not trainable_only)
            optimizer.load_state_dict(optim_sd)

    def close(self) -> None:
        """End of a run: every rank meets. NCCL groups are then destroyed (as PyTorch asks). Gloo groups are
        left alone: the CLI ends a launched rank with `os._exit` (`rlalign.cli._leave_worker`), and
        destroying one deadlocked a rank (its destructor joins a gloo worker thread that waits for the GIL
        to free a finished collective's tensors, while the joining thread holds the GIL) or aborted it at
        interpreter teardown."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            self.barrier()
            if dist.get_backend() == "nccl":
                dist.destroy_process_group()

    # -- collectives ----------------------------------------------------------------------------
    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max) over ranks in float64, on CPU (gloo) and GPU (NCCL) alike; the result is on the CPU."""
        if self.world_size == 1:
            return values.to("cpu", torch.float64)
        t = values.to(self.device, torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.to("cpu", torch.float64)

    def any(self, flag: bool) -> bool:
        return bool(self.all_reduce(torch.tensor([float(flag)]), op="max").item() > 0)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (so that all ranks decide on the same input)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def local_shards(self, model: torch.nn.Module) -> Iterator[ParamShard]:
        """Every parameter as this rank holds it: its name (wrapper prefixes removed), its full shape, the
        local piece (a ZeRO-3 partition, an FSDP2 DTensor's local shard, or the whole tensor) and whether
        every rank holds the same whole tensor."""
        for name, p in model.named_parameters():
            name = name.removeprefix("module.")
            if hasattr(p, "ds_tensor"):
                yield ParamShard(name, tuple(p.ds_shape), p.ds_tensor, replicated=False)
            elif hasattr(p, "to_local"):
                yield ParamShard(name, tuple(p.shape), p.to_local(), replicated=False)
            else:
                yield ParamShard(name, tuple(p.shape), p, replicated=True)

    def parameter_sums(
        self, model: torch.nn.Module, skip: Callable[[str], bool] = lambda name: False
    ) -> tuple[list[str], torch.Tensor]:
        """(`name:shape` per parameter, float64 [P, 2] sums of x and x^2 over all ranks): the same numbers
        under any number of ranks and any sharding (a replicated tensor counts once, from rank 0)."""
        names, stats = [], []
        for shard in self.local_shards(model):
            if skip(shard.name):
                continue
            names.append(f"{shard.name}:{shard.shape}")
            x = shard.local.detach().double().flatten()
            if shard.replicated and self.rank != 0:
                x = torch.zeros(0, dtype=torch.float64, device=x.device)
            stats.append(torch.stack([x.sum(), (x * x).sum()]).cpu())
        total = torch.stack(stats) if stats else torch.zeros(0, 2, dtype=torch.float64)
        return names, self.all_reduce(total)

    def parameter_counts(self, model: torch.nn.Module) -> tuple[int, int]:
        """(all parameters, trainable parameters) of the whole model, whatever the sharding."""
        total = trainable = 0
        for (_, p), shard in zip(model.named_parameters(), self.local_shards(model)):
            n = math.prod(shard.shape)
            total += n
            trainable += n if p.requires_grad else 0
        return total, trainable

    def parameter_bytes(self, model: torch.nn.Module) -> int:
        """Bytes of the whole model's parameters, whatever the sharding (what one rank would hold unsharded)."""
        return sum(math.prod(s.shape) * s.local.element_size() for s in self.local_shards(model))

    def peak_memory_bytes(self) -> int:
        """This rank's peak memory since start: CUDA's max allocated, or the process's peak resident set."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def optimizer_state_bytes(self, optimizer: Any) -> int:
        """Bytes of per-parameter optimizer state this rank holds (AdamW's moments; step counters excluded).
        Under DeepSpeed: the moments of its float32 partitions (its master copy is not counted)."""
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's and DeepSpeed's wrappers
        total = 0
        for state in inner.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    local = value.to_local() if hasattr(value, "to_local") else value
                    total += local.numel() * local.element_size()
        return total

    def local_param_fraction(self, model: torch.nn.Module) -> float:
        """Share of all parameter elements this rank holds (≈ 1/world under ZeRO-3 and FSDP2)."""
        held = total = 0
        for shard in self.local_shards(model):
            held, total = held + shard.local.numel(), total + math.prod(shard.shape)
        return held / max(total, 1)

    def model_kind(self, model: torch.nn.Module) -> str:
        """Class name of the wrapper the model really runs in (a silent fallback shows here)."""
        if self.backend == "fsdp2":
            from torch.distributed.fsdp import FSDPModule

            return "FSDPModule" if isinstance(model, FSDPModule) else type(model).__name__
        return type(model).__name__


@contextlib.contextmanager
def _zero3_hooks_detached(engine: Any) -> Iterator[None]:
    """Detach ZeRO-3's per-module fetch/release hooks while the parameters are gathered anyway, and
    register them again afterwards (with a fresh prefetch trace, since generation changed the order)."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params

    offload = engine.optimizer.parameter_offload
    for param in iter_params(offload.module, recurse=True):
        param.ds_active_sub_modules.clear()
    for hook in offload.forward_hooks + offload.backward_hooks:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        coordinator = offload.param_coordinator
        if not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()
        offload._register_deepspeed_module(offload.module)


def shard_fsdp2(
    model: torch.nn.Module, world_size: int, device: torch.device, *, reshard: bool, mixed_precision: str
) -> None:
    """`fully_shard` every transformer block named in `_no_split_modules`, then the root. A model on the
    meta device stays there (`Runtime.shard_at_load` allocates its shards afterwards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not any(p.is_meta for p in model.parameters()):
        model.to(device)
    mesh = init_device_mesh(device.type, (world_size,))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    mp = (
        MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        if dtype
        else MixedPrecisionPolicy()
    )
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    log.info("FSDP2: sharded %d blocks + root over %d ranks", len(blocks), world_size)
