"""DPO / rDPO: parity with TRL's DPOTrainer (loss, rewards, gradients), `logp_reduction: mean` and the
rDPO visual term against float64 hand computations, cached reference log-probs (keys that follow the
processed pixels and the reference weights), bad preference rows."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from rlalign.config.schema import DataConfig, TinyModelConfig
from rlalign.data.preference import BadRowError, PreferenceCollator, PreferencePairs, shapes_preferences
from rlalign.models.tiny import build_tiny_llava
from rlalign.objectives.dpo import DPOConfig, DPOObjective, sequence_logps
from rlalign.objectives.rdpo import RDPOConfig, RDPOObjective, rdpo_terms
from rlalign.objectives.ref_cache import pair_cache_keys
from rlalign.shapes import ShapesConfig

SHAPES = ShapesConfig(image_size=48)


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_llava(
        TinyModelConfig(vision_hidden=32, text_hidden=64, vocab_size=400), SHAPES
    )
    return model.train(), processor


@pytest.fixture(scope="module")
def table():
    return shapes_preferences(SHAPES, "train", 6)


def pairs(table, processor, **kw):
    return PreferencePairs(table, processor, DataConfig(**kw), retrieved=True)


class Ref:
    """The frozen reference as ReferenceModel calls it (a perturbed copy, so rewards are non-zero)."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        self.forward_calls, self.mode, self.runtime = 0, "copy", _Runtime()

    def modules(self):
        return self.model.modules()

    def __call__(self, **inputs):
        self.forward_calls += 1
        return self.model(**inputs)


def _Runtime():
    """A real single-process runtime (what a one-process run uses)."""
    from rlalign.config.schema import DistributedConfig
    from rlalign.runtime import Runtime

    return Runtime.create(DistributedConfig(backend="single"))


def test_packed_logps_equal_separate_sequences(tiny, table):
    model, processor = tiny
    rows = pairs(table, processor)
    batch = PreferenceCollator(processor, 48, None, retrieved=True)([rows[i] for i in range(3)])
    with torch.no_grad():
        logps = sequence_logps(model, batch, "sum", torch.float32)
    tok = processor.tokenizer
    for i in range(3):
        for col, value in (
            ("chosen", logps[i, 0]),
            ("rejected", logps[i, 1]),
            ("retrieved", logps[3 + i, 0]),
        ):
            image = rows[i]["retrieved_image"] if col == "retrieved" else rows[i]["image"]
            enc = processor(text=[processor.image_token], images=[[image]], return_tensors="pt")
            resp = tok(rows[i]["chosen" if col == "retrieved" else col], add_special_tokens=False)[
                "input_ids"
            ]
            ids = torch.tensor([enc["input_ids"][0].tolist() + resp + [tok.eos_token_id]])
            with torch.no_grad():
                lp = model(input_ids=ids, pixel_values=enc["pixel_values"]).logits[0].log_softmax(-1)
            P = enc["input_ids"].shape[1]
            expected = sum(lp[t - 1, ids[0, t]] for t in range(P, ids.shape[1]))
            assert float(value) == pytest.approx(float(expected), rel=1e-6), col  # float32 sum order


def test_dpo_matches_trl(tmp_path, tiny, table):
    """Loss, rewards and gradients equal TRL DPOTrainer's (its collator + `_compute_loss`) to 1e-5."""
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    model, processor = tiny
    ref = Ref(model)
    rows = pairs(table, processor)
    eos = processor.tokenizer.eos_token
    trl_rows = [
        {
            "images": [rows[i]["image"]],
            "prompt": processor.image_token + rows[i]["prompt"],
            "chosen": rows[i]["chosen"] + eos,
            "rejected": rows[i]["rejected"] + eos,
        }
        for i in range(4)
    ]
    policy_trl = copy.deepcopy(model)
    args = TRLConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.1,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        max_length=None,
        padding_free=False,
        bf16=False,
    )
    trainer = DPOTrainer(
        model=policy_trl,
        ref_model=ref.model,
        args=args,
        processing_class=processor,
        train_dataset=Dataset.from_list([{k: v for k, v in r.items()} for r in trl_rows]),
    )
    trl_batch = trainer.data_collator([dict(r) for r in trl_rows])
    trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    ours_model = copy.deepcopy(model)
    batch = PreferenceCollator(processor, 48, None, retrieved=False)([rows[i] for i in range(4)])
    loss, metrics = DPOObjective(DPOConfig(beta=0.1)).loss(
        ours_model, batch, items_per_micro=4, reference=ref
    )
    loss.backward()
    assert float(loss) == pytest.approx(float(trl_loss), abs=1e-5)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(metrics[k]) == pytest.approx(trl_metrics[k], abs=1e-5), k
    assert abs(float(metrics["rewards/margins"])) > 1e-3  # a non-trivial case
    grads = dict(policy_trl.named_parameters())
    worst = max(
        float((p.grad - grads[n].grad).abs().max())
        for n, p in ours_model.named_parameters()
        if p.grad is not None
    )
    assert worst < 1e-5, worst


