"""`rlalign bench dpo`: our DPO training step against TRL's `DPOTrainer` on the same VLM, data and batch,
in the same run. Runs on CUDA when present, on the CPU otherwise.

One step = collate the batch (images processed) + policy and reference forwards + loss + backward +
AdamW step. TRL's step runs its own collator (`DataCollatorForVisionPreference`) and `compute_loss`
(concatenated chosen/rejected forward, the image encoded twice); ours packs chosen and rejected into
one row (image and prompt run once). Repetitions alternate ours / TRL; medians are reported. Ends
with one JSON line; `ratio` = our DPO samples/s / TRL's.

`--arch tiny` (default): the built-in tiny Llava, full fine-tuning, a frozen copy as reference; our
DPO and rDPO objectives called directly, TRL's `compute_loss`, each with a plain AdamW step.
`--arch qwen2-vl`: Qwen2-VL-7B's widths (`rlalign.bench.arch`) with `--layers` text layers (default 2 on a
CPU, 28 on a GPU) in bf16, saved to a temporary folder that both trainers load; both train the same LoRA
adapters, reference = adapter disabled. Ours runs our loop's `train_step` on the recipe
`recipes/test/tiny-dpo.yaml` pointed at the folder, TRL its `train()` (steps timed by a callback); ours is
built, run and freed before TRL's is built. Per trainer: samples (pairs)/s and tokens/s per device
(tokens = prompt with its image tokens + response, for the chosen and the rejected sequence of every pair,
counted the same way for both whatever their layout), peak memory of the timed steps
(`rlalign.bench.measure`) and, on a known GPU, MFU.

    rlalign bench dpo [--arch tiny|qwen2-vl] [--layers N] [--batch 8] [--steps 5] [--reps 3] [--image-size 48]
                      [--text-hidden 128]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rlalign.bench.arch import ARCHES, bench_checkpoint
from rlalign.bench.measure import bench_device, compared, summary
from rlalign.config.schema import DataConfig, TinyModelConfig
from rlalign.data.preference import PreferenceCollator, PreferencePairs, shapes_preferences
from rlalign.models.tiny import build_tiny_llava
from rlalign.objectives.dpo import DPOConfig, DPOObjective
from rlalign.objectives.rdpo import RDPOConfig, RDPOObjective
from rlalign.shapes import ShapesConfig
from rlalign.utils.memory import PeakMemory
from rlalign.utils.tensors import to_device


class _Ref:
    def __init__(self, model):
        self.model, self.mode, self.forward_calls = model, "copy", 0

    def modules(self):
        """The modules that run, as `ReferenceModel.modules` (packed rows read the model's attention kernel)."""
        return self.model.modules()

    def __call__(self, **inputs):
        with torch.no_grad():
            return self.model(**inputs)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def tiny(a: argparse.Namespace) -> dict:
    import datasets
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    datasets.disable_progress_bars()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = ShapesConfig(image_size=a.image_size)
    base, processor = build_tiny_llava(TinyModelConfig(text_hidden=a.text_hidden), shapes)
    table = shapes_preferences(shapes, "train", a.batch * a.steps)
    rows = PreferencePairs(table, processor, DataConfig(), retrieved=True)
    batches = [[rows[i] for i in range(s * a.batch, (s + 1) * a.batch)] for s in range(a.steps)]
    eos = processor.tokenizer.eos_token
    trl_batches = [
        [
            {
                "images": [r["image"]],
                "prompt": processor.image_token + r["prompt"],
                "chosen": r["chosen"] + eos,
                "rejected": r["rejected"] + eos,
            }
            for r in b
        ]
        for b in batches
    ]

    def ours(objective, retrieved):
        model, ref = copy.deepcopy(base).to(device).train(), _Ref(copy.deepcopy(base).to(device).eval())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        collate = PreferenceCollator(processor, 48, None, retrieved=retrieved)

        def step(b):
            batch = to_device(collate(b), device)
            loss, _ = objective.loss(model, batch, items_per_micro=len(b), reference=ref)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def trl():
        model = copy.deepcopy(base).to(device).train()
        cfg = TRLConfig(
            output_dir="/tmp/rlalign-bench-trl",
            beta=0.1,
            per_device_train_batch_size=a.batch,
            report_to=[],
            use_cpu=device.type == "cpu",
            max_length=None,
            bf16=False,
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=copy.deepcopy(base).to(device).eval(),
            args=cfg,
            processing_class=processor,
            train_dataset=datasets.Dataset.from_list(trl_batches[0]),
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def step(b):
            inputs = to_device(trainer.data_collator([dict(r) for r in b]), device)
            trainer.compute_loss(trainer.model, inputs).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    runners = {
        "dpo": ours(DPOObjective(DPOConfig(beta=0.1)), False),
        "rdpo": ours(RDPOObjective(RDPOConfig(beta=0.1)), True),
        "trl": trl(),
    }
    src = {"dpo": batches, "rdpo": batches, "trl": trl_batches}
    times: dict[str, list[float]] = {k: [] for k in runners}
    peaks: dict[str, float | None] = {}
    for name, step in runners.items():  # warm-up
        step(src[name][0])
    for _ in range(a.reps):
        for name, step in runners.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            for b in src[name]:
                step(b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - started)
            peaks[name] = _peak_mb(device)
    sps = {k: a.batch * a.steps / statistics.median(v) for k, v in times.items()}
    print(f"{'':6} {'samples/s':>10} {'peak MB':>9}", file=sys.stderr)
    for k in runners:
        print(f"{k:6} {sps[k]:10.1f} {peaks[k] or float('nan'):9.1f}", file=sys.stderr)
    result = {
        "bench": "dpo",
        "peer": "trl",
        "ratio": round(sps["dpo"] / sps["trl"], 3),
        "rdpo_ratio": round(sps["rdpo"] / sps["trl"], 3),
        "ours_samples_per_s": round(sps["dpo"], 2),
        "rdpo_samples_per_s": round(sps["rdpo"], 2),
        "peer_samples_per_s": round(sps["trl"], 2),
        "peak_mem_mb": peaks["dpo"],
        "rdpo_peak_mem_mb": peaks["rdpo"],
        "peer_peak_mem_mb": peaks["trl"],
        "batch": a.batch,
        "steps": a.steps,
        "reps": a.reps,
        "device": device.type,
    }
    print(json.dumps(result))
    return result


DEFAULTS = {
    "tiny": dict(batch=8, steps=5, reps=3, image_size=48),
    ("qwen2-vl", "cpu"): dict(batch=2, steps=2, reps=3, image_size=112, layers=2, vision_layers=2),
    ("qwen2-vl", "cuda"): dict(batch=4, steps=5, reps=3, image_size=448, layers=28, vision_layers=32),
}
"""Per arch (and device). The real architecture on a CPU: 2 pairs of 16-token images a step, 2 timed steps per
repetition (1.5-3 minutes for `--reps 3` on 2 cores); on a GPU: full depth, 448-pixel images (256 image
tokens)."""


def parse(args: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlalign bench dpo")
    p.add_argument("--arch", choices=ARCHES, default="tiny")
    p.add_argument("--layers", type=int, default=None, help="text layers of a real arch (CPU 2, GPU 28)")
    p.add_argument(
        "--vision-layers", type=int, default=None, help="vision blocks of a real arch (CPU 2, GPU 32)"
    )
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="real arch weights")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None, help="pixels (real arch: 112 = 16 image tokens)")
    p.add_argument("--text-hidden", type=int, default=128, help="tiny arch only")
    p.add_argument("--test-dims", action="store_true", help=argparse.SUPPRESS)  # toy widths, for tests
    a = p.parse_args(args)
    defaults = DEFAULTS["tiny" if a.arch == "tiny" else (a.arch, bench_device().type)]
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    return a


def run(args: list[str] | None) -> dict:
    a = parse(args)
    return tiny(a) if a.arch == "tiny" else real(a)


def _recipe(a: argparse.Namespace):
    from rlalign.bench.arch import lora_overrides
    from rlalign.recipe import load_recipe

    overrides = [
        f"trainer.output_dir={tempfile.mkdtemp()}",
        f"trainer.per_device_batch_size={a.batch}",
        f"data.train_size={a.batch * (a.steps + 1)}",
        "optim.lr=1e-5",
        "objective.dpo.beta=0.1",
    ]
    return load_recipe(
        "recipes/test/tiny-dpo.yaml", overrides + lora_overrides(a.checkpoint, a.dtype, a.image_size)
    )


def real(a: argparse.Namespace) -> dict:
    """Ours against TRL on the real-architecture checkpoint (see the module docstring)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import datasets

    from rlalign.config.schema import DistributedConfig
    from rlalign.data import build_data
    from rlalign.data.collate import prompt_text
    from rlalign.models.families import load_processor
    from rlalign.objectives import build_objective
    from rlalign.runtime import Runtime

    datasets.disable_progress_bars()
    device = bench_device()
    runtime = Runtime.create(
        DistributedConfig()
    )  # once: TRL's trainer reuses the process-wide accelerate state
    o, q = [], []
    with tempfile.TemporaryDirectory(prefix="rlalign-bench-dpo-") as folder:
        a.checkpoint = bench_checkpoint(a, Path(folder))
        recipe = _recipe(a)
        processor = load_processor(str(a.checkpoint))
        objective = build_objective(recipe, processor)
        data = build_data(objective.data_kind, recipe, processor, objective)
        rows = [data.train[i] for i in range(a.batch * (a.steps + 1))]
        eos = processor.tokenizer.eos_token
        trl_rows = [
            {
                "images": [r["image"]],
                "prompt": prompt_text(processor, r["prompt"]),
                "chosen": r["chosen"] + eos,
                "rejected": r["rejected"] + eos,
            }
            for r in rows
        ]
        # sequence tokens of a pair: prompt (image tokens included) + response, for chosen and rejected
        tokens = [
            sum(
                len(processor(text=[r["prompt"] + r[k]], images=r["images"])["input_ids"][0])
                for k in ("chosen", "rejected")
            )
            for r in trl_rows
        ]
        timed = sum(tokens[a.batch :])
        for _ in range(a.reps):
            o.append(ours(a, runtime, recipe, data, timed))
            q.append(peer(a, device, processor, trl_rows, timed))
    n_params = o[0]["params"]
    rows_out = {"rlalign dpo": summary(o, n_params, device), "trl DPOTrainer": summary(q, n_params, device)}
    table(rows_out)
    mine, theirs = rows_out.values()
    result = {
        "bench": "dpo",
        "peer": "trl",
        "arch": a.arch,
        **compared(mine, theirs, digits=3),
        "device": device.type,
        "layers": a.layers,
        "vision_layers": a.vision_layers,
        "dtype": a.dtype,
        "image_size": a.image_size,
        "batch": a.batch,
        "steps": a.steps,
        "reps": a.reps,
        "params": n_params,
        "tokens_per_pair": round(timed / (a.batch * a.steps), 1),
    }
    print(json.dumps(result))
    return result


def ours(a: argparse.Namespace, runtime, recipe, data, tokens: int) -> dict:
    """Our loop's `train_step` on `a.steps` batches after a warm-up one (rows read and collated in the step)."""
    from rlalign.models.builder import ReferenceModel, build_policy
    from rlalign.objectives import build_objective
    from rlalign.trainer.loop import StepContext, make_scheduler, train_step

    policy, processor = build_policy(recipe.model, recipe.data)
    objective = build_objective(recipe, processor)
    reference = ReferenceModel.build(recipe.model.reference, policy, runtime)
    model, opt, sched = runtime.prepare(
        policy,
        lambda params: torch.optim.AdamW(params, lr=recipe.optim.lr),
        lambda optimizer: make_scheduler(optimizer, recipe),
        micro_batch_size=a.batch,
    )
    reference.attach(model)
    ctx = StepContext(model, objective, opt, sched, runtime, reference, max_grad_norm=1.0)
    probe = PeakMemory(runtime.device, interval=0.01)
    started = 0.0
    for step in range(a.steps + 1):
        if step == 1:
            probe.start()
            started = time.perf_counter()
        window = [data.collate([data.train[i] for i in range(step * a.batch, (step + 1) * a.batch)])]
        train_step(ctx, window, step)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    elapsed = time.perf_counter() - started
    result = {
        "samples_per_s": a.batch * a.steps / elapsed,
        "tokens_per_s": tokens / elapsed,
        "peak_bytes": probe.stop(),
        "peak_rss": probe.peak_rss,
        "params": runtime.parameter_counts(model)[0],
    }
    del ctx, model, opt, sched, reference, policy, objective
    runtime.accelerator.free_memory()
    gc.collect()
    return result


def peer(a: argparse.Namespace, device: torch.device, processor, rows: list[dict], tokens: int) -> dict:
    """TRL's `DPOTrainer.train()` on the same rows in the same order (sequential sampler), steps after the
    first timed by a callback."""
    import datasets
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from rlalign.bench.arch import peft_lora
    from rlalign.models.builder import DTYPES

    probe = PeakMemory(device, interval=0.01)

    class Clock(TrainerCallback):
        stamps: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.stamps.append(time.perf_counter())
            if len(self.stamps) == 1:  # the warm-up step is done
                probe.start()

    clock = Clock()
    cfg = TRLConfig(
        output_dir=tempfile.mkdtemp(),
        beta=0.1,
        per_device_train_batch_size=a.batch,
        max_steps=a.steps + 1,
        learning_rate=1e-5,
        train_sampling_strategy="sequential",
        report_to=[],
        logging_steps=1000,
        save_strategy="no",
        use_cpu=device.type == "cpu",
        bf16=False,  # bf16 weights, no autocast, as ours
        max_length=None,
        padding_free=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        model_init_kwargs={"dtype": DTYPES[a.dtype]},
    )
    trainer = DPOTrainer(
        model=str(a.checkpoint),
        args=cfg,
        processing_class=processor,
        train_dataset=datasets.Dataset.from_list(rows),
        peft_config=peft_lora(),
        callbacks=[clock],
    )
    trainer.remove_callback(PrinterCallback)  # its end-of-training print of the log
    trainer.train()
    elapsed = clock.stamps[-1] - clock.stamps[0]
    result = {
        "samples_per_s": a.batch * a.steps / elapsed,
        "tokens_per_s": tokens / elapsed,
        "peak_bytes": probe.stop(),
        "peak_rss": probe.peak_rss,
    }
    trainer.accelerator.free_memory()
    del trainer
    gc.collect()
    return result


def table(rows: dict[str, dict]) -> None:
    print(f"{'trainer':<16}{'pairs/s':>9}{'tokens/s/dev':>14}{'peak MiB':>10}{'MFU':>7}   pairs/s per run")
    for name, r in rows.items():
        share = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        runs = ", ".join(f"{x:.3f}" for x in r["runs"])
        print(
            f"{name:<16}{r['samples_per_s']:>9.3f}{r['tokens_per_s']:>14.1f}{r['peak_bytes'] / 2**20:>10.0f}"
            f"{share:>7}   {runs}"
        )


if __name__ == "__main__":
    run(sys.argv[1:])
