"""The family x objective support matrix, through the real CLI (first cells).

Each cell: a tiny random checkpoint of the family saved with `save_pretrained` (tests/families.py),
3 steps of the objective's test recipe with `model.name_or_path` pointing at it, then:
- every step's loss is finite and the step-3 checkpoint is complete;
- DPO: at step 1 the policy is the reference (a copy), so the loss is exactly log 2 and every reward 0;
- GRPO (one inner update per rollout): at step 1 the reference equals the policy and scores the same
  sequences, so the KL is 0 and the importance ratio 1 (old log-probs from the rollout equal the loss's).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import metrics, rlalign
from families import FAMILIES

pytestmark = pytest.mark.e2e

CELLS = [(family, objective) for family in ("qwen2_5_vl", "llava_next") for objective in ("dpo", "grpo")]
MODEL_CLASSES = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
}
RECIPES = {
    "dpo": ["recipes/test/tiny-dpo.yaml"],
    # one inner update per rollout: the step-1 metrics are those of the policy before any update
    "grpo": ["recipes/test/tiny-grpo.yaml", "objective.grpo.inner_epochs=1"],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for family in {f for f, _ in CELLS}:
        out[family] = tmp_path_factory.mktemp(family)
        FAMILIES[family](out[family])
    return out


@pytest.mark.parametrize(("family", "objective"), CELLS)
def test_three_steps_through_the_cli(tmp_path, checkpoints, family, objective):
    out = tmp_path / "run"
    rlalign(
        "train",
        *RECIPES[objective],
        f"model.name_or_path={checkpoints[family]}",
        "model.tiny=null",
        f"trainer.output_dir={out}",
        "trainer.max_steps=3",
    )
    steps = metrics(out)
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in steps)
    assert (out / "checkpoints/step-0000003/COMPLETE").is_file()
    info = json.loads((out / "run_info.json").read_text())
    assert info["model_class"] == MODEL_CLASSES[family]
    assert info.get("preference_rows") == ("packed" if objective == "dpo" else None)
    first = steps[0]
    if objective == "dpo":
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
        assert steps[-1]["rewards/margins"] != 0.0  # the policy moved away from the reference
    else:
        assert first["kl"] == pytest.approx(0.0, abs=1e-7)
        assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