def test_rdpo_visual_term_equals_float64_hand_computation():
    logps = torch.tensor(
        [[-10.0, -12.5], [-7.25, -7.0], [-11.0, 0.0], [-6.5, 0.0]]
    )  # rows: (w, l|v) x2, (w|v_l) x2
    ref = torch.tensor([[-10.5, -12.0], [-7.0, -7.5], [-10.0, 0.0], [-7.0, 0.0]])
    cfg = RDPOConfig(beta=0.1, dpo_weight=0.7, visual_weight=1.3)
    loss, m = rdpo_terms(logps.double(), ref.double(), cfg)
    for i in range(2):
        b = 0.1
        dw, dl, dwl = logps[i, 0] - ref[i, 0], logps[i, 1] - ref[i, 1], logps[2 + i, 0] - ref[2 + i, 0]
        text = -torch.log(torch.sigmoid(b * (dw - dl).double()))
        visual = -torch.log(torch.sigmoid(b * (dw - dwl).double()))
        assert float(loss[i]) == pytest.approx(float(0.7 * text + 1.3 * visual), abs=1e-12)
    assert float(m["visual/accuracies"]) == 0.5  # pair 0: dw=0.5 > dwl=-1; pair 1: dw=-0.25 < dwl=0.5
    anchored, _ = rdpo_terms(logps.double(), ref.double(), RDPOConfig(beta=0.1, anchor_weight=1.0))
    plain, _ = rdpo_terms(logps.double(), ref.double(), RDPOConfig(beta=0.1))
    assert torch.allclose(anchored - plain, -F.logsigmoid(0.1 * (logps[:2, 0] - ref[:2, 0])).double())


@pytest.mark.parametrize("objective", ["dpo", "rdpo"])
def test_cached_reference_equals_live_and_second_epoch_runs_none(tmp_path, tiny, table, objective):
    model, processor = tiny
    rows = pairs(table, processor)
    retrieved = objective == "rdpo"
    collate = PreferenceCollator(processor, 48, None, retrieved=retrieved)
    batches = [collate([rows[i] for i in (0, 1, 2)]), collate([rows[i] for i in (3, 4, 5)])]
    Obj, Cfg = (RDPOObjective, RDPOConfig) if retrieved else (DPOObjective, DPOConfig)
    live_ref, cached_ref = Ref(model), Ref(model)
    cached_ref.model.load_state_dict(live_ref.model.state_dict())
    live, cached = Obj(Cfg()), Obj(Cfg(ref_cache_dir=str(tmp_path / "cache")))
    with torch.no_grad():
        for epoch in range(2):
            for b in batches:
                a, _ = live.loss(model, b, items_per_micro=3, reference=live_ref)
                c, _ = cached.loss(model, b, items_per_micro=3, reference=cached_ref)
                assert float(c) == pytest.approx(float(a), abs=1e-6)
            if epoch == 0:
                assert cached_ref.forward_calls == 2
        assert cached_ref.forward_calls == 2 and live_ref.forward_calls == 4  # epoch 2: no reference forward
        cached.cache.flush()
        later_run = Obj(Cfg(ref_cache_dir=str(tmp_path / "cache")))  # a later run reads the shards from disk
        fresh_ref = Ref(model)
        fresh_ref.model.load_state_dict(live_ref.model.state_dict())
        c, _ = later_run.loss(model, batches[0], items_per_micro=3, reference=fresh_ref)
        assert fresh_ref.forward_calls == 0
        other_ref = Ref(model)  # other weights: another fingerprint, so the cache misses
        Obj(Cfg(ref_cache_dir=str(tmp_path / "cache"))).loss(
            model, batches[0], items_per_micro=3, reference=other_ref
        )
        assert other_ref.forward_calls == 1


