"""The Accelerate loop: the same code under single process, DDP, ZeRO-2/3 and FSDP2.

It knows the objective interface, never which objective runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from rlalign.config import Recipe, RecipeError, dump_recipe, recipe_to_dict
from rlalign.data import build_data
from rlalign.data.preference import PreferenceCollator
from rlalign.models.builder import BUILTIN_TINY, ReferenceModel, build_policy, load_reference
from rlalign.objectives import build_objective, is_rollout
from rlalign.runtime import Runtime, StepOutcome
from rlalign.tracking import make_tracker, wandb_mode
from rlalign.trainer.checkpoint import Checkpointer, TrainState, data_order
from rlalign.trainer.data import budget_groups, split_to, step_loader
from rlalign.trainer.evaluation import evaluate_sharded, nll_measure, objective_measure
from rlalign.utils.io import atomic_write_text
from rlalign.utils.memory import PeakMemory
from rlalign.utils.tensors import to_device

log = logging.getLogger(__name__)


class Preemption:
    """SIGTERM (a preempted job) asks the loop to checkpoint and exit cleanly at the next step."""

    def __init__(self) -> None:
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
        self.requested = True

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._old)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.LambdaLR:
    o, total = recipe.optim, recipe.trainer.max_steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        if o.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        if o.scheduler == "linear":
            return 1.0 - 0.9 * progress
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class StepContext:
    """What every update of a run shares: the prepared model and optimizer, the objective, the reference."""

    model: Any
    objective: Any
    optimizer: Any
    scheduler: Any
    runtime: Runtime
    reference: Any = None
    max_grad_norm: float = 1.0
    on_nonfinite: str = "stop"


def optimizer_update(
    ctx: StepContext, window: list[dict], *, step: int = 0, step_scheduler: bool = True
) -> dict:
    """One optimizer step over `window` (this rank's micro-batches); metrics are global means.
    `step` (1-based) names the update when its loss or gradient norm is non-finite. The learning-rate
    schedule counts loop steps: a rollout step's several updates advance it once (`step_scheduler` on
    the last). `grad_norm` and `lr` are always reported (NaN norm when no micro-batch synchronised)."""
    runtime, objective = ctx.runtime, ctx.objective
    runtime.begin_update(len(window))
    counts = torch.tensor([sum(objective.count_items(b) for b in window)], dtype=torch.float64)
    items_per_micro = float(runtime.all_reduce(counts)) / (len(window) * runtime.world_size)
    sums: dict[str, float] = {}
    tokens = padded = samples = skipped = 0
    loss_finite = True
    grad_norm, lr = float("nan"), ctx.scheduler.get_last_lr()[0]
    for batch in window:
        batch = to_device(batch, runtime.device)
        with runtime.accumulate(ctx.model):
            loss, metrics = objective.loss(
                ctx.model, batch, items_per_micro=items_per_micro, reference=ctx.reference
            )
            loss_finite = loss_finite and bool(torch.isfinite(loss.detach()).all())
            runtime.backward(loss)
            if runtime.sync_gradients:
                lr = ctx.scheduler.get_last_lr()[0]
                outcome = runtime.step(ctx.model, ctx.optimizer, ctx.max_grad_norm, loss_finite)
                if not outcome.finite:
                    drop_nonfinite(outcome, step, ctx.on_nonfinite)
                    skipped += 1
                grad_norm, loss_finite = outcome.grad_norm, True
                if step_scheduler:
                    ctx.scheduler.step()
                ctx.optimizer.zero_grad(set_to_none=True)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        tokens += int(batch["attention_mask"].sum())
        padded += batch["input_ids"].numel()
        samples += batch["input_ids"].shape[0]
    keys = sorted(sums)
    totals = runtime.all_reduce(
        torch.tensor([sums[k] for k in keys] + [tokens, padded, samples], dtype=torch.float64)
    )
    out = {k: float(totals[i]) / (len(window) * runtime.world_size) for i, k in enumerate(keys)}
    out.update(grad_norm=grad_norm, lr=lr, tokens=float(totals[-3]), samples=float(totals[-1]))
    # share of the batch's token slots that are padding (all ranks): what a token budget would save
    out["padding_share"] = 1.0 - float(totals[-3]) / max(float(totals[-2]), 1.0)
    if skipped:
        out["skipped_updates"] = float(skipped)
    return out


def budget_window(rows: list, collate, budget: int, runtime: Runtime) -> list[dict]:
    """A step's rows of this rank as micro-batches of at most `budget` padded tokens (`budget_groups`; a
    row's size is the token count of its collated rows), as many on every rank as the rank needing most."""
    lengths = [int(collate([row])["input_ids"].numel()) for row in rows]
    groups = budget_groups(lengths, budget)
    count = int(runtime.all_reduce(torch.tensor([float(len(groups))]), op="max").item())
    return [collate([rows[i] for i in g]) for g in split_to(groups, count)]


