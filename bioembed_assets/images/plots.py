"""Plate-layout figures as PNG bytes (matplotlib Agg, no pyplot global state)."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bioembed_assets.schema import WELL, parse_well, well_name

PLATE_FORMATS: tuple[tuple[int, int], ...] = ((8, 12), (16, 24), (32, 48))
"""(rows, columns) of 96-, 384- and 1536-well plates; the smallest that holds every well is drawn."""
_ANNOTATE_MAX_WELLS = 96


def _layout(rows: np.ndarray, cols: np.ndarray) -> tuple[int, int]:
    for n_rows, n_cols in PLATE_FORMATS:
        if rows.max() <= n_rows and cols.max() <= n_cols:
            return n_rows, n_cols
    return int(rows.max()), int(cols.max())


def plate_heatmap_png(values: pl.DataFrame, value_col: str, title: str) -> bytes:
    """Heatmap of a per-well value in plate layout (rows A.. top to bottom, columns 1.. left to right).

    `values` needs one row per well (`well` column, ids like 'B07') and a numeric or boolean
    `value_col`; aggregate sites first (e.g. flagged sites per well). The plate is drawn as a
    96-, 384- or 1536-well plate (the smallest that fits), or rows/columns 1..max beyond that;
    wells without a value (or a null) are grey. Values are written in the wells of plates up to 96.
    """
    for col in (WELL, value_col):
        if col not in values.columns:
            raise ValueError(f"values has no {col!r} column (has {values.columns})")
    if values.height == 0:
        raise ValueError("values is empty: nothing to draw")
    dup = values.group_by(WELL).len().filter(pl.col("len") > 1)
    if dup.height:
        raise ValueError(f"one row per well expected; repeated wells {sorted(dup[WELL].to_list())[:5]} (aggregate first)")
    rc = np.array([parse_well(w) for w in values[WELL].to_list()])
    v = values[value_col].cast(pl.Float64).fill_null(np.nan).to_numpy()
    n_rows, n_cols = _layout(rc[:, 0], rc[:, 1])
    grid = np.full((n_rows, n_cols), np.nan)
    grid[rc[:, 0] - 1, rc[:, 1] - 1] = v

    fig = Figure(figsize=(min(2.0 + 0.45 * n_cols, 16.0), min(1.2 + 0.45 * n_rows, 11.0)))
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["viridis"].with_extremes(bad="0.85")
    finite = grid[np.isfinite(grid)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1, aspect="equal")
    fig.colorbar(im, ax=ax, label=value_col, shrink=0.85)
    step = 1 if n_cols <= 24 else 2
    ax.set_xticks(np.arange(0, n_cols, step), [str(c + 1) for c in range(0, n_cols, step)], fontsize=7)
    ax.set_yticks(np.arange(0, n_rows, step), [well_name(r + 1, 1)[:-2] for r in range(0, n_rows, step)], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_xticks(np.arange(-0.5, n_cols), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    if n_rows * n_cols <= _ANNOTATE_MAX_WELLS:
        mid = (lo + hi) / 2
        for (r, c), x in np.ndenumerate(grid):
            if np.isfinite(x):
                ax.text(c, r, f"{x:.3g}", ha="center", va="center", fontsize=6.5, color="black" if x > mid else "white")
    ax.set_title(title, pad=18)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()
