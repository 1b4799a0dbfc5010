"""Mask geometry for shape profiling: outer contours, distance matrices, elliptic Fourier and regionprops features.

Written from the ShapeEmbed notes in `reference/seeds_systems.md` section 1.9 (no upstream code). The
`shape_embed` family (`shape.py`) builds on the contours and distance matrices; the classical descriptors
(normalised elliptic Fourier descriptors via `pyefd`, skimage `regionprops_table`) are its baselines.
All functions take masks (B, H, W) (cell or nucleus masks alike) and work in pixels of the given masks.

Contours (`mask_contours`): marching squares (`skimage.measure.find_contours`, level 0.5) on the mask
padded by one background pixel, so a mask touching the crop border still gives a closed curve; the
longest curve (by arc length) is the outer contour. It is resampled to `n_points` points equally
spaced in arc length (numpy interpolation on cumulative arc length) and oriented counter-clockwise as
displayed (row axis pointing down; positive shoelace area in (row, col) order). Points are (row, col).

Empty masks: `mask_contours` raises a ValueError naming the crop index unless `allow_empty=True`, which
gives an all-zero contour and `empty=True` for that crop; the feature functions give all-zero rows.
"""

from __future__ import annotations

import numpy as np
import pyefd
from skimage.measure import find_contours, regionprops_table

EFD_COEFFICIENTS = ("a", "b", "c", "d")
REGIONPROPS = {  # skimage property -> CellProfiler-style name (rotation/translation invariant ones only)
    "area": "Area",
    "perimeter": "Perimeter",
    "eccentricity": "Eccentricity",
    "major_axis_length": "MajorAxisLength",
    "minor_axis_length": "MinorAxisLength",
    "solidity": "Solidity",
    "extent": "Extent",
    "equivalent_diameter_area": "EquivalentDiameter",
    "euler_number": "EulerNumber",
}


def check_masks(masks: np.ndarray) -> np.ndarray:
    """(B, H, W) bool or 0/1 integer masks -> bool array; ValueError naming the shape/dtype otherwise."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"expected masks (B, H, W), got shape {masks.shape}")
    if masks.dtype != bool:
        if masks.dtype.kind not in "ui":
            raise ValueError(f"expected bool or integer masks, got dtype {masks.dtype}")
        masks = masks != 0
    return masks


def outer_contour(mask: np.ndarray) -> np.ndarray | None:
    """Longest marching-squares contour (M, 2) (row, col) of a 2-D mask, closed, counter-clockwise; None if empty.

    The curve's last point is not repeated (the closing segment is implicit).
    """
    if not mask.any():
        return None
    padded = np.pad(mask.astype(np.float64), 1)
    curves = find_contours(padded, 0.5)
    best = max(curves, key=lambda c: np.linalg.norm(np.diff(c, axis=0), axis=1).sum())
    best = best[:-1] if len(best) > 1 and np.array_equal(best[0], best[-1]) else best
    best = best - 1.0  # undo the padding
    if signed_area(best) < 0:
        best = best[::-1]
    return np.ascontiguousarray(best)


def signed_area(points: np.ndarray) -> float:
    """Shoelace area of a closed polygon (M, 2) (row, col): > 0 for counter-clockwise as displayed."""
    r, c = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(r, np.roll(c, -1)) - np.dot(np.roll(r, -1), c))


def resample_closed(points: np.ndarray, n_points: int, phase: float = 0.0) -> np.ndarray:
    """`n_points` points (n_points, 2) equally spaced in arc length along the closed polygon `points`.

    The first sample lies `phase` (in [0, 1), in units of the spacing) past the polygon's first vertex.
    """
    closed = np.vstack([points, points[:1]])
    seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    keep = np.concatenate([[True], seg > 1e-12])  # drop repeated vertices (np.interp needs increasing xp)
    closed, seg = closed[keep], seg[seg > 1e-12]
    s = np.concatenate([[0.0], np.cumsum(seg)])
    total = s[-1]
    if total <= 0:
        return np.repeat(points[:1].astype(np.float64), n_points, axis=0)
    t = ((np.arange(n_points) + phase) * (total / n_points)) % total
    return np.stack([np.interp(t, s, closed[:, 0]), np.interp(t, s, closed[:, 1])], axis=1)


def mask_contours(
    masks: np.ndarray, n_points: int = 64, *, allow_empty: bool = False, phases: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Masks (B, H, W) -> (contours float64 (B, n_points, 2) (row, col), empty bool (B,)).

    Each contour is the outer contour resampled to equal arc length, counter-clockwise. `phases` (B,)
    shifts each crop's first sample along the curve (a sub-spacing start-point augmentation). An empty
    mask raises a ValueError naming its crop index, or with `allow_empty` gives zeros and `empty=True`.
    """
    masks = check_masks(masks)
    if n_points < 3:
        raise ValueError(f"n_points must be >= 3, got {n_points}")
    out = np.zeros((masks.shape[0], n_points, 2))
    empty = np.zeros(masks.shape[0], dtype=bool)
    for i, mask in enumerate(masks):
        contour = outer_contour(mask)
        if contour is None:
            if not allow_empty:
                raise ValueError(f"mask of crop {i} is empty (no foreground pixels); a contour needs a cell mask")
            empty[i] = True
            continue
        out[i] = resample_closed(contour, n_points, 0.0 if phases is None else float(phases[i]))
    return out, empty


