"""Objectives as plug-ins: a user objective in a module outside the package, with its own settings section,
trains through the CLI and validates with one-line errors, with no edit inside `rlalign/`; `validate` checks
an objective's needs (reference, data columns) before anything loads."""

from __future__ import annotations

import math
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, losses, metrics, one_line_error, rlalign

USER_OBJECTIVE = '''
"""SFT with label smoothing: a user objective, outside the rlalign package."""
from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F

from rlalign.objectives import ObjectiveBase


@dataclass(kw_only=True)
class SmoothingConfig:
    smoothing: float = 0.1
    """Share of the target mass spread evenly over the vocabulary."""

    def __post_init__(self):
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")


class LabelSmoothedSFT(ObjectiveBase):
    name: ClassVar[str] = "sft_ls"
    config_class: ClassVar[type] = SmoothingConfig
    data_kind: ClassVar[str] = "captions"

    def count_items(self, batch):
        return float((batch["labels"][:, 1:] != -100).sum())

    def loss(self, model, batch, *, items_per_micro, reference=None):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        per_token = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100,
                                    label_smoothing=self.cfg.smoothing, reduction="none")
        loss = per_token.sum() / items_per_micro
        return loss, {"loss": loss.detach()}
'''


def write_plugin(folder, smoothing: float | str = 0.1, extra: str = "") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my_objectives.py").write_text(USER_OBJECTIVE)
    recipe = folder / "sft-ls.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        base: {ROOT / "recipes/test/tiny-xe.yaml"}
        objective:
          name: my_objectives:LabelSmoothedSFT
          sft_ls:
            smoothing: {smoothing}
            {extra}
        trainer:
          max_steps: 3
        """)
    )
    return str(recipe)


def test_user_objective_trains_through_the_cli(tmp_path):
    """Smoothing 0 is plain cross-entropy: the user objective's losses equal the built-in `xe`'s, step by step
    (same data, same seed); smoothing 0.1 trains too, with a larger loss."""
    plain, smoothed, xe = tmp_path / "ls0", tmp_path / "ls1", tmp_path / "xe"
    rlalign("train", write_plugin(tmp_path / "p0", 0.0), f"trainer.output_dir={plain}")
    rlalign("train", write_plugin(tmp_path / "p1", 0.1), f"trainer.output_dir={smoothed}")
    rlalign("train", "recipes/test/tiny-xe.yaml", "trainer.max_steps=3", f"trainer.output_dir={xe}")
    assert len(losses(plain)) == 3 and all(math.isfinite(v) for v in losses(smoothed))
    assert losses(plain) == pytest.approx(losses(xe), abs=1e-5)
    assert losses(smoothed)[0] > losses(plain)[0] + 0.01
    assert metrics(plain)[-1]["val/loss"] == pytest.approx(metrics(xe)[-1]["val/loss"], abs=1e-5)
    assert "sft_ls:\n    smoothing: 0.1" in (smoothed / "recipe.yaml").read_text()


def test_user_objective_settings_errors_are_one_line(tmp_path):
    one_line_error(
        rlalign("validate", write_plugin(tmp_path / "a", extra="smoothin: 0.2"), check=False),
        "objective.sft_ls.smoothin: unknown key",
        "did you mean 'smoothing'",
    )
    one_line_error(
        rlalign("validate", write_plugin(tmp_path / "b", 1.5), check=False),
        "objective.sft_ls",
        "smoothing must be in [0, 1), got 1.5",
    )
    one_line_error(
        rlalign(
            "validate",
            write_plugin(tmp_path / "c"),
            "--set",
            "objective.name=my_objectives:Nope",
            check=False,
        ),
        "objective.name",
        "module 'my_objectives' has no attribute 'Nope'",
    )
    one_line_error(
        rlalign("validate", "recipes/test/tiny-xe.yaml", "--set", "objective.name=dpoo", check=False),
        "objective.name: unknown objective 'dpoo'",
        "did you mean 'dpo'",
    )


def test_rdpo_needs_retrieved_images_in_the_data(tmp_path):
    """`validate` reads the preference file's schema: rDPO on pairs without `retrieved_images` is refused in
    one line naming the key and the file; DPO on the same file is fine."""
    path = tmp_path / "pairs.parquet"
    table = pa.table({"images": [b"x"], "prompt": ["p"], "chosen": ["a"], "rejected": ["b"]})
    pq.write_table(table, path)
    sets = ["--set", f"data.pairs_path={path}"]
    line = one_line_error(
        rlalign("validate", "test/tiny-rdpo.yaml", *sets, check=False),
        "data.retrieved_images_column",
        str(path),
        "'retrieved_images'",
        "objective 'rdpo'",
    )
    assert "columns: images, prompt, chosen, rejected" in line
    assert rlalign("validate", "test/tiny-dpo.yaml", *sets, check=False).returncode == 0


def test_builtin_objectives_satisfy_the_protocols():
    """Every registered objective has the parts the loader and the trainer use; exactly the rollout ones are
    `RolloutObjective`s (checked on instances built from their recipes)."""
    import dataclasses

    from rlalign.data import DATA_KINDS
    from rlalign.objectives import OBJECTIVES, Objective, RolloutObjective, build_objective
    from rlalign.recipe import load_recipe

    assert OBJECTIVES.names() == ["dpo", "grpo", "rdpo", "scst", "xe"]
    for name in OBJECTIVES.names():
        cls = OBJECTIVES.get(name, where="test")
        assert cls.name == name and dataclasses.is_dataclass(cls.config_class) and cls.data_kind in DATA_KINDS
    recipes = {"xe": "test/tiny-xe.yaml", "dpo": "test/tiny-dpo.yaml", "grpo": "test/tiny-grpo.yaml"}
    for name, recipe in recipes.items():
        built = build_objective(load_recipe(recipe), processor=_Processor())
        assert isinstance(built, Objective)
        assert isinstance(built, RolloutObjective) == (name == "grpo")


class _Processor:
    """Enough of a processor for building the rollout engine (it only keeps the tokenizer)."""

    tokenizer = None
