"""The model layer on real HF VLM families and every model option, offline.

Tiny random-weight Llava, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL and Idefics3 checkpoints (tests/families.py:
tokenizers trained there, Pillow image processors) are written to disk the way the hub ships them and loaded through
`load_base` / `build_policy`; the built-in tiny Llava covers dtype, gradient checkpointing, frozen
vision, LoRA, the reference handle, save/load and seeding.
"""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch
from families import FAMILIES, PROMPTS, RESPONSES, images, rows
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import is_torchvision_available

from rlalign.config.schema import DataConfig, DistributedConfig, LoraConfig, ModelConfig, TinyModelConfig
from rlalign.data.collate import IGNORE, SFTCollator, encode_prompts
from rlalign.models.builder import ReferenceModel, build_policy, load_base, vision_parameters
from rlalign.models.families import IMAGE_ONLY_PROCESSORS
from rlalign.objectives.xe import token_nll
from rlalign.runtime import Runtime

# Image tokens per prompt for the two images() (Qwen: dynamic resolution, LLaVA-NeXT: tiles of the best
# grid resolution plus a newline per row, the others: fixed).
IMAGE_TOKENS = {
    "llava": [16, 16],
    "llava_next": [44, 46],
    "qwen2_vl": [20, 24],
    "qwen2_5_vl": [20, 24],
    "idefics3": [4, 4],
    "gemma3": [1, 1],  # its processor.image_token is the begin-of-image marker (4 soft tokens follow)
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, save in FAMILIES.items():
        out[name] = tmp_path_factory.mktemp(name)
        save(out[name])
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    """One per module: accelerate keeps a process-wide state."""
    return Runtime.create(DistributedConfig(backend="single"))


def image_token_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids(processor.image_token)


def vision_and_text(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    vision = {id(p) for p in vision_parameters(model)}
    names = {n: id(p) for n, p in model.named_parameters()}
    return {n for n, i in names.items() if i in vision}, {n for n, i in names.items() if i not in vision}


# -- real families ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_family_processor_loads_offline(checkpoints, family):
    """Without torchvision, the Qwen families get their stock processor class minus the video half."""
    _, processor = load_base(ModelConfig(name_or_path=str(checkpoints[family])))
    expected = {
        "llava": "LlavaProcessor",
        "llava_next": "LlavaNextProcessor",
        "qwen2_vl": "Qwen2VLProcessor",
        "qwen2_5_vl": "Qwen2_5_VLProcessor",
        "idefics3": "Idefics3Processor",
        "gemma3": "Gemma3Processor",
    }[family]
    assert type(processor).__name__ == expected
    if is_torchvision_available():
        return
    assert type(processor.image_processor).__name__.endswith("ImageProcessorPil")
    if family.startswith("qwen"):
        assert type(processor) is IMAGE_ONLY_PROCESSORS[family]
        assert processor.get_attributes() == ["image_processor", "tokenizer"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_collator_labels_exactly_response_and_eos(checkpoints, family):
    _, processor = load_base(ModelConfig(name_or_path=str(checkpoints[family])))
    tok = processor.tokenizer
    image_id = image_token_id(processor)
    prompts = encode_prompts(processor, images(), PROMPTS)
    for max_tokens in (48, 2):
        batch = SFTCollator(processor, max_tokens)(rows())
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        for i, response in enumerate(RESPONSES):
            ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
            prompt = prompts["input_ids"][i][prompts["attention_mask"][i].bool()]
            response_ids = tok(response, add_special_tokens=False)["input_ids"][:max_tokens]
            response_ids.append(tok.eos_token_id)
            n = len(prompt) + len(response_ids)
            # Sequence = prompt exactly as encode_prompts gives it, then response + EOS, then padding.
            assert ids[: len(prompt)].tolist() == prompt.tolist()
            assert mask.tolist() == [1] * n + [0] * (len(ids) - n)
            assert labels.tolist() == [IGNORE] * len(prompt) + response_ids + [IGNORE] * (len(ids) - n)
            labelled = ids[labels != IGNORE]
            if max_tokens == 48:
                assert tok.decode(labelled) == response + tok.eos_token
            assert int((ids == image_id).sum()) == IMAGE_TOKENS[family][i]
            assert (labels[ids == image_id] == IGNORE).all()
        if "mm_token_type_ids" in prompts:  # Qwen: one type per token, re-aligned with the new sequence
            assert batch["mm_token_type_ids"].tolist() == (batch["input_ids"] == image_id).long().tolist()


def mean_response_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token NLL of the labelled tokens, all in the model's dtype (HF's own loss upcasts to float32)."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
    target = batch["labels"][:, 1:]
    mask = target != IGNORE
    logp = logits.log_softmax(-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return -(logp * mask).sum() / mask.sum()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_gradients_reach_vision_and_text(checkpoints, family):
    """HF's loss on the collated batch is the response-token mean NLL, and the gradient of that NLL (float64)
    equals central finite differences on the steepest weight of the vision side and of the text side:
    the image really reaches the loss, and nothing on the way is detached."""
    policy, processor = build_policy(ModelConfig(name_or_path=str(checkpoints[family])))
    batch = SFTCollator(processor, 48)(rows())
    out = policy(**batch)
    nll_BT, mask_BT = token_nll(out.logits, batch["labels"])
    torch.testing.assert_close(out.loss, nll_BT.sum() / mask_BT.sum(), rtol=1e-6, atol=1e-6)
    policy = policy.double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    mean_response_nll(policy, batch).backward()
    vision, text = vision_and_text(policy)
    params = dict(policy.named_parameters())
    moved = {n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved & vision and moved & text and "embed" in " ".join(moved & text)
    for side in (vision, text):
        name = max(moved & side, key=lambda n: float(params[n].grad.abs().max()))
        p = params[name]
        flat = int(p.grad.abs().argmax())
        analytic, h, losses = float(p.grad.view(-1)[flat]), 1e-3, []
        with torch.no_grad():
            for step in (h, -2 * h, h):  # +h, -h, back to the weight
                p.view(-1)[flat] += step
                losses.append(float(mean_response_nll(policy, batch)))
        numeric = (losses[0] - losses[1]) / (2 * h)
        # the families' norms compute in float32 even in a float64 model: differences agree to ~1e-4
        assert numeric == pytest.approx(analytic, rel=1e-3), name


@pytest.mark.parametrize("family", FAMILIES)
def test_family_generate_continues_prompt_greedily(checkpoints, family):
    model, processor = load_base(ModelConfig(name_or_path=str(checkpoints[family])))
    model.eval()
    enc = encode_prompts(processor, images(), PROMPTS)
    tok = processor.tokenizer
    with torch.no_grad():
        logits = model(**enc).logits[:, -1]
        out = model.generate(
            **enc,
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    width = enc["input_ids"].shape[1]
    assert out.shape == (2, width + 3)
    assert torch.equal(out[:, :width], enc["input_ids"])
    logits[:, tok.eos_token_id] = -float("inf")  # min_new_tokens forbids EOS at the first step
    assert out[:, width].tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_bf16_and_freeze_vision(checkpoints, family):
    model, _ = load_base(ModelConfig(name_or_path=str(checkpoints[family]), dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    policy, _ = build_policy(ModelConfig(name_or_path=str(checkpoints[family]), freeze_vision=True))
    vision, text = vision_and_text(policy)
    llava = ("model.vision_tower.", "model.multi_modal_projector.")
    vision_prefix = {
        "llava": llava,
        "llava_next": llava,
        "qwen2_vl": ("model.visual.",),
        "qwen2_5_vl": ("model.visual.",),
        "idefics3": ("model.vision_model.", "model.connector."),
        "gemma3": llava,
    }[family]
    assert vision == {n for n, _ in policy.named_parameters() if n.startswith(vision_prefix)}
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == text


def test_qwen2_vl_export_reloads(checkpoints, tmp_path):
    """What the trainer exports (model + processor save_pretrained) loads again, also when
    processor_config.json carries a video processor as the stock class writes it."""
    model, processor = load_base(ModelConfig(name_or_path=str(checkpoints["qwen2_vl"])))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["processor_class"] == "Qwen2VLProcessor"
    if not is_torchvision_available():  # what the stock class writes, which the image-only one must accept
        config["video_processor"] = {"video_processor_type": "Qwen2VLVideoProcessor", "merge_size": 2}
        (tmp_path / "processor_config.json").write_text(json.dumps(config))
    model2, processor2 = load_base(ModelConfig(name_or_path=str(tmp_path)))
    enc, enc2 = (encode_prompts(p, images(), PROMPTS) for p in (processor, processor2))
    assert enc.keys() == enc2.keys()
    for key in enc:
        assert torch.equal(enc[key], enc2[key]), key
    with torch.no_grad():
        assert torch.equal(model.eval()(**enc).logits, model2.eval()(**enc2).logits)


# -- options on the built-in tiny model ----------------------------------------------------------------

TINY = TinyModelConfig(
    vision_hidden=32, vision_layers=1, text_hidden=64, text_layers=2, heads=4, vocab_size=400
)
DATA = DataConfig(image_size=48)


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(tiny=TINY, **kw)


def tiny_batch(processor) -> dict[str, torch.Tensor]:
    return SFTCollator(processor, 48)(rows())


def test_bfloat16_weights_and_finite_loss():
    policy32, processor = build_policy(tiny_cfg(), DATA)
    policy16, _ = build_policy(tiny_cfg(dtype="bfloat16"), DATA)
    assert {p.dtype for p in policy16.parameters()} == {torch.bfloat16}
    batch = tiny_batch(processor)
    out16, loss32 = policy16(**batch), policy32(**batch).loss
    loss16 = out16.loss
    assert out16.logits.dtype == torch.bfloat16 and torch.isfinite(loss16)
    assert abs(loss16.item() - loss32.item()) < 0.02 * loss32.item()


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4)], ids=["full", "lora"])
def test_gradient_checkpointing_same_loss_and_grads_and_recomputes(lora):
    plain, processor = build_policy(tiny_cfg(lora=lora), DATA)
    ckpt, _ = build_policy(tiny_cfg(lora=lora, gradient_checkpointing=True), DATA)
    assert not plain.is_gradient_checkpointing and ckpt.is_gradient_checkpointing
    batch = tiny_batch(processor)
    calls = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        # transformers checkpoints the layer's `forward`, so hooks on the layer itself run once; its
        # attention runs inside the checkpoint.
        llava = model.base_model.model if lora else model
        attention = llava.model.language_model.layers[0].self_attn
        calls[name] = 0

        def count(*_, name=name):
            calls[name] += 1

        handle = attention.register_forward_pre_hook(count)
        model(**batch).loss.backward()
        handle.remove()
    assert calls == {"plain": 1, "ckpt": 2}  # checkpointing recomputes attention in backward
    torch.testing.assert_close(ckpt(**batch).loss, plain(**batch).loss, rtol=0, atol=1e-6)
    grads = dict(plain.named_parameters())
    for n, p in ckpt.named_parameters():
        assert (p.grad is None) == (grads[n].grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n].grad, rtol=0, atol=1e-6)
    # Every trainable parameter gets a gradient, except CLIP's last norm, which Llava's features skip.
    no_grad = {n for n, p in ckpt.named_parameters() if p.requires_grad and p.grad is None}
    assert no_grad == (
        set() if lora else {f"model.vision_tower.post_layernorm.{w}" for w in ("weight", "bias")}
    )


def test_freeze_vision_keeps_tower_and_projector_fixed():
    policy, processor = build_policy(tiny_cfg(freeze_vision=True), DATA)
    vision, text = vision_and_text(policy)
    names = {n for n, _ in policy.named_parameters()}
    assert vision == {
        n for n in names if n.startswith(("model.vision_tower.", "model.multi_modal_projector."))
    }
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    policy(**tiny_batch(processor)).loss.backward()
    optimizer.step()
    params = dict(policy.named_parameters())
    assert all(torch.equal(params[n], before[n]) and params[n].grad is None for n in vision)
    changed = {n for n in text if not torch.equal(params[n], before[n])}
    assert changed == {n for n in text if params[n].grad is not None and params[n].grad.abs().sum() > 0}
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in changed


def lora_count(r: int, shapes: list[tuple[int, int]]) -> int:
    """A (r x in) + B (out x r) per adapted Linear."""
    return sum(r * (fan_in + fan_out) for fan_in, fan_out in shapes)


@pytest.mark.parametrize("freeze_vision", [False, True])
def test_lora_trains_only_adapters(freeze_vision):
    r = 4
    policy, processor = build_policy(
        tiny_cfg(lora=LoraConfig(r=r, alpha=8), freeze_vision=freeze_vision), DATA
    )
    v, t = TINY.vision_hidden, TINY.text_hidden
    # Default targets q/k/v/o_proj: CLIP attention has q/k/v_proj (out_proj is not a target), Llama all four.
    text = [(t, t)] * 4 * TINY.text_layers
    vision = [] if freeze_vision else [(v, v)] * 3 * TINY.vision_layers
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == lora_count(r, text + vision)
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any("vision_tower" in n for n in trainable) != freeze_vision
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-2)
    policy(**tiny_batch(processor)).loss.backward()
    optimizer.step()
    for n, p in policy.named_parameters():
        if n not in trainable:
            assert torch.equal(p, before[n]), n  # base weights bit-identical
        elif ".lora_B." in n:
            assert not torch.equal(p, before[n]), n  # B starts at zero, so only B moves on step one


# -- the reference handle -----------------------------------------------------------------------------


def test_reference_copy_is_frozen_snapshot(runtime):
    policy, processor = build_policy(tiny_cfg(), DATA)
    batch = tiny_batch(processor)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ref = ReferenceModel.build("copy", policy, runtime)
    ref.attach(policy)
    with torch.no_grad():
        initial = policy(**inputs).logits
    ref_initial = ref(**inputs).logits
    assert torch.equal(ref_initial, initial)
    assert all(not p.requires_grad for p in ref.model.parameters()) and not ref.model.training
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    policy(**batch).loss.backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.equal(policy(**inputs).logits, initial)
    assert torch.equal(ref(**inputs).logits, ref_initial)
    assert all(p.grad is None for p in ref.model.parameters())
    assert ref.forward_calls == 2


@pytest.fixture(scope="module")
def dropout_checkpoint(tmp_path_factory) -> Path:
    """The built-in tiny model with attention dropout: a reference must not be stochastic."""
    model, processor = load_base(tiny_cfg(), DATA)
    model.config.text_config.attention_dropout = 0.5
    path = tmp_path_factory.mktemp("tiny-dropout")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_reference_adapter_disabled_is_base_model(runtime, dropout_checkpoint):
    cfg = ModelConfig(
        name_or_path=str(dropout_checkpoint), lora=LoraConfig(r=4), reference="adapter_disabled"
    )
    base, processor = load_base(ModelConfig(name_or_path=str(dropout_checkpoint)))
    policy, _ = build_policy(cfg)
    batch = tiny_batch(processor)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        base_logits = base.eval()(**inputs).logits
    ref = ReferenceModel.build("adapter_disabled", policy, runtime)
    ref.attach(policy)
    assert ref.model is None  # no copy: the policy itself, adapter off
    torch.testing.assert_close(ref(**inputs).logits, base_logits, rtol=0, atol=1e-6)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    policy(**batch).loss.backward()
    optimizer.step()
    modes = [m.training for m in policy.modules()]
    torch.testing.assert_close(ref(**inputs).logits, base_logits, rtol=0, atol=1e-6)
    assert [m.training for m in policy.modules()] == modes and all(modes)  # train mode restored
    with torch.no_grad():
        assert (policy.eval()(**inputs).logits - base_logits).abs().max() > 1e-4  # the adapter did train
    assert ref.forward_calls == 2


def test_reference_none_refuses(runtime):
    policy, processor = build_policy(tiny_cfg(), DATA)
    ref = ReferenceModel.build("none", policy, runtime)
    with pytest.raises(RuntimeError, match="model.reference is 'none'"):
        ref(input_ids=torch.zeros(1, 1, dtype=torch.long))
    assert ref.forward_calls == 1


# -- save / load and seeding --------------------------------------------------------------------------


def test_tiny_save_pretrained_round_trip(tmp_path):
    model, processor = load_base(tiny_cfg(), DATA)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model2 = AutoModelForImageTextToText.from_pretrained(tmp_path)
    processor2 = AutoProcessor.from_pretrained(tmp_path)
    assert type(model2) is type(model) and type(processor2) is type(processor)
    batch, batch2 = tiny_batch(processor), tiny_batch(processor2)
    assert batch.keys() == batch2.keys()
    for key in batch:
        assert torch.equal(batch[key], batch2[key]), key
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, model2.eval()(**batch2).logits)
    model3, _ = load_base(ModelConfig(name_or_path=str(tmp_path)))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model3.state_dict().values()))


