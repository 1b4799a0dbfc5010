"""The classical encoder's opt-in CellProfiler groups, and the neighbour features that need the whole
field rather than a crop.

Why a separate module: these groups are opt-in (`classical(groups=[...])`) and cost 3-50x the
default groups (tests/benchmarks/bench_classical.py). `texture` is our batched reimplementation of CellProfiler's MeasureTexture
(`haralick_features`, checked against cp_measure/mahotas to ~1e-11); zernike, feret, granularity,
radial_distribution and radial_zernikes call the maintained `cp_measure` package (CellProfiler's
measurement code as a library) per crop, imported only when one of them is requested. Each group is
computed per crop on the crop's own mask (a label image with that one object), with the crop's
pixels scaled to [0, 1] as CellProfiler scales them. Steps CellProfiler runs on the whole image
therefore see the crop, not the field: granularity's background subtraction and 0.25 subsampling
run on the 64 px crop (a 16 px image, so only the first few of the 16 spectrum steps are non-zero).
NaN that cp_measure returns for undefined values becomes 0, as in the rest of the encoder.

Names are CellProfiler's as it writes them (Measurement_Feature_Image_Parameters):
`Texture_Contrast_DNA_3_00_256`, `Granularity_1_DNA`, `RadialDistribution_FracAtD_DNA_1of4`,
`RadialDistribution_ZernikeMagnitude_DNA_2_0`, `AreaShape_Zernike_2_0`, `AreaShape_MinFeretDiameter`
(radial Zernike phases, which depend on the cell's orientation, are left out, as in JUMP's profiles).

`neighbor_features` is CellProfiler's MeasureObjectNeighbors from cell centroids (see its doc).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from scipy.spatial import cKDTree

from bioembed_assets.schema import CELL_ID, PLATE, SITE, WELL, BioembedInputError

HARALICK_FEATURES = (
    "AngularSecondMoment", "Contrast", "Correlation", "Variance", "InverseDifferenceMoment", "SumAverage",
    "SumVariance", "SumEntropy", "Entropy", "DifferenceVariance", "DifferenceEntropy", "InfoMeas1", "InfoMeas2",
)
TEXTURE_SCALE, TEXTURE_GRAY_LEVELS, TEXTURE_DIRECTIONS = 3, 256, 4  # CellProfiler 4's defaults (2-D)
GRANULARITY_SPECTRUM = 16
RADIAL_BINS = 4
RADIAL_FEATURES = ("FracAtD", "MeanFrac", "RadialCV")
ZERNIKE_DEGREE = 9
ZERNIKE_INDEXES: tuple[tuple[int, int], ...] = tuple(
    (n, m) for n in range(ZERNIKE_DEGREE + 1) for m in range(n % 2, n + 1, 2)
)


@dataclass(frozen=True)
class CpGroup:
    """One opt-in group: its output columns for given channels, as (CellProfiler name, cp_measure key,
    channel index or None for shape), and either a cp_measure function (`bulk.get_core_measurements`
    key) called per crop, or our own batched implementation `compute(pixels, masks) -> (B, K)`."""

    columns: Callable[[Sequence[str]], list[tuple[str, str, int | None]]]
    function: str | None = None
    compute: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None


def _per_channel(make: Callable[[str], list[tuple[str, str]]]) -> Callable[[Sequence[str]], list]:
    """Columns from `make(channel) -> [(name, cp_key)]`: each entry of that list for every channel."""

    def columns(channels: Sequence[str]) -> list[tuple[str, str, int | None]]:
        per = [make(c) for c in channels]
        return [(*per[ci][k], ci) for k in range(len(per[0])) for ci in range(len(channels))]

    return columns


def _texture(ch: str) -> list[tuple[str, str]]:
    s, g = TEXTURE_SCALE, TEXTURE_GRAY_LEVELS
    return [(f"Texture_{f}_{ch}_{s}_{d:02d}_{g}", f"{f}_{s}_{d:02d}_{g}")
            for f in HARALICK_FEATURES for d in range(TEXTURE_DIRECTIONS)]


def _granularity(ch: str) -> list[tuple[str, str]]:
    return [(f"Granularity_{i}_{ch}", f"Granularity_{i}") for i in range(1, GRANULARITY_SPECTRUM + 1)]


def _radial(ch: str) -> list[tuple[str, str]]:
    return [(f"RadialDistribution_{f}_{ch}_{i}of{RADIAL_BINS}", f"RadialDistribution_{f}_{i}of{RADIAL_BINS}")
            for f in RADIAL_FEATURES for i in range(1, RADIAL_BINS + 1)]


def _radial_zernikes(ch: str) -> list[tuple[str, str]]:
    return [(f"RadialDistribution_ZernikeMagnitude_{ch}_{n}_{m}", f"RadialDistribution_ZernikeMagnitude_{n}_{m}")
            for n, m in ZERNIKE_INDEXES]


def _shape(names: Sequence[str]) -> Callable[[Sequence[str]], list[tuple[str, str, int | None]]]:
    return lambda channels: [(f"AreaShape_{k}", k, None) for k in names]


# -- CellProfiler's MeasureTexture, batched ------------------------------------------------------
_DIRECTIONS = ((0, 1), (1, 1), (1, 0), (1, -1))  # mahotas' 2-D order: CellProfiler's _00.._03


def _entropy(p: np.ndarray, axis: int) -> np.ndarray:
    """-sum p log2 p along `axis` (0 log 0 = 0)."""
    return -(p * np.log2(np.where(p > 0, p, 1.0))).sum(axis)


def haralick_features(pixels: np.ndarray, masks: np.ndarray, scale: int = TEXTURE_SCALE) -> np.ndarray:
    """CellProfiler's 13 Haralick features (B, 13 * 4 * C; feature, direction, channel) of crops
    `pixels` (B, C, S, S) in [0, 1] inside `masks` (B, S, S), 256 grey levels, distance `scale`.

    Same definition as cp_measure / CellProfiler 4 (mahotas.haralick with ignore_zeros on the
    object's masked image quantised by `img_as_ubyte`), reproduced to ~1e-11, but for the whole
    batch at once. Why not call cp_measure: it runs mahotas per object and channel and evaluates
    every feature on the dense (max level + 1)^2 matrix. Here the pixel pairs of every (crop,
    channel, direction) are counted once into histograms (marginal, i + j, |i - j|) and the sparse
    matrix entries, and every feature comes from those: the pair means from the i + j and |i - j|
    histograms (i j = ((i + j)^2 - (i - j)^2) / 4), HXY1 = HX + HY (= 2 HX, the matrix being
    symmetric). Speed against cp_measure: tests/benchmarks/bench_classical.py. Pairs with a zero
    level (outside the mask, or dark) are left out; an object with no pair in some direction gets 0
    for all its 52 features of that channel (cp_measure: NaN).
    """
    b, c, h, w = pixels.shape
    q = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)  # skimage.util.img_as_ubyte
    q[~np.broadcast_to(masks[:, None], q.shape)] = 0
    side = q.reshape(b, c, -1).max(2).astype(np.int64) + 1  # mahotas' matrix side: the object's max level + 1
    nd = len(_DIRECTIONS)
    ng = b * c * nd  # one co-occurrence matrix per (crop, channel, direction)
    group = np.arange(b * c, dtype=np.int64).reshape(b, c, 1, 1) * nd
    gs, iss, jss = [], [], []
    for d, (dy, dx) in enumerate(_DIRECTIONS):
        dy, dx = dy * scale, dx * scale
        x0 = max(0, -dx)
        first = q[:, :, : h - dy, x0 : w - max(dx, 0)]
        second = q[:, :, dy:, x0 + dx : w + min(dx, 0)]
        valid = (first > 0) & (second > 0)
        gs.append(np.broadcast_to(group + d, valid.shape)[valid])
        iss.append(first[valid])
        jss.append(second[valid])
    g = np.concatenate(gs)
    i, j = np.concatenate(iss).astype(np.int64), np.concatenate(jss).astype(np.int64)
    npairs = np.bincount(g, minlength=ng).astype(np.float64)
    ok = npairs > 0
    inv_n = np.divide(1.0, npairs, out=np.zeros(ng), where=ok)
    inv_t = inv_n / 2  # the symmetric matrix counts each pair twice

    def histogram(key: np.ndarray, bins: int, inv: np.ndarray) -> np.ndarray:
        return np.bincount(g * bins + key, minlength=ng * bins).reshape(ng, bins) * inv[:, None]

    levels = np.arange(256, dtype=np.float64)
    marg = histogram(i, 256, inv_t) + histogram(j, 256, inv_t)  # px == py
    ux = marg @ levels
    vx = marg @ levels**2 - ux**2
    sx = np.sqrt(np.maximum(vx, 0.0))
    mn, mx = np.minimum(i, j), np.maximum(i, j)
    psum = histogram(mn + mx, 512, inv_n)
    pdiff = histogram(mx - mn, 256, inv_n)
    # the matrix entries, from unordered pairs: an off-diagonal entry holds its count twice
    keys, counts = np.unique(g * 65536 + mn * 256 + mx, return_counts=True)
    kg = keys // 65536
    diag = (keys // 256) % 256 == keys % 256
    entry = np.where(diag, 2 * counts, counts) * inv_t[kg]
    cells = np.where(diag, 1.0, 2.0)
    sums = np.arange(512, dtype=np.float64)
    f = np.zeros((ng, len(HARALICK_FEATURES)))
    f[:, 0] = np.bincount(kg, weights=cells * entry * entry, minlength=ng)
    f[:, 1] = pdiff @ levels**2
    mean_ij = (psum @ sums**2 - f[:, 1]) / 4
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = (1.0 / sx / sx) * (mean_ij - ux * ux)
    f[:, 2] = np.where(sx == 0, 1.0, corr)
    f[:, 3] = vx
    f[:, 4] = pdiff @ (1.0 / (1.0 + levels**2))
    f[:, 5] = psum @ sums
    f[:, 6] = psum @ sums**2 - f[:, 5] ** 2
    f[:, 7] = _entropy(psum, 1)
    hxy = -np.bincount(kg, weights=cells * entry * np.log2(entry), minlength=ng)
    f[:, 8] = hxy
    size = np.repeat(side.reshape(-1), nd).astype(np.float64)  # np.var over the side-long p(|i-j|)
    mu = pdiff.sum(1) / size
    f[:, 9] = (((pdiff - mu[:, None]) ** 2 * (pdiff > 0)).sum(1) + (size - (pdiff > 0).sum(1)) * mu**2) / size
    f[:, 10] = _entropy(pdiff, 1)
    hx = _entropy(marg, 1)
    hxy1 = 2 * hx  # -sum p(i, j) log2(px(i) py(j)) = HX + HY
    f[:, 11] = np.where(hx == 0, hxy - hxy1, (hxy - hxy1) / np.where(hx == 0, 1.0, hx))
    hxy2 = 2 * hx * marg.sum(1)  # entropy of px * py, px == py
    f[:, 12] = np.sqrt(np.maximum(0.0, 1 - np.exp(-2.0 * (hxy2 - hxy))))
    f = f.reshape(b, c, nd, len(HARALICK_FEATURES))
    f[~ok.reshape(b, c, nd).all(2)] = 0.0
    return f.transpose(0, 3, 2, 1).reshape(b, -1)


CP_GROUPS: dict[str, CpGroup] = {
    "zernike": CpGroup(_shape([f"Zernike_{n}_{m}" for n, m in ZERNIKE_INDEXES]), function="zernike"),
    "feret": CpGroup(_shape(["MinFeretDiameter", "MaxFeretDiameter"]), function="feret"),
    "texture": CpGroup(_per_channel(_texture), compute=haralick_features),
    "granularity": CpGroup(_per_channel(_granularity), function="granularity"),
    "radial_distribution": CpGroup(_per_channel(_radial), function="radial_distribution"),
    "radial_zernikes": CpGroup(_per_channel(_radial_zernikes), function="radial_zernikes"),
}
"""The opt-in CellProfiler groups (beside the encoder's own default groups)."""


def cp_group_names(group: str, channels: Sequence[str]) -> list[str]:
    """CellProfiler names of `group`'s columns for `channels`."""
    return [name for name, _, _ in CP_GROUPS[group].columns(channels)]


def needs_cp_measure(groups: Sequence[str]) -> bool:
    """Whether any of `groups` calls cp_measure."""
    return any(g in CP_GROUPS and CP_GROUPS[g].function is not None for g in groups)


def cp_measure_functions() -> dict[str, Callable[..., dict[str, Any]]]:
    """cp_measure's per-object measurement functions (CellProfiler's `n*q` quartile convention);
    a clear ImportError when the package is missing."""
    try:
        from cp_measure.bulk import get_core_measurements
    except ImportError as exc:  # pragma: no cover - cp-measure is installed with the project
        groups = sorted(g for g, spec in CP_GROUPS.items() if spec.function is not None)
        raise ImportError(f"the classical encoder's groups {groups} need the cp-measure package "
                          "(pip install cp-measure)") from exc
    return get_core_measurements(legacy=True, sanitize=False)


def cp_measure_features(function: str, columns: list[tuple[str, str, int | None]], pixels: np.ndarray,
                        masks: np.ndarray) -> np.ndarray:
    """`columns` (B, K) float64 from the cp_measure `function`, called per crop (and channel) with the
    crop's own mask as a one-object label image; empty masks give zeros."""
    fn = cp_measure_functions()[function]
    out = np.zeros((len(pixels), len(columns)))
    shape_only = all(ci is None for _, _, ci in columns)
    for i in np.nonzero(masks.reshape(len(masks), -1).any(1))[0]:
        label = masks[i].astype(np.int32)
        with np.errstate(all="ignore"):  # cp_measure's 0/0 for empty bins and wedges (-> NaN -> 0)
            results = [fn(label, None)] if shape_only else [fn(label, pixels[i, c]) for c in range(pixels.shape[1])]
        for j, (name, key, ci) in enumerate(columns):
            res = results[0 if ci is None else ci]
            if key not in res:
                raise KeyError(f"cp_measure {function} returned no {key!r} (for {name}); it returned "
                               f"{sorted(res)[:5]}...")
            out[i, j] = np.asarray(res[key], dtype=np.float64)[0]
    return out


def cp_group_features(group: str, pixels: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """`group`'s features (B, K) float64 of crops `pixels` (B, C, S, S) scaled to [0, 1] inside their
    `masks` (B, S, S) bool; NaN -> 0."""
    spec = CP_GROUPS[group]
    if spec.compute is not None:
        out = spec.compute(pixels, masks)
    else:
        columns = spec.columns([f"c{i}" for i in range(pixels.shape[1])])
        out = cp_measure_features(spec.function, columns, pixels, masks)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


# -- neighbours (need the field, not a crop) -----------------------------------------------------
def _distance_token(distance: float) -> str:
    """CellProfiler writes the neighbour distance into the name: 5 -> "5" (2.5 -> "2_5")."""
    return f"{float(distance):g}".replace(".", "_")


def neighbor_feature_names(distance: float) -> list[str]:
    """Column names `neighbor_features(..., distance)` adds."""
    d = _distance_token(distance)
    return [f"Neighbors_CentroidNeighbors_{d}", f"Neighbors_FirstClosestDistance_{d}",
            f"Neighbors_SecondClosestDistance_{d}"]


def neighbor_features(cells: pl.DataFrame, distance: float) -> pl.DataFrame:
    """Per cell, neighbours among the cells of its field (plate, well, site), from centroids.

    Returns `plate, well, site, cell_id` plus (d = `distance` in pixels, as CellProfiler names it):
    - `Neighbors_CentroidNeighbors_<d>`: how many other cells have their centroid within d pixels
      of this cell's centroid. NOT CellProfiler's `Neighbors_NumberOfNeighbors_<d>`, which expands
      each object's *pixels* by d and counts the objects it then touches (it needs the label image;
      the lake holds centroids), hence the different name;
    - `Neighbors_FirstClosestDistance_<d>`, `Neighbors_SecondClosestDistance_<d>`: the distance from
      this cell's centroid to the nearest and second-nearest other centroid in the field, at any
      distance. These are CellProfiler's definitions (centroid to centroid, independent of d); null
      when the field has fewer than two (three) cells.
    Centroids are the lake's `centroid_y`, `centroid_x` (mean pixel coordinates, as CellProfiler's
    Location_Center). Rows come back in input order.
    """
    needed = [PLATE, WELL, SITE, CELL_ID, "centroid_y", "centroid_x"]
    missing = [c for c in needed if c not in cells.columns]
    if missing:
        raise BioembedInputError(f"cells table lacks columns {missing} for neighbour features (has {cells.columns})")
    if not np.isfinite(distance) or distance <= 0:
        raise ValueError(f"neighbour distance must be a positive number of pixels, got {distance}")
    yx = cells.select("centroid_y", "centroid_x").to_numpy().astype(np.float64)
    if not np.isfinite(yx).all():
        bad = cells.filter(~pl.col("centroid_y").is_finite() | ~pl.col("centroid_x").is_finite())
        raise BioembedInputError(f"{bad.height} cells have missing or non-finite centroids, e.g. "
                                 f"{bad[CELL_ID][0]!r}", plate=str(bad[PLATE][0]), well=str(bad[WELL][0]))
    n = cells.height
    count = np.zeros(n, np.int64)
    first, second = np.full(n, np.nan), np.full(n, np.nan)
    fields = cells.select(PLATE, WELL, SITE).with_row_index("_row").group_by(PLATE, WELL, SITE)
    for rows in fields.agg(pl.col("_row"))["_row"].to_list():
        idx = np.asarray(rows, dtype=np.int64)
        pts = yx[idx]
        tree = cKDTree(pts)
        count[idx] = np.asarray(tree.query_ball_point(pts, r=float(distance), return_length=True)) - 1
        k = min(3, len(idx))
        if k > 1:
            dist, _ = tree.query(pts, k=k)
            first[idx] = dist[:, 1]
            if k > 2:
                second[idx] = dist[:, 2]
    names = neighbor_feature_names(distance)
    return cells.select(PLATE, WELL, SITE, CELL_ID).with_columns(
        pl.Series(names[0], count, dtype=pl.Int64),
        pl.Series(names[1], first).fill_nan(None),
        pl.Series(names[2], second).fill_nan(None),
    )
