"""Moving batches between devices: tensors move, everything else (captions, ids, lists) stays as is."""

from __future__ import annotations

from typing import Any

import torch


def to_device(batch: dict[str, Any], device: torch.device | str, **kwargs: Any) -> dict[str, Any]:
    """A copy of `batch` with every tensor on `device` (`kwargs` go to `Tensor.to`, e.g. non_blocking)."""
    return {k: v.to(device, **kwargs) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_inputs(batch: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model's forward: the batch's tensors except the `drop` keys (labels,
    advantages and other objective-side tensors)."""
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in drop}
