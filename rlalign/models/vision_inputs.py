"""Per-image processor outputs, split and repeated by row, for every family.

A batch's image inputs come in two layouts (transformers 5.x):
- one leading entry per row: Llava `pixel_values` (B, C, H, W); LLaVA-NeXT `pixel_values`
  (B, tiles, C, H, W, padded to the batch's most tiles) with `image_sizes` (B, 2); Idefics3
  `pixel_values` (B, images, C, H, W) with `pixel_attention_mask` (B, images, H, W);
- patch-major (Qwen2-VL / Qwen2.5-VL): `pixel_values` (patches of every image, D) and `image_grid_thw`
  (images, 3); image i owns the next t*h*w patch rows, and a row owns as many images as it has runs of
  image tokens (`mm_token_type_ids` == 1; videos likewise with `video_grid_thw` and type 2).

`split_rows` cuts every such input into one slice per row (leading dimension kept), so a row's inputs
can be repeated (a GRPO group, an unpacked preference pair), selected (minibatches) or hashed (the
reference cache) without knowing the family. A tensor that fits neither layout raises, naming the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

PATCH_MAJOR = {"pixel_values": "image_grid_thw", "pixel_values_videos": "video_grid_thw"}
"""Patch-major inputs -> the grid tensor that says how many patch rows each image owns."""
GRID_TYPES = {"image_grid_thw": 1, "video_grid_thw": 2}
"""Grid tensors -> the `mm_token_type_ids` value of their tokens."""


def images_per_row(batch: dict[str, Any], grid_key: str, rows: int) -> list[int] | None:
    """How many entries of `batch[grid_key]` each row owns: its runs of tokens of that modality (one
    run per image), or one each when there are as many grids as rows; None when neither holds."""
    grid = batch.get(grid_key)
    if not isinstance(grid, torch.Tensor):
        return None
    types = batch.get("mm_token_type_ids")
    if isinstance(types, torch.Tensor) and types.shape[0] == rows:
        is_kind = types == GRID_TYPES[grid_key]
        starts = is_kind.clone()
        starts[:, 1:] &= ~is_kind[:, :-1]
        counts = starts.sum(1).tolist()
        if sum(counts) == grid.shape[0]:
            return counts
    return [1] * rows if grid.shape[0] == rows else None


def split_rows(batch: dict[str, Any], name: str, rows: int) -> list[torch.Tensor] | None:
    """`batch[name]` cut into one slice per row (leading dimension kept); None when it does not split."""
    value = batch[name]
    grid_key = PATCH_MAJOR.get(name)
    if grid_key is not None and isinstance(batch.get(grid_key), torch.Tensor):
        counts = images_per_row(batch, grid_key, rows)
        if counts is None:
            return None
        patches = batch[grid_key].prod(-1)
        per_row = [int(p.sum()) for p in patches.split(counts)]
        return list(value.split(per_row)) if sum(per_row) == value.shape[0] else None
    if name in GRID_TYPES:
        counts = images_per_row(batch, name, rows)
        return None if counts is None else list(value.split(counts))
    if value.ndim and value.shape[0] == rows:
        return list(value.split(1))
    return None


def _parts(batch: dict[str, Any], name: str, rows: int) -> list[torch.Tensor]:
    parts = split_rows(batch, name, rows)
    if parts is None:
        shape = tuple(batch[name].shape)
        raise ValueError(f"batch input '{name}' of shape {shape} does not split into {rows} rows")
    return parts


def take_rows(batch: dict[str, Any], index: Sequence[int]) -> dict[str, Any]:
    """The rows `index` (in that order, repeats allowed) of every tensor of `batch`, per-image inputs
    included; non-tensors are kept as they are."""
    rows = batch["input_ids"].shape[0]
    out = {}
    for name, value in batch.items():
        if not isinstance(value, torch.Tensor):
            out[name] = value
            continue
        parts = _parts(batch, name, rows)
        out[name] = torch.cat([parts[i] for i in index]) if index else value[:0]
    return out


def repeat_rows(batch: dict[str, Any], times: int) -> dict[str, Any]:
    """Every row repeated `times` times in place (row b becomes rows b*times ... b*times + times - 1),
    image inputs repeated per image, as `generate(num_return_sequences=times)` orders its output."""
    rows = batch["input_ids"].shape[0]
    return take_rows(batch, [b for b in range(rows) for _ in range(times)])
