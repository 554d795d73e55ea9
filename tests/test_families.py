"""Preference and rollout paths on every real family, against each family's own forward and TRL.

For Llava-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3 and Gemma 3 (tiny random checkpoints of
tests/families.py, float32):
- packed DPO log-probs (one row: prompt | chosen | rejected, plus an rDPO retrieved-image row) equal the
  family's own forward of each unpacked sequence (the model computing its own positions), and so do
  the unpacked rows of the fallback layout; for the M-RoPE families, 1-D positions in the packed row
  would be wrong by far more than the tolerance; Gemma 3, whose image tokens attend both ways, is not
  packed, and packing it would be wrong;
- GRPO completion log-probs from the rollout path (generate G samples, repeat image inputs per image,
  split into minibatches) equal a plain forward of each prompt + completion alone;
- DPO loss, rewards and every gradient equal TRL DPOTrainer's (its collator and loss);
- the log-prob path (completion positions only, chunked) equals full logits + log_softmax in float64, values
  and gradients.
"""

from __future__ import annotations

import copy
import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch
from families import FAMILIES, PROMPTS, RESPONSES, images, qwen_tokenizer

import rlalign.objectives.dpo as dpo
from rlalign.config.schema import ModelConfig, RolloutConfig
from rlalign.data.collate import TOKEN_ALIGNED, encode_prompts, prompt_text
from rlalign.data.preference import PreferenceCollator
from rlalign.models.builder import load_base
from rlalign.models.vision_inputs import images_per_row, repeat_rows, split_rows, take_rows
from rlalign.rollout.engine import BUFFER_KEYS, _sequences, _split, completion_logprobs
from rlalign.rollout.sampling import banned_tokens, completion_mask, sample_groups
from rlalign.utils.tensors import model_inputs

M_ROPE = ("qwen2_vl", "qwen2_5_vl")
UNPACKED = ("gemma3",)
"""Families whose pairs are not packed (Gemma 3: two-way attention among image tokens)."""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, save in FAMILIES.items():
        out[name] = tmp_path_factory.mktemp(name)
        save(out[name])
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


def pairs() -> list[dict]:
    """Two pairs on images of different sizes (Qwen: different grids), retrieved image = the other one."""
    ims = images()
    return [
        {
            "image": ims[i],
            "retrieved_image": ims[1 - i],
            "prompt": PROMPTS[i],
            "chosen": RESPONSES[i],
            "rejected": RESPONSES[1 - i],
            "image_hash": f"h{i}",
            "retrieved_image_hash": f"h{1 - i}",
        }
        for i in range(2)
    ]


def with_tokens(enc: dict, tokens: list[int]) -> dict:
    """A one-row processor output with `tokens` appended (attention on, token-aligned inputs filled)."""
    out = dict(enc)
    extra = torch.tensor([tokens])
    out["input_ids"] = torch.cat([enc["input_ids"], extra], 1)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    for key, fill in TOKEN_ALIGNED.items():
        if key in enc:
            out[key] = torch.cat([enc[key], torch.full_like(extra, fill)], 1)
    return out


def own_logp(model, processor, image, prompt: str, tokens: list[int]) -> torch.Tensor:
    """Summed log-prob of `tokens` after the prompt, from the family's own forward of that sequence alone
    (its own position ids: M-RoPE from `get_rope_index` for Qwen)."""
    enc = encode_prompts(processor, [image], [prompt])
    P = enc["input_ids"].shape[1]
    batch = with_tokens(enc, tokens)
    logp = model(**batch).logits[0, P - 1 : -1].log_softmax(-1)
    return logp.gather(-1, torch.tensor(tokens)[:, None]).sum()


