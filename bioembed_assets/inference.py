"""The embedding engine: stream crops from a zarr store through an encoder in batches.

Reads batch k+1 on a background thread while batch k is encoded, resizes crops to the
encoder's input size, selects the channels it expects, and places it on the best device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from bioembed_assets.encoders.base import Encoder

ProgressCallback = Callable[[int, int], None]


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else Apple MPS, else CPU; otherwise the named device."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def channel_indices(store_channels: Sequence[str], wanted: Sequence[str] | None, where: str) -> list[int]:
    """Indices of `wanted` stains in `store_channels` (all channels if `wanted` is None)."""
    if wanted is None:
        return list(range(len(store_channels)))
    missing = [c for c in wanted if c not in store_channels]
    if missing:
        raise ValueError(f"{where}: encoder expects channels {list(wanted)} but the store has "
                         f"{list(store_channels)} (missing {missing})")
    return [list(store_channels).index(c) for c in wanted]


def resize_crops(images: np.ndarray, masks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear-resize crops (keeping their integer dtype) and nearest-resize masks to `size`."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images, masks
    dtype = images.dtype
    t = F.interpolate(torch.from_numpy(images.astype(np.float32)), size=(size, size),
                      mode="bilinear", align_corners=False, antialias=True)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        t = t.round().clamp(info.min, info.max)
    m = F.interpolate(torch.from_numpy(masks[:, None].astype(np.float32)), size=(size, size),
                      mode="nearest")
    return t.numpy().astype(dtype), m[:, 0].numpy() > 0.5


def _batches(images: zarr.Array, masks: zarr.Array, channels: list[int],
             batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    n = images.shape[0]
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        yield images[start:stop][:, channels], masks[start:stop]


def encoder_outputs(encoder: Encoder) -> dict[str, list[str]]:
    """The per-cell side outputs an encoder produces beside its embedding: key -> column names ({} if none)."""
    return dict(getattr(encoder, "output_names", None) or {})


def encoder_feature_names(encoder: Encoder) -> list[str] | None:
    """The names of the embedding's columns, if the encoder names them (checked against its width)."""
    names = getattr(encoder, "feature_names", None)
    if names is None:
        return None
    names = [str(n) for n in names]
    if len(names) != encoder.spec.embedding_dim or len(set(names)) != len(names):
        raise ValueError(f"encoder {encoder.spec.family}: {len(names)} feature names ({len(set(names))} distinct) "
                         f"for an embedding of {encoder.spec.embedding_dim}")
    return names


def _embed_batch(encoder: Encoder, images: np.ndarray, masks: np.ndarray,
                 with_outputs: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    if with_outputs:
        return encoder.embed_with_outputs(images, masks)  # type: ignore[attr-defined]
    return encoder.embed(images, masks), {}


def embed_crop_store(
    encoder: Encoder,
    crops_path: str | Path,
    *,
    batch_size: int = 256,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Embed every crop of the zarr crop store at `crops_path`; returns float32 (N, D).

    The store holds `images` (N, C, S, S), `masks` (N, S, S) and attrs `channels`.
    """
    return embed_crop_store_with_outputs(encoder, crops_path, batch_size=batch_size, progress=progress)[0]


def embed_crop_store_with_outputs(
    encoder: Encoder,
    crops_path: str | Path,
    *,
    batch_size: int = 256,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """As `embed_crop_store`, plus the encoder's side outputs (`encoder_outputs`): key -> float32 (N, K)."""
    group = zarr.open_group(str(crops_path), mode="r")
    images, masks = group["images"], group["masks"]
    spec = encoder.spec
    channels = channel_indices(group.attrs["channels"], spec.channels, f"crop store {crops_path}")
    names = encoder_outputs(encoder)
    n = images.shape[0]
    outputs: list[np.ndarray] = []
    extras: dict[str, list[np.ndarray]] = {key: [] for key in names}
    done = 0
    batches = _batches(images, masks, channels, batch_size)
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(next, batches, None)
        while (batch := pending.result()) is not None:
            pending = reader.submit(next, batches, None)
            imgs, msks = resize_crops(*batch, spec.input_size)
            try:
                emb, side = _embed_batch(encoder, imgs, msks, bool(names))
            except ValueError as err:  # the encoder speaks of positions in its batch: say where they are
                raise ValueError(f"crop store {crops_path}, crops {done}..{done + imgs.shape[0] - 1} "
                                 f"(the cells table's crop_index): {err}") from err
            if names:
                for key, columns in names.items():
                    values = np.asarray(side[key], dtype=np.float32)
                    if values.shape != (imgs.shape[0], len(columns)):
                        raise RuntimeError(f"encoder {spec.family} output {key!r} has shape {values.shape}, "
                                           f"expected ({imgs.shape[0]}, {len(columns)})")
                    extras[key].append(values)
            emb = np.asarray(emb, dtype=np.float32)
            if emb.ndim != 2 or emb.shape[0] != imgs.shape[0]:
                raise RuntimeError(f"encoder {spec.family} returned shape {emb.shape} "
                                   f"for a batch of {imgs.shape[0]} crops")
            outputs.append(emb)
            done += imgs.shape[0]
            if progress is not None:
                progress(done, n)
    side_outputs = {key: (np.concatenate(parts) if parts else np.zeros((0, len(names[key])), np.float32))
                    for key, parts in extras.items()}
    if not outputs:
        return np.zeros((0, spec.embedding_dim), dtype=np.float32), side_outputs
    return np.concatenate(outputs), side_outputs
