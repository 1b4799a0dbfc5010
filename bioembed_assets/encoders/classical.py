"""Classical CellProfiler-like features (intensity, shape, texture, correlation) as an Encoder.

All features are computed inside each crop's mask, vectorized over the batch with numpy.
Intensities are scaled to [0, 1] by the dtype's maximum (integer crops; float crops are taken
as already scaled). Conventions where a quantity is undefined, so no feature is ever NaN:
an empty mask gives all-zero features; a constant channel gives zero spread (Std, texture
Contrast, Entropy), zero texture Correlation and zero channel Correlation; a perimeter of 0
gives FormFactor 0.

Definitions follow scikit-image / CellProfiler: perimeter as `skimage.measure.perimeter`
(4-neighbourhood), axis lengths as `regionprops` (4 * sqrt of the inertia eigenvalues),
Solidity = area / area of the convex hull of the mask's pixel squares, Extent = area / bbox.
Texture is a grey-level co-occurrence matrix at distance 1 pooled over 0/45/90/135 degrees,
symmetric, on `TEXTURE_LEVELS` levels spanning each object's own min..max in that channel
(brightness-invariant; intensity features carry brightness); Energy = sqrt(ASM) as skimage,
Entropy in bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np
import torch
from scipy.spatial import ConvexHull, QhullError

from bioembed_assets.encoders.base import EncoderSpec, register_family
from bioembed_assets.schema import CELL_PAINTING_CHANNELS

INTENSITY_FEATURES = ("Mean", "Std", "Median", "P10", "P90", "Integrated", "Max")
SHAPE_FEATURES = (
    "Area", "Perimeter", "FormFactor", "Eccentricity", "MajorAxisLength", "MinorAxisLength",
    "Solidity", "Extent", "EquivalentDiameter",
)
TEXTURE_FEATURES = ("Contrast", "Homogeneity", "Energy", "Correlation", "Entropy")
TEXTURE_LEVELS = 8
_BATCH = 128  # crops per vectorized block (bounds memory)

_PERIM_WEIGHTS = np.zeros(50)
_PERIM_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIM_WEIGHTS[[21, 33]] = np.sqrt(2.0)
_PERIM_WEIGHTS[[13, 23]] = (1.0 + np.sqrt(2.0)) / 2.0


def feature_names(channels: Sequence[str] = CELL_PAINTING_CHANNELS) -> list[str]:
    """Names of the feature columns, in `embed` output order (CellProfiler-style)."""
    ch = list(channels)
    return (
        [f"Intensity_{s}_{c}" for s in INTENSITY_FEATURES for c in ch]
        + [f"AreaShape_{s}" for s in SHAPE_FEATURES]
        + [f"Texture_{t}_{c}" for t in TEXTURE_FEATURES for c in ch]
        + [f"Correlation_{a}_{b}" for a, b in combinations(ch, 2)]
    )


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den == 0."""
    den = np.asarray(den)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _gather(sorted_vals: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """sorted_vals (B, C, P) at per-crop positions idx (B,) -> (B, C) float64."""
    return np.take_along_axis(sorted_vals, idx[:, None, None], axis=2)[..., 0].astype(np.float64)


def _intensity(
    raw: np.ndarray, m: np.ndarray, n: np.ndarray, scale: float, x: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Intensity stats (B, 7, C) of raw (B, C, P) inside m (B, P); also the scaled per-channel
    min and max (B, C), a constant-channel flag (B, C) and the mean-centred masked x (B, C, P)."""
    b, c, p = raw.shape
    fill = np.iinfo(raw.dtype).max if raw.dtype.kind in "ui" else np.inf
    # integers sort by radix (kind="stable"); out-of-mask pixels go to the end
    srt = np.sort(np.where(m[:, None, :], raw, fill), axis=2, kind="stable")
    last = np.maximum(n - 1, 0)

    def quantile(q: float) -> np.ndarray:
        pos = q * last
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, last)
        frac = (pos - lo)[:, None]
        return (_gather(srt, lo) * (1 - frac) + _gather(srt, hi) * frac) / scale

    vmin, vmax = _gather(srt, np.zeros(b, np.int64)) / scale, _gather(srt, last) / scale
    const = vmax <= vmin
    mf = m[:, None, :].astype(np.float32)
    total = np.einsum("bcp,bcp->bc", x, mf, dtype=np.float64)
    mean = _safe_div(total, n[:, None].astype(np.float64))
    xc = (x - mean[:, :, None].astype(np.float32)) * mf
    var = _safe_div(np.einsum("bcp,bcp->bc", xc, xc, dtype=np.float64), n[:, None].astype(np.float64))
    std = np.where(const, 0.0, np.sqrt(var))
    feats = np.stack([mean, std, quantile(0.5), quantile(0.1), quantile(0.9), total, vmax], axis=1)
    feats[n == 0] = 0.0
    return feats, vmin, vmax, const, xc


def _shape(m2: np.ndarray) -> np.ndarray:
    """Mask shape features (B, 9) from (B, S, S) bool masks."""
    b, h, w = m2.shape
    mf = m2.astype(np.float64)
    area = mf.sum((1, 2))
    yy, xx = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    rows, cols = mf.sum(2), mf.sum(1)  # (B, H), (B, W) marginals
    cy, cx = _safe_div(rows @ yy, area), _safe_div(cols @ xx, area)
    myy = _safe_div(rows @ yy**2, area) - cy**2
    mxx = _safe_div(cols @ xx**2, area) - cx**2
    mxy = _safe_div(np.einsum("byx,y,x->b", mf, yy, xx), area) - cy * cx
    half_tr, d = (myy + mxx) / 2, np.sqrt(((myy - mxx) / 2) ** 2 + mxy**2)
    l1, l2 = np.maximum(half_tr + d, 0), np.maximum(half_tr - d, 0)
    major, minor = 4 * np.sqrt(l1), 4 * np.sqrt(l2)
    ecc = np.sqrt(np.clip(1 - _safe_div(l2, l1), 0, 1)) * (l1 > 0)

    # perimeter exactly as skimage.measure.perimeter(neighborhood=4)
    pad = np.pad(m2, ((0, 0), (1, 1), (1, 1)))
    core = pad[:, 1:-1, 1:-1]
    eroded = core & pad[:, :-2, 1:-1] & pad[:, 2:, 1:-1] & pad[:, 1:-1, :-2] & pad[:, 1:-1, 2:]
    border = (core & ~eroded).astype(np.uint8)
    bp = np.pad(border, ((0, 0), (1, 1), (1, 1)))
    code = (
        border
        + 2 * (bp[:, :-2, 1:-1] + bp[:, 2:, 1:-1] + bp[:, 1:-1, :-2] + bp[:, 1:-1, 2:])
        + 10 * (bp[:, :-2, :-2] + bp[:, :-2, 2:] + bp[:, 2:, :-2] + bp[:, 2:, 2:])
    )
    perimeter = (_PERIM_WEIGHTS[code] * border).sum((1, 2))
    form = _safe_div(4 * np.pi * area, perimeter**2)

    # bounding box and convex hull from each row's leftmost / rightmost pixel
    has_row, has_col = rows > 0, cols > 0
    bbox_h = np.where(area > 0, h - has_row[:, ::-1].argmax(1) - has_row.argmax(1), 0)
    bbox_w = np.where(area > 0, w - has_col[:, ::-1].argmax(1) - has_col.argmax(1), 0)
    extent = _safe_div(area, (bbox_h * bbox_w).astype(np.float64))
    # hull corners: both corners of each row's leftmost and rightmost pixel; empty rows repeat
    # the first filled row's corner (duplicates leave the hull unchanged)
    ys = np.broadcast_to(np.arange(h, dtype=np.float64), (b, h))
    left, right = m2.argmax(2).astype(np.float64), w - m2[:, :, ::-1].argmax(2).astype(np.float64)
    first = has_row.argmax(1)[:, None]
    ys = np.where(has_row, ys, np.take_along_axis(ys, first, 1))
    left = np.where(has_row, left, np.take_along_axis(left, first, 1))
    right = np.where(has_row, right, np.take_along_axis(right, first, 1))
    pts = np.stack(
        [np.concatenate([ys, ys + 1, ys, ys + 1], 1), np.concatenate([left, left, right, right], 1)], axis=2
    )
    hull_area = np.zeros(b)
    for i in np.nonzero(area > 0)[0]:
        try:
            hull_area[i] = ConvexHull(pts[i]).volume
        except QhullError:  # cannot happen for pixel squares; solidity 0 if it ever does
            pass
    solidity = np.clip(_safe_div(area, hull_area), 0, 1)
    eqd = np.sqrt(4 * area / np.pi)
    return np.stack([area, perimeter, form, ecc, major, minor, solidity, extent, eqd], axis=1)


def _texture(x: np.ndarray, m2: np.ndarray, vmin: np.ndarray, vmax: np.ndarray, levels: int) -> np.ndarray:
    """GLCM features (B, 5, C) on per-object min..max quantized levels inside the mask."""
    b, c, h, w = x.shape
    span = (vmax - vmin).astype(np.float32)
    scale = np.divide(levels, span, out=np.zeros_like(span), where=span > 0)
    q = ((x - vmin[:, :, None, None].astype(np.float32)) * scale[:, :, None, None]).astype(np.int16)
    q = np.clip(q, 0, levels - 1).astype(np.uint8)
    qt = np.ascontiguousarray(q.transpose(0, 2, 3, 1))  # (B, H, W, C): one gather serves all channels
    l2 = levels * levels
    chan = np.arange(c, dtype=np.int64)
    counts = np.zeros(b * c * l2, dtype=np.int64)
    for dy, dx in ((0, 1), (1, 1), (1, 0), (1, -1)):
        x0 = max(0, -dx)
        bi, yi, xi = np.nonzero(m2[:, : h - dy, x0 : w - max(dx, 0)] & m2[:, dy:, x0 + dx : w + min(dx, 0)])
        xi += x0
        code = qt[bi, yi, xi] * np.uint8(levels) + qt[bi, yi + dy, xi + dx]  # (N, C) pair codes
        idx = (bi[:, None] * c + chan) * l2 + code
        counts += np.bincount(idx.ravel(), minlength=b * c * l2)
    counts = counts.reshape(b, c, l2)
    g = counts.reshape(b, c, levels, levels).astype(np.float64)
    g = g + g.transpose(0, 1, 3, 2)
    p = _safe_div(g, g.sum((2, 3), keepdims=True))
    i, j = np.indices((levels, levels), dtype=np.float64)
    contrast = (p * (i - j) ** 2).sum((2, 3))
    homogeneity = (p / (1 + (i - j) ** 2)).sum((2, 3))
    energy = np.sqrt((p**2).sum((2, 3)))
    mu = (p * i).sum((2, 3))
    var = (p * (i - mu[..., None, None]) ** 2).sum((2, 3))
    cov = (p * (i - mu[..., None, None]) * (j - mu[..., None, None])).sum((2, 3))
    corr = np.where(var > 1e-12, _safe_div(cov, var), 0.0)  # symmetric GLCM: sigma_i == sigma_j
    entropy = -(p * np.log2(np.where(p > 0, p, 1.0))).sum((2, 3))
    return np.stack([contrast, homogeneity, energy, corr, entropy], axis=1)


def _channel_correlation(xc: np.ndarray, const: np.ndarray) -> np.ndarray:
    """Pearson correlation (B, C*(C-1)/2) of mean-centred masked channels xc (B, C, P)."""
    cov = np.matmul(xc, xc.transpose(0, 2, 1)).astype(np.float64)
    sd = np.sqrt(np.maximum(np.diagonal(cov, axis1=1, axis2=2), 0.0))
    corr = _safe_div(cov, sd[:, :, None] * sd[:, None, :])
    ok = ~const[:, :, None] & ~const[:, None, :]
    corr = np.clip(np.where(ok, corr, 0.0), -1.0, 1.0)
    iu = np.triu_indices(xc.shape[1], k=1)
    return corr[:, iu[0], iu[1]]


def classical_features(images: np.ndarray, masks: np.ndarray | None, levels: int = TEXTURE_LEVELS) -> np.ndarray:
    """Features (B, D) float32 of raw crops (B, C, S, S) inside masks (B, S, S); see module doc."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected crops (B, C, H, W), got shape {images.shape}")
    b, c, h, w = images.shape
    m2 = np.ones((b, h, w), bool) if masks is None else np.asarray(masks).astype(bool, copy=False)
    if m2.shape != (b, h, w):
        raise ValueError(f"masks shape {m2.shape} does not match crops {images.shape}")
    if levels > 16:
        raise ValueError(f"texture levels must be <= 16, got {levels}")
    if images.dtype.kind in "ui":
        scale = float(np.iinfo(images.dtype).max)
    elif images.dtype.kind == "f":
        scale, images = 1.0, np.nan_to_num(images.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    else:
        raise ValueError(f"unsupported crop dtype {images.dtype}")
    out = []
    for s in range(0, b, _BATCH):
        raw, mb = images[s : s + _BATCH], m2[s : s + _BATCH]
        n = mb.sum((1, 2))
        x = raw.astype(np.float32) * np.float32(1.0 / scale)
        inten, vmin, vmax, const, xc = _intensity(
            raw.reshape(len(raw), c, -1), mb.reshape(len(raw), -1), n, scale, x.reshape(len(raw), c, -1)
        )
        tex = _texture(x, mb, vmin, vmax, levels)
        tex[n == 0] = 0.0
        parts = [inten.reshape(len(raw), -1), _shape(mb), tex.reshape(len(raw), -1), _channel_correlation(xc, const)]
        out.append(np.concatenate(parts, axis=1))
    feats = np.concatenate(out, axis=0) if out else np.zeros((0, len(feature_names(["c"] * c))))
    return np.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


class ClassicalEncoder:
    """CellProfiler-like hand-crafted features; parameter-free (state_dict is {})."""

    def __init__(self, channels: Sequence[str] = CELL_PAINTING_CHANNELS, input_size: int = 64) -> None:
        self.channels = tuple(channels)
        self.names = feature_names(self.channels)
        self.spec = EncoderSpec(
            family="classical",
            embedding_dim=len(self.names),
            input_size=int(input_size),
            channels=self.channels,
            per_cell=True,
            trainable=False,
            config={"channels": list(self.channels), "input_size": int(input_size)},
        )

    def embed(self, images: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        """(B, C, S, S) raw crops + (B, S, S) bool masks -> (B, D) float32."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != len(self.channels):
            raise ValueError(f"expected crops (B, {len(self.channels)}, S, S) for {self.channels}, got {images.shape}")
        return classical_features(images, masks)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> Any:
        if state_dict:
            raise ValueError(f"classical encoder has no weights; got keys {sorted(state_dict)[:5]}")
        return self

    def to(self, device: str | torch.device) -> ClassicalEncoder:
        return self


@register_family("classical")
def classical(channels: Sequence[str] = CELL_PAINTING_CHANNELS, input_size: int = 64) -> ClassicalEncoder:
    """Build the classical-features encoder for `channels` (order matters)."""
    return ClassicalEncoder(channels, input_size)