def response(processor, text: str) -> list[int]:
    tok = processor.tokenizer
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def expected_logps(model, processor) -> torch.Tensor:
    """(4, 2): per pair (chosen, rejected), then per retrieved-image row (chosen, 0)."""
    rows = []
    for p in pairs():
        chosen, rejected = response(processor, p["chosen"]), response(processor, p["rejected"])
        rows.append([own_logp(model, processor, p["image"], p["prompt"], t) for t in (chosen, rejected)])
    for p in pairs():
        chosen = response(processor, p["chosen"])
        rows.append(
            [own_logp(model, processor, p["retrieved_image"], p["prompt"], chosen), torch.tensor(0.0)]
        )
    return torch.tensor([[float(v) for v in row] for row in rows])


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logps_equal_unpacked_forward(checkpoints, family, caplog):
    model, processor = load_base(ModelConfig(name_or_path=str(checkpoints[family])))
    model.eval()
    packed = PreferenceCollator(processor, 48, None, retrieved=True, packed=True)
    unpacked = PreferenceCollator(processor, 48, None, retrieved=True, packed=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlalign.data.preference"):
        default = PreferenceCollator(processor, 48, None, retrieved=True)
    assert default.packed == (family not in UNPACKED)
    assert ("not packed for this family" in caplog.text) == (family in UNPACKED)
    with torch.no_grad():
        expected = expected_logps(model, processor)
        batch = packed(pairs())
        assert batch["input_ids"].shape[0] == 4  # one row per pair + one per retrieved image
        got = dpo.sequence_logps(model, batch, "sum", torch.float32)
        rows = unpacked(pairs())
        assert rows["input_ids"].shape[0] == 6  # one row per response
        got_unpacked = dpo.sequence_logps(model, rows, "sum", torch.float32)
    # float32 sums of ~60 nats: one ulp is 4e-6, and other CPUs round other partial sums, hence the
    # relative term (measured up to 2e-7 relative on llava_next)
    torch.testing.assert_close(got_unpacked, expected, rtol=1e-6, atol=1e-5)
    if family in UNPACKED:  # what packing would give: the image tokens lose their two-way attention
        assert float((got - expected).abs().max()) > 1e-3
        return
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    print(
        f"{family}: packed vs own forward max |diff| {float((got - expected).abs().max()):.2e} "
        f"(unpacked {float((got_unpacked - expected).abs().max()):.2e}, |logp| up to {float(expected.abs().max()):.1f})"
    )
    if family in M_ROPE:  # the same packed row with 1-D positions: the test above is what catches it
        with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(dpo, "segment_positions", lambda *args: None)
            naive = dpo.sequence_logps(model, batch, "sum", torch.float32)
        assert float((naive - expected).abs().max()) > 5e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_rollout_logps_equal_plain_forward(checkpoints, family):
    """G = 3 samples of 2 images of different sizes, 3 minibatches (each mixes the two images' rows)."""
    model, processor = load_base(ModelConfig(name_or_path=str(checkpoints[family])))
    model.eval()
    tok, group = processor.tokenizer, 3
    batch = dict(encode_prompts(processor, images(), PROMPTS))
    with torch.no_grad():
        comp = sample_groups(model, batch, list(range(6)), group, RolloutConfig(max_new_tokens=6), tok)
        mask = completion_mask(comp, tok.eos_token_id)
        micro = _split(_sequences(batch, comp, mask, group), 3)
        got = torch.cat([completion_logprobs(model, mb)[0] * mb["completion_mask"] for mb in micro])
        worst = 0.0
        for n in range(6):
            b = n // group
            tokens = comp[n, : int(mask[n].sum())].tolist()
            expected = own_logp(model, processor, images()[b], PROMPTS[b], tokens)
            assert float(got[n].sum()) == pytest.approx(float(expected), abs=1e-5), n
            worst = max(worst, abs(float(got[n].sum()) - float(expected)))
    print(f"{family}: rollout vs plain forward max |diff| {worst:.2e}")
    assert len(set(map(tuple, comp.tolist()))) > 1  # the samples differ


class Reference:
    """The frozen reference, a perturbed copy of the policy (so rewards are not zero)."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))

    def modules(self):
        return self.model.modules()

    def __call__(self, **inputs):
        return self.model(**inputs)


def trl_dpo(tmp_path: Path, policy, reference, processor) -> tuple[torch.Tensor, dict]:
    """TRL DPOTrainer's loss (backward done) and metrics on pairs() with the same prompt text and EOS."""
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    eos = processor.tokenizer.eos_token
    rows = [
        {
            "images": [p["image"]],
            "prompt": prompt_text(processor, p["prompt"]),
            "chosen": p["chosen"] + eos,
            "rejected": p["rejected"] + eos,
        }
        for p in pairs()
    ]
    args = TRLConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.1,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        max_length=None,
        padding_free=False,
        bf16=False,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference.model,
        args=args,
        processing_class=processor,
        train_dataset=Dataset.from_list(rows),
    )
    loss = trainer.compute_loss(trainer.model, trainer.data_collator([dict(r) for r in rows]))
    loss.backward()
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_matches_trl(tmp_path, checkpoints, family):
    """Loss, rewards and gradients equal TRL DPOTrainer's to 1e-5 (our packed rows, TRL's padded ones)."""
    model, processor = load_base(ModelConfig(name_or_path=str(checkpoints[family])))
    model.train()
    reference = Reference(model)
    theirs = copy.deepcopy(model)
    trl_loss, trl_metrics = trl_dpo(tmp_path, theirs, reference, processor)

    batch = PreferenceCollator(processor, 48, None, retrieved=False)(pairs())
    logps = dpo.sequence_logps(model, batch, "sum", torch.float32)
    with torch.no_grad():
        ref = dpo.sequence_logps(reference, batch, "sum", torch.float32)
    per_pair, metrics = dpo.preference_terms(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], 0.1, 0.0)
    loss = per_pair.sum() / 2
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(trl_loss.detach()), abs=1e-5)
    for k in ("chosen", "rejected", "margins", "accuracies"):
        assert float(metrics[k].mean()) == pytest.approx(trl_metrics[f"rewards/{k}"], abs=1e-5), k
    assert float(metrics["margins"].abs().min()) > 1e-3  # a non-trivial case
    grads = dict(theirs.named_parameters())
    ours = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ours.keys() == {n for n, p in grads.items() if p.grad is not None}
    worst = max(ours, key=lambda n: float((ours[n] - grads[n].grad).abs().max()))
    assert float((ours[worst] - grads[worst].grad).abs().max()) < 1e-5, worst
    print(
        f"{family}: DPO vs TRL |loss diff| {abs(float(loss.detach()) - float(trl_loss.detach())):.2e}, "
        f"max |grad diff| {float((ours[worst] - grads[worst].grad).abs().max()):.2e}"
    )


