"""TRL-format data: conversational and plain preference rows give the same batches; pre-rendered prompts are
not templated twice (same token ids); rows with several images pack, each image encoded once, with the
log-probs of the family's own forward; splits are chosen by name (a `test` split is never silently
ignored); a hub id is read from the local cache only; prompt-completion rows train XE; conversational and
plain datasets saved with `save_to_disk` both train DPO through the CLI, to the same losses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
from conftest import metrics, rlalign
from families import FAMILIES, images

import rlalign.objectives.dpo as dpo
from rlalign.config import RecipeError
from rlalign.config.schema import DataConfig, ModelConfig, TinyModelConfig
from rlalign.data.captions import CaptionPairs, load_rows
from rlalign.data.collate import encode_prompts, is_templated, prompt_text
from rlalign.data.images import BadRowError
from rlalign.data.preference import PreferenceCollator, load_preferences
from rlalign.models.builder import load_base
from rlalign.models.tiny import build_tiny_llava
from rlalign.shapes import ShapesConfig, make_item

CHAT_FAMILIES = ("llava", "qwen2_vl", "idefics3", "gemma3")
MULTI_IMAGE = ("llava", "llava_next", "qwen2_vl", "idefics3")
"""Families whose preference rows pack (tests/test_families.py), and so take rows with several images."""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for family in set(CHAT_FAMILIES) | set(MULTI_IMAGE):
        out[family] = tmp_path_factory.mktemp(family)
        FAMILIES[family](out[family])
    return out


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava(TinyModelConfig(), ShapesConfig(image_size=48))[1]


def user(text: str, n_images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def pref_rows(conversational: bool, n: int = 6) -> dict[str, list]:
    items = [make_item(ShapesConfig(image_size=48), "train", i) for i in range(n)]
    prompt = "describe the image"
    chosen = [it.captions[0] for it in items]
    rejected = [it.captions[0].replace("a ", "two ", 1) for it in items]
    return {
        "images": [[it.image] for it in items],
        "prompt": [user(prompt) if conversational else prompt for _ in items],
        "chosen": [assistant(c) if conversational else c for c in chosen],
        "rejected": [assistant(r) if conversational else r for r in rejected],
    }


def save(tmp_path: Path, name: str, rows: dict, split: str = "train", **more: dict) -> Path:
    features = {"images": [datasets.Image()]} if isinstance(rows["images"][0], list) else {}
    splits = {split: rows, **more}
    dd = datasets.DatasetDict(
        {
            s: datasets.Dataset.from_dict(r).cast_column("images", features["images"])
            if features
            else datasets.Dataset.from_dict(r)
            for s, r in splits.items()
        }
    )
    dd.save_to_disk(str(tmp_path / name))
    return tmp_path / name


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_pre_templated_prompt_gives_the_same_token_ids(checkpoints, family):
    _, processor = load_base(ModelConfig(name_or_path=str(checkpoints[family])))
    image = images()[0]
    rendered = prompt_text(processor, "describe the image")
    assert rendered != "describe the image" and is_templated(processor, rendered)
    assert not is_templated(processor, "describe the image")
    plain = encode_prompts(processor, [image], ["describe the image"])
    again = encode_prompts(processor, [image], [rendered])
    messages = encode_prompts(processor, [image], [user("describe the image")])
    assert plain["input_ids"].tolist() == again["input_ids"].tolist() == messages["input_ids"].tolist()
    # rendering the rendered prompt once more would add a second template (and image) around it
    twice = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rendered}]}],
        add_generation_prompt=True,
    )
    assert len(twice) > len(rendered)


def test_pre_templated_prompt_without_chat_template(tiny):
    """The built-in model has no chat template: `<image>` + text, and a prompt holding `<image>` stays as is."""
    image = make_item(ShapesConfig(image_size=48), "train", 0).image
    assert prompt_text(tiny, "describe") == tiny.image_token + "describe"
    a = encode_prompts(tiny, [image], ["describe"])["input_ids"]
    b = encode_prompts(tiny, [image], [tiny.image_token + "describe"])["input_ids"]
    assert a.tolist() == b.tolist()


def test_conversational_and_plain_rows_give_the_same_batches(tmp_path, tiny):
    plain = save(tmp_path, "plain", pref_rows(False))
    chat = save(tmp_path, "chat", pref_rows(True))
    got = []
    for path in (plain, chat):
        train, val = load_preferences(DataConfig(pairs_path=str(path)), tiny, retrieved=False)
        assert (len(train), len(val)) == (5, 1)  # no validation split: the last row is held out
        assert train[0]["chosen"] == pref_rows(False)["chosen"][0]
        got.append(PreferenceCollator(tiny, 48, None, retrieved=False)([train[i] for i in range(4)]))
    for key in ("input_ids", "attention_mask", "position_ids", "segment_ids", "pixel_values"):
        assert torch.equal(got[0][key], got[1][key]), key
    assert got[0]["pair_keys"] == got[1]["pair_keys"]


def test_bad_conversational_cells_name_the_row_and_column(tmp_path, tiny):
    rows = pref_rows(True)
    rows["chosen"][2] = [{"role": "user", "content": [{"type": "text", "text": "not an answer"}]}]
    path = save(tmp_path, "bad", rows)
    with pytest.raises(
        BadRowError, match=r"split 'train' row 2, column 'chosen': not a response .*role 'user'"
    ):
        load_preferences(DataConfig(pairs_path=str(path)), tiny, retrieved=False)
    rows = pref_rows(True)
    rows["prompt"][1] = user("describe", n_images=2)  # two image slots, one image
    path = save(tmp_path, "slots", rows)
    with pytest.raises(
        BadRowError, match=r"row 1, column 'prompt': image count \(.*2 image parts for 1 images"
    ):
        load_preferences(DataConfig(pairs_path=str(path)), tiny, retrieved=False)


def own_logp(model, processor, row_images: list, prompt: str, tokens: list[int]) -> float:
    """Summed log-prob of `tokens` after the prompt with all the row's images, from the family's own forward."""
    enc = encode_prompts(processor, [row_images], [prompt])
    P = enc["input_ids"].shape[1]
    batch = dict(enc)
    batch["input_ids"] = torch.cat([enc["input_ids"], torch.tensor([tokens])], 1)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if "mm_token_type_ids" in enc:
        batch["mm_token_type_ids"] = torch.cat(
            [enc["mm_token_type_ids"], torch.zeros(1, len(tokens), dtype=torch.long)], 1
        )
    logp = model(**batch).logits[0, P - 1 : -1].log_softmax(-1)
    return float(logp.gather(-1, torch.tensor(tokens)[:, None]).sum())


@pytest.mark.parametrize("family", MULTI_IMAGE)
def test_multi_image_rows_pack_with_their_own_forward_logps(checkpoints, family):
    """Rows of 2 and 1 images in one packed batch: each image encoded once (pixel inputs of 3 images), the
    chosen / rejected log-probs equal the family's own forward of [prompt with its images | response]."""
    model, processor = load_base(ModelConfig(name_or_path=str(checkpoints[family])))
    model.eval()
    a, b = images()
    pairs = [
        {
            "image": [a, b],
            "prompt": "describe the image",
            "chosen": "a red circle",
            "rejected": "two blue squares",
            "image_hash": "ab",
        },
        {
            "image": b,
            "prompt": "what is in the picture",
            "chosen": "two blue squares",
            "rejected": "a red circle",
            "image_hash": "b",
        },
    ]
    batch = PreferenceCollator(processor, 48, None, retrieved=False)(pairs)
    assert batch["packed"] and batch["input_ids"].shape[0] == 2
    single = encode_prompts(processor, [[a, b], b], [p["prompt"] for p in pairs])
    assert torch.equal(batch["pixel_values"], single["pixel_values"])  # 3 images, each once
    tok = processor.tokenizer
    with torch.no_grad():
        got = dpo.sequence_logps(model, batch, "sum", torch.float32)
        expected = [
            [
                own_logp(
                    model,
                    processor,
                    p["image"] if isinstance(p["image"], list) else [p["image"]],
                    p["prompt"],
                    tok(p[k], add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                )
                for k in ("chosen", "rejected")
            ]
            for p in pairs
        ]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-5)


