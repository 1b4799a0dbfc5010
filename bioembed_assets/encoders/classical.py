"""Classical CellProfiler features (intensity, shape, texture, correlation, ...) as an Encoder.

The encoder is a set of feature groups (`groups`). The default groups are ours, vectorised over
the batch with numpy (together ~350-1000 crops/s for 5 stains of 64 px on one shared core; each
5-14x cp_measure's speed for the same features); the opt-in groups add CellProfiler's other
modules (`encoders/cp_features.py`: `texture` ours, ~150-250 crops/s; the others `cp_measure` per
crop, 15-600 crops/s), enabled by `groups=[...]` (run config `[encoder_options.classical]`).
Measured by tests/benchmarks/bench_classical.py. Columns (<s> = stain):

- `intensity` (default): `Intensity_{Mean,Std,Median,LowerQuartile,UpperQuartile,Integrated,Max}Intensity_<s>`
- `shape` (default): `AreaShape_{Area,Perimeter,FormFactor,Eccentricity,MajorAxisLength,MinorAxisLength,
  Solidity,Extent,EquivalentDiameter}`
- `glcm` (default): `GLCM_{Contrast,Homogeneity,Energy,Correlation,Entropy}_<s>`, ours, NOT
  CellProfiler's texture (that is the `texture` group)
- `correlation` (default): `Correlation_Correlation_<a>_<b>` (Pearson, MeasureColocalization)
- `intensity_extra`: `Intensity_{Min,MAD}Intensity_<s>`, `Intensity_MassDisplacement_<s>`,
  `Intensity_{Integrated,Mean,Std,Min,Max}IntensityEdge_<s>`
- `zernike`, `feret`: `AreaShape_Zernike_<n>_<m>` (n <= 9), `AreaShape_{Min,Max}FeretDiameter`
- `texture`: `Texture_<Haralick feature>_<s>_3_<00..03>_256` (13 features x 4 directions)
- `granularity`: `Granularity_<1..16>_<s>`
- `radial_distribution`: `RadialDistribution_{FracAtD,MeanFrac,RadialCV}_<s>_<1..4>of4`
- `radial_zernikes`: `RadialDistribution_ZernikeMagnitude_<s>_<n>_<m>`

Every feature is computed inside each crop's own mask. Intensities are scaled to [0, 1] by the
dtype's maximum (integer crops, as CellProfiler loads them; float crops are taken as already
scaled). A name in CellProfiler's form has CellProfiler's definition (checked against cp_measure
and a CellProfiler run in tests/test_cp_measure_agreement.py): quartiles and the median
interpolate the sorted values at position n*q (CellProfiler's convention, cp_measure
`legacy=True`, not numpy's (n-1)*q); Std is the population std; Perimeter is
`skimage.measure.perimeter` (4-neighbourhood); axis lengths and Eccentricity come from the
second central moments (4 * sqrt of the eigenvalues); Solidity = Area / the pixel count of
`skimage.morphology.convex_hull_image` (pixels whose centre lies in the hull of the pixels' edge
midpoints); Extent = Area / bounding-box area; edge intensities are over the mask's inner
boundary (`skimage.segmentation.find_boundaries(mode="inner")`, 4-connected, the crop border
reflected as scipy does).

`glcm` is our cheap texture, kept as the default so the default width (79 for 5 stains) and its
values do not change: a grey-level co-occurrence matrix at distance 1 pooled over 0/45/90/135
degrees, symmetric, on `TEXTURE_LEVELS` (8) levels spanning each object's own min..max in that
channel (brightness-invariant; intensity features carry brightness); Homogeneity and Energy as
scikit-image (Energy = sqrt(ASM)), Entropy in bits. CellProfiler's texture (fixed 256-level
quantisation of the image, scale 3, per direction, 13 Haralick features) is the `texture` group.

An empty mask is an error (no CellProfiler object has zero pixels; a silent all-zero row would
pull its well's profile toward zero), as are masks that are not boolean and crops whose channel
count is not the encoder's. Conventions where a quantity is undefined, so no feature is ever NaN:
a constant channel gives zero spread (Std, GLCM Contrast, Entropy), zero GLCM
Correlation and zero channel Correlation; a perimeter of 0 gives FormFactor 0; zero intensity
gives MassDisplacement 0; NaN from cp_measure becomes 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np
import torch
from scipy.spatial import ConvexHull, QhullError

from bioembed_assets.encoders.base import EncoderSpec, register_family
from bioembed_assets.encoders.cp_features import (
    cp_group_features,
    cp_group_names,
    cp_measure_functions,
    needs_cp_measure,
)
from bioembed_assets.schema import CELL_PAINTING_CHANNELS

INTENSITY_FEATURES = (
    "MeanIntensity", "StdIntensity", "MedianIntensity", "LowerQuartileIntensity", "UpperQuartileIntensity",
    "IntegratedIntensity", "MaxIntensity",
)
INTENSITY_EXTRA_FEATURES = (
    "MinIntensity", "MADIntensity", "MassDisplacement", "IntegratedIntensityEdge", "MeanIntensityEdge",
    "StdIntensityEdge", "MinIntensityEdge", "MaxIntensityEdge",
)
SHAPE_FEATURES = (
    "Area", "Perimeter", "FormFactor", "Eccentricity", "MajorAxisLength", "MinorAxisLength",
    "Solidity", "Extent", "EquivalentDiameter",
)
GLCM_FEATURES = ("Contrast", "Homogeneity", "Energy", "Correlation", "Entropy")
TEXTURE_LEVELS = 8
DEFAULT_GROUPS: tuple[str, ...] = ("intensity", "shape", "glcm", "correlation")
GROUPS: tuple[str, ...] = (
    "intensity", "intensity_extra", "shape", "zernike", "feret", "glcm", "texture", "granularity",
    "radial_distribution", "radial_zernikes", "correlation",
)
"""Every group, in the order the encoder concatenates them (whatever order `groups` lists them in)."""
_OWN_CHANNEL_GROUPS = frozenset({"intensity", "intensity_extra", "glcm", "correlation"})
_BATCH = 128  # crops per vectorized block (bounds memory)

_PERIM_WEIGHTS = np.zeros(50)
_PERIM_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIM_WEIGHTS[[21, 33]] = np.sqrt(2.0)
_PERIM_WEIGHTS[[13, 23]] = (1.0 + np.sqrt(2.0)) / 2.0


def resolve_groups(groups: Sequence[str] | None) -> tuple[str, ...]:
    """`groups` checked and put in canonical (`GROUPS`) order; None -> `DEFAULT_GROUPS`."""
    if groups is None:
        return DEFAULT_GROUPS
    if isinstance(groups, str):
        groups = [groups]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown classical feature group(s) {unknown}; known: {list(GROUPS)}")
    if not groups:
        raise ValueError(f"classical encoder needs at least one feature group; known: {list(GROUPS)}")
    return tuple(g for g in GROUPS if g in set(groups))


def feature_names(channels: Sequence[str] = CELL_PAINTING_CHANNELS, groups: Sequence[str] | None = None) -> list[str]:
    """Names of the feature columns, in `embed` output order (CellProfiler's where defined like it)."""
    ch = list(channels)
    names: list[str] = []
    for g in resolve_groups(groups):
        if g == "intensity":
            names += [f"Intensity_{s}_{c}" for s in INTENSITY_FEATURES for c in ch]
        elif g == "intensity_extra":
            names += [f"Intensity_{s}_{c}" for s in INTENSITY_EXTRA_FEATURES for c in ch]
        elif g == "shape":
            names += [f"AreaShape_{s}" for s in SHAPE_FEATURES]
        elif g == "glcm":
            names += [f"GLCM_{t}_{c}" for t in GLCM_FEATURES for c in ch]
        elif g == "correlation":
            names += [f"Correlation_Correlation_{a}_{b}" for a, b in combinations(ch, 2)]
        else:
            names += cp_group_names(g, ch)
    return names


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den == 0."""
    den = np.asarray(den)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _gather(sorted_vals: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """sorted_vals (B, C, P) at per-crop positions idx (B,) -> (B, C) float64."""
    return np.take_along_axis(sorted_vals, idx[:, None, None], axis=2)[..., 0].astype(np.float64)


def _cp_quantile(srt: np.ndarray, n: np.ndarray, q: float) -> np.ndarray:
    """CellProfiler's quantile (B, C) of the first n (B,) values of each sorted row of srt (B, C, P):
    linear interpolation at position n*q, both neighbours clamped to the last value."""
    last = np.maximum(n - 1, 0)
    pos = q * n.astype(np.float64)
    lo = np.minimum(np.floor(pos).astype(np.int64), last)
    hi = np.minimum(lo + 1, last)
    frac = (pos - lo)[:, None]
    return _gather(srt, lo) * (1 - frac) + _gather(srt, hi) * frac


class _Block:
    """One batch block: raw crops (B, C, S, S), masks (B, S, S), and the shared per-channel stats."""

    def __init__(self, raw: np.ndarray, m2: np.ndarray, scale: float) -> None:
        b, c, h, w = raw.shape
        self.raw, self.m2, self.scale, self.shape = raw, m2, scale, (b, c, h, w)
        self.n = m2.sum((1, 2))
        self.x = raw.astype(np.float32) * np.float32(1.0 / scale)
        raw_f, m = raw.reshape(b, c, -1), m2.reshape(b, -1)
        fill = np.iinfo(raw.dtype).max if raw.dtype.kind in "ui" else np.inf
        # integers sort by radix (kind="stable"); out-of-mask pixels go to the end
        self.sorted = np.sort(np.where(m[:, None, :], raw_f, fill), axis=2, kind="stable")
        self.vmin = _gather(self.sorted, np.zeros(b, np.int64)) / scale
        self.vmax = _gather(self.sorted, np.maximum(self.n - 1, 0)) / scale
        self.const = self.vmax <= self.vmin
        self.mf = m[:, None, :].astype(np.float32)
        xf = self.x.reshape(b, c, -1)
        self.total = np.einsum("bcp,bcp->bc", xf, self.mf, dtype=np.float64)
        self.mean = _safe_div(self.total, self.n[:, None].astype(np.float64))
        self.xc = (xf - self.mean[:, :, None].astype(np.float32)) * self.mf  # mean-centred, 0 outside

    def quantile(self, q: float) -> np.ndarray:
        return _cp_quantile(self.sorted, self.n, q) / self.scale


def _intensity(blk: _Block) -> np.ndarray:
    """Intensity features (B, 7, C)."""
    n = blk.n[:, None].astype(np.float64)
    var = _safe_div(np.einsum("bcp,bcp->bc", blk.xc, blk.xc, dtype=np.float64), n)
    std = np.where(blk.const, 0.0, np.sqrt(var))
    q1, med, q3 = blk.quantile(0.25), blk.quantile(0.5), blk.quantile(0.75)
    feats = np.stack([blk.mean, std, med, q1, q3, blk.total, blk.vmax], axis=1)
    feats[blk.n == 0] = 0.0
    return feats


def _inner_boundary(m2: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask; the crop border reflects (scipy's mode)."""
    p = np.pad(m2, ((0, 0), (1, 1), (1, 1)), mode="edge")
    inner = p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:]
    return m2 & ~inner


