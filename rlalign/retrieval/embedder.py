"""Image embeddings from a VLM's own vision tower, batched and cached on disk.

An embedding is the vision tower's last hidden state averaged over patch tokens (`mean`, the first
token, CLIP's CLS, left out) or its pooled output (`cls`), L2-normalised, as float32.

The cache lives in `<cache_dir>/<fingerprint[:24]>/`: `.npz` files holding `keys` (sha256 of each
image's mode, size and pixels, as fixed-width bytes) and `vectors`, named by the sha256 of their keys:
one per `embed` call, or one per pool shard (`rlalign.retrieval.embed_store`). Files are written
atomically and read with `allow_pickle=False`, lazily on the first `embed`. The fingerprint hashes the
vision tower's weights and config, the image processor's config and the pooling, so a retrained or
different encoder never reads another's vectors. Several processes may share one cache folder.

Images are batched by their size: processors with a dynamic resolution (Qwen2-VL, Idefics) give each
size its own pixel shape, so a batch holds one size; fixed-resolution processors are not affected.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rlalign.config.pairs import EmbedderConfig
from rlalign.models.vision_features import pooled_image_features
from rlalign.utils.io import atomic_write

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
        self._cache: dict[bytes, np.ndarray] | None = None
        """Cached vectors by image key, read from `cache_path` on the first `embed`."""

    @property
    def device(self) -> torch.device:
        return next(self.tower.parameters()).device

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """Unit vectors [N, D] of `images`, from the cache where it has them."""
        if self._cache is None:
            self._cache = self._read_cache()
        keys = [image_key(im) for im in images]
        todo = sorted(
            {k: i for i, k in enumerate(keys) if k not in self._cache}.items(), key=lambda kv: kv[1]
        )
        self.cache_hits += len(keys) - len(todo)
        if todo:
            fresh = self.forward([images[i] for _, i in todo])
            new_keys = [k for k, _ in todo]
            self._cache.update(zip(new_keys, fresh))
            self.save(new_keys, fresh)
        if not keys:
            return np.empty((0, 0), dtype=np.float32)
        return np.stack([self._cache[k] for k in keys])

    @torch.no_grad()
    def forward(self, images: list[Image.Image]) -> np.ndarray:
        """Run `images` through the tower (no cache): batches of one image size, rows in input order."""
        self.embedded += len(images)
        order = sorted(range(len(images)), key=lambda i: images[i].size)
        out = np.empty((len(images), 0), dtype=np.float32)
        step = self.config.batch_size
        start = 0
        while start < len(order):
            size = images[order[start]].size
            stop = start + 1
            while stop < len(order) and stop - start < step and images[order[stop]].size == size:
                stop += 1
            chunk = [images[i].convert("RGB") for i in order[start:stop]]
            pooled = pooled_image_features(self.tower, self.image_processor, chunk, self.config.pooling)
            pooled = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
            if out.shape[1] == 0:
                out = np.empty((len(images), pooled.shape[1]), dtype=np.float32)
            out[order[start:stop]] = pooled
            start = stop
        return out

    # ------------------------------------------------------------------- cache

    def _read_cache(self) -> dict[bytes, np.ndarray]:
        cache: dict[bytes, np.ndarray] = {}
        if self.cache_path is None or not self.cache_path.is_dir():
            return cache
        for file in sorted(self.cache_path.glob("[!.]*.npz")):  # not the temporaries of a killed writer
            try:
                with np.load(file, allow_pickle=False) as data:
                    cache.update(zip(data["keys"].tolist(), data["vectors"]))
            except (
                OSError,
                ValueError,
                KeyError,
                EOFError,
                zipfile.BadZipFile,
            ) as err:  # a foreign or damaged file: skip it loudly
                log.warning("embedding cache: skipping %s (%s)", file, err)
        log.info("embedding cache %s: %d vectors", self.cache_path, len(cache))
        return cache

    def save(self, keys: list[bytes], vectors: np.ndarray) -> Path | None:
        """Write `keys` and their `vectors` into the cache as one file named by the keys' sha256."""
        if self.cache_path is None:
            return None
        path = self.cache_path / f"{keys_digest(keys)}.npz"
        keys_S = np.array(keys, dtype="S64")
        vectors = vectors.astype(np.float32)
        return atomic_write(path, lambda tmp: np.savez(tmp, keys=keys_S, vectors=vectors))


def keys_digest(keys: list[bytes]) -> str:
    """Name of the cache file holding exactly these image keys, in this order."""
    return hashlib.sha256(b"".join(keys)).hexdigest()[:32]


VISION_ENCODERS = ("clip", "siglip", "clip_vision_model", "siglip_vision_model")
"""`model_type`s of image-text encoders loaded as such (`AutoModel`), not as VLMs."""


def load_encoder(path: str) -> tuple[torch.nn.Module, Any] | None:
    """A CLIP / SigLIP folder (or hub id) as (model, image processor); None when `path` holds another kind
    of model (a VLM, loaded by the model builder)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    try:
        model_type = AutoConfig.from_pretrained(path).model_type
    except (OSError, ValueError):
        return None
    if model_type not in VISION_ENCODERS:
        return None
    return AutoModel.from_pretrained(path).eval(), AutoImageProcessor.from_pretrained(path)


def build_embedder(recipe: Any) -> tuple[ImageEmbedder, torch.nn.Module, Any]:
    """The embedder a recipe asks for, with the model and processor it came from (the policy when
    `pairs.embedder.encoder` is `policy`; a CLIP / SigLIP folder is loaded as an image encoder)."""
    from dataclasses import replace

    from rlalign.models.builder import load_base

    cfg = recipe.pairs.embedder
    encoder = load_encoder(cfg.encoder) if cfg.encoder != "policy" else None
    if encoder is not None:
        model, processor = encoder
        return ImageEmbedder(model, processor, cfg), model, processor
    model_cfg = recipe.model if cfg.encoder == "policy" else replace(recipe.model, name_or_path=cfg.encoder)
    model, processor = load_base(model_cfg, recipe.data)
    model.eval()
    return ImageEmbedder(model, processor, cfg), model, processor
