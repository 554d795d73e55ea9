"""`rlalign bench grpo`: our GRPO step against TRL's `GRPOTrainer`, same VLM, same work, same run.

Both train the same model (random weights, the same for both) on shapes images with the same group
size G, images per step, completion length, beta 0.04, eps 0.2 and 2 updates per rollout (ours:
inner_epochs 2; TRL: num_iterations 2 with its generation batch = one step), CIDEr-D reward from the
same cached scorer. A step = rollout + reference + update; samples = images x G. Steps after the first
(warm-up) are timed; the two trainers alternate `--reps` times and medians are reported. Ends with one
JSON line. Runs on CUDA when present, on the CPU otherwise.

`--arch tiny` (default): the built-in tiny Llava, full fine-tuning, a frozen copy as reference.
`--arch qwen2-vl`: Qwen2-VL-7B's widths (`rlalign.bench.arch`) with `--layers` text layers (default 2 on
a CPU, 28 on a GPU) in bf16, saved to a temporary folder that both trainers load; both train the same
LoRA adapters, reference = adapter disabled; ours is built, run and freed before TRL's is built.

Per trainer: samples/s and tokens/s per device (tokens = prompt with its image tokens + completion of
every sample, counted the same way for both), peak memory of the timed steps (`rlalign.bench.measure`)
and, on a known GPU, MFU (6 x parameters x trained tokens/s: each sample is trained on twice).

    rlalign bench grpo [--arch tiny|qwen2-vl] [--layers N] [--images 8] [--group 5] [--steps 4]
                       [--max-new-tokens 24] [--reps 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rlalign.bench.arch import ARCHES, bench_checkpoint
from rlalign.bench.measure import bench_device, compared
from rlalign.bench.measure import summary as measured
from rlalign.utils.memory import PeakMemory

CHAT = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
)
UPDATES = 2
"""Updates per rollout on both sides (inner_epochs / num_iterations)."""
DEFAULTS = {
    "tiny": dict(images=8, group=5, steps=4, max_new_tokens=24, reps=2, image_size=48),
    ("qwen2-vl", "cpu"): dict(
        images=1, group=2, steps=1, max_new_tokens=8, reps=3, image_size=112, layers=2, vision_layers=2
    ),
    ("qwen2-vl", "cuda"): dict(
        images=4, group=4, steps=3, max_new_tokens=64, reps=3, image_size=448, layers=28, vision_layers=32
    ),
}
"""Per arch (and device). The real architecture on a CPU: one image of 16 tokens, G = 2, one timed step per
repetition, so `--reps 3` ends within 10 minutes on 2 cores; on a GPU: full depth, 448-pixel images (256
image tokens), 16 samples a step (no gradient checkpointing on either side)."""


def _recipe(a: argparse.Namespace, out: str):
    from rlalign.bench.arch import lora_overrides
    from rlalign.recipe import load_recipe

    overrides = [
        f"trainer.output_dir={out}",
        f"trainer.per_device_batch_size={a.images}",
        f"objective.grpo.group_size={a.group}",
        f"objective.rollout.max_new_tokens={a.max_new_tokens}",
        f"objective.grpo.inner_epochs={UPDATES}",
        "optim.lr=1e-5",
        "data.train_size=256",
    ]
    if a.arch == "tiny":
        overrides += ["model.tiny.vision_hidden=64", "model.tiny.text_hidden=128"]
    else:
        overrides += lora_overrides(a.checkpoint, a.dtype, a.image_size)
    return load_recipe("recipes/test/tiny-grpo.yaml", overrides)


def _model(recipe, arch: str):
    from rlalign.models.builder import build_policy

    model, processor = build_policy(recipe.model, recipe.data)
    if arch == "tiny":  # the checkpoints of real families bring their own chat template
        processor.chat_template = processor.tokenizer.chat_template = CHAT
    return model, processor


def ours(a: argparse.Namespace, runtime) -> dict:
    from rlalign.data import build_data
    from rlalign.models.builder import ReferenceModel
    from rlalign.objectives import build_objective
    from rlalign.trainer.loop import StepContext, make_scheduler, train_step

    recipe = _recipe(a, tempfile.mkdtemp())
    policy, processor = _model(recipe, a.arch)
    objective = build_objective(recipe, processor)
    reference = ReferenceModel.build(recipe.model.reference, policy, runtime)
    data = build_data(objective.data_kind, recipe, processor)
    model, opt, sched = runtime.prepare(
        policy,
        lambda params: torch.optim.AdamW(params, lr=recipe.optim.lr),
        lambda optimizer: make_scheduler(optimizer, recipe),
        micro_batch_size=a.images,
    )
    reference.attach(model)
    ctx = StepContext(model, objective, opt, sched, runtime, reference, max_grad_norm=1.0)
    probe = PeakMemory(runtime.device, interval=0.01)
    times, lengths, tokens = [], [], []
    for step in range(a.steps + 1):
        window = [
            data.collate([data.train[(step * a.images + i) % len(data.train)] for i in range(a.images)])
        ]
        if step == 1:
            probe.start()
        t0 = time.perf_counter()
        m = train_step(ctx, window, step)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        times.append(time.perf_counter() - t0)
        lengths.append(m["gen_length_mean"])
        prompts = float(window[0]["attention_mask"].sum())
        tokens.append(a.group * prompts + a.images * a.group * m["gen_length_mean"])
    peak = probe.stop()
    result = {
        "samples_per_s": a.images * a.group / statistics.mean(times[1:]),
        "tokens_per_s": sum(tokens[1:]) / sum(times[1:]),
        "length": statistics.mean(lengths),
        "peak_bytes": peak,
        "peak_rss": probe.peak_rss,
        "params": runtime.parameter_counts(model)[0],
    }
    del ctx, model, opt, sched, reference, policy, objective, data
    runtime.accelerator.free_memory()
    gc.collect()
    return result


def peer(a: argparse.Namespace, device: torch.device) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlalign.bench.arch import peft_lora
    from rlalign.data.captions import load_split
    from rlalign.models.builder import DTYPES
    from rlalign.models.families import load_processor
    from rlalign.rewards import CiderReward

    recipe = _recipe(a, tempfile.mkdtemp())
    if a.arch == "tiny":
        model, processor = _model(recipe, a.arch)
        path = tempfile.mkdtemp()  # TRL builds its reference model from a path
        model.save_pretrained(path)
        processor.save_pretrained(path)
        del model
        dtype, peft_config = torch.float32, None
    else:
        path, processor = str(a.checkpoint), load_processor(str(a.checkpoint))
        dtype, peft_config = DTYPES[a.dtype], peft_lora()
    train = load_split(recipe.data, "train")
    cider = CiderReward(dict(zip(train["image_id"], train["captions"])))
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ""}]}]
    ds = Dataset.from_dict(
        {"prompt": [prompt] * len(train), "image": train["image"], "image_id": train["image_id"]}
    )

    def reward(completions, image_id, **kw):
        return cider([str(c) for c in completions], image_id).tolist()

    probe = PeakMemory(device, interval=0.01)

    class Clock(TrainerCallback):
        stamps: list[float] = []
        seen: list[int] = []

        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.stamps.append(time.perf_counter())
            self.seen.append(state.num_input_tokens_seen)
            if len(self.stamps) == UPDATES:  # the warm-up step's updates are done
                probe.start()

    clock = Clock()
    extra = {} if a.arch == "tiny" else {"bf16": False}  # bf16 weights, no autocast, as ours
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        use_cpu=device.type == "cpu",
        report_to=[],
        logging_steps=1000,
        save_strategy="no",
        per_device_train_batch_size=a.images * a.group,
        num_generations=a.group,
        steps_per_generation=1,
        num_iterations=UPDATES,
        max_completion_length=a.max_new_tokens,
        beta=0.04,
        epsilon=0.2,
        learning_rate=1e-5,
        max_steps=UPDATES * (a.steps + 1),
        gradient_checkpointing=False,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        model_init_kwargs={"dtype": dtype},
        **extra,
    )
    trainer = GRPOTrainer(
        model=path,
        reward_funcs=reward,
        args=args,
        train_dataset=ds,
        processing_class=processor,
        callbacks=[clock],
        peft_config=peft_config,
    )
    trainer.remove_callback(PrinterCallback)  # its end-of-training print of the log
    trainer.train()
    peak = probe.stop()
    # one of our steps (rollout + 2 updates) = two TRL optimizer steps (num_iterations 2); skip the first pair
    span = clock.stamps[-1] - clock.stamps[UPDATES - 1]
    result = {
        "samples_per_s": a.images * a.group * a.steps / span,
        "tokens_per_s": (clock.seen[-1] - clock.seen[UPDATES - 1]) / span,
        "length": float(trainer.state.log_history[-1]["completions/mean_length"]),
        "peak_bytes": peak,
        "peak_rss": probe.peak_rss,
    }
    trainer.accelerator.free_memory()
    del trainer
    gc.collect()
    return result


def parse(args: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlalign bench grpo")
    p.add_argument("--arch", choices=ARCHES, default="tiny")
    p.add_argument("--layers", type=int, default=None, help="text layers of a real arch (CPU 2, GPU 28)")
    p.add_argument(
        "--vision-layers", type=int, default=None, help="vision blocks of a real arch (CPU 2, GPU 32)"
    )
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="real arch weights")
    p.add_argument("--image-size", type=int, default=None, help="real arch: pixels (112 = 16 image tokens)")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--group", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--test-dims", action="store_true", help=argparse.SUPPRESS)  # toy widths, for tests
    a = p.parse_args(args)
    device = bench_device()
    defaults = DEFAULTS["tiny" if a.arch == "tiny" else (a.arch, device.type)]
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    return a


def table(rows: dict[str, dict], device: torch.device) -> None:
    print(
        f"{'trainer':<18}{'samples/s':>11}{'tokens/s/dev':>14}{'peak MiB':>10}{'MFU':>7}"
        f"{'length':>8}   samples/s per run"
    )
    for name, r in rows.items():
        share = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
        runs = ", ".join(f"{x:.2f}" for x in r["runs"])
        print(
            f"{name:<18}{r['samples_per_s']:>11.2f}{r['tokens_per_s']:>14.1f}{r['peak_bytes'] / 2**20:>10.0f}"
            f"{share:>7}{r['length']:>8.1f}   {runs}"
        )


def summary(reps: list[dict], n_params: int, device: torch.device) -> dict:
    """`measure.summary` (each sample is trained on UPDATES times) and the mean completion length."""
    out = measured(reps, n_params, device, trained_per_token=UPDATES)
    out["length"] = statistics.mean(r["length"] for r in reps)
    return out


def run(args: list[str] | None) -> dict:
    a = parse(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from rlalign.config.schema import DistributedConfig
    from rlalign.runtime import Runtime

    device = bench_device()
    runtime = Runtime.create(
        DistributedConfig()
    )  # once: TRL's trainer reuses the process-wide accelerate state
    with tempfile.TemporaryDirectory(prefix="rlalign-bench-grpo-") as folder:
        if a.arch != "tiny":
            a.checkpoint = bench_checkpoint(a, Path(folder))
        o, q = [], []
        for _ in range(a.reps):
            o.append(ours(a, runtime))
            q.append(peer(a, device))
    n_params = o[0]["params"]
    rows = {"rlalign grpo": summary(o, n_params, device), "trl GRPOTrainer": summary(q, n_params, device)}
    table(rows, device)
    mine, theirs = rows.values()
    result = {
        "bench": "grpo",
        "peer": "trl",
        "arch": a.arch,
        **compared(mine, theirs, digits=2),
        "device": device.type,
        "images": a.images,
        "group": a.group,
        "max_new_tokens": a.max_new_tokens,
        "steps": a.steps,
        "reps": a.reps,
        "params": n_params,
        "ours_mean_length": round(mine["length"], 2),
        "peer_mean_length": round(theirs["length"], 2),
    }
    if a.arch != "tiny":
        result.update(layers=a.layers, vision_layers=a.vision_layers, dtype=a.dtype, image_size=a.image_size)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(None)