def test_multi_image_rows_refused_where_they_cannot_train(tmp_path, checkpoints, tiny):
    rows = pref_rows(False)
    rows["images"][3] = rows["images"][3] + rows["images"][4]
    rows["retrieved_images"] = [im for im in rows["images"]]
    path = save(tmp_path, "multi", {k: v for k, v in rows.items() if k != "retrieved_images"})
    train, _ = load_preferences(DataConfig(pairs_path=str(path)), tiny, retrieved=False)
    assert len(train[3]["image"]) == 2  # Llava packs: accepted
    path = save(tmp_path, "multi-r", rows)
    with pytest.raises(BadRowError, match=r"row 3, column 'images': multi-image row \(2 images, but rDPO"):
        load_preferences(DataConfig(pairs_path=str(path)), tiny, retrieved=True)
    _, gemma = load_base(ModelConfig(name_or_path=str(checkpoints["gemma3"])))
    with pytest.raises(
        BadRowError, match=r"row 3, column 'images': multi-image row \(2 images, but Gemma3Processor"
    ):
        load_preferences(DataConfig(pairs_path=str(path)), gemma, retrieved=False)


def test_splits_by_name(tmp_path, tiny):
    rows = pref_rows(False, n=4)
    folder = tmp_path / "files"
    folder.mkdir()
    for name, part in (("train", slice(0, 3)), ("test", slice(3, 4))):
        ds = datasets.Dataset.from_dict({k: v[part] for k, v in rows.items()}).cast_column(
            "images", [datasets.Image()]
        )
        ds.to_parquet(str(folder / f"{name}.parquet"))
    train, val = load_preferences(DataConfig(pairs_path=str(folder)), tiny, retrieved=False)
    assert (len(train), len(val)) == (3, 1) and val.name.endswith("test.parquet")  # test split, not held out
    assert val[0]["chosen"] == rows["chosen"][3]
    with pytest.raises(
        RecipeError, match=r"data.eval_split: .* has no split 'validation' \(splits: test, train\)"
    ):
        load_preferences(DataConfig(pairs_path=str(folder), eval_split="validation"), tiny, retrieved=False)
    train, val = load_preferences(
        DataConfig(pairs_path=str(folder), train_split="test", eval_split="train"), tiny, retrieved=False
    )
    assert (len(train), len(val)) == (1, 3)
    dd = save(tmp_path, "dd", rows, split="train", validation={k: v[:2] for k, v in rows.items()})
    _, val = load_preferences(DataConfig(pairs_path=str(dd), eval_split="val"), tiny, retrieved=False)
    assert len(val) == 2 and val.name.endswith("split 'validation'")


