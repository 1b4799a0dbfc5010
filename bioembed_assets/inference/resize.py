"""Resizing crops to an encoder's input side, on whatever device the crops are on.

Images are resized bilinearly (antialiased) in float32 and, for integer stores, rounded and
clamped back to the stored range, so the device path and the host path (`resize_crops`) give the
same values bit for bit. Masks are resized nearest-neighbour.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_INT_RANGES = {torch.uint8: (0, 255), torch.uint16: (0, 65535), torch.int16: (-32768, 32767)}


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Crops (B, C, H, W) in their stored dtype -> float32 (B, C, size, size) in stored units
    (integer stores: rounded and clamped to the dtype's range)."""
    x = images.float()
    if images.shape[-1] == size and images.shape[-2] == size:
        return x
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if images.dtype in _INT_RANGES:
        lo, hi = _INT_RANGES[images.dtype]
        x = x.round_().clamp_(lo, hi)
    return x


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Masks (B, H, W) bool -> (B, size, size) bool, nearest-neighbour."""
    if masks.shape[-1] == size and masks.shape[-2] == size:
        return masks.bool()
    m = F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")
    return m[:, 0] > 0.5


def resize_crops(images: np.ndarray, masks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Host arrays: `resize_images` keeping the stored dtype, `resize_masks` -> bool."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images, masks
    x = resize_images(torch.from_numpy(np.ascontiguousarray(images)), size)
    m = resize_masks(torch.from_numpy(np.ascontiguousarray(masks, dtype=bool)), size)
    return x.numpy().astype(images.dtype), m.numpy()
