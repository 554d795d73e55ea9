"""The family x objective support matrix, through the real CLI.

Families: tiny random checkpoints of Llava-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3 and Gemma 3
saved with `save_pretrained` (tests/families.py). Objectives: xe, scst, grpo, dpo, rdpo and `pairs build`;
the rdpo cell trains on the pairs its family's `pairs build` cell wrote (the two cells chain).

Each training cell runs 3 steps of the objective's test recipe with `model.name_or_path` pointing at the
checkpoint (a checkpoint every 2 steps), then checks:
- every step's loss is finite, the step-2 and step-3 checkpoints are complete, run_info.json names the
  family's model class and, for preference data, packed rows (Gemma 3: unpacked);
- step 1 against exact values: DPO and rDPO start from the reference (a copy), so each term is log 2 and
  every reward 0; GRPO (one inner update) has KL 0 and ratio 1; SCST's advantage is reward - greedy reward;
- the export `final/` reloads with `AutoModelForImageTextToText` and the family's processor, and its logits
  and greedy `generate` on one image equal those of the family's model holding the step-3 checkpoint's
  weights (and differ from the untrained model's unless every gradient was 0: a rollout whose rewards are
  all equal, as CIDEr-D 0 for every sample of a random model, does not move the weights);
- resume (every slow cell): with the step-3 checkpoint removed, `trainer.resume=auto`
  continues from step 2 (the metrics of steps 1-2 are not rewritten) to the same step-3 loss, gradient norm
  and learning rate, and the same step-3 weights (optimizer and scheduler state restored), to 1e-6.

The default tier (`DEFAULT`) holds every objective once; the rest is `slow`.
Cell results go to `support-matrix.json` in pytest's base temporary folder (the README table's source).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_env, metrics, rlalign
from families import FAMILIES, PROMPTS, images

pytestmark = pytest.mark.e2e

FAMILY_NAMES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3")
OBJECTIVES = ("xe", "scst", "grpo", "dpo", "rdpo", "pairs")
DEFAULT = {
    ("gemma3", "pairs"),
    ("gemma3", "rdpo"),
    ("llava_next", "grpo"),
    ("qwen2_vl", "dpo"),
    ("qwen2_5_vl", "scst"),
    ("idefics3", "xe"),
}
"""The default tier, six CLI runs (about a minute on 2 cores): every objective once, every family but
Llava-1.5, whose class the built-in tiny model shares (the rest of the default suite runs it)."""
RESUME_IN_DEFAULT: set[tuple[str, str]] = set()
"""Default cells that also check resume (every slow cell does; the default suite's resume tests run the
built-in tiny Llava)."""
MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
}
UNPACKED = {"gemma3"}
RECIPES = {
    "xe": ["recipes/test/tiny-xe.yaml"],
    "scst": ["recipes/test/tiny-scst.yaml"],
    # one inner update per rollout: the step-1 metrics are those of the policy before any update
    "grpo": ["recipes/test/tiny-grpo.yaml", "objective.grpo.inner_epochs=1"],
    "dpo": ["recipes/test/tiny-dpo.yaml"],
    "rdpo": ["recipes/test/tiny-rdpo.yaml"],
}
PAIRS = ["pairs.pool_size=16", "pairs.top_k=3", "pairs.shard_size=8"]


def cells() -> list:
    out = []
    for family in FAMILY_NAMES:
        for objective in OBJECTIVES:
            marks = () if (family, objective) in DEFAULT else (pytest.mark.slow,)
            out.append(pytest.param(family, objective, marks=marks, id=f"{family}-{objective}"))
    return out


class Matrix:
    """Lazily built, shared by the module's cells: checkpoints, pair datasets, the results file."""

    def __init__(self, root: Path):
        self.root = root
        self.env = make_env(HF_HOME=str(root / "hf-home"))  # datasets' caches stay under tmp
        self.results: dict[str, dict] = {}
        self.results_file = root.parent / "support-matrix.json"

    def checkpoint(self, family: str) -> Path:
        path = self.root / "models" / family
        if not (path / "config.json").is_file():
            path.mkdir(parents=True, exist_ok=True)
            FAMILIES[family](path)
        return path

    def pairs(self, family: str) -> Path:
        """`rlalign pairs build` on the family's checkpoint (once): a pool of 16 shapes images."""
        out = self.root / "pairs" / family
        if not (out / "pairs.parquet").is_file():
            rlalign(
                "pairs",
                "build",
                "recipes/test/tiny-xe.yaml",
                f"model.name_or_path={self.checkpoint(family)}",
                "model.tiny=null",
                "trainer.output_dir=unused",
                f"pairs.output_dir={out}",
                f"pairs.embedder.cache_dir={out / 'cache'}",
                *PAIRS,
                env=self.env,
            )
        return out

    def record(self, family: str, objective: str, **result) -> None:
        self.results[f"{family}/{objective}"] = {"family": family, "objective": objective, **result}
        self.results_file.write_text(json.dumps(self.results, indent=1, sort_keys=True))


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Matrix:
    return Matrix(tmp_path_factory.mktemp("matrix"))


