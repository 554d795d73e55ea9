"""Restarts and faults of `rlalign pairs build`: a restart with other settings is refused before anything
is written (and `--overwrite` starts over), damaged shards are found by their records and rebuilt, and a
launch whose every process is killed resumes to the dataset of an uninterrupted build.

All compare with one uninterrupted in-process build (`reference`: 32 images, 8 shards of 4), which the
tests copy and never change; tables are compared raw (pyarrow), images as their stored bytes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import subprocess
import time
from pathlib import Path

import datasets
import psutil
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, TINY, accelerate_cmd, make_env, rlalign
from datasets import Dataset

from rlalign.config import RecipeError
from rlalign.data.captions import shapes_dataset
from rlalign.pairs import builder
from rlalign.pairs.builder import build_pairs
from rlalign.pairs.store import manifest_difference, manifest_digest, pool_fingerprint, shard_problem
from rlalign.recipe import load_recipe
from rlalign.retrieval.embedder import build_embedder
from rlalign.shapes import ShapesConfig

SETTINGS = ["trainer.output_dir=unused", "pairs.pool_size=32", "pairs.shard_size=4", "pairs.top_k=3"]
N_SHARDS = 8
START_OVER = "--overwrite starts over (or set pairs.output_dir to a new folder)"


def _overrides(out: Path, cache: Path, *extra: str) -> list[str]:
    return [*SETTINGS, f"pairs.output_dir={out}", f"pairs.embedder.cache_dir={cache}", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted build in `reference/out`, its embedding cache in `reference/cache`."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pairs-reference")
    build_pairs(load_recipe(ROOT / TINY, _overrides(root / "out", root / "cache")))
    return root


def _copy(reference: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(reference / "out", tmp_path / "out"))


def _table(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def _shard(out: Path, s: int, ext: str = "parquet") -> Path:
    return out / "shards" / f"shard-{s:05d}.{ext}"


def _stop_after_two_shards(out: Path) -> None:
    """What a run stopped after its first two shards leaves (plus the index)."""
    for s in range(2, N_SHARDS):
        _shard(out, s).unlink()
        _shard(out, s, "json").unlink()
    (out / "pairs.parquet").unlink()
    (out / "stats.json").unlink()


def _whole_shards(out: Path) -> list[int]:
    digest = manifest_digest(json.loads((out / "manifest.json").read_text()))
    return [s for s in range(N_SHARDS) if shard_problem(out / "shards", s, digest) is None]


# --------------------------------------------------------------------------------------- manifest


def test_manifest_difference_names_the_first_change():
    manifest = {
        "version": 1,
        "settings": {"pairs.shard_size": 4, "pairs.top_k": 3, "pairs.index.kind": "flat"},
        "fingerprints": {"pool": {"images": 32, "sha256": "p"}, "policy": "m", "embedder": "e"},
    }

    def changed(**parts) -> dict:
        return {**manifest, **{k: {**manifest[k], **v} for k, v in parts.items()}}

    assert manifest_difference(manifest, manifest) is None
    assert manifest_difference(manifest, changed(settings={"pairs.top_k": 2, "pairs.index.kind": "ivf"})) == (
        "pairs.top_k is 2, but this folder was built with 3"
    )
    service = {
        **manifest,
        "settings": {"pairs.shard_size": 4, "pairs.top_k": 3, "pairs.service_index": "pool"},
    }
    assert (
        manifest_difference(manifest, service)
        == 'pairs.service_index is "pool", but this folder was built with unset'
    )
    assert (
        manifest_difference(service, manifest)
        == 'pairs.index.kind is "flat", but this folder was built with unset'
    )
    assert manifest_difference(manifest, changed(fingerprints={"embedder": "e2", "policy": "m2"})) == (
        "the policy's weights, config or tokenizer (model.*) differs from the one this folder was built with"
    )
    assert manifest_difference(manifest, changed(fingerprints={"embedder": "e2"})) == (
        "the image embedder's weights or pooling (pairs.embedder.*) differs from the one this folder was built with"
    )
    assert (
        manifest_difference({**manifest, "version": 0}, manifest) == "manifest version 0, this build writes 1"
    )
    fewer = {**manifest, "settings": {"pairs.shard_size": 4, "pairs.top_k": 3}}
    assert (
        manifest_difference(manifest, fewer)
        == 'pairs.index.kind is unset, but this folder was built with "flat"'
    )


def test_pool_fingerprint_sees_one_changed_byte_and_caption():
    """The stored image bytes count (one byte flipped, same length), and so do the other columns."""
    pool = shapes_dataset(ShapesConfig(), "train", 4)
    assert pool_fingerprint(pool) == pool_fingerprint(shapes_dataset(ShapesConfig(), "train", 4))
    raw = pool.cast_column("image", datasets.Image(decode=False)).to_dict()
    flipped = bytearray(raw["image"][2]["bytes"])
    flipped[len(flipped) // 2] ^= 0x01
    raw["image"][2] = {"bytes": bytes(flipped), "path": None}
    assert len(flipped) == len(pool.cast_column("image", datasets.Image(decode=False))[2]["image"]["bytes"])
    changed = Dataset.from_dict(raw, features=pool.features)
    assert pool_fingerprint(changed)["sha256"] != pool_fingerprint(pool)["sha256"]
    captions = pool.map(
        lambda row, i: {"captions": row["captions"][:-1] if i == 3 else row["captions"]}, with_indices=True
    )
    assert pool_fingerprint(captions)["sha256"] != pool_fingerprint(pool)["sha256"]


@pytest.mark.e2e
@pytest.mark.slow
def test_restart_with_another_shard_size_is_refused_and_overwrite_starts_over(reference, tmp_path):
    """A run stopped after two shards of 4, restarted with shards of 3: refused in one line, exit 2,
    nothing written or lost; with --overwrite, a fresh build of 11 shards with one row per image."""
    out = _copy(reference, tmp_path)
    _stop_after_two_shards(out)
    before = _snapshot(out)
    args = ["pairs", "build", TINY, *_overrides(out, reference / "cache", "pairs.shard_size=3")]
    refused = rlalign(*args, check=False)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert refused.stderr.splitlines() == [
        f"error: {out / 'manifest.json'}: pairs.shard_size is 3, but this folder was built with 4; {START_OVER}"
    ]
    assert _snapshot(out) == before

    rlalign(*args, "--overwrite")
    rows, expected = _table(out / "pairs.parquet"), _table(reference / "out" / "pairs.parquet")
    ids = [r["image_id"] for r in rows]
    assert len(ids) == len(set(ids)) == len(expected)  # one row per image that gives a pair
    assert rows == expected  # the shard size changes where rows are written, not what they are
    assert json.loads((out / "manifest.json").read_text())["settings"]["pairs.shard_size"] == 3
    assert sorted(p.name for p in (out / "shards").glob("shard-*.parquet")) == [
        f"shard-{s:05d}.parquet" for s in range(math.ceil(32 / 3))
    ]


@pytest.mark.parametrize(
    "override, difference",
    [
        ("pairs.top_k=2", "pairs.top_k is 2, but this folder was built with 3"),
        (
            "pairs.similarity_threshold=0.9",
            "pairs.similarity_threshold is 0.9, but this folder was built with 0.95",
        ),
        (
            "pairs.embedder.pooling=cls",
            'pairs.embedder.pooling is "cls", but this folder was built with "mean"',
        ),
        ("pairs.index.kind=hnsw", 'pairs.index.kind is "hnsw", but this folder was built with "flat"'),
        ("data.seed=1", "data.seed is 1, but this folder was built with 0"),
        (
            "model.tiny.init_seed=1",
            "the policy's weights, config or tokenizer (model.*) differs from the one this folder was built with",
        ),
    ],
)
def test_restart_with_other_settings_is_refused_before_writing(reference, tmp_path, override, difference):
    out = _copy(reference, tmp_path)
    before = _snapshot(out)
    with pytest.raises(RecipeError) as refused:
        build_pairs(load_recipe(ROOT / TINY, _overrides(out, reference / "cache", override)))
    assert str(refused.value) == f"{out / 'manifest.json'}: {difference}; {START_OVER}"
    assert _snapshot(out) == before


def test_pairs_without_a_manifest_are_refused(reference, tmp_path):
    out = _copy(reference, tmp_path)
    (out / "manifest.json").unlink()
    before = _snapshot(out)
    with pytest.raises(RecipeError) as refused:
        build_pairs(load_recipe(ROOT / TINY, _overrides(out, reference / "cache")))
    assert (
        str(refused.value)
        == f"{out}: holds pairs but no manifest.json saying how they were built; {START_OVER}"
    )
    assert _snapshot(out) == before


def test_index_over_another_pool_is_rebuilt(reference, tmp_path):
    """An index left by `rlalign index build` over the first 16 images (no manifest: not pairs) is not
    searched for a pool of 32: it is rebuilt, and the dataset equals the reference."""
    out = tmp_path / "out"
    small = load_recipe(ROOT / TINY, _overrides(out, reference / "cache", "pairs.pool_size=16"))
    embedder, _, _ = build_embedder(small)
    builder.build_index(small.pairs, embedder, builder.load_pool(small)["image"], out / "index")
    assert json.loads((out / "index" / "meta.json").read_text())["count"] == 16
    build_pairs(load_recipe(ROOT / TINY, _overrides(out, reference / "cache")))
    assert json.loads((out / "index" / "meta.json").read_text())["count"] == 32
    assert _table(out / "pairs.parquet") == _table(reference / "out" / "pairs.parquet")


# ----------------------------------------------------------------------------------------- shards


def test_resume_redoes_only_missing_shards(reference, tmp_path):
    """A run stopped after two shards (and a stale temp file) is completed by a rerun that redoes only the
    missing shards and ends with the uninterrupted dataset."""
    out = _copy(reference, tmp_path)
    _stop_after_two_shards(out)
    (out / "shards" / ".shard-00003.tmp-999.parquet").write_bytes(b"half")
    kept = {s: _shard(out, s).stat().st_mtime_ns for s in (0, 1)}
    build_pairs(load_recipe(ROOT / TINY, _overrides(out, reference / "cache")))
    assert _table(out / "pairs.parquet") == _table(reference / "out" / "pairs.parquet")
    assert {s: _shard(out, s).stat().st_mtime_ns for s in (0, 1)} == kept  # finished shards were not redone
    assert _whole_shards(out) == list(range(N_SHARDS)) and not list((out / "shards").glob(".*"))


def test_damaged_shards_are_rebuilt(reference, tmp_path, caplog):
    """Shard 2 cut short (size), shard 5 with one byte flipped (sha256), shard 6 without its record (its
    writer killed between the two renames): each is named in the log, rebuilt, and the dataset equals the
    uninterrupted one; the whole shards are not redone."""
    out = _copy(reference, tmp_path)
    (out / "pairs.parquet").unlink()
    cut, flipped = _shard(out, 2), _shard(out, 5)
    whole = cut.stat().st_size
    cut.write_bytes(cut.read_bytes()[: whole // 2])
    assert cut.stat().st_size == whole // 2 < whole
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    assert flipped.read_bytes() != _shard(reference / "out", 5).read_bytes()
    assert flipped.stat().st_size == _shard(reference / "out", 5).stat().st_size
    _shard(out, 6, "json").unlink()
    assert _whole_shards(out) == [0, 1, 3, 4, 7]
    kept = {s: _shard(out, s).stat().st_mtime_ns for s in (0, 1, 3, 4, 7)}

    with caplog.at_level(logging.WARNING, logger="rlalign.pairs.builder"):
        build_pairs(load_recipe(ROOT / TINY, _overrides(out, reference / "cache")))
    assert [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()] == [
        f"pairs: rebuilding {_shard(out, 2)}: {whole // 2} bytes, {whole} recorded",
        f"pairs: rebuilding {_shard(out, 5)}: content differs from its recorded sha256",
        f"pairs: rebuilding {_shard(out, 6)}: no shard-00006.json (its writer stopped before recording it)",
    ]
    assert _table(out / "pairs.parquet") == _table(reference / "out" / "pairs.parquet")
    assert all(_shard(out, s).read_bytes() == _shard(reference / "out", s).read_bytes() for s in (2, 5, 6))
    assert {s: _shard(out, s).stat().st_mtime_ns for s in kept} == kept
    assert _whole_shards(out) == list(range(N_SHARDS))


def test_shard_damaged_during_the_run_is_rebuilt_before_assembly(reference, tmp_path, caplog, monkeypatch):
    """Shard 0 is whole when the run starts and cut short while the last shard is written (as another
    process or a disk might): the check before assembly finds it, rebuilds it, and the dataset is whole."""
    out = _copy(reference, tmp_path)
    _stop_after_two_shards(out)
    first, whole = _shard(out, 0), _shard(out, 0).stat().st_size
    write = builder._write_shard

    def write_then_damage(b, s: int) -> None:
        write(b, s)
        if s == N_SHARDS - 1:
            first.write_bytes(first.read_bytes()[:100])
            assert first.stat().st_size == 100 < whole

    monkeypatch.setattr(builder, "_write_shard", write_then_damage)
    with caplog.at_level(logging.WARNING, logger="rlalign.pairs.builder"):
        build_pairs(load_recipe(ROOT / TINY, _overrides(out, reference / "cache")))
    assert [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()] == [
        f"pairs: rebuilding {first}: 100 bytes, {whole} recorded"
    ]
    assert _table(out / "pairs.parquet") == _table(reference / "out" / "pairs.parquet")


# ------------------------------------------------------------------------------------------- kill


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _running_with(text: str) -> list[psutil.Process]:
    """Every live process whose command line mentions `text`."""
    found = []
    for proc in psutil.process_iter():
        try:
            if text in " ".join(proc.cmdline()) and _alive(proc):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.distributed
def test_killed_launch_resumes_to_the_uninterrupted_dataset(reference, tmp_path):
    """`accelerate launch` with 2 processes, SIGKILLed (the launcher and both workers, which torch elastic
    starts in sessions of their own) once two shards are recorded; no process of the run survives, the
    build had not finished; one process then finishes it, equal to the uninterrupted build."""
    out = tmp_path / "out"
    args = ["pairs", "build", TINY, *_overrides(out, reference / "cache")]
    cmd = [
        *accelerate_cmd("ddp-8gpu.yaml", 2),
        "-m",
        "rlalign.cli",
        *args,
    ]
    launcher = subprocess.Popen(
        cmd, cwd=ROOT, env=make_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    tree = [psutil.Process(launcher.pid)]
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "shards").glob("shard-*.json"))) < 2:
            assert launcher.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "no shard recorded in 120 s"
            time.sleep(0.02)
        tree += tree[0].children(recursive=True)
        workers = [p for p in tree[1:] if "rlalign.cli" in p.cmdline()]
        assert len(workers) == 2 and len({p.pid for p in workers}) == 2
    finally:
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        launcher.wait(timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert [p for p in alive if _alive(p)] == []
    assert _running_with(str(out)) == []  # nothing else of the run, whatever its parent now
    assert not (out / "pairs.parquet").exists() and 2 <= len(_whole_shards(out)) < N_SHARDS

    rlalign(*args)
    assert _table(out / "pairs.parquet") == _table(reference / "out" / "pairs.parquet")
    assert json.loads((out / "stats.json").read_text())["embedded_this_run"] == 0  # the reference's cache
