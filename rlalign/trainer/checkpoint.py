"""Checkpoints that are complete or absent, and resume that continues the same run.

A checkpoint is written into `step-XXXXXXX.tmp` and renamed to `step-XXXXXXX` by the main process
only after every rank has finished writing and the `COMPLETE` marker is in place; a crash at any
moment leaves either the previous checkpoints or a `.tmp` folder that resume ignores and removes.

Contents: model weights (safetensors, full state dict), optimizer state (torch.save of tensors and
numbers, read back with `weights_only=True`; under DeepSpeed, DeepSpeed's own per-rank shards; under
FSDP2 by default both as torch.distributed.checkpoint shards in `sharded/`, each rank writing its own,
nothing gathered: `distributed.fsdp_checkpoint`),
scheduler and trainer state (JSON), every rank's RNG states (JSON + safetensors) and the resolved
recipe. Resume restores all of it, and the data position is the step itself (the sampler is a
pure function of the step).

Each checkpoint proves itself: `manifest.json`, written after every rank has finished and before
`COMPLETE`, lists every file (relative path, size, sha256; each rank hashes a share of the files),
the step, the recipe and the data-order fingerprint; `COMPLETE` records the manifest's own sha256.
Resume verifies a checkpoint before reading it (every rank checks a share, all get the same
verdict); `auto` falls back to the previous valid checkpoint, naming the bad file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlalign.config import Recipe, RecipeError, dump_recipe, recipe_to_dict
from rlalign.runtime import SHARDED_DIR, Runtime

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
BASE = "base.json"
"""Adapter-only checkpoints (LoRA): the base model they apply to, by name and frozen-weight fingerprint."""
MANIFEST = "manifest.json"
DATA_ORDER_KEYS = ("seed", "global_batch", "train_size")
"""The fields of the data-order fingerprint that decide which samples each step sees."""


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    world_size: int = 1
    engine: str = "single"


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        if v.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    save_file(out, str(path))


def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    np_state = np.random.get_state()
    py = random.getstate()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return meta, tensors


def _set_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def data_order(recipe: Recipe, world_size: int, train_size: int) -> dict[str, int]:
    """What the data order depends on (see `trainer/data.py`): seed, global batch and dataset size."""
    t = recipe.trainer
    return {
        "seed": t.seed,
        "per_device_batch_size": t.per_device_batch_size,
        "grad_accum_steps": t.grad_accum_steps,
        "world_size": world_size,
        "global_batch": t.per_device_batch_size * t.grad_accum_steps * world_size,
        "train_size": train_size,
    }


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _listing(folder: Path) -> list[str]:
    """Every file under `folder` (relative, sorted), but the manifest and the marker themselves."""
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(n for n in names if n not in (MANIFEST, MARKER))


def _check_file(folder: Path, name: str, entry: dict[str, Any]) -> str | None:
    """What is wrong with one file against its manifest entry, or None."""
    path = folder / name
    if not path.is_file():
        return f"{name}: missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{name}: size {size} bytes, the manifest says {entry['size']}"
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        return f"{name}: sha256 {digest[:16]}... differs from the manifest's {entry['sha256'][:16]}..."
    return None


def read_manifest(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) when the manifest is there and matches the sha256 in `COMPLETE`, else (None, why)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        text = (folder / MANIFEST).read_text()
    except FileNotFoundError as err:
        return None, f"{Path(err.filename).name}: missing"
    except (ValueError, OSError) as err:
        return None, f"{MARKER}: unreadable ({err})"
    if not isinstance(marker, dict) or "manifest_sha256" not in marker:
        return None, f"{MARKER}: records no manifest sha256 (not written by this version)"
    if hashlib.sha256(text.encode()).hexdigest() != marker["manifest_sha256"]:
        return None, f"{MANIFEST}: sha256 differs from the one recorded in {MARKER}"
    return json.loads(text), None


class Checkpointer:
    def __init__(
        self,
        output_dir: str | Path,
        runtime: Runtime,
        keep_last: int,
        *,
        recipe: Recipe | None = None,
        order: dict[str, int] | None = None,
    ):
        self.root = Path(output_dir) / "checkpoints"
        self.runtime = runtime
        self.keep_last = keep_last
        self.recipe = recipe
        self.order = order or {}

    # -- finding --------------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [
            p
            for p in self.root.iterdir()
            if p.is_dir() and p.name.startswith("step-") and ".tmp" not in p.name
        ]
        return sorted((p for p in found if (p / MARKER).is_file()), key=lambda p: p.name)

    def resolve(self, resume: str) -> Path | None:
        """`none` -> None; `auto` -> the newest complete checkpoint that passes verification (falling back
        past bad ones, a RecipeError when none passes) or None when there is none; else that path, which
        must be complete and pass verification."""
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            if not (path / MARKER).is_file():
                raise FileNotFoundError(
                    f"trainer.resume: {path} is not a complete checkpoint (no {MARKER} file)"
                )
            problems = self.verify(path)
            if problems:
                raise RecipeError(
                    f"trainer.resume={path}: checkpoint fails verification: {'; '.join(problems)}"
                )
            return path
        failures = []
        for path in reversed(self.runtime.broadcast_object(self.complete())):
            problems = self.verify(path)
            if not problems:
                if failures:
                    log.warning("falling back to %s, the newest checkpoint that passes verification", path)
                return path
            log.warning("checkpoint %s fails verification: %s", path, "; ".join(problems))
            failures.append(f"{path.name}/{problems[0]}")
        if failures:
            raise RecipeError(
                f"trainer.resume=auto: no valid checkpoint in {self.root}: {'; '.join(failures)}"
            )
        return None

    def verify(self, path: Path) -> list[str]:
        """What is wrong with the checkpoint at `path` (empty: nothing). Every rank hashes a share of the
        files; all ranks return the same list."""
        rt = self.runtime
        manifest, problem = rt.broadcast_object(read_manifest(path) if rt.is_main else None)
        if problem is not None:
            return [problem]
        files = manifest["files"]
        names = sorted(files)[rt.rank :: rt.world_size]
        mine = [p for p in (_check_file(path, n, files[n]) for n in names) if p is not None]
        return sorted(p for part in rt.all_gather_object(mine) for p in part)

    # -- saving ---------------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: TrainState) -> Path:
        rt = self.runtime
        final = self.root / f"step-{state.step:07d}"
        tmp = self.root / f"step-{state.step:07d}.tmp"
        if rt.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        rt.barrier()
        adapter_only = self.recipe is not None and self.recipe.model.lora is not None
        sharded = rt.sharded_checkpoints
        model_sd = {} if sharded else rt.model_state(model, trainable_only=adapter_only)
        base = (
            {"name_or_path": self.recipe.model.name_or_path, **rt.frozen_fingerprint(model)}
            if adapter_only
            else None
        )
        if sharded:  # every rank writes its own shards: nothing gathered
            rt.save_sharded(model, optimizer, tmp / SHARDED_DIR, trainable_only=adapter_only)
        else:
            rt.save_optimizer(model, optimizer, tmp, trainable_only=adapter_only)
        meta, tensors = _rng_state()
        (tmp / "rng" / f"rank-{rt.rank}.json").write_text(json.dumps(meta))
        save_tensors(tensors, tmp / "rng" / f"rank-{rt.rank}.safetensors")
        if rt.is_main:
            if not sharded:
                save_tensors(model_sd, tmp / "model.safetensors")
            if base is not None:  # adapter-only: the frozen base is referenced, not copied
                (tmp / BASE).write_text(json.dumps(base, indent=1))
            (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
            (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
            (tmp / "recipe.yaml").write_text(dump_recipe(self.recipe))
        rt.barrier()
        files = self._hash_files(tmp)
        if rt.is_main:
            manifest = {
                "step": state.step,
                "world_size": rt.world_size,
                "engine": rt.engine,
                "data_order": self.order,
                "recipe": recipe_to_dict(self.recipe),
                "files": files,
            }
            text = json.dumps(manifest, indent=1)
            (tmp / MANIFEST).write_text(text)
            marker = {
                "step": state.step,
                "world_size": rt.world_size,
                "manifest_sha256": hashlib.sha256(text.encode()).hexdigest(),
            }
            (tmp / MARKER).write_text(json.dumps(marker))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.complete()[: -self.keep_last]:
                (old / MARKER).unlink()  # no longer complete even if the deletion is cut short
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint saved: %s", final)
        rt.barrier()
        return final

    def _hash_files(self, folder: Path) -> dict[str, dict[str, Any]]:
        """Size and sha256 of every file in `folder` (all ranks' files, after the barrier): each rank
        hashes a share, rank 0 gets them all (other ranks get the same)."""
        rt = self.runtime
        names = rt.broadcast_object(_listing(folder) if rt.is_main else None)
        mine = {
            n: {"size": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)}
            for n in names[rt.rank :: rt.world_size]
        }
        files: dict[str, dict[str, Any]] = {}
        for part in rt.all_gather_object(mine):
            files.update(part)
        return {n: files[n] for n in names}

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The full model state dict on the main process (see `Runtime.model_state`)."""
        return self.runtime.model_state(model)

    # -- loading --------------------------------------------------------------------------------
    def load(self, path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> TrainState:
        """Restore everything but the RNG (call `restore_rng` last, right before the loop)."""
        rt = self.runtime
        state = TrainState(**json.loads((path / "trainer_state.json").read_text()))
        self._check_data_order(path)
        adapter_only = (path / BASE).is_file()
        if adapter_only:
            saved, ours = json.loads((path / BASE).read_text()), rt.frozen_fingerprint(model)
            if saved["fingerprint"] != ours["fingerprint"]:
                raise RecipeError(
                    f"trainer.resume: {path} holds adapter weights over base '{saved['name_or_path']}' "
                    f"({saved['parameters']:,} frozen parameters, fingerprint {saved['fingerprint']}), but this "
                    f"run's frozen weights differ ({ours['parameters']:,}, {ours['fingerprint']}): "
                    "model.name_or_path must name the same base"
                )
        rt.load_training_state(model, optimizer, path, trainable_only=adapter_only)
        scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
        log.info("resumed from %s at step %d", path, state.step)
        return state

    def _check_data_order(self, path: Path) -> None:
        """Warn when the resumed run's samples will differ from the checkpointed run's."""
        saved = json.loads((path / MANIFEST).read_text()).get("data_order", {})
        changed = [
            f"{k} {saved.get(k)} -> {self.order.get(k)}"
            for k in DATA_ORDER_KEYS
            if saved.get(k) != self.order.get(k)
        ]
        if self.order and changed:
            log.warning(
                "data order differs from %s (%s): the resumed run sees other samples than the "
                "interrupted one would have",
                path,
                ", ".join(changed),
            )

    def restore_rng(self, path: Path) -> None:
        rank = self.runtime.rank
        meta_file = path / "rng" / f"rank-{rank}.json"
        if not meta_file.is_file():
            log.warning("no RNG state for rank %d in %s (world size changed?); RNG not restored", rank, path)
            return
        _set_rng_state(
            json.loads(meta_file.read_text()), load_file(str(path / "rng" / f"rank-{rank}.safetensors"))
        )

    def clean_partial(self) -> None:
        if self.runtime.is_main and self.root.is_dir():
            for p in self.root.glob("step-*.tmp"):
                shutil.rmtree(p, ignore_errors=True)
