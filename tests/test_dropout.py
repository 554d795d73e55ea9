"""`model.disable_dropout`: on by default for the objectives that score against a reference or roll out, off
for XE; with it on, the same batch gives the same loss twice in training mode (LoRA dropout and a family's
attention / hidden dropout included), with it off the two differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import rows, save_llava

from rlalign.config.schema import LoraConfig, ModelConfig
from rlalign.data.collate import SFTCollator
from rlalign.models.builder import build_policy
from rlalign.recipe import load_recipe


@pytest.mark.parametrize(
    ("recipe", "overrides", "expected"),
    [
        ("recipes/test/tiny-xe.yaml", [], False),
        ("recipes/test/tiny-dpo.yaml", [], True),
        ("recipes/test/tiny-rdpo.yaml", [], True),
        ("recipes/test/tiny-grpo.yaml", [], True),
        ("recipes/test/tiny-grpo.yaml", ["objective.name=scst"], True),
        ("recipes/test/tiny-dpo.yaml", ["model.disable_dropout=false"], False),
        ("recipes/test/tiny-xe.yaml", ["model.disable_dropout=true"], True),
    ],
)
def test_default_follows_the_objective(recipe, overrides, expected):
    assert load_recipe(recipe, overrides).model.disable_dropout is expected


def two_losses(cfg: ModelConfig) -> tuple[float, float]:
    """The loss of one batch, twice, in training mode. LoRA B matrices start at 0 (the adapter's output, and so
    its dropout, would not show): they get small random values first."""
    torch.manual_seed(0)
    model, processor = build_policy(cfg)
    assert model.training
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = SFTCollator(processor, 16)(rows())
    with torch.no_grad():
        return tuple(float(model(**batch).loss) for _ in range(2))


@pytest.fixture(scope="module")
def dropout_llava(tmp_path_factory) -> Path:
    """A tiny Llava checkpoint with dropout 0.3 in its text attention and vision attention."""
    path = tmp_path_factory.mktemp("llava-dropout")
    save_llava(path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["attention_dropout"] = 0.3
    config["vision_config"]["attention_dropout"] = 0.3
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4, dropout=0.5)], ids=["full", "lora"])
def test_same_batch_same_loss_in_training_mode(dropout_llava, lora):
    common = {"name_or_path": str(dropout_llava), "lora": lora}
    on = two_losses(ModelConfig(**common, disable_dropout=True))
    off = two_losses(ModelConfig(**common, disable_dropout=False))
    assert on[0] == on[1]
    assert off[0] != off[1]


def test_lora_dropout_alone():
    """The built-in model has no dropout of its own: LoRA's is the only noise, and it is switched off."""
    lora = LoraConfig(r=4, dropout=0.5)
    on = two_losses(ModelConfig(lora=lora, disable_dropout=True))
    off = two_losses(ModelConfig(lora=lora, disable_dropout=False))
    assert on[0] == on[1] and off[0] != off[1]
