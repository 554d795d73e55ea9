"""Image embeddings from a VLM's own vision tower, batched and cached on disk.

An embedding is the vision tower's last hidden state averaged over patch tokens (`mean`, the first
token, CLIP's CLS, left out) or its pooled output (`cls`), L2-normalised, as float32.

The cache lives in `<cache_dir>/<fingerprint[:24]>/`: one `.npz` file per `embed` call holding
`keys` (sha256 of each image's mode, size and pixels, as fixed-width bytes) and `vectors`; files are
written to a temp name and renamed, and read with `allow_pickle=False`. The fingerprint hashes the
vision tower's weights and config, the image processor's config and the pooling, so a retrained or
different encoder never reads another's vectors. Several processes may share one cache folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rlalign.retrieval.config import EmbedderConfig

log = logging.getLogger(__name__)

VISION_TOWERS = ("vision_tower", "vision_model", "visual")


def find_vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The first submodule named like a vision tower (Llava, Idefics, Qwen-VL families); a bare
    vision model (main input `pixel_values`, e.g. `CLIPVisionModel`) is its own tower."""
    for name, module in model.named_modules():
        if name.split(".")[-1] in VISION_TOWERS:
            return module
    if getattr(model, "main_input_name", None) == "pixel_values":
        return model
    raise ValueError(f"no vision tower ({', '.join(VISION_TOWERS)}) found in {type(model).__name__}")


def image_key(image: Image.Image) -> bytes:
    """Content hash of an image: the same pixels give the same key wherever they come from."""
    image = image.convert("RGB")
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest().encode()


def encoder_fingerprint(tower: torch.nn.Module, image_processor: Any, pooling: str) -> str:
    """sha256 over the tower's parameters and buffers (names, shapes, dtypes, values), its config,
    the image processor's config and the pooling."""
    h = hashlib.sha256(f"pooling={pooling}\n".encode())
    config = getattr(tower, "config", None)
    h.update((config.to_json_string(use_diff=False) if config is not None else "").encode())
    h.update(image_processor.to_json_string().encode())
    for name, tensor in sorted(tower.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ImageEmbedder:
    """`embed(images) -> [N, D]` float32 unit vectors; counts what it actually ran through the tower."""

    def __init__(self, model: torch.nn.Module, processor: Any, config: EmbedderConfig | None = None):
        self.config = config or EmbedderConfig()
        self.tower = find_vision_tower(model).eval()
        self.image_processor = getattr(processor, "image_processor", processor)
        self.fingerprint = encoder_fingerprint(self.tower, self.image_processor, self.config.pooling)
        self.embedded = 0
        """Images run through the vision tower (cache misses) since construction."""
        self.cache_hits = 0
        self.cache_path = (
            Path(self.config.cache_dir).expanduser() / self.fingerprint[:24]
            if self.config.cache_dir
            else None
        )
        self._cache: dict[bytes, np.ndarray] = {}
        self._load_cache()

    @property
    def device(self) -> torch.device:
        return next(self.tower.parameters()).device

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        keys = [image_key(im) for im in images]
        todo = sorted(
            {k: i for i, k in enumerate(keys) if k not in self._cache}.items(), key=lambda kv: kv[1]
        )
        self.cache_hits += len(keys) - len(todo)
        if todo:
            fresh = self._forward([images[i] for _, i in todo])
            self.embedded += len(todo)
            new_keys = [k for k, _ in todo]
            self._cache.update(zip(new_keys, fresh))
            self._save(new_keys, fresh)
        if not keys:
            return np.empty((0, 0), dtype=np.float32)
        return np.stack([self._cache[k] for k in keys])

    @torch.no_grad()
    def _forward(self, images: list[Image.Image]) -> np.ndarray:
        out = []
        dtype = next(self.tower.parameters()).dtype
        for start in range(0, len(images), self.config.batch_size):
            chunk = [im.convert("RGB") for im in images[start : start + self.config.batch_size]]
            pixels = self.image_processor(chunk, return_tensors="pt")["pixel_values"].to(self.device, dtype)
            hidden = self.tower(pixel_values=pixels)
            if self.config.pooling == "cls":
                pooled = hidden.pooler_output
            else:
                pooled = hidden.last_hidden_state[:, 1:].mean(dim=1)
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
            out.append(pooled.cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    # ------------------------------------------------------------------- cache

    def _load_cache(self) -> None:
        if self.cache_path is None or not self.cache_path.is_dir():
            return
        for file in sorted(self.cache_path.glob("*.npz")):
            try:
                with np.load(file, allow_pickle=False) as data:
                    self._cache.update(zip(data["keys"].tolist(), data["vectors"]))
            except (OSError, ValueError, KeyError) as err:  # a foreign or damaged file: skip it loudly
                log.warning("embedding cache: skipping %s (%s)", file, err)
        log.info("embedding cache %s: %d vectors", self.cache_path, len(self._cache))

    def _save(self, keys: list[bytes], vectors: np.ndarray) -> None:
        if self.cache_path is None:
            return
        self.cache_path.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(b"".join(keys)).hexdigest()[:32]
        final = self.cache_path / f"{name}.npz"
        tmp = self.cache_path / f".{name}.tmp-{os.getpid()}.npz"
        try:
            np.savez(tmp, keys=np.array(keys, dtype="S64"), vectors=vectors.astype(np.float32))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)


def build_embedder(recipe: Any) -> tuple[ImageEmbedder, torch.nn.Module, Any]:
    """The embedder a recipe asks for, with the model and processor it came from (the policy when
    `pairs.embedder.encoder` is `policy`)."""
    from dataclasses import replace

    from rlalign.models.builder import load_base

    cfg = recipe.pairs.embedder
    model_cfg = recipe.model if cfg.encoder == "policy" else replace(recipe.model, name_or_path=cfg.encoder)
    model, processor = load_base(model_cfg, recipe.data)
    model.eval()
    return ImageEmbedder(model, processor, cfg), model, processor
