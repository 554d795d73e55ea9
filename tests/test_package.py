"""rlalign as an installed tool: a wheel built from the sources, installed into a fresh venv, used from an
empty folder. The venv reuses the test venv's dependencies (no download) but not its rlalign."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT, make_env

SOURCES = ("pyproject.toml", "README.md", "rlalign")


def sh(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(bin folder of a fresh venv holding the wheel, its environment)."""
    tmp = tmp_path_factory.mktemp("package")
    outputs = lambda: sorted(map(str, [*ROOT.glob("build"), *ROOT.glob("dist"), *ROOT.rglob("*.egg-info")]))  # noqa: E731
    before = outputs()
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:  # build from a copy: setuptools leaves build/ and *.egg-info where it builds
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(
            ROOT / name,
            src / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}),
        )
    env = make_env(HOME=str(tmp / "home"), PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    pip = [sys.executable, "-m", "pip"]
    sh(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(src)],
        tmp,
        env,
    )
    wheel = next((tmp / "dist").glob("rlalign-*.whl"))
    venv = tmp / "venv"
    sh([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    # the dependencies come from the test venv's site-packages (its editable rlalign finder is not loaded)
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    sh([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "-q", str(wheel)], tmp, env)
    assert outputs() == before, "building the wheel must leave no build output in the checkout"
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    env.pop("PYTHONPATH", None)
    return venv / "bin", env


def test_wheel_ships_recipes_and_launch_files(installed, tmp_path):
    bin_, env = installed
    where = sh([str(bin_ / "python"), "-c", "import rlalign; print(rlalign.__file__)"], tmp_path, env).stdout
    assert where.startswith(str(bin_.parent)), f"rlalign imported from {where}, not from the installed wheel"
    listing = sh([str(bin_ / "rlalign"), "ls"], tmp_path, env).stdout
    for name in (
        "demo/shapes-xe.yaml",
        "test/tiny-dpo.yaml",
        "realign/llava-1.5-7b-rdpo.yaml",
        "launch/zero3-8gpu.yaml",
        "launch/deepspeed/zero2.json",
        "launch/slurm.sbatch",
    ):
        assert name in listing, name
    ok = sh([str(bin_ / "rlalign"), "validate", "demo/shapes-xe.yaml", "test/tiny-dpo.yaml"], tmp_path, env)
    assert ok.stdout.count("ok  ") == 2


def test_init_copies_recipe_its_bases_and_launch_files(installed, tmp_path):
    bin_, env = installed
    out = sh([str(bin_ / "rlalign"), "init", "test/tiny-dpo.yaml"], tmp_path, env).stdout
    for rel in (
        "recipes/test/tiny-dpo.yaml",
        "recipes/test/tiny-xe.yaml",
        "recipes/demo/shapes-xe.yaml",
        "launch/zero3-8gpu.yaml",
        "launch/deepspeed/zero3.json",
    ):
        assert (tmp_path / rel).is_file() and f"wrote {rel}" in out, rel
    # the copy is the user's to edit: the edited local file is what validate reads
    local = tmp_path / "recipes/test/tiny-dpo.yaml"
    local.write_text(local.read_text() + "\ntrainer:\n  max_stpes: 3\n")

    def refused(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(bin_ / "rlalign"), *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        return proc

    bad = refused("validate", "recipes/test/tiny-dpo.yaml")
    assert "trainer.max_stpes: unknown key (did you mean 'max_steps'?)" in bad.stderr
    again = refused("init", "test/tiny-dpo.yaml")
    assert again.returncode == 2 and "already exist" in again.stderr and "max_stpes" in local.read_text()


@pytest.mark.e2e
@pytest.mark.parametrize(
    "stages",
    [["--stages", "xe"], pytest.param([], marks=pytest.mark.slow)],
    ids=["xe", "all-stages"],
)
def test_quick_demo_runs_from_the_installed_package(installed, tmp_path, stages):
    bin_, env = installed
    sh([str(bin_ / "rlalign"), "demo", "--quick", "--seeds", "1", *stages, "--out", "report"], tmp_path, env)
    report = (tmp_path / "report" / "report.md").read_text()
    for row in ("init", "xe", "scst", "grpo", "dpo", "rdpo") if not stages else ("init", "xe"):
        assert f"| {row} |" in report, row
    assert (tmp_path / "report" / "runs").is_dir() and not (ROOT / "report").exists()
