"""`rlalign bench grpo`: our GRPO step against TRL's `GRPOTrainer`, same tiny VLM, same work, same run.

Both train the built-in tiny Llava (random weights, the same for both) on shapes images with the
same group size G, images per step, completion length, beta 0.04, eps 0.2 and 2 updates per
rollout (ours: inner_epochs 2; TRL: num_iterations 2 with its generation batch = one step), CIDEr-D
reward from the same cached scorer. A step = rollout + reference + update; samples = images x G.
Steps after the first (warm-up) are timed; the two trainers alternate `--reps` times and medians
are reported. Ends with one JSON line.

    rlalign bench grpo [--images 8] [--group 5] [--steps 4] [--max-new-tokens 24] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time

import torch

CHAT = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
)


def _recipe(a: argparse.Namespace, out: str):
    from rlalign.recipe import load_recipe

    return load_recipe(
        "recipes/test/tiny-grpo.yaml",
        [
            f"trainer.output_dir={out}",
            f"trainer.per_device_batch_size={a.images}",
            f"objective.grpo.group_size={a.group}",
            f"objective.rollout.max_new_tokens={a.max_new_tokens}",
            "objective.grpo.inner_epochs=2",
            "optim.lr=1e-5",
            "data.train_size=256",
            "model.tiny.vision_hidden=64",
            "model.tiny.text_hidden=128",
        ],
    )


def _model(recipe):
    from rlalign.models.builder import build_policy

    model, processor = build_policy(recipe.model, recipe.data)
    processor.chat_template = processor.tokenizer.chat_template = CHAT
    return model, processor


def ours(a: argparse.Namespace, runtime) -> tuple[float, float]:
    from rlalign.data import build_data
    from rlalign.models.builder import ReferenceModel
    from rlalign.objectives import build_objective
    from rlalign.trainer.loop import StepContext, make_scheduler, train_step

    recipe = _recipe(a, tempfile.mkdtemp())
    model, processor = _model(recipe)
    objective = build_objective(recipe, processor)
    reference = ReferenceModel.build("copy", model, runtime)
    data = build_data(objective.data_kind, recipe, processor)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.optim.lr)
    sched = make_scheduler(opt, recipe)
    ctx = StepContext(model, objective, opt, sched, runtime, reference, max_grad_norm=1.0)
    times, lengths = [], []
    for step in range(a.steps + 1):
        window = [
            data.collate([data.train[(step * a.images + i) % len(data.train)] for i in range(a.images)])
        ]
        t0 = time.perf_counter()
        m = train_step(ctx, window, step)
        times.append(time.perf_counter() - t0)
        lengths.append(m["gen_length_mean"])
    return a.images * a.group / statistics.mean(times[1:]), statistics.mean(lengths)


def peer(a: argparse.Namespace) -> tuple[float, float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlalign.data.captions import load_split
    from rlalign.rewards import CiderReward

    recipe = _recipe(a, tempfile.mkdtemp())
    model, processor = _model(recipe)
    train = load_split(recipe.data, "train")
    cider = CiderReward(dict(zip(train["image_id"], train["captions"])))
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ""}]}]
    ds = Dataset.from_dict(
        {"prompt": [prompt] * len(train), "image": train["image"], "image_id": train["image_id"]}
    )

    def reward(completions, image_id, **kw):
        return cider([str(c) for c in completions], image_id).tolist()

    class Clock(TrainerCallback):
        stamps: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.stamps.append(time.perf_counter())

    clock = Clock()
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        report_to=[],
        logging_steps=1000,
        save_strategy="no",
        per_device_train_batch_size=a.images * a.group,
        num_generations=a.group,
        steps_per_generation=1,
        num_iterations=2,
        max_completion_length=a.max_new_tokens,
        beta=0.04,
        epsilon=0.2,
        learning_rate=1e-5,
        max_steps=2 * (a.steps + 1),
        gradient_checkpointing=False,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32},
    )
    path = tempfile.mkdtemp()  # TRL builds its reference model from a path
    model.save_pretrained(path)
    processor.save_pretrained(path)
    trainer = GRPOTrainer(
        model=path,
        reward_funcs=reward,
        args=args,
        train_dataset=ds,
        processing_class=processor,
        callbacks=[clock],
    )
    trainer.train()
    # one of our steps (rollout + 2 updates) = two TRL optimizer steps (num_iterations 2); skip the first pair
    span = clock.stamps[-1] - clock.stamps[1]
    length = float(trainer.state.log_history[-1]["completions/mean_length"])
    return a.images * a.group * a.steps / span, length


def run(args: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="rlalign bench grpo")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--group", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from rlalign.config.schema import DistributedConfig
    from rlalign.runtime import Runtime

    runtime = Runtime.create(
        DistributedConfig()
    )  # once: TRL's trainer reuses the process-wide accelerate state
    o, q = [], []
    for _ in range(a.reps):
        o.append(ours(a, runtime))
        q.append(peer(a))
    ours_sps, peer_sps = statistics.median(x[0] for x in o), statistics.median(x[0] for x in q)
    ours_len, peer_len = statistics.mean(x[1] for x in o), statistics.mean(x[1] for x in q)
    print(f"{'trainer':<22}{'samples/s (median)':>20}{'mean length':>14}   runs")
    print(f"{'rlalign grpo':<22}{ours_sps:>20.1f}{ours_len:>14.1f}   {', '.join(f'{x[0]:.1f}' for x in o)}")
    print(
        f"{'trl GRPOTrainer':<22}{peer_sps:>20.1f}{peer_len:>14.1f}   {', '.join(f'{x[0]:.1f}' for x in q)}"
    )
    result = {
        "bench": "grpo",
        "peer": "trl",
        "ratio": round(ours_sps / peer_sps, 3),
        "ours_samples_per_s": round(ours_sps, 2),
        "peer_samples_per_s": round(peer_sps, 2),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "images": a.images,
        "group": a.group,
        "max_new_tokens": a.max_new_tokens,
        "ours_mean_length": round(ours_len, 2),
        "peer_mean_length": round(peer_len, 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(None)