def test_patch_major_inputs_split_and_repeat_by_image():
    """Qwen layout with 2 images in row 0 and 1 in row 1: patches and grids follow their rows' images."""
    grid = torch.tensor([[1, 2, 2], [1, 2, 4], [1, 4, 2]])  # 4, 8 and 8 patch rows
    pixels = torch.arange(20, dtype=torch.float32)[:, None].expand(20, 3)
    types = torch.tensor([[0, 1, 1, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0]])  # row 0: two image runs, row 1: one
    batch = {
        "input_ids": torch.zeros(2, 7, dtype=torch.long),
        "mm_token_type_ids": types,
        "pixel_values": pixels,
        "image_grid_thw": grid,
        "image_ids": ["a", "b"],
    }
    assert images_per_row(batch, "image_grid_thw", 2) == [2, 1]
    parts = split_rows(batch, "pixel_values", 2)
    assert [p[:, 0].tolist() for p in parts] == [list(range(12)), list(range(12, 20))]
    out = repeat_rows(batch, 2)
    assert out["pixel_values"][:, 0].tolist() == [*range(12), *range(12), *range(12, 20), *range(12, 20)]
    assert out["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4]] * 2 + [[1, 4, 2]] * 2
    assert out["mm_token_type_ids"].tolist() == [types[0].tolist()] * 2 + [types[1].tolist()] * 2
    assert out["image_ids"] == ["a", "b"]  # not a tensor: left as it is
    second = take_rows(out, [2, 3])
    assert second["pixel_values"][:, 0].tolist() == [*range(12, 20)] * 2
    with pytest.raises(ValueError, match="'pixel_values' of shape \\(19, 3\\) does not split into 2 rows"):
        repeat_rows({**batch, "pixel_values": pixels[:19]}, 2)


def test_sampling_bans_every_special_token_but_eos():
    """Qwen's image and vision markers are added special tokens, not special-token roles: a sampled
    <|image_pad|> would claim an image the sequence does not have."""
    tok = qwen_tokenizer()
    specials = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert image_pad not in tok.all_special_ids and image_pad in specials
    assert banned_tokens(tok) == sorted(specials - {tok.eos_token_id})


@pytest.mark.parametrize("family", FAMILIES)
def test_logprob_path_equals_full_logits_in_float64(checkpoints, family):
    """The log-prob path (logits at the completion positions only, chunked LM head + logsumexp, its own
    backward) against the full-vocabulary logits + log_softmax of the same float64 forward: values and every
    parameter's gradient to 1e-6, on 2 images x G = 2 sampled completions."""
    model, processor = load_base(ModelConfig(name_or_path=str(checkpoints[family])))
    model = model.double().eval()
    tok, group = processor.tokenizer, 2
    batch = {
        k: v.double() if v.is_floating_point() else v
        for k, v in encode_prompts(processor, images(), PROMPTS).items()
    }
    with torch.no_grad():
        comp = sample_groups(model, batch, list(range(4)), group, RolloutConfig(max_new_tokens=5), tok)
    mask = completion_mask(comp, tok.eos_token_id)
    seqs = _sequences(batch, comp, mask, group)
    L = mask.shape[1]

    def grads(logp: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad()
        (logp * mask).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours = completion_logprobs(model, seqs)[0]
    ours_grads = grads(ours)
    logits = model(**model_inputs(seqs, BUFFER_KEYS)).logits[:, -L - 1 : -1]
    full = logits.log_softmax(-1).gather(-1, seqs["input_ids"][:, -L:, None])[..., 0]
    full_grads = grads(full)
    assert ours.dtype == full.dtype == torch.float64
    torch.testing.assert_close(ours * mask, full * mask, rtol=0, atol=1e-6)
    assert ours_grads.keys() == full_grads.keys() and len(ours_grads) > 5
    worst = 0.0
    for name, g in full_grads.items():
        scale = max(1.0, float(g.abs().max()))
        worst = max(worst, float((ours_grads[name] - g).abs().max()) / scale)
        torch.testing.assert_close(ours_grads[name], g, rtol=0, atol=1e-6 * scale, msg=name)
    print(
        f"{family}: log-probs max |diff| {float(((ours - full) * mask).detach().abs().max()):.1e}, gradients {worst:.1e}"
    )