def test_image_paths_bytes_and_lists_from_jsonl(tmp_path, tiny):
    items = [make_item(ShapesConfig(image_size=48), "train", i) for i in range(3)]
    for i, it in enumerate(items):
        it.image.save(tmp_path / f"{i}.png")
    lines = [
        {"images": ["0.png", "1.png"], "prompt": "describe", "chosen": "a", "rejected": "b"},
        {"images": "2.png", "prompt": "describe", "chosen": "a", "rejected": "b"},
        {"images": ["1.png"], "prompt": "describe", "chosen": "a", "rejected": "b"},
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    train, val = load_preferences(DataConfig(pairs_path=str(tmp_path / "train.jsonl")), tiny, retrieved=False)
    got = [train[0]["image"], train[1]["image"], val[0]["image"]]
    assert [len(g) if isinstance(g, list) else 1 for g in got] == [2, 1, 1]
    assert list(got[0][1].getdata()) == list(items[1].image.getdata())
    assert train[0]["image_hash"] != val[0]["image_hash"]


def test_hub_id_absent_from_the_local_cache_is_one_line(tmp_path, monkeypatch, tiny):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as err:
        load_preferences(DataConfig(pairs_path="someone/prefs"), tiny, retrieved=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.path: 'someone/prefs' is no local path")
    assert "local Hugging Face datasets cache" in message
    assert datasets.config.HF_HUB_OFFLINE is not None  # restored


def test_prompt_completion_rows_train_xe(tmp_path):
    """TRL's prompt-completion format (conversational here): each row's prompt and the completion's text."""
    items = [make_item(ShapesConfig(image_size=48), "train", i) for i in range(3)]
    rows = {
        "image": [it.image for it in items],
        "prompt": [user(f"question {i}", 0) for i in range(3)],
        "completion": [assistant(it.captions[0]) for it in items],
    }
    for split in ("train", "test"):
        datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / f"{split}.parquet"))
    cfg = DataConfig(source="local", path=str(tmp_path), prompt="ignored")
    pairs = CaptionPairs(load_rows(cfg, "train"), cfg.prompt)
    assert [pairs[i]["response"] for i in range(3)] == [it.captions[0] for it in items]
    assert pairs[1]["prompt"] == user("question 1", 0)
    assert len(load_rows(cfg, "val")) == 3  # the test split validates


def test_hub_id_read_from_the_local_datasets_cache(tmp_path, monkeypatch, tiny):
    """A cache entry as `load_dataset('someone/prefs')` leaves it after a download (built here from local
    Parquet files under the name the hub id maps to), read with the hub unreachable."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    rows = pref_rows(False, n=3)
    files = {}
    for split, part in (("train", slice(0, 2)), ("test", slice(2, 3))):
        files[split] = str(tmp_path / f"{split}.parquet")
        part_rows = {k: v[part] for k, v in rows.items()}
        datasets.Dataset.from_dict(part_rows).cast_column("images", [datasets.Image()]).to_parquet(
            files[split]
        )
    datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "build"))
    built = next(p for p in (tmp_path / "build" / "parquet").glob("*/*/*") if p.is_dir())
    entry = tmp_path / "cache" / "someone___prefs" / "default" / "0.0.0" / built.name
    shutil.copytree(built, entry)
    for f in entry.glob("parquet-*.arrow"):
        f.rename(f.with_name(f.name.replace("parquet-", "prefs-")))
    train, val = load_preferences(DataConfig(pairs_path="someone/prefs"), tiny, retrieved=False)
    assert [train[i]["chosen"] for i in range(2)] == rows["chosen"][:2]
    assert val[0]["chosen"] == rows["chosen"][2] and val.name == "someone/prefs split 'test'"


@pytest.mark.e2e
def test_conversational_and_plain_datasets_train_dpo_to_the_same_losses(tmp_path):
    losses = []
    for name, conversational in (("plain", False), ("chat", True)):
        path = save(tmp_path, name, pref_rows(conversational, n=12))
        out = tmp_path / f"run-{name}"
        rlalign(
            "train",
            "recipes/test/tiny-dpo.yaml",
            f"data.pairs_path={path}",
            f"trainer.output_dir={out}",
            "trainer.max_steps=3",
            "trainer.per_device_batch_size=2",
            "trainer.export_final=false",
        )
        losses.append([m["loss"] for m in metrics(out) if "loss" in m])
    assert len(losses[0]) == 3 and all(torch.isfinite(torch.tensor(losses[0])))
    assert losses[0] == losses[1]
