"""The Grad-CAMO score per cell (Gopalakrishnan, Ma, Xie 2024) and its per-plate / per-perturbation summary.

Pure numpy (the summary uses polars tables); no torch. For a Grad-CAM map G >= 0 of one crop (2-D
(H, W) or a z-stack (Z, H, W)), the centre cell's mask M and the other cells' pixels N in the crop:

- score = sum(G * M) / sum(G): the share of the attention on the cell (Grad-CAMO; > 0.5 counts as
  "on the cell"). It is taken on the un-shifted ReLU map: a min-max rescale (as pytorch-grad-cam
  shows maps) subtracts the minimum, which changes the ratio, so maps must be >= 0 and un-shifted.
- chance = |M| / |crop|: the score of uniform attention (small cells score low even then);
- enrichment = score / chance (1 = no better than uniform);
- neighbour_fraction = sum(G * N) / sum(G): attention on neighbouring cells ("cheating" on context).

Edge cases: sum(G) == 0 (the target's gradients switch every feature off, so ReLU leaves nothing) gives
NaN score, enrichment and neighbour_fraction with reason "zero_map"; such cells are counted but left
out of the means. A negative or non-finite map value, an empty cell mask, or a neighbour mask that
overlaps the cell's own mask is an error naming the cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

ZERO_MAP = "zero_map"
"""`reason` of a cell whose map sums to 0 (its score is NaN)."""
SCORE_COLUMNS = ("score", "chance", "enrichment", "neighbour_fraction", "reason")
THRESHOLD = 0.5


@dataclass(frozen=True)
class GradCAMOScores:
    """Per-cell results (float64 arrays of length B; `reason` "" for scored cells, else ZERO_MAP)."""

    score: np.ndarray
    chance: np.ndarray
    enrichment: np.ndarray
    neighbour_fraction: np.ndarray
    reason: np.ndarray

    def to_frame(self) -> pl.DataFrame:
        return pl.DataFrame({name: getattr(self, name) for name in SCORE_COLUMNS})


def _cell(i: int, cell_ids: Sequence[str] | None) -> str:
    return f"cell {cell_ids[i]!r} (row {i})" if cell_ids is not None else f"cell at row {i}"


def _like_maps(mask: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """`mask` with the maps' shape: as is, or a 2-D mask (B, H, W) repeated along Z for (B, Z, H, W) maps."""
    if mask.shape == shape:
        return mask
    if len(shape) == 4 and mask.shape == (shape[0], *shape[2:]):
        return np.broadcast_to(mask[:, None], shape)
    raise ValueError(f"{what} shape {mask.shape} does not match maps {shape}")


def gradcamo_scores(
    maps: np.ndarray,
    masks: np.ndarray,
    neighbours: np.ndarray | None = None,
    cell_ids: Sequence[str] | None = None,
) -> GradCAMOScores:
    """Grad-CAMO of B crops: `maps` float (B, H, W) or (B, Z, H, W) >= 0, `masks` bool of the same shape
    (the centre cell), `neighbours` bool (other cells' pixels; None: neighbour_fraction is NaN). For
    z-stack maps, 2-D masks (B, H, W) (one mask for every slice) are repeated along Z.
    `cell_ids` only name cells in errors."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim not in (3, 4):
        raise ValueError(f"expected maps (B, H, W) or z-stacks (B, Z, H, W), got shape {maps.shape}")
    masks = _like_maps(np.asarray(masks), maps.shape, "masks")
    if neighbours is not None:
        neighbours = _like_maps(np.asarray(neighbours), maps.shape, "neighbour masks")
    if cell_ids is not None and len(cell_ids) != maps.shape[0]:
        raise ValueError(f"{len(cell_ids)} cell ids for {maps.shape[0]} maps")
    b = maps.shape[0]
    flat = maps.reshape(b, -1)
    m = masks.reshape(b, -1).astype(bool)
    bad = ~np.isfinite(flat).all(axis=1) | (np.nan_to_num(flat, nan=0.0).min(axis=1, initial=0.0) < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{_cell(i, cell_ids)}: map has negative or non-finite values (min {np.nanmin(flat[i])}); "
            "Grad-CAMO needs the un-shifted ReLU map (>= 0)"
        )
    area = m.sum(axis=1)
    if (area == 0).any():
        i = int(np.argmax(area == 0))
        raise ValueError(f"{_cell(i, cell_ids)}: empty cell mask (no pixel of the centre cell in the crop)")
    total = flat.sum(axis=1)
    zero = total <= 0
    denom = np.where(zero, 1.0, total)
    score = np.where(zero, np.nan, (flat * m).sum(axis=1) / denom)
    chance = area / flat.shape[1]
    if neighbours is None:
        neighbour = np.full(b, np.nan)
    else:
        n = neighbours.reshape(b, -1).astype(bool)
        overlap = (n & m).any(axis=1)
        if overlap.any():
            i = int(np.argmax(overlap))
            raise ValueError(f"{_cell(i, cell_ids)}: neighbour mask overlaps the cell's own mask")
        neighbour = np.where(zero, np.nan, (flat * n).sum(axis=1) / denom)
    return GradCAMOScores(
        score=score, chance=chance, enrichment=score / chance, neighbour_fraction=neighbour,
        reason=np.where(zero, ZERO_MAP, ""),
    )


def summarize(cells: pl.DataFrame, by: Sequence[str] = ("plate",), threshold: float = THRESHOLD) -> pl.DataFrame:
    """Per group of `by`: n_cells, n_scored (score not NaN), fraction_above (share of scored cells with
    score > `threshold`), mean_score, mean_chance, mean_enrichment, mean_neighbour_fraction (scored cells;
    null where none)."""
    missing = [c for c in (*by, "score", "chance", "enrichment", "neighbour_fraction") if c not in cells.columns]
    if missing:
        raise ValueError(f"Grad-CAMO summary needs columns {missing} (got {cells.columns})")
    scored = pl.col("score").is_not_nan() & pl.col("score").is_not_null()

    def mean(c: str) -> pl.Expr:
        return pl.col(c).filter(scored).fill_nan(None).mean().alias(f"mean_{c}")

    return (
        cells.group_by(list(by), maintain_order=True)
        .agg(
            pl.len().cast(pl.Int64).alias("n_cells"),
            scored.sum().cast(pl.Int64).alias("n_scored"),
            (pl.col("score").filter(scored) > threshold).mean().alias("fraction_above"),
            mean("score"), mean("chance"), mean("enrichment"), mean("neighbour_fraction"),
        )
        .sort(list(by))
    )
