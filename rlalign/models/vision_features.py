"""One pooled vision-tower vector per image, for every family's image layout.

The image embedder of the pair builder and the index (`rlalign.retrieval.embedder`) runs a VLM's own
vision tower on the pool. Towers take their images in the layouts their processors give
(`rlalign.models.vision_inputs` describes them), so the pooling follows the layout:
- one image per row (Llava's CLIP, Gemma 3's SigLIP): `pixel_values` (N, C, H, W), the tower's last
  hidden state averaged over its tokens after the first (CLIP's CLS), or its pooled output (`cls`);
- tiles (LLaVA-NeXT): `pixel_values` (N, tiles, C, H, W) padded to the batch's most tiles, `image_sizes`
  saying how many are real; every real tile through the tower, the mean over all their patch tokens;
- sub-images (Idefics3): `pixel_values` (N, images, C, H, W) with `pixel_attention_mask`; padding images
  (all zero) dropped and padded patches masked as the model itself does, the mean over real patches;
- patch-major (Qwen2-VL, Qwen2.5-VL): `pixel_values` (patches of every image, D) and `image_grid_thw`;
  the tower's per-patch last hidden state cut per image (t*h*w rows each) and averaged (Qwen2.5-VL's
  window order permutes patches within an image only, which a mean ignores).

`cls` pooling needs one pooled vector per image, which only the first layout's towers give.
"""

from __future__ import annotations

from typing import Any

import torch


def pooled_image_features(
    tower: torch.nn.Module, image_processor: Any, images: list, pooling: str
) -> torch.Tensor:
    """[N, D] features (float32, not normalised) of `images`, one row per image, in order."""
    # one image per row: a flat list is one row of several images to Idefics3's processor
    enc = image_processor([[image] for image in images], return_tensors="pt")
    param = next(tower.parameters())
    pixels = enc["pixel_values"].to(param.device, param.dtype)
    if "image_grid_thw" in enc:
        rows = _patch_major(tower, pixels, enc["image_grid_thw"].to(param.device))
    elif pixels.ndim == 4:
        out = tower(pixel_values=pixels)
        if pooling == "cls":
            return out.pooler_output.float()
        return out.last_hidden_state[:, 1:].float().mean(dim=1)
    elif pixels.ndim == 5 and "pixel_attention_mask" in enc:
        rows = _sub_images(tower, pixels, enc["pixel_attention_mask"].to(param.device))
    elif pixels.ndim == 5 and "image_sizes" in enc:
        rows = _tiles(tower, image_processor, pixels, enc["image_sizes"])
    else:
        keys = ", ".join(f"{k} {tuple(v.shape)}" for k, v in enc.items())
        raise ValueError(f"{type(tower).__name__}: no vision features for processor outputs {keys}")
    if pooling == "cls":
        raise ValueError(
            f"pairs.embedder.pooling 'cls': {type(tower).__name__} gives no pooled vector per image; use 'mean'"
        )
    return torch.stack(rows)


def _patch_major(tower: torch.nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
    hidden = tower(pixels, grid_thw=grid_thw).last_hidden_state.float()
    return [h.mean(dim=0) for h in hidden.split(grid_thw.prod(-1).tolist())]


def _sub_images(tower: torch.nn.Module, pixels: torch.Tensor, pixel_mask: torch.Tensor) -> list[torch.Tensor]:
    """Idefics3: as `Idefics3Model.get_image_features` feeds its vision model, then a masked mean per row."""
    n, per_row = pixels.shape[:2]
    flat = pixels.flatten(0, 1)
    real = (flat != 0).flatten(1).any(dim=1)
    patch = tower.config.patch_size
    sub = pixel_mask.flatten(0, 1)[real].unfold(1, patch, patch).unfold(2, patch, patch)
    patch_mask = sub.sum(dim=(-1, -2)) > 0
    hidden = tower(pixel_values=flat[real], patch_attention_mask=patch_mask).last_hidden_state.float()
    weights = patch_mask.flatten(1).float()
    owner = torch.arange(n, device=pixels.device).repeat_interleave(per_row)[real]
    sums = torch.zeros(n, hidden.shape[-1], device=hidden.device).index_add_(
        0, owner, (hidden * weights[..., None]).sum(1)
    )
    counts = torch.zeros(n, device=hidden.device).index_add_(0, owner, weights.sum(1))
    return list(sums / counts[:, None])


def _tiles(
    tower: torch.nn.Module, image_processor: Any, pixels: torch.Tensor, sizes: torch.Tensor
) -> list[torch.Tensor]:
    """LLaVA-NeXT: the real tiles of each image (count as the model itself computes it)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    side = tower.config.image_size
    rows = []
    for image, size in zip(pixels, sizes.tolist()):
        tiles = image_size_to_num_patches(size, image_processor.image_grid_pinpoints, side)
        hidden = tower(pixel_values=image[:tiles]).last_hidden_state[:, 1:].float()
        rows.append(hidden.flatten(0, 1).mean(dim=0))
    return rows