def _masked_stats(x: np.ndarray, sel: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sum, mean, population std, min, max (each (B, C)) of x (B, C, P) over sel (B, P); 0 if empty."""
    k = sel.sum(1)[:, None].astype(np.float64)
    sf = sel[:, None, :].astype(np.float32)
    total = np.einsum("bcp,bcp->bc", x, sf, dtype=np.float64)
    mean = _safe_div(total, k)
    dev = (x - mean[:, :, None].astype(np.float32)) * sf
    std = np.sqrt(_safe_div(np.einsum("bcp,bcp->bc", dev, dev, dtype=np.float64), k))
    has = k > 0
    vmin = np.where(has, np.where(sel[:, None, :], x, np.inf).min(2), 0.0)
    vmax = np.where(has, np.where(sel[:, None, :], x, -np.inf).max(2), 0.0)
    return total, mean, std, vmin, vmax


def _intensity_extra(blk: _Block) -> np.ndarray:
    """Min, MAD, MassDisplacement and the five edge features (B, 8, C)."""
    b, c, h, w = blk.shape
    m = blk.m2.reshape(b, -1)
    xf = blk.x.reshape(b, c, -1)
    med = blk.quantile(0.5)
    dev = np.where(m[:, None, :], np.abs(blk.raw.reshape(b, c, -1) / blk.scale - med[:, :, None]), np.inf)
    mad = _cp_quantile(np.sort(dev, axis=2), blk.n, 0.5)  # CellProfiler: the (1/ndim)-quantile, 1/2 in 2-D
    yy, xx = np.divmod(np.arange(h * w, dtype=np.float64), w)
    n = blk.n[:, None].astype(np.float64)
    cy, cx = _safe_div((m * yy).sum(1)[:, None], n), _safe_div((m * xx).sum(1)[:, None], n)
    wy = _safe_div(np.einsum("bcp,p->bc", xf * blk.mf, yy, dtype=np.float64), blk.total)
    wx = _safe_div(np.einsum("bcp,p->bc", xf * blk.mf, xx, dtype=np.float64), blk.total)
    displacement = np.where(blk.total > 0, np.hypot(wy - cy, wx - cx), 0.0)
    edge = _masked_stats(xf, _inner_boundary(blk.m2).reshape(b, -1))
    feats = np.stack([blk.vmin, mad, displacement, *edge], axis=1)
    feats[blk.n == 0] = 0.0
    return feats


def _convex_area(m2: np.ndarray, area: np.ndarray) -> np.ndarray:
    """Pixel count (B,) of `skimage.morphology.convex_hull_image` of each mask (B, S, S).

    The hull of all pixels' edge midpoints is the hull of those of each row's leftmost and
    rightmost pixel (scipy, per crop); a pixel counts when its centre lies in the hull or on its
    border, counted row by row from the hull's half-planes for the whole batch at once (4x faster
    than `skimage.measure.grid_points_in_poly` per crop, measured on 64 px cell crops).
    """
    b, h, w = m2.shape
    has_row = m2.any(2)
    left = m2.argmax(2).astype(np.float64)
    right = (w - 1 - m2[:, :, ::-1].argmax(2)).astype(np.float64)
    ys = np.broadcast_to(np.arange(h, dtype=np.float64), (b, h))
    # per row: (y, l - 1/2), (y, r + 1/2), (y -+ 1/2, l), (y -+ 1/2, r)
    pts = np.stack([
        np.concatenate([ys, ys, ys - 0.5, ys + 0.5, ys - 0.5, ys + 0.5], 1),
        np.concatenate([left - 0.5, right + 0.5, left, left, right, right], 1),
    ], axis=2)
    keep = np.tile(has_row, 6)
    eqs = []
    for i in np.nonzero(area > 0)[0]:
        try:
            eqs.append((i, ConvexHull(pts[i][keep[i]]).equations))  # rows (n_y, n_x, c): n . p + c <= 0 inside
        except QhullError:  # cannot happen for edge midpoints (never collinear); solidity 0 if it does
            pass
    out = np.zeros(b)
    if not eqs:
        return out
    k = max(len(e) for _, e in eqs)
    idx = np.array([i for i, _ in eqs])
    eq = np.zeros((len(eqs), k, 3))
    eq[:, :, 2] = -1.0  # padding: 0 . p - 1 <= 0 always holds
    for r, (_, e) in enumerate(eqs):
        eq[r, : len(e)] = e
    ny, nx, c = (eq[:, None, :, j] for j in range(3))  # (N, 1, K)
    rhs = -c - ny * ys[: len(eqs), :, None]  # n_x * x <= rhs, per row y (N, H, K)
    tol = 1e-9
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = rhs / nx
    hi = np.where(nx > tol, bound, np.inf).min(2)
    lo = np.where(nx < -tol, bound, -np.inf).max(2)
    row_ok = np.where(np.abs(nx) <= tol, rhs >= -tol, True).all(2)
    n_in = np.floor(np.minimum(hi, w - 1) + tol) - np.ceil(np.maximum(lo, 0) - tol) + 1
    out[idx] = np.where(row_ok, np.maximum(n_in, 0), 0).sum(1)
    return out


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

    has_row, has_col = rows > 0, cols > 0
    bbox_h = np.where(area > 0, h - has_row[:, ::-1].argmax(1) - has_row.argmax(1), 0)
    bbox_w = np.where(area > 0, w - has_col[:, ::-1].argmax(1) - has_col.argmax(1), 0)
    extent = _safe_div(area, (bbox_h * bbox_w).astype(np.float64))
    solidity = _safe_div(area, _convex_area(m2, area))
    eqd = np.sqrt(4 * area / np.pi)
    return np.stack([area, perimeter, form, ecc, major, minor, solidity, extent, eqd], axis=1)


def _glcm(x: np.ndarray, m2: np.ndarray, vmin: np.ndarray, vmax: np.ndarray, levels: int) -> np.ndarray:
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


def _group(blk: _Block, group: str, levels: int) -> np.ndarray:
    """Features (B, K) of one group for one block."""
    b, c = blk.shape[:2]
    if group == "intensity":
        return _intensity(blk).reshape(b, -1)
    if group == "intensity_extra":
        return _intensity_extra(blk).reshape(b, -1)
    if group == "shape":
        return _shape(blk.m2)
    if group == "glcm":
        tex = _glcm(blk.x, blk.m2, blk.vmin, blk.vmax, levels)
        tex[blk.n == 0] = 0.0
        return tex.reshape(b, -1)
    if group == "correlation":
        return _channel_correlation(blk.xc, blk.const)
    pixels = np.clip(blk.raw.astype(np.float64) / blk.scale, 0.0, 1.0)  # cp_measure: CellProfiler's [0, 1]
    return cp_group_features(group, pixels, blk.m2)


def _check_masks(masks: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """`masks` as bool (B, H, W), or a ValueError saying what was expected."""
    if masks.shape != shape:
        raise ValueError(f"masks shape {masks.shape} does not match the crops: expected (B, H, W) = {shape}")
    if masks.dtype != bool and masks.size and (masks.min() < 0 or masks.max() > 1):
        raise ValueError(f"masks hold values {masks.min()}..{masks.max()}: expected boolean masks of each crop's "
                         "own cell (a label window would merge its neighbours into the cell)")
    m2 = masks.astype(bool, copy=False)
    empty = np.nonzero(~m2.any((1, 2)))[0]
    if len(empty):
        raise ValueError(f"{len(empty)} of {len(m2)} crops have an empty mask (at positions {empty[:10].tolist()}"
                         f"{' ...' if len(empty) > 10 else ''}): expected each crop's cell mask to hold at least one "
                         "pixel (masks=None measures the whole crop)")
    return m2


def classical_features(
    images: np.ndarray, masks: np.ndarray | None, levels: int = TEXTURE_LEVELS, groups: Sequence[str] | None = None
) -> np.ndarray:
    """Features (B, D) float32 of raw crops (B, C, S, S) inside masks (B, S, S); see module doc."""
    groups = resolve_groups(groups)
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected crops (B, C, H, W), got shape {images.shape}")
    b, c, h, w = images.shape
    m2 = np.ones((b, h, w), bool) if masks is None else _check_masks(np.asarray(masks), (b, h, w))
    if levels > 16:
        raise ValueError(f"GLCM levels must be <= 16, got {levels}")
    if images.dtype.kind in "ui":
        scale = float(np.iinfo(images.dtype).max)
    elif images.dtype.kind == "f":
        scale, images = 1.0, np.nan_to_num(images.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    else:
        raise ValueError(f"unsupported crop dtype {images.dtype}")
    out = []
    for s in range(0, b, _BATCH):
        blk = _Block(images[s : s + _BATCH], m2[s : s + _BATCH], scale)
        out.append(np.concatenate([_group(blk, g, levels) for g in groups], axis=1))
    width = len(feature_names([f"c{i}" for i in range(c)], groups))
    feats = np.concatenate(out, axis=0) if out else np.zeros((0, width))
    return np.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


class ClassicalEncoder:
    """CellProfiler hand-crafted features; parameter-free (state_dict is {})."""

    def __init__(
        self,
        channels: Sequence[str] = CELL_PAINTING_CHANNELS,
        input_size: int = 64,
        groups: Sequence[str] | None = None,
    ) -> None:
        self.channels = tuple(channels)
        if not self.channels or len(set(self.channels)) != len(self.channels):
            raise ValueError(f"classical encoder needs distinct channel names, got {list(self.channels)}")
        self.groups = resolve_groups(groups)
        if needs_cp_measure(self.groups):
            cp_measure_functions()  # fail now, not at the first batch, if cp-measure is missing
        self.feature_names = feature_names(self.channels, self.groups)
        config: dict[str, Any] = {"channels": list(self.channels), "input_size": int(input_size)}
        if self.groups != DEFAULT_GROUPS:
            config["groups"] = list(self.groups)
        self.spec = EncoderSpec(
            family="classical",
            embedding_dim=len(self.feature_names),
            input_size=int(input_size),
            channels=self.channels,
            per_cell=True,
            trainable=False,
            config=config,
        )

    def embed(self, images: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        """(B, C, S, S) raw crops + (B, S, S) bool masks -> (B, D) float32."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != len(self.channels):
            raise ValueError(f"expected crops (B, {len(self.channels)}, S, S), one channel per stain of "
                             f"{list(self.channels)}, got shape {images.shape}")
        return classical_features(images, masks, groups=self.groups)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> Any:
        if state_dict:
            raise ValueError(f"classical encoder has no weights; got keys {sorted(state_dict)[:5]}")
        return self

    def to(self, device: str | torch.device) -> ClassicalEncoder:
        return self


@register_family("classical")
def classical(
    channels: Sequence[str] = CELL_PAINTING_CHANNELS, input_size: int = 64, groups: Sequence[str] | None = None
) -> ClassicalEncoder:
    """Build the classical-features encoder for `channels` (order matters) and feature `groups`
    (default `DEFAULT_GROUPS`; any of `GROUPS`)."""
    return ClassicalEncoder(channels, input_size, groups)