def test_init_seed_decides_weights_not_vocab():
    a, pa = load_base(tiny_cfg(), DATA)
    b, pb = load_base(tiny_cfg(), DATA)
    c, pc = load_base(ModelConfig(tiny=TinyModelConfig(**{**TINY.__dict__, "init_seed": 1})), DATA)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert pa.tokenizer.get_vocab() == pb.tokenizer.get_vocab() == pc.tokenizer.get_vocab()
    randomly_initialised = [k for k in sa if k.endswith("proj.weight") or "embed" in k]
    assert randomly_initialised and all(not torch.equal(sa[k], sc[k]) for k in randomly_initialised)


def test_lora_init_is_seeded(checkpoints):
    """Adapters start identical on every build (every rank), without touching the caller's RNG."""
    rng = torch.get_rng_state()
    a, _ = build_policy(tiny_cfg(lora=LoraConfig(r=4)), DATA)
    assert torch.equal(torch.get_rng_state(), rng)
    b, _ = build_policy(tiny_cfg(lora=LoraConfig(r=4)), DATA)
    c, _ = build_policy(
        ModelConfig(tiny=TinyModelConfig(**{**TINY.__dict__, "init_seed": 1}), lora=LoraConfig(r=4)), DATA
    )
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    lora_a = [k for k in sa if ".lora_A." in k]
    assert lora_a and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(not torch.equal(sa[k], sc[k]) for k in lora_a)
    cfg = ModelConfig(name_or_path=str(checkpoints["qwen2_vl"]), lora=LoraConfig(r=4))
    sd, se = build_policy(cfg)[0].state_dict(), build_policy(cfg)[0].state_dict()
    assert any(".lora_A." in k for k in sd) and all(torch.equal(sd[k], se[k]) for k in sd)