def test_cache_keys_are_per_pair_not_per_batch(tiny, table):
    """A pair's key does not depend on the batch it comes in (later runs may batch differently)."""
    _, processor = tiny
    rows = pairs(table, processor)
    for retrieved in (False, True):
        collate = PreferenceCollator(processor, 48, None, retrieved=retrieved)
        a = pair_cache_keys(collate([rows[i] for i in (0, 1, 2)]))
        b = pair_cache_keys(collate([rows[i] for i in (2, 0)]))
        assert b == [a[2], a[0]] and len(set(a)) == 3


def test_cache_keys_split_flattened_patches_by_image_grid():
    """Qwen2-VL layout: the patches of all rows' images in one tensor, split by `image_grid_thw`."""
    grid = torch.tensor([[1, 2, 2], [1, 2, 4]])  # 4 and 8 patches
    pixels = torch.arange(12 * 3, dtype=torch.float32).view(12, 3)
    batch = {
        "pair_keys": ["p0", "p1"],
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "pixel_values": pixels,
        "image_grid_thw": grid,
    }
    keys = pair_cache_keys(batch)
    changed = pixels.clone()
    changed[11, 0] = -1.0  # a patch of the second image
    after = pair_cache_keys({**batch, "pixel_values": changed})
    assert after[0] == keys[0] and after[1] != keys[1]
    alone = {
        "pair_keys": ["p0"],
        "input_ids": torch.zeros(1, 5, dtype=torch.long),
        "pixel_values": pixels[:4],
        "image_grid_thw": grid[:1],
    }
    assert pair_cache_keys(alone) == keys[:1]


def test_cache_misses_when_the_image_processor_changes(tmp_path, tiny, table):
    """Same raw images and tokens, other resolution before the crop: a miss that scores the new pixels;
    the same processor config (saved and reloaded) is a hit."""
    from transformers import AutoProcessor

    model, processor = tiny
    rows = pairs(table, processor)
    processor.save_pretrained(tmp_path / "same")
    same = AutoProcessor.from_pretrained(tmp_path / "same")
    larger = copy.deepcopy(processor)
    larger.image_processor.size = {"shortest_edge": 64}  # resized to 64, then the centre 48 x 48 cropped
    batch, batch_same, batch_larger = (
        PreferenceCollator(p, 48, None, retrieved=False)([rows[0], rows[1]])
        for p in (processor, same, larger)
    )
    assert batch["pair_keys"] == batch_larger["pair_keys"]  # the collator's key alone cannot tell them apart
    assert batch["pixel_values"].shape == batch_larger["pixel_values"].shape
    assert not torch.equal(batch["pixel_values"], batch_larger["pixel_values"])
    ref = Ref(model)
    cached = DPOObjective(DPOConfig(ref_cache_dir=str(tmp_path / "cache")))
    with torch.no_grad():
        first, _ = cached.loss(model, batch, items_per_micro=2, reference=ref)
        again, _ = cached.loss(model, batch_same, items_per_micro=2, reference=ref)
        assert ref.forward_calls == 1 and float(again) == float(first)  # same config: a hit
        got, _ = cached.loss(model, batch_larger, items_per_micro=2, reference=ref)
        assert ref.forward_calls == 2  # other pixels: a miss
        live, _ = DPOObjective(DPOConfig()).loss(model, batch_larger, items_per_micro=2, reference=ref)
    assert float(got) == pytest.approx(float(live), abs=1e-6)
    assert abs(float(live) - float(first)) > 1e-4  # a stale entry would have given another loss


def separate_logp(model, processor, image, response: str, reduction: str) -> torch.Tensor:
    """log pi(response + EOS | image), summed or averaged over its tokens, from the sequence alone."""
    tok = processor.tokenizer
    enc = processor(text=[processor.image_token], images=[[image]], return_tensors="pt")
    resp = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([enc["input_ids"][0].tolist() + resp])
    dtype = next(model.parameters()).dtype
    lp = model(input_ids=ids, pixel_values=enc["pixel_values"].to(dtype)).logits[0].log_softmax(-1)
    P = enc["input_ids"].shape[1]
    tokens = torch.stack([lp[t - 1, ids[0, t]] for t in range(P, ids.shape[1])])
    return tokens.mean() if reduction == "mean" else tokens.sum()


