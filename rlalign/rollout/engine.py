"""The one rollout path of `scst` and `grpo`: sample, score, estimate advantages, log-prob, buffer.

Per loop step: the policy's parameters are gathered once (`Runtime.full_parameters`: ZeRO-3
gather / FSDP2 unshard) for all generation and old-log-prob forwards of the window; the reference
then scores the same sequences. The buffer holds one micro-batch per rollout micro-batch (or
`minibatches` parts of it) with `input_ids` / `attention_mask` of prompt + completion, repeated
pixel inputs, `completion_mask`, `advantages`, and `old_logp` / `ref_logp` when asked for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from rlalign.config.schema import RolloutConfig
from rlalign.data.collate import TOKEN_ALIGNED
from rlalign.models.vision_inputs import repeat_rows, take_rows
from rlalign.ops import token_entropy, token_logprobs
from rlalign.rewards.combined import CombinedReward
from rlalign.rollout.sampling import completion_mask, greedy, row_seed, sample_groups
from rlalign.rollout.shared_prefix import pack_groups, packed_completion_logprobs, supports_shared_prefix
from rlalign.utils.tensors import model_inputs, to_device

BUFFER_KEYS = ("completion_mask", "advantages", "old_logp", "ref_logp")
"""Buffer tensors that are not model inputs."""


def reward_columns(batch: dict, times: int) -> dict[str, list]:
    """Every non-tensor column of the batch (one value per row: ids, references, ground truth, the rows'
    prompts, answers...), each value repeated `times` times, for the rewards."""
    rows = batch["input_ids"].shape[0]
    return {
        k: [v for v in values for _ in range(times)]
        for k, values in batch.items()
        if isinstance(values, list | tuple) and len(values) == rows
    }


def completion_logprobs(
    model: Any, batch: dict, *, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [N, L] (float32) of the completion tokens under `model` (temperature 1), and their entropy.
    Logits exist for the completion positions only (`logits_to_keep`): none for the prompt and image tokens.
    A packed micro-batch (one row per group, `rlalign.rollout.shared_prefix`) gives the same [N, L] layout."""
    if "segment_ids" in batch:
        return packed_completion_logprobs(model, batch, entropy=entropy, drop=BUFFER_KEYS)
    length = batch["completion_mask"].shape[1]
    logits = model(**model_inputs(batch, BUFFER_KEYS), logits_to_keep=length + 1).logits[:, :-1]
    logp = token_logprobs(logits, batch["input_ids"][:, -length:])
    ent = token_entropy(logits) if entropy else None
    return logp, ent


def no_grad_logprobs(model: Any, batch: dict) -> torch.Tensor:
    """Completion log-probs for the buffer (old policy, reference): computed under `inference_mode` (no
    autograd records, no version counters), returned as an ordinary tensor the update's graph can use."""
    with torch.inference_mode():
        logp = completion_logprobs(model, batch)[0]
    return logp.clone()


def _sequences(batch: dict, comp: torch.Tensor, mask: torch.Tensor, group: int) -> dict:
    """Prompt (repeated per sample) + completion, with every prompt-aligned input repeated alike (image
    inputs per image, whatever the family's layout: `rlalign.models.vision_inputs`)."""
    prompt_len = batch["input_ids"].shape[1]
    out: dict[str, Any] = {}
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    for key, value in repeat_rows(tensors, group).items():
        if key == "input_ids":
            value = torch.cat([value, comp], 1)
        elif key == "attention_mask":
            value = torch.cat([value, mask], 1)
        elif key in TOKEN_ALIGNED and value.shape[1] == prompt_len:
            value = torch.cat([value, torch.full_like(comp, TOKEN_ALIGNED[key])], 1)
        out[key] = value
    out["completion_mask"] = mask
    return out


def _split(batch: dict, parts: int) -> list[dict]:
    n = batch["input_ids"].shape[0]
    if n % parts:
        raise ValueError(f"{n} sequences per micro-batch do not split into {parts} minibatches")
    size = n // parts
    return [take_rows(batch, range(i * size, (i + 1) * size)) for i in range(parts)]


def _packed_parts(
    model: Any, batch: dict, comp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, group: int, parts: int
) -> list[dict]:
    """The micro-batch as `parts` packed micro-batches of whole groups (one row per image)."""
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    B = tensors["input_ids"].shape[0]
    if B % parts:
        raise ValueError(
            f"{B} images per micro-batch do not split into {parts} minibatches of whole groups "
            "(objective.rollout.shared_prefix: false splits sequences instead)"
        )
    size = B // parts
    out = []
    for i in range(parts):
        rows = slice(i * size * group, (i + 1) * size * group)
        prompts = take_rows(tensors, range(i * size, (i + 1) * size))
        mb = pack_groups(model, prompts, comp[rows], mask[rows], group)
        mb["advantages"] = adv[rows]
        out.append(mb)
    return out