def drop_nonfinite(outcome: StepOutcome, step: int, on_nonfinite: str) -> None:
    """A non-finite loss or gradient norm: stop the run (a one-line error, nothing saved) or, under
    `skip_step`, log that the update was dropped. An update DeepSpeed applied anyway always stops."""
    what = f"step {step}: non-finite loss or gradient norm (grad norm {outcome.grad_norm:.4g})"
    if outcome.applied:
        raise RecipeError(f"{what}; the engine applied the update anyway, run stopped, nothing saved")
    if on_nonfinite == "stop":
        raise RecipeError(
            f"{what}; run stopped before the optimizer step, nothing saved "
            "(trainer.on_nonfinite=skip_step drops such updates)"
        )
    log.warning("%s; update dropped (trainer.on_nonfinite=skip_step)", what)


SUMMED = ("tokens", "samples", "skipped_updates")


def train_step(ctx: StepContext, window: list[dict], step: int) -> dict:
    """One loop step (`step` updates done before it). Supervised objectives: one optimizer update over
    `window`. Rollout objectives: `objective.rollout` (seeded by the step) turns `window` into a buffer of
    micro-batches, reused for `inner_epochs` passes of updates of `len(window)` micro-batches each; metrics
    are averaged over the updates."""
    objective = ctx.objective
    if not is_rollout(objective):
        return optimizer_update(ctx, window, step=step + 1)
    buffer, metrics = objective.rollout(
        ctx.model, window, step=step, runtime=ctx.runtime, reference=ctx.reference
    )
    accum = len(window)
    updates = [
        buffer[i : i + accum] for _ in range(objective.inner_epochs) for i in range(0, len(buffer), accum)
    ]
    results = [
        optimizer_update(ctx, u, step=step + 1, step_scheduler=i == len(updates) - 1)
        for i, u in enumerate(updates)
    ]
    for key in sorted({k for r in results for k in r}):
        total = sum(r.get(key, 0.0) for r in results)
        metrics[key] = total / (1 if key in SUMMED else len(results))
    return metrics


def validate(ctx: StepContext, data, t) -> dict[str, float]:
    """`val/loss` (reference-caption NLL) for caption data; the objective's own loss and metrics
    (rewards, accuracies) for preference data. One sharded path for both."""
    if data.val_metric == "loss":
        measure = nll_measure(ctx.model)
    else:
        measure = objective_measure(ctx.model, ctx.objective, ctx.reference)
    return evaluate_sharded(
        ctx.model, data.val, data.collate, ctx.runtime, t.eval_size, t.per_device_batch_size, measure
    )


def export_final(model, processor, runtime: Runtime, recipe: Recipe, out: Path) -> None:
    """A plain HF checkpoint (config + safetensors + processor) any `from_pretrained` loads."""
    from rlalign.trainer.checkpoint import save_tensors

    state = runtime.model_state(model)
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        bare = runtime.unwrap(model)
        if recipe.model.lora is not None:
            # one more copy of the model (base + adapters, loaded once), the trained state put in, the
            # adapters merged into the base weights: the plain model of the family, no PEFT wrapper
            with runtime.model_init():  # whole, on this rank alone (not ZeRO-3's collective init)
                peft_model, _ = build_policy(recipe.model, recipe.data)
            peft_model.load_state_dict(state)
            bare = peft_model.merge_and_unload()
            state = bare.state_dict()
        bare.config.save_pretrained(out)
        bare.generation_config.save_pretrained(out)
        save_tensors(state, out / "model.safetensors")
        processor.save_pretrained(out)
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
    runtime.barrier()


def write_pid(out: Path, rank: int) -> None:
    """`out/pids/rank-R.pid`: which processes run this rank, for operators and for the kill tests."""
    folder = out / "pids"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{rank}.pid").write_text(f"{os.getpid()}\n")


