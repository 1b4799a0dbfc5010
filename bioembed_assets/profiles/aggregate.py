"""Aggregate per-cell (or per-site) profiles to one profile per group, e.g. per well."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import polars as pl
from scipy import sparse

N_CELLS = "n_cells"
_ROW = "__bioembed_row"


def _is_nested(dtype: pl.DataType) -> bool:
    return isinstance(dtype, (pl.List, pl.Array, pl.Struct, pl.Object))


def aggregate_to_wells(
    meta: pl.DataFrame,
    X: np.ndarray,
    by: Sequence[str] = ("plate", "well"),
    method: Literal["median", "mean"] = "median",
) -> tuple[pl.DataFrame, np.ndarray]:
    """Median/mean of the rows of `X` per group of `by` columns.

    Returns (meta, X) with one row per group, sorted by `by`. Other metadata columns are kept
    when they are constant within every group (nested columns are dropped). `n_cells` is the
    number of rows aggregated; if `meta` already has `n_cells` it is summed instead.
    The output matrix is float32; means accumulate in float64. Raises ValueError naming the
    first group (in sorted order) that holds a NaN/inf value.
    """
    by = list(by)
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] != meta.height:
        raise ValueError(f"X must be 2-D with {meta.height} rows (one per meta row), got {X.shape}")
    if method not in ("median", "mean"):
        raise ValueError(f"method must be 'median' or 'mean', got {method!r}")
    missing = [c for c in by if c not in meta.columns]
    if missing:
        raise ValueError(f"group columns {missing} not in meta (columns: {meta.columns})")
    if meta.height == 0:
        raise ValueError("cannot aggregate an empty table")

    has_n = N_CELLS in meta.columns
    others = [c for c in meta.columns if c not in by and c != N_CELLS and not _is_nested(meta.schema[c])]
    g = (
        meta.with_row_index(_ROW)
        .group_by(by)
        .agg(
            pl.col(_ROW),
            (pl.col(N_CELLS).sum() if has_n else pl.len()).alias(N_CELLS),
            *[pl.col(c).n_unique().alias(f"__nu_{c}") for c in others],
            *[pl.col(c).first() for c in others],
        )
        .sort(by, nulls_last=False)
    )
    keep = [c for c in others if g[f"__nu_{c}"].max() == 1]
    rows = g[_ROW]
    counts = rows.list.len().to_numpy().astype(np.int64)
    order = rows.explode().to_numpy().astype(np.int64)
    n_groups = counts.size
    gid = np.empty(X.shape[0], dtype=np.int64)
    gid[order] = np.repeat(np.arange(n_groups), counts)

    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        grp = int(gid[bad].min())
        key = ", ".join(f"{c}={g[c][grp]!r}" for c in by)
        row = int(np.flatnonzero(bad & (gid == grp))[0])
        raise ValueError(f"non-finite (NaN/inf) features in group {key} (row {row})")

    if method == "mean":  # segment sums as a sparse indicator product (float64)
        ind = sparse.csr_matrix((1.0 / counts[gid], (gid, np.arange(X.shape[0]))), shape=(n_groups, X.shape[0]))
        out = np.asarray(ind @ X, dtype=np.float64)
    else:  # groups of equal size are stacked and reduced together
        Xs = X[order]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        out = np.empty((n_groups, X.shape[1]), dtype=np.float64)
        for c in np.unique(counts).tolist():
            sel = np.flatnonzero(counts == c)
            out[sel] = np.median(Xs[starts[sel, None] + np.arange(c)], axis=1)

    meta_out = g.select(*by, *keep, pl.col(N_CELLS).cast(pl.Int64))
    return meta_out, out.astype(np.float32)