class RolloutEngine:
    """Samples `group_size` completions per image (+ a greedy decode when asked) and builds the buffer."""

    def __init__(
        self,
        cfg: RolloutConfig,
        reward: CombinedReward,
        tokenizer: Any,
        seed: int,
        shared_prefix: bool = False,
    ):
        self.cfg, self.reward, self.tok, self.seed = cfg, reward, tokenizer, seed
        self.shared_prefix = shared_prefix
        """One packed row per group in the buffer (`rlalign.rollout.shared_prefix`)."""

    def __call__(
        self,
        model: Any,
        window: list[dict],
        *,
        runtime: Any,
        group_size: int,
        with_greedy: bool,
        advantage: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
        old_logp: bool,
        step: int,
        reference: Any = None,
        minibatches: int = 1,
    ) -> tuple[list[dict], dict[str, float]]:
        started, gathers = time.perf_counter(), runtime.param_gathers
        stats: dict[str, list] = {"reward": [], "adv": [], "length": [], "zero_std": []}
        parts: dict[str, list] = {}
        buffer = []
        bare = runtime.unwrap(model)
        with runtime.full_parameters(model):
            was_training = bare.training
            bare.eval()
            for raw in window:
                batch = to_device(raw, runtime.device)
                seeds = [
                    row_seed(self.seed, step, iid, g) for iid in batch["image_ids"] for g in range(group_size)
                ]
                comp = sample_groups(bare, batch, seeds, group_size, self.cfg, self.tok)
                mask = completion_mask(comp, self.tok.eos_token_id)
                texts = [
                    t.strip()
                    for t in self.tok.batch_decode(
                        comp * mask + self.tok.pad_token_id * (1 - mask), skip_special_tokens=True
                    )
                ]
                cols = reward_columns(batch, group_size)
                cols["completion_ids"] = [ids[m.bool()].tolist() for ids, m in zip(comp, mask)]
                total, terms = self.reward(texts, cols.pop("image_ids"), **cols)
                base = None
                if with_greedy:
                    g_ids = greedy(bare, batch, self.cfg, self.tok)
                    g_texts = [t.strip() for t in self.tok.batch_decode(g_ids, skip_special_tokens=True)]
                    g_cols = reward_columns(batch, 1)
                    base = torch.from_numpy(self.reward(g_texts, g_cols.pop("image_ids"), **g_cols)[0])
                    stats.setdefault("greedy_reward", []).append(base.numpy())
                rewards = torch.from_numpy(total)
                adv = advantage(rewards, base)
                adv_dev = adv.to(runtime.device, torch.float32)
                if self.shared_prefix:
                    micro = _packed_parts(bare, batch, comp, mask, adv_dev, group_size, minibatches)
                else:
                    seqs = _sequences(batch, comp, mask, group_size)
                    seqs["advantages"] = adv_dev
                    micro = _split(seqs, minibatches)
                if old_logp:
                    for mb in micro:
                        mb["old_logp"] = no_grad_logprobs(bare, mb)
                buffer += micro
                stats["reward"].append(total)
                stats["adv"].append(adv.numpy())
                stats["length"].append(mask.sum(1).double().numpy())
                r_BG = rewards.view(-1, group_size)
                stats["zero_std"].append((r_BG.max(1).values == r_BG.min(1).values).double().numpy())
                for name, value in terms.items():
                    parts.setdefault(name, []).append(value)
            bare.train(was_training)
        rollout_s = time.perf_counter() - started
        started = time.perf_counter()
        if reference is not None:
            for mb in buffer:
                mb["ref_logp"] = no_grad_logprobs(reference, mb)
        metrics = self._global_stats(runtime, stats, parts)
        metrics.update(
            {
                "time/rollout_s": rollout_s,
                "time/reference_s": time.perf_counter() - started,
                "rollout/param_gathers": float(runtime.param_gathers - gathers),
            }
        )
        return buffer, metrics

    @staticmethod
    def _global_stats(runtime: Any, stats: dict[str, list], parts: dict[str, list]) -> dict[str, float]:
        """Means and stds over every rank's samples (sums of x, x^2 and counts all-reduced)."""
        series = {f"reward/{k}": np.concatenate(v) for k, v in parts.items()}
        series.update(
            {
                "reward": np.concatenate(stats["reward"]),
                "advantage": np.concatenate(stats["adv"]),
                "gen_length": np.concatenate(stats["length"]),
                "zero_std_groups": np.concatenate(stats["zero_std"]),
            }
        )
        if "greedy_reward" in stats:
            series["greedy_reward"] = np.concatenate(stats["greedy_reward"])
        keys = sorted(series)
        sums = torch.tensor(
            [[series[k].sum(), (series[k] ** 2).sum(), series[k].size] for k in keys], dtype=torch.float64
        )
        sums = runtime.all_reduce(sums)
        out = {}
        for i, k in enumerate(keys):
            mean = float(sums[i, 0] / sums[i, 2])
            out[f"{k}_mean" if k != "zero_std_groups" else k] = mean
            if k in ("reward", "advantage") or k.startswith("reward/"):
                out[f"{k}_std"] = max(float(sums[i, 1] / sums[i, 2]) - mean**2, 0.0) ** 0.5
        return out


def completion_items(batch: dict, normalize: str) -> float:
    """Normaliser count of a rollout micro-batch: completion tokens (`token`) or completions."""
    mask = batch["completion_mask"]
    return float(mask.sum()) if normalize == "token" else float(mask.shape[0])


def build_engine(recipe: Any, processor: Any) -> RolloutEngine:
    """The rollout engine of a recipe: rewards with df / references from the training split."""
    from rlalign.data.captions import load_split

    if processor is None:
        raise ValueError("rollout objectives need the processor (build_objective(recipe, processor))")
    train = load_split(recipe.data, "train")
    refs = {
        iid: caps if isinstance(caps, list) else [caps]
        for iid, caps in zip(train["image_id"], train["captions"])
    }
    reward = CombinedReward(recipe.objective.rewards, refs)
    cfg = recipe.objective.rollout
    supported = supports_shared_prefix(processor, recipe.model.attn_implementation)
    if cfg.shared_prefix and not supported:
        raise ValueError(
            f"objective.rollout.shared_prefix: {type(processor).__name__} with attention "
            f"'{recipe.model.attn_implementation}' has no shared-prefix forward (set it false or leave it unset)"
        )
    shared = supported if cfg.shared_prefix is None else cfg.shared_prefix
    return RolloutEngine(cfg, reward, processor.tokenizer, recipe.trainer.seed, shared_prefix=shared)