def distance_matrices(contours: np.ndarray) -> np.ndarray:
    """Contours (B, N, 2) -> Euclidean distance matrices (B, N, N): invariant to rotation and translation."""
    diff = contours[:, :, None, :] - contours[:, None, :, :]
    return np.sqrt((diff**2).sum(-1))


def frobenius_normalize(distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, N, N) -> (distances / Frobenius norm, the norms (B,)); an all-zero matrix stays zero."""
    norm = np.sqrt((distances**2).sum((1, 2)))
    safe = np.where(norm > 0, norm, 1.0)
    return distances / safe[:, None, None], norm


# -- classical descriptors -------------------------------------------------------------------------


def efd_feature_names(order: int = 10, prefix: str = "AreaShape") -> list[str]:
    """`<prefix>_EFD_<harmonic>_<a|b|c|d>` for harmonics 1..order, in `efd_features` column order."""
    return [f"{prefix}_EFD_{k}_{c}" for k in range(1, order + 1) for c in EFD_COEFFICIENTS]


def efd_features(masks: np.ndarray, order: int = 10) -> np.ndarray:
    """Normalised elliptic Fourier descriptors (B, 4 * order) float32 of each mask's outer contour.

    `pyefd.elliptic_fourier_descriptors(normalize=True)` on the (counter-clockwise) outer contour,
    unchanged: invariant to rotation, scale and start point up to the half-turn ambiguity of that
    normalisation (harmonic 1 is (+-1, 0, 0, d); odd harmonics may flip sign together). Empty masks give zeros.
    """
    if order < 1:
        raise ValueError(f"EFD order must be >= 1, got {order}")
    masks = check_masks(masks)
    out = np.zeros((masks.shape[0], 4 * order), dtype=np.float32)
    for i, mask in enumerate(masks):
        contour = outer_contour(mask)
        if contour is not None and len(contour) >= 3:
            out[i] = pyefd.elliptic_fourier_descriptors(contour, order=order, normalize=True).ravel()
    return out


def regionprops_feature_names(prefix: str = "AreaShape") -> list[str]:
    """`<prefix>_<Name>` of the regionprops baseline, in `regionprops_features` column order."""
    return [f"{prefix}_{name}" for name in REGIONPROPS.values()]


def regionprops_features(masks: np.ndarray) -> np.ndarray:
    """skimage `regionprops_table` shape features (B, len(REGIONPROPS)) float32 of each whole mask; empty -> 0."""
    masks = check_masks(masks)
    out = np.zeros((masks.shape[0], len(REGIONPROPS)), dtype=np.float32)
    for i, mask in enumerate(masks):
        if mask.any():
            table = regionprops_table(mask.astype(np.uint8), properties=list(REGIONPROPS))
            out[i] = [float(table[p][0]) for p in REGIONPROPS]
    return out
