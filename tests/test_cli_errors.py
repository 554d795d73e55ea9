"""Every user mistake gives one line on stderr naming the key (and the file, path or item) and exit 2;
`validate` catches those knowable without loading weights; `--debug` shows the traceback instead."""

from __future__ import annotations

import pytest
from conftest import BIN, make_env, one_line_error
from families import save_llava

TINY_XE = "test/tiny-xe.yaml"  # shipped names resolve from any working directory


def rl(*args: str, cwd=None, env=None):
    import subprocess

    return subprocess.run(
        [str(BIN / "rlalign"), *args],
        cwd=cwd,
        env=env or make_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    save_llava(path)
    return path


@pytest.mark.slow
def test_missing_model_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    for cmd in ("validate", "train"):
        args = (
            [TINY_XE, "--set", f"model.name_or_path={missing}"]
            if cmd == "validate"
            else [TINY_XE, f"model.name_or_path={missing}", f"trainer.output_dir={tmp_path / 'run'}"]
        )
        one_line_error(rl(cmd, *args), "model.name_or_path", str(missing), "tiny-xe.yaml")
    assert not (tmp_path / "run").exists(), "nothing may be written before the model is found"


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(
        rl("validate", TINY_XE, "--set", f"model.name_or_path={tmp_path / 'empty'}"),
        "model.name_or_path",
        "no config.json",
    )


def test_hub_id_not_in_cache_offline_says_nothing_is_downloaded(tmp_path):
    env = make_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    line = one_line_error(
        rl(
            "train",
            TINY_XE,
            "model.name_or_path=some-org/some-vlm",
            f"trainer.output_dir={tmp_path / 'r'}",
            env=env,
        ),
        "model.name_or_path",
        "'some-org/some-vlm'",
        "not in the Hugging Face cache",
        "nothing is downloaded",
    )
    assert str(tmp_path / "hf") in line, "the cache that was looked in is named"
    ok = rl("validate", TINY_XE, "--set", "model.name_or_path=some-org/some-vlm", env=env)
    assert ok.returncode == 0 and "note: model.name_or_path" in ok.stdout, (
        "validate notes it, a run refuses it"
    )


@pytest.mark.parametrize(
    ("reward", "source", "needles"),
    [
        ("nosuchmod:f", None, ["module 'nosuchmod' not found"]),
        pytest.param(
            "myreward:missing",
            "def f(samples, image_ids, **kw):\n    return [0.0] * len(samples)\n",
            ["module 'myreward' has no attribute 'missing'"],
            marks=pytest.mark.slow,
        ),
        pytest.param("myreward:X", "X = 3\n", ["'X' is not callable"], marks=pytest.mark.slow),
        (
            "myreward:f",
            "raise RuntimeError('boom at import')\n",
            ["importing 'myreward' failed", "boom at import"],
        ),
    ],
    ids=["no-module", "no-attribute", "not-callable", "import-fails"],
)
def test_reward_that_cannot_be_loaded(tmp_path, reward, source, needles):
    if source:
        (tmp_path / "myreward.py").write_text(source)
    over = f"objective.rewards=[{{name: '{reward}'}}]"
    one_line_error(
        rl("validate", "test/tiny-grpo.yaml", "--set", over, cwd=tmp_path),
        "objective.rewards",
        reward,
        *needles,
    )


def test_reward_from_working_directory_loads_and_bad_output_is_named(tmp_path):
    """A module beside the user (no PYTHONPATH) is importable; one returning the wrong number of values
    stops the run with one line naming it."""
    (tmp_path / "myreward.py").write_text("def short(samples, image_ids, **kw):\n    return [1.0]\n")
    over = "objective.rewards=[{name: 'myreward:short'}]"
    assert rl("validate", "test/tiny-grpo.yaml", "--set", over, cwd=tmp_path).returncode == 0
    proc = rl(
        "train",
        "test/tiny-grpo.yaml",
        over,
        f"trainer.output_dir={tmp_path / 'run'}",
        "trainer.max_steps=1",
        cwd=tmp_path,
    )
    one_line_error(proc, "objective.rewards", "'myreward:short'", "returned 1 values for")


def test_lora_targets_that_match_nothing(tmp_path, llava_dir):
    lora = "model.lora={target_modules: [q_proj, qkv_proj]}"
    # validate: the built-in model, and a checkpoint folder whose structure is read from its config alone
    for model in ("builtin:tiny-llava", str(llava_dir)):
        line = one_line_error(
            rl("validate", TINY_XE, "--set", lora, "--set", f"model.name_or_path={model}"),
            "model.lora.target_modules",
            "'qkv_proj'",
            "LlavaForConditionalGeneration",
        )
        assert "q_proj" in line.split("adaptable module names:")[1], "the names that exist are listed"
    # train: refused on the real model, before anything is written
    proc = rl("train", TINY_XE, lora, f"trainer.output_dir={tmp_path / 'run'}")
    one_line_error(proc, "model.lora.target_modules", "'qkv_proj'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("recipe", "overrides", "needle"),
    [
        ("test/tiny-dpo.yaml", ["model.reference=none"], "objective 'dpo' scores against a reference"),
        pytest.param(
            "test/tiny-rdpo.yaml",
            ["model.reference=none"],
            "objective 'rdpo' scores against a reference",
            marks=pytest.mark.slow,
        ),
        (
            "test/tiny-grpo.yaml",
            ["model.reference=none", "objective.grpo.beta=0.04"],
            "objective 'grpo' scores against a reference",
        ),
    ],
    ids=["dpo", "rdpo", "grpo"],
)
def test_objective_needs_not_met(recipe, overrides, needle, tmp_path):
    sets = [x for o in overrides for x in ("--set", o)]
    one_line_error(rl("validate", recipe, *sets), "model.reference", needle)
    if (
        recipe.endswith("dpo.yaml") and "rdpo" not in recipe
    ):  # train runs the same preflight: one case is enough
        one_line_error(rl("train", recipe, *overrides, f"trainer.output_dir={tmp_path / 'run'}"), needle)


def test_grpo_without_kl_needs_no_reference():
    proc = rl(
        "validate", "test/tiny-grpo.yaml", "--set", "model.reference=none", "--set", "objective.grpo.beta=0"
    )
    assert proc.returncode == 0, proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    args = ["validate", TINY_XE, "--set", f"model.name_or_path={tmp_path / 'none'}"]
    for proc in (rl("--debug", *args), rl(*args, env=make_env(RLALIGN_DEBUG="1"))):
        assert proc.returncode != 0 and "Traceback" in proc.stderr and "RecipeError" in proc.stderr


def test_every_shipped_recipe_validates_offline_in_an_empty_home(tmp_path):
    from rlalign.config.loader import RECIPES_DIR

    env = make_env(HOME=str(tmp_path), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    names = [str(p.relative_to(RECIPES_DIR)) for p in sorted(RECIPES_DIR.rglob("*.yaml"))]
    proc = rl("validate", *names, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ok  ") == len(names)
