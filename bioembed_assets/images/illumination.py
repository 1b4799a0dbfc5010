"""Illumination correction per plate x channel, in the spirit of CellProfiler's
CorrectIlluminationCalculate (Regular intensity, "All" images, heavy smoothing) + CorrectIlluminationApply (Divide).

The estimate is a smooth multiplicative field (C, H, W) with median 1; the corrected image is
``raw / illum`` so a plate keeps its intensity scale while vignetting and uneven lamps are flattened.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage

from bioembed_assets.images.ngff import PlateWriter, display_ends, open_plate_store
from bioembed_assets.images.store import open_plate_images
from bioembed_assets.schema import BioembedInputError, ProgressCallback
from bioembed_assets.store.atomic import atomic_dir, atomic_file

ILLUM_FLOOR = 0.05
"""The estimate never goes below this (relative to its median 1), so a dead corner is amplified at most 20x."""
_TARGET_SIZE = 160  # the averaged image is smoothed at about this resolution


def _block_mean(stack: np.ndarray, f: int) -> np.ndarray:
    """(C, H, W) -> (C, ceil(H/f), ceil(W/f)) block means; the edges are padded by replication."""
    _, h, w = stack.shape
    x = np.pad(stack, ((0, 0), (0, -h % f), (0, -w % f)), mode="edge").astype(np.float32)
    x = sum(x[:, :, j::f] for j in range(f))  # strided adds: ~4x faster than reshape(...).mean(axis)
    return sum(x[:, i::f] for i in range(f)) / (f * f)


def _local_linear_1d(img: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """Gaussian-weighted local *linear* regression along `axis` (Nadaraya-Watson's edge bias removed).

    Plain Gaussian or median filtering flattens a gradient towards the image edge (the kernel sees
    only one side), exactly where vignetting is strongest; a local linear fit reproduces any
    linear trend, edges included.
    """
    n = img.shape[axis]
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2

    def g(a: np.ndarray, ax: int) -> np.ndarray:
        return ndimage.gaussian_filter1d(a, sigma, axis=ax, mode="constant", cval=0.0, truncate=4.0)

    s0, m1, m2 = g(np.ones(n), 0), g(x, 0), g(x * x, 0)
    s1, s2 = m1 - x * s0, m2 - 2 * x * m1 + x * x * s0
    shape = [1] * img.ndim
    shape[axis] = n
    xs, s0, s1, s2 = (v.reshape(shape) for v in (x, s0, s1, s2))
    f0 = g(img, axis)
    f1 = g(img * xs, axis) - xs * f0
    return (s2 * f0 - s1 * f1) / np.maximum(s0 * s2 - s1 * s1, 1e-300)


def _smooth(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable (tensor-product) local linear Gaussian smoothing of a 2-D image."""
    return _local_linear_1d(_local_linear_1d(img, sigma, 0), sigma, 1)


def estimate_illumination(
    store_path: Path, sample: int | None = None, smoothing_sigma: float | None = None
) -> np.ndarray:
    """Illumination function (C, H, W) float32 of a plate store, median 1 per channel.

    Method ("Regular / All" in CellProfiler terms), one field in memory at a time:

    1. each site's channel is block-averaged to about 160 px and divided by its own mean, so every
       site has the same weight whatever its brightness or cell count (a plain average is dominated
       by bright or crowded sites; the mean rather than the median because sparse 8-bit fluorescence
       has medians of 2-4 grey levels, far too coarse to normalise by);
    2. these are averaged over the sites (`sample`: that many sites spread evenly over the plate,
       default all);
    3. the average is smoothed with a Gaussian local linear fit, sigma `smoothing_sigma` pixels
       (default min(H, W) / 8): as heavy as CellProfiler's large median filter, but without the
       edge bias that flattens vignetting in the corners; then upsampled bilinearly to (H, W);
    4. divided by its median and floored at `ILLUM_FLOOR`.

    A channel that is empty on every sampled site gets an all-ones function (no correction).
    """
    images, _ = open_plate_images(Path(store_path))
    n, c, h, w = images.shape
    if n == 0:
        raise BioembedInputError("plate store has no fields", path=store_path)
    sigma = float(smoothing_sigma) if smoothing_sigma is not None else min(h, w) / 8
    if sigma <= 0:
        raise ValueError(f"smoothing_sigma must be positive, got {smoothing_sigma}")
    f = max(1, min(math.ceil(max(h, w) / _TARGET_SIZE), int(sigma // 2)))
    idx = np.arange(n) if sample is None or sample >= n else np.unique(np.linspace(0, n - 1, max(1, sample)).round().astype(int))

    acc = np.zeros((c, -(-h // f), -(-w // f)))
    count = np.zeros(c)
    for i in idx:
        small = _block_mean(np.asarray(images[int(i)]), f)
        means = small.mean(axis=(1, 2))
        ok = means > 0
        acc[ok] += small[ok] / means[ok, None, None]
        count += ok

    illum = np.ones((c, h, w), dtype=np.float32)
    for k in range(c):
        if not count[k]:
            continue
        smooth = _smooth(acc[k] / count[k], sigma / f)
        full = ndimage.zoom(smooth, f, order=1, mode="nearest", grid_mode=True)[:h, :w]  # bilinear, pixel areas aligned
        med = float(np.median(full))
        if med > 0 and np.isfinite(med):
            illum[k] = np.maximum(full / med, ILLUM_FLOOR)
    return illum


def save_illumination(illum: np.ndarray, path: Path, channels: Sequence[str]) -> Path:
    """Write an illumination function (C, H, W) and its channel names to an .npz file, atomically."""
    illum = np.asarray(illum, dtype=np.float32)
    channels = list(channels)
    if illum.ndim != 3 or illum.shape[0] != len(channels):
        raise ValueError(f"illum must be (C, H, W) with C = {len(channels)} channels, got shape {illum.shape}")
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, illum=illum, channels=np.array(channels, dtype=np.str_))
    return path


def load_illumination(path: Path) -> tuple[np.ndarray, list[str]]:
    """(illum (C, H, W) float32, channel names) from `save_illumination`'s file."""
    with np.load(Path(path), allow_pickle=False) as z:
        return z["illum"].astype(np.float32), [str(s) for s in z["channels"]]


def correct_plate_store(src_store: Path, illum: np.ndarray, dst_store: Path, *, workers: int = 4,
                        progress: ProgressCallback | None = None) -> None:
    """Write `dst_store`: a copy of the plate store with every field divided by `illum`.

    The same OME-Zarr plate layout, codec, channels and pixel size, `bioembed.kind` "corrected" and
    ``bioembed.illumination_corrected: true``. Values are
    rounded and clipped to the dtype's range. Field by field on `workers` threads; `dst_store` appears atomically
    (it may be `src_store` itself, which is then replaced whole); `progress(done, total)` after each field.
    """
    src_store, dst_store = Path(src_store), Path(dst_store)
    source = open_plate_store(src_store, "images")
    images = source.fields()
    illum = np.asarray(illum, dtype=np.float32)
    if illum.shape != images.shape[1:]:
        raise BioembedInputError(
            f"illumination function is {illum.shape} but the plate's fields are {images.shape[1:]} (C, H, W)",
            path=src_store,
        )
    if not np.all(np.isfinite(illum)) or illum.min() <= 0:
        raise ValueError("illumination function must be finite and positive")
    hi = np.iinfo(images.dtype).max
    inv = 1.0 / illum

    def corrected(i: int) -> np.ndarray:
        return np.clip(np.rint(images[i].astype(np.float32) * inv), 0, hi).astype(images.dtype)

    with atomic_dir(dst_store) as tmp:
        writer = PlateWriter(tmp, source.layout, "corrected", images.field_shape, images.dtype,
                             compressor=source.attrs.get("compressor", "none"), channels=source.channels,
                             pixel_size_um=source.attrs.get("pixel_size_um"), attrs={"illumination_corrected": True})
        first = corrected(0) if len(images) else None
        writer.begin(display_ends(first) if first is not None else None)

        def correct(i: int) -> None:
            writer.write_field(i, first if i == 0 and first is not None else corrected(i))

        with ThreadPoolExecutor(workers) as pool:  # zarr I/O and numpy release the GIL
            for done, _ in enumerate(pool.map(correct, range(images.shape[0])), 1):
                if progress is not None:
                    progress(done, images.shape[0])