def build_models(recipe: Recipe, runtime: Runtime) -> tuple[torch.nn.Module, Any, ReferenceModel, dict]:
    """The policy, its processor and the reference, and what loading them cost: per model, the parameter
    bytes of the whole model and each rank's peak memory while it loaded (`utils.memory.PeakMemory`).
    Under ZeRO-3 a checkpoint loads partitioned (`Runtime.model_init`), under FSDP2 sharded from the meta
    device (`Runtime.shard_at_load`, `models.sharded_load`), and the `copy` reference is loaded again,
    partitioned, instead of copied."""
    m = recipe.model
    partitioned = runtime.partitions_at_load and m.name_or_path != BUILTIN_TINY

    def shard(frozen: bool):
        return runtime.shard_at_load(frozen=frozen) if partitioned else None

    with runtime.model_init(partitioned), PeakMemory(runtime.device) as policy_load:
        policy, processor = build_policy(m, recipe.data, shard(False))
    partitioned = partitioned and runtime.loaded_partitioned(policy)
    load = (lambda: load_reference(m, recipe.data, shard(True))) if partitioned else None
    with runtime.model_init(partitioned), PeakMemory(runtime.device) as reference_load:
        reference = ReferenceModel.build(recipe.model.reference, policy, runtime, load=load)
    loads = {"policy": (policy, policy_load)}
    if reference.model is not None:
        loads["reference"] = (reference.model, reference_load)
    loading = {"partitioned": partitioned}
    for name, (model, probe) in loads.items():
        peaks = runtime.all_gather_object(probe.added)
        loading[name] = {"parameter_bytes": runtime.parameter_bytes(model), "peak_bytes_per_rank": peaks}
    return policy, processor, reference, loading


def write_run_info(
    out: Path, runtime: Runtime, model: torch.nn.Module, collate: Any = None, loading: dict | None = None
) -> None:
    """What really runs (engine, wrapper class, share of parameters per rank): a silent fallback shows here;
    `loading` (from `build_models`) adds what loading the models cost."""
    fractions = torch.zeros(runtime.world_size, dtype=torch.float64)
    fractions[runtime.rank] = runtime.local_param_fraction(model)
    fractions = runtime.all_reduce(fractions)
    total, trainable = runtime.parameter_counts(model)
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        info = {
            "engine": runtime.engine,
            "world_size": runtime.world_size,
            "model_class": runtime.model_kind(model),
            "param_fraction_per_rank": fractions.tolist(),
            "parameters": total,
            "trainable_parameters": trainable,
            "device": str(runtime.device),
        }
        if loading is not None:
            info["loading"] = loading
        if isinstance(collate, PreferenceCollator):
            info["preference_rows"] = (
                "packed" if collate.packed else "unpacked (image encoded once per response)"
            )
        (out / "run_info.json").write_text(json.dumps(info, indent=1))


PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "B200": 2250.0,
}
"""Dense bf16 peak TFLOP/s by device name, for MFU (a device not listed reports no MFU)."""


def throughput(
    samples: float, tokens: float, elapsed: float, runtime: Runtime, n_params: int
) -> dict[str, float]:
    """Step throughput: samples/s and tokens/s (all ranks), tokens/s per device, peak memory of the busiest
    rank, and on a known GPU the model FLOPs utilisation (6 x parameters x tokens per device per second over
    the device's dense bf16 peak; attention FLOPs not counted)."""
    per_device = tokens / elapsed / runtime.world_size
    peak = float(
        runtime.all_reduce(torch.tensor([runtime.peak_memory_bytes()], dtype=torch.float64), op="max")
    )
    out = {
        "samples_per_s": samples / elapsed,
        "tokens_per_s": tokens / elapsed,
        "tokens_per_s_per_device": per_device,
        "step_time_s": elapsed,
        "memory/peak_gb": peak / 2**30,
    }
    name = runtime.device_name()
    peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if peak_tflops:
        out["mfu"] = 6 * n_params * per_device / (peak_tflops * 1e12)
    return out


def record_optimizer_state(out: Path, runtime: Runtime, optimizer: Any) -> None:
    """Add the optimizer state bytes each rank holds (known once the first step created it) to run_info.json."""
    per_rank = runtime.all_gather_object(runtime.optimizer_state_bytes(optimizer))
    if runtime.is_main:
        path = out / "run_info.json"
        info = json.loads(path.read_text())
        info["optimizer_state_bytes_per_rank"] = per_rank
        atomic_write_text(path, json.dumps(info, indent=1))


