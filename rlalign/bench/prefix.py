"""`rlalign bench prefix`: the GRPO update with shared-prefix rows against unpacked rows, same run.

COCO-like shapes: a Llava with 576 image tokens per image (96-pixel images, 4-pixel patches), a prompt of
~600 tokens, G completions of 16 tokens each, B images per micro-batch. Unpacked, each of the B*G rows is
prompt + completion (image inputs repeated G times, as TRL and the plain rollout do); shared-prefix,
each of the B rows is [prompt | c1 | ... | cG] (`rlalign.rollout.shared_prefix`). Both score the same
completions with the same GRPO loss (random old / reference log-probs and advantages). Timed per layout:
the update (loss forward + backward) and the no-grad log-prob forward of the old-policy / reference
passes; the layouts alternate `--reps` times and medians are reported, with the loss difference
between them. Ends with one JSON line (`ratio`: unpacked / shared-prefix update time).

    rlalign bench prefix [--images 2] [--group 5] [--completion 16] [--text-hidden 256] [--text-layers 4]
                         [--reps 3] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

PROMPT = "describe the image in one short sentence, naming every shape and its colour"


def _setup(a: argparse.Namespace, device: str):
    from rlalign.data.captions import load_split
    from rlalign.data.collate import encode_prompts
    from rlalign.models.builder import build_policy
    from rlalign.recipe import load_recipe
    from rlalign.rollout.engine import _sequences
    from rlalign.rollout.shared_prefix import pack_groups

    recipe = load_recipe(
        "recipes/test/tiny-grpo.yaml",
        [
            "data.image_size=96",
            "data.train_size=64",
            "model.tiny.patch_size=4",
            f"model.tiny.text_hidden={a.text_hidden}",
            f"model.tiny.text_layers={a.text_layers}",
            f"model.tiny.heads={a.heads}",
        ],
    )
    model, processor = build_policy(recipe.model, recipe.data)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = model.to(device, dtype).train()

    split = load_split(recipe.data, "train")
    batch = dict(encode_prompts(processor, list(split["image"][: a.images]), [PROMPT] * a.images))
    batch = {k: v.to(device, dtype) if torch.is_floating_point(v) else v.to(device) for k, v in batch.items()}
    g = torch.Generator().manual_seed(0)
    N = a.images * a.group
    vocab = processor.tokenizer.vocab_size
    comp = torch.randint(5, vocab, (N, a.completion), generator=g).to(device)
    mask = torch.ones_like(comp)
    extra = {
        "advantages": torch.randn(N, generator=g).to(device),
        "old_logp": -torch.rand(N, a.completion, generator=g).to(device) - 4,
        "ref_logp": -torch.rand(N, a.completion, generator=g).to(device) - 4,
    }
    unpacked = {**_sequences(batch, comp, mask, a.group), **extra}
    packed = {**pack_groups(model, batch, comp, mask, a.group), **extra}
    return model, batch, unpacked, packed


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _update(model, mb) -> tuple[float, float]:
    from rlalign.objectives.grpo import grpo_token_loss
    from rlalign.ops import reduce_loss
    from rlalign.rollout.engine import completion_logprobs

    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    logp, _ = completion_logprobs(model, mb)
    per_token, _ = grpo_token_loss(logp, mb["old_logp"], mb["ref_logp"], mb["advantages"], 0.2, 0.04)
    loss = reduce_loss(per_token, mb["completion_mask"], "token") / float(mb["completion_mask"].sum())
    loss.backward()
    _sync(str(logp.device.type))
    return time.perf_counter() - started, float(loss.detach())


def _scoring(model, mb) -> float:
    from rlalign.rollout.engine import no_grad_logprobs

    started = time.perf_counter()
    no_grad_logprobs(model, mb)
    _sync(next(model.parameters()).device.type)
    return time.perf_counter() - started


def run(argv: list[str] | None) -> dict:
    p = argparse.ArgumentParser(prog="rlalign bench prefix")
    p.add_argument("--images", type=int, default=2, help="images (groups) per micro-batch")
    p.add_argument("--group", type=int, default=5)
    p.add_argument("--completion", type=int, default=16, help="tokens per completion")
    p.add_argument("--text-hidden", type=int, default=256)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    a = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    torch.manual_seed(0)
    model, batch, unpacked, packed = _setup(a, device)
    layouts = {"unpacked": unpacked, "shared_prefix": packed}
    times: dict[str, dict[str, list[float]]] = {k: {"update": [], "score": []} for k in layouts}
    losses: dict[str, float] = {}
    for mb in layouts.values():  # warm-up, not timed
        _update(model, mb)
        _scoring(model, mb)
    for _ in range(a.reps):
        for name, mb in layouts.items():
            t, losses[name] = _update(model, mb)
            times[name]["update"].append(t)
            times[name]["score"].append(_scoring(model, mb))
    med = {k: {p: statistics.median(v) for p, v in t.items()} for k, t in times.items()}
    tokens = {k: int(mb["input_ids"].numel()) for k, mb in layouts.items()}
    image_tokens = int((batch["input_ids"][0] == model.config.image_token_id).sum())
    prompt_len = int(batch["input_ids"].shape[1])
    print(
        f"GRPO update at {image_tokens} image tokens, prompt {prompt_len} tokens, G = {a.group}, "
        f"{a.completion}-token completions, {a.images} images per micro-batch ({device}, medians of {a.reps})"
    )
    print(f"{'layout':<16}{'rows':>6}{'tokens':>9}{'update s':>11}{'score s':>10}   update runs")
    for name, mb in layouts.items():
        runs = ", ".join(f"{x:.3f}" for x in times[name]["update"])
        print(
            f"{name:<16}{mb['input_ids'].shape[0]:>6}{tokens[name]:>9}{med[name]['update']:>11.3f}"
            f"{med[name]['score']:>10.3f}   {runs}"
        )
    ratio = med["unpacked"]["update"] / med["shared_prefix"]["update"]
    result = {
        "bench": "prefix",
        "peer": "unpacked rows",
        "ratio": round(ratio, 3),
        "score_ratio": round(med["unpacked"]["score"] / med["shared_prefix"]["score"], 3),
        "device": device,
        "image_tokens": image_tokens,
        "prompt_tokens": prompt_len,
        "completion_tokens": a.completion,
        "group": a.group,
        "images": a.images,
        "tokens_unpacked": tokens["unpacked"],
        "tokens_shared_prefix": tokens["shared_prefix"],
        "update_s_unpacked": round(med["unpacked"]["update"], 4),
        "update_s_shared_prefix": round(med["shared_prefix"]["update"], 4),
        "loss_abs_diff": abs(losses["unpacked"] - losses["shared_prefix"]),
        "reps": a.reps,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(None)
