"""`make docker-check`: the Dockerfile's pins are the lock's, and the check notices when they drift."""

from __future__ import annotations

import importlib.util
import shutil

from conftest import ROOT

spec = importlib.util.spec_from_file_location("docker_check", ROOT / "docker" / "check.py")
docker_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docker_check)


def copy_context(tmp_path):
    for name in ("pyproject.toml", "constraints.txt", ".dockerignore", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "docker").mkdir()
    shutil.copy(ROOT / "docker" / "Dockerfile", tmp_path / "docker" / "Dockerfile")
    (tmp_path / "rlalign").mkdir()
    return tmp_path


def test_shipped_dockerfile_passes():
    assert docker_check.check(ROOT) == []


def test_drift_and_lint_problems_are_named(tmp_path):
    root = copy_context(tmp_path)
    dockerfile = root / "docker" / "Dockerfile"
    text = dockerfile.read_text()
    assert "torch==2.13.0" in text and "-c constraints.txt '.[gpu,serve]'" in text
    text = text.replace("torch==2.13.0", "torch==2.9.1").replace(
        "-c constraints.txt '.[gpu,serve]'", "'.[gpu,serve]'"
    )
    dockerfile.write_text(
        text.replace("FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04", "FROM nvidia/cuda:latest")
    )
    (root / ".dockerignore").write_text("runs\n")
    lock = (root / "constraints.txt").read_text()
    (root / "constraints.txt").write_text(
        "\n".join(x for x in lock.splitlines() if not x.startswith("peft=="))
    )
    problems = "\n".join(docker_check.check(root))
    assert "torch==2.9.1 but the lock has 2.13.0" in problems
    assert "pip install without -c constraints.txt" in problems
    assert "base image without a pinned tag" in problems
    assert "no pin for peft" in problems
    assert ".dockerignore: does not keep out .venv" in problems