def test_dpo_mean_reduction_equals_float64_hand_computation(tiny, table):
    """`logp_reduction: mean`: loss, margins and gradients of the packed float32 objective against
    -log sigma(beta [(mean log pi - mean log pi_ref)(w) - (same)(l)]) on separate float64 sequences."""
    model, processor = tiny
    ref, rows, beta = Ref(model), pairs(table, processor), 0.5
    picks = [rows[i] for i in range(3)]
    batch = PreferenceCollator(processor, 48, None, retrieved=False)(picks)
    policy = copy.deepcopy(model)
    loss, metrics = DPOObjective(DPOConfig(beta=beta, logp_reduction="mean")).loss(
        policy, batch, items_per_micro=4, reference=ref
    )
    loss.backward()
    policy64, ref64 = copy.deepcopy(model).double(), copy.deepcopy(ref.model).double()
    hand = {"mean": torch.zeros((), dtype=torch.float64), "sum": torch.zeros((), dtype=torch.float64)}
    margins = []
    for reduction in ("mean", "sum"):
        for row in picks:
            d = {}
            for col in ("chosen", "rejected"):
                with torch.no_grad():
                    r = separate_logp(ref64, processor, row["image"], row[col], reduction)
                d[col] = separate_logp(policy64, processor, row["image"], row[col], reduction) - r
            margin = beta * (d["chosen"] - d["rejected"])
            hand[reduction] = hand[reduction] - F.logsigmoid(margin) / 4  # items_per_micro 4, not 3 pairs
            if reduction == "mean":
                margins.append(float(margin))
        if reduction == "mean":
            hand["mean"].backward()
    assert float(loss) == pytest.approx(float(hand["mean"]), abs=1e-6)
    assert abs(float(hand["mean"]) - float(hand["sum"])) > 1e-3  # the case tells mean from sum
    assert float(metrics["rewards/margins"]) == pytest.approx(sum(margins) / 3, abs=1e-6)
    grads = dict(policy64.named_parameters())
    worst = max(
        float((p.grad.double() - grads[n].grad).abs().max())
        for n, p in policy.named_parameters()
        if p.grad is not None
    )
    assert worst < 1e-6, worst


def _bad(table, column, value, row=2):
    rows = table.to_list()
    rows[row][column] = value
    from datasets import Dataset

    return Dataset.from_list(rows, features=table.features)


@pytest.mark.parametrize(
    ("column", "value", "kw", "needle"),
    [
        ("images", "missing", {}, "row 2, column 'images': missing image file"),
        ("retrieved_images", "missing", {}, "row 2, column 'retrieved_images': missing image file"),
        ("chosen", "  ", {}, "row 2, column 'chosen': empty text"),
        ("rejected", "", {}, "row 2, column 'rejected': empty text"),
        ("prompt", "describe", {"max_length": 10}, "row 2, column 'prompt': image tokens would be truncated"),
    ],
    ids=["missing-image", "missing-retrieved", "empty-chosen", "empty-rejected", "image-tokens-truncated"],
)
def test_bad_rows_fail_with_row_and_column_or_are_skipped(
    tmp_path, tiny, table, caplog, column, value, kw, needle
):
    """The error names row 2 and its column; with skip_bad_rows exactly row 2 is dropped."""
    from datasets import Dataset

    _, processor = tiny
    if column in ("images", "retrieved_images"):  # images as files, one of them missing
        rows = table.to_list()
        for i, r in enumerate(table):
            for col in ("images", "retrieved_images"):
                path = tmp_path / f"{i}-{col}.png"
                r[col][0].save(path)
                rows[i][col] = [str(path)]
        rows[2][column] = [str(tmp_path / "missing.png")]
        bad = Dataset.from_list(rows)
    else:
        bad = _bad(table, column, value)
    with pytest.raises(BadRowError, match=needle.replace("(", r"\(")):
        pairs(bad, processor, **kw)
    with caplog.at_level(logging.WARNING):
        kept = pairs(bad, processor, skip_bad_rows=True, **kw)
    assert kept.skipped == 1
    assert [r["chosen"] for r in kept.rows] == [c for i, c in enumerate(table["chosen"]) if i != 2]
    assert f"skipped 1 bad preference rows of {len(bad)}" in caplog.text