def train(recipe: Recipe) -> Path:
    """Run a recipe to its end (or to a SIGTERM); returns the output folder."""
    t = recipe.trainer
    out = Path(t.output_dir)
    runtime = Runtime.create(
        recipe.distributed,
        grad_accum_steps=t.grad_accum_steps,
        log_with="wandb" if wandb_mode(recipe.tracking) else None,
    )
    set_seed(t.seed)
    policy, processor, reference, loading = build_models(recipe, runtime)
    objective = build_objective(recipe, processor)
    data = build_data(objective.data_kind, recipe, processor, objective)
    train_set = data.train
    o = recipe.optim
    model, optimizer, scheduler = runtime.prepare(
        policy,
        lambda params: torch.optim.AdamW(
            params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        ),
        lambda optimizer: make_scheduler(optimizer, recipe),
        micro_batch_size=t.per_device_batch_size,
    )
    reference.attach(model)
    write_pid(out, runtime.rank)  # after model and data are built: a bad recipe or row leaves no run folder
    order = data_order(recipe, runtime.world_size, len(train_set))
    ckpt = Checkpointer(out, runtime, t.keep_last, recipe=recipe, order=order)
    ckpt.clean_partial()
    resume_from = ckpt.resolve(t.resume)
    state = TrainState(world_size=runtime.world_size, engine=runtime.engine)
    if resume_from is not None:
        state = ckpt.load(resume_from, model, optimizer, scheduler)
    tracker = make_tracker(recipe.tracking, out, runtime.accelerator, recipe_to_dict(recipe))
    tracker.truncate_after(state.step)
    write_run_info(out, runtime, model, data.collate, loading)
    if runtime.is_main:
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
        log.info(
            "engine %s, world size %d, %d train pairs", runtime.engine, runtime.world_size, len(train_set)
        )
    loader = step_loader(
        train_set,
        list if t.max_tokens_per_micro else data.collate,  # a token budget collates in `budget_window`
        micro=t.per_device_batch_size,
        world=runtime.world_size,
        rank=runtime.rank,
        accum=t.grad_accum_steps,
        seed=t.seed,
        start_step=state.step,
        end_step=t.max_steps,
        num_workers=t.num_workers,
    )
    if resume_from is not None:
        ckpt.restore_rng(resume_from)
    n_params = runtime.parameter_counts(model)[0]
    ctx = StepContext(
        model, objective, optimizer, scheduler, runtime, reference, recipe.optim.max_grad_norm, t.on_nonfinite
    )
    preemption = Preemption()
    batches = iter(loader)
    with Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} {task.fields[info]}"),
        TimeRemainingColumn(),
        disable=not runtime.is_main,
    ) as bar:
        task = bar.add_task("train", total=t.max_steps, completed=state.step, info="")
        while state.step < t.max_steps:
            started = time.perf_counter()
            if t.max_tokens_per_micro:
                rows = [row for _ in range(t.grad_accum_steps) for row in next(batches)]
                window = budget_window(rows, data.collate, t.max_tokens_per_micro, runtime)
            else:
                window = [next(batches) for _ in range(t.grad_accum_steps)]
            m = train_step(ctx, window, state.step)
            if t.max_tokens_per_micro:
                m["micro_batches"] = float(len(window))
            state.step += 1
            state.samples_seen += int(m["samples"])
            elapsed = time.perf_counter() - started
            m.update(throughput(m.pop("samples"), m.pop("tokens"), elapsed, runtime, n_params))
            last = state.step == t.max_steps
            if (t.eval_every and state.step % t.eval_every == 0) or last:
                m.update(validate(ctx, data, t))
            if state.step % t.log_every == 0 or last or "val/loss" in m:
                tracker.log(m, state.step)
            bar.update(task, completed=state.step, info=f"loss {m['loss']:.4f}")
            stop = runtime.any(preemption.requested)
            if (t.save_every and state.step % t.save_every == 0) or last or stop:
                ckpt.save(model, optimizer, scheduler, state)
            if stop:
                log.warning("stopped by SIGTERM at step %d; checkpoint written", state.step)
                break
    preemption.close()
    record_optimizer_state(out, runtime, optimizer)
    if state.step == t.max_steps and t.export_final:
        export_final(model, processor, runtime, recipe, out / "final")
    tracker.finish()
    runtime.close()
    return out