@pytest.mark.parametrize(("family", "objective"), cells())
def test_cell(matrix, tmp_path, family, objective):
    matrix.record(family, objective, status="fail")
    if objective == "pairs":
        n = check_pairs(matrix.pairs(family))
        matrix.record(family, objective, status="pass", pairs=n)
        return
    out = tmp_path / "run"
    args = [
        *RECIPES[objective],
        f"model.name_or_path={matrix.checkpoint(family)}",
        "model.tiny=null",
        f"trainer.output_dir={out}",
        "trainer.max_steps=3",
        "trainer.save_every=2",
        "trainer.export_final=true",
    ]
    if objective == "rdpo":
        args.append(f"data.pairs_path={matrix.pairs(family) / 'pairs.parquet'}")
    rlalign("train", *args, env=matrix.env)
    steps = check_run(out, family, objective)
    # rollouts whose rewards are all equal (CIDEr-D 0 for every sample of a random model) have advantages
    # and gradients of 0: Adam leaves the weights as they were
    check_export(out, matrix.checkpoint(family), moved=any(m["grad_norm"] > 0 for m in steps))
    resumed = (family, objective) in RESUME_IN_DEFAULT or (family, objective) not in DEFAULT
    if resumed:
        check_resume(out, args, matrix.env)
    matrix.record(
        family, objective, status="pass", losses=[m["loss"] for m in steps], resumed=resumed, exported=True
    )


def check_run(out: Path, family: str, objective: str) -> list[dict]:
    steps = metrics(out)
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in steps)
    for step in (2, 3):
        assert (out / f"checkpoints/step-{step:07d}/COMPLETE").is_file()
    info = json.loads((out / "run_info.json").read_text())
    assert info["model_class"] == MODEL_CLASSES[family]
    if objective in ("dpo", "rdpo"):
        assert info["preference_rows"].startswith("unpacked" if family in UNPACKED else "packed")
    else:
        assert "preference_rows" not in info
    first = steps[0]
    if objective in ("dpo", "rdpo"):
        terms = 2 if objective == "rdpo" else 1  # rDPO: the DPO term and the visual term, both log 2
        assert first["loss"] == pytest.approx(terms * math.log(2), abs=1e-6)
        assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
        assert steps[-1]["rewards/margins"] != 0.0  # the policy moved away from the reference
    elif objective == "grpo":
        assert first["kl"] == pytest.approx(0.0, abs=1e-7)
        assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    elif objective == "scst":
        for m in steps:  # one sample per image: advantage = r(sample) - r(greedy decode)
            assert m["advantage_mean"] == pytest.approx(m["reward_mean"] - m["greedy_reward_mean"], abs=1e-9)
    return steps


def one_input(processor) -> dict:
    from rlalign.data.collate import encode_prompts

    return dict(encode_prompts(processor, [images()[0]], [PROMPTS[0]]))


@torch.no_grad()
def check_export(out: Path, initial: Path, moved: bool) -> None:
    """The export reloads and generates, holding exactly the step-3 checkpoint's weights (which differ
    from the initial ones when some gradient was not 0)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from rlalign.models.families import load_processor

    exported = AutoModelForImageTextToText.from_pretrained(out / "final").eval()
    processor = load_processor(str(out / "final"))
    trained = AutoModelForImageTextToText.from_pretrained(initial).eval()
    untrained_logits = trained(**one_input(processor)).logits
    trained.load_state_dict(load_file(out / "checkpoints/step-0000003/model.safetensors"))
    inputs = one_input(processor)
    logits = exported(**inputs).logits
    assert (logits - trained(**inputs).logits).abs().max() <= 1e-6
    assert bool((logits - untrained_logits).abs().max() > 1e-4) == moved
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    ids = exported.generate(**inputs, **gen)
    assert ids.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(ids, trained.generate(**inputs, **gen))


def check_resume(out: Path, args: list[str], env: dict) -> None:
    """Remove the step-3 checkpoint, resume: the run continues from step 2 to the same step 3."""
    from safetensors.torch import load_file

    last = out / "checkpoints/step-0000003"
    whole_lines = (out / "metrics.jsonl").read_text().splitlines()
    whole_weights = load_file(last / "model.safetensors")
    shutil.rmtree(last)
    shutil.rmtree(out / "final")
    rlalign("train", *args, "trainer.resume=auto", "trainer.export_final=false", env=env)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines[:2] == whole_lines[:2]  # steps 1-2 kept, not rerun (their timings would differ)
    assert not (out / "final").exists()
    resumed, whole = json.loads(lines[2]), json.loads(whole_lines[2])
    assert resumed["step"] == 3 and len(lines) == 3
    for key in ("loss", "grad_norm", "lr"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6), key
    weights = load_file(last / "model.safetensors")
    assert weights.keys() == whole_weights.keys()
    assert max(float((weights[k] - whole_weights[k]).abs().max()) for k in weights) <= 1e-6


def check_pairs(out: Path) -> int:
    """The pair dataset: TRL columns, every rejected answer a refill of its chosen answer's template
    (same words outside the masked slots), below the similarity threshold, from another image."""
    import pyarrow.parquet as pq

    from rlalign.pairs.builder import mask_template, shapes_vocabulary, template_string

    table = pq.read_table(out / "pairs.parquet")  # not through `datasets`: its cache is outside tmp_path
    stats = json.loads((out / "stats.json").read_text())
    assert stats["pool"] == 16 and stats["pairs"] == table.num_rows > 0
    assert {"images", "prompt", "chosen", "rejected", "retrieved_images"} <= set(table.column_names)
    vocab = shapes_vocabulary()
    for row in table.drop_columns(["images", "retrieved_images"]).to_pylist():
        assert row["rejected"] != row["chosen"]
        assert template_string(mask_template(row["rejected"], vocab)) == row["mask"]
        assert template_string(mask_template(row["chosen"], vocab)) == row["mask"]
        assert row["text_similarity"] < 0.95
        assert row["retrieved_id"] != row["image_id"]
    return table.num_rows
