"""Nearest-neighbour MoA accuracy: NSC (not-same-compound) and NSCB (not-same-compound-or-batch).

Rows with a MoA annotation (negative controls and rows without MoA are left out) are
aggregated to consensus profiles: the median per perturbation (NSC) or per perturbation x batch
(NSCB). Every consensus profile queries the others by cosine similarity; its nearest neighbour
must be another perturbation (NSC) and, for NSCB, also come from another batch. A query is a
hit when the two MoA annotations share a label; multi-MoA annotations are split on `sep` ("|").
Ties in similarity go to the neighbour listed first (consensus rows are sorted by perturbation,
then batch).

A query is *matchable* when some eligible neighbour shares a label with it; queries that can
never be hits (a MoA with a single compound, or, for NSCB, only in the query's batch) are
reported but left out of the accuracy by default (`only_matchable=True`), as is common for NSC.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from bioembed_assets.profiles.aggregate import aggregate_to_wells
from bioembed_assets.schema import CONTROL_TYPE, MOA, PERTURBATION, PLATE, ControlType

_BLOCK_ELEMS = 1 << 22


@dataclass(frozen=True)
class NeighbourAccuracy:
    """`accuracy`: share of hits among the counted queries (NaN if none); `table`: one row per
    consensus profile with the query, its nearest eligible neighbour, their similarity, `hit` and
    `matchable`."""

    accuracy: float
    table: pl.DataFrame


def nsc(
    meta: pl.DataFrame,
    X: np.ndarray,
    pert_col: str = PERTURBATION,
    moa_col: str = MOA,
    *,
    control_col: str = CONTROL_TYPE,
    sep: str = "|",
    only_matchable: bool = True,
) -> NeighbourAccuracy:
    """NSC: nearest-neighbour MoA accuracy on per-perturbation consensus profiles, the
    neighbour being another perturbation."""
    return _neighbour_accuracy(meta, X, pert_col, moa_col, None, control_col, sep, only_matchable)


def nscb(
    meta: pl.DataFrame,
    X: np.ndarray,
    pert_col: str = PERTURBATION,
    moa_col: str = MOA,
    batch_col: str = PLATE,
    *,
    control_col: str = CONTROL_TYPE,
    sep: str = "|",
    only_matchable: bool = True,
) -> NeighbourAccuracy:
    """NSCB: as `nsc` on per perturbation x batch consensus profiles, the neighbour being another
    perturbation from another batch."""
    return _neighbour_accuracy(meta, X, pert_col, moa_col, batch_col, control_col, sep, only_matchable)


def _labels(moa: list[str], sep: str) -> list[frozenset[str]]:
    return [frozenset(t.strip() for t in m.split(sep) if t.strip()) for m in moa]


def _neighbour_accuracy(
    meta: pl.DataFrame,
    X: np.ndarray,
    pert_col: str,
    moa_col: str,
    batch_col: str | None,
    control_col: str,
    sep: str,
    only_matchable: bool,
) -> NeighbourAccuracy:
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] != meta.height:
        raise ValueError(f"X must be 2-D with {meta.height} rows (one per meta row), got {X.shape}")
    by = [pert_col] if batch_col is None else [pert_col, batch_col]
    for c in [*by, moa_col]:
        if c not in meta.columns:
            raise ValueError(f"column {c!r} not in metadata (columns: {meta.columns})")
    keep = meta[moa_col].is_not_null() & meta[pert_col].is_not_null()
    if batch_col is not None:
        if meta.filter(keep)[batch_col].null_count():
            raise ValueError(f"column {batch_col!r} has null values in annotated rows; every row needs a batch")
    if control_col in meta.columns:
        keep &= (meta[control_col] != ControlType.NEGATIVE).fill_null(True)
    sub = meta.filter(keep).select(*[pl.col(c).cast(pl.String) for c in by], pl.col(moa_col).cast(pl.String))
    multi = sub.group_by(pert_col).agg(pl.col(moa_col).n_unique()).filter(pl.col(moa_col) > 1)
    if multi.height:
        raise ValueError(f"perturbation {multi[pert_col][0]!r} has several {moa_col} values; expected one "
                         f"(write several MoAs as one value separated by {sep!r})")
    if sub.height == 0:
        raise ValueError(f"no rows with a {moa_col!r} annotation (other than negative controls)")
    cons_meta, cons = aggregate_to_wells(sub, X[keep.to_numpy()], by=by, method="median")
    n = cons_meta.height
    Xn = cons.astype(np.float64)
    norm = np.linalg.norm(Xn, axis=1, keepdims=True)
    if (norm == 0).any():
        raise ValueError(f"cosine similarity is undefined for all-zero consensus profiles (row {int(np.argmax(norm == 0))})")
    Xn /= norm
    pert = np.unique(cons_meta[pert_col].to_numpy(), return_inverse=True)[1].reshape(-1)
    batch = None if batch_col is None else np.unique(cons_meta[batch_col].to_numpy(), return_inverse=True)[1].reshape(-1)

    nb = np.full(n, -1)
    sim = np.full(n, np.nan)
    b = max(1, _BLOCK_ELEMS // n)
    for lo in range(0, n, b):
        hi = min(lo + b, n)
        S = Xn[lo:hi] @ Xn.T
        bad = pert[lo:hi, None] == pert[None, :]
        if batch is not None:
            bad |= batch[lo:hi, None] == batch[None, :]
        S[bad] = -np.inf
        j = np.argmax(S, axis=1)
        ok = np.isfinite(S[np.arange(hi - lo), j])
        nb[lo:hi] = np.where(ok, j, -1)
        sim[lo:hi] = np.where(ok, S[np.arange(hi - lo), j], np.nan)

    labels = _labels(cons_meta[moa_col].to_list(), sep)
    hit = np.array([i >= 0 and bool(labels[k] & labels[i]) for k, i in enumerate(nb)])
    matchable = _matchable(labels, pert, batch)
    counted = matchable if only_matchable else np.ones(n, dtype=bool)
    accuracy = float(hit[counted].mean()) if counted.any() else float("nan")
    names = cons_meta.select(by)
    neighbour = names[np.maximum(nb, 0)].rename({c: f"neighbour_{c}" if c != pert_col else "neighbour" for c in by})
    neighbour = neighbour.with_columns(pl.when(pl.Series(nb >= 0)).then(pl.col(c)).otherwise(None).alias(c)
                                       for c in neighbour.columns)
    table = pl.concat([names, cons_meta.select(moa_col), neighbour], how="horizontal").with_columns(
        pl.Series("similarity", sim), pl.Series("hit", hit), pl.Series("matchable", matchable))
    return NeighbourAccuracy(accuracy, table)


def _matchable(labels: list[frozenset[str]], pert: np.ndarray, batch: np.ndarray | None) -> np.ndarray:
    """Whether some other-perturbation (other-batch) consensus row shares a label with each row:
    per label, rows with it minus same-perturbation (minus same-batch, plus same-both) rows."""
    rows = np.array([i for i, s in enumerate(labels) for _ in s], dtype=np.int64)
    lab = np.unique(np.array([t for s in labels for t in sorted(s)], dtype=object).astype(str), return_inverse=True)[1]
    lab = lab.reshape(-1).astype(np.int64)
    out = np.zeros(len(labels), dtype=bool)
    if rows.size == 0:
        return out

    def count(*keys: np.ndarray) -> np.ndarray:
        k = np.unique(np.stack(keys, axis=1), axis=0, return_inverse=True)[1].reshape(-1)
        return np.bincount(k)[k]

    others = count(lab) - count(lab, pert[rows])
    if batch is not None:
        others -= count(lab, batch[rows]) - count(lab, pert[rows], batch[rows])
    np.logical_or.at(out, rows, others > 0)
    return out
