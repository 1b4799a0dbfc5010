"""NSC and NSCB: the standard nearest-neighbour MoA benchmark (Ljosa et al. 2013; Ando et al. 2017).

Definitions, as in those papers:

- Profiles are *treatment-level*: one profile per treatment (a compound at one concentration,
  i.e. one `perturbation`), the mean (default) or median of its replicate wells across plates.
  Negative controls and rows without a MoA annotation are left out (neither queries nor
  neighbours).
- Each treatment queries the others by cosine similarity. NSC (not-same-compound): the
  neighbour must be a treatment of another *compound* (every dose of the query's compound is
  excluded). NSCB (not-same-compound-or-batch): profiles are per treatment and *batch* (its
  replicate wells across the plates of one batch; a treatment in one batch has one, as in the
  papers), and the neighbour must be another compound from another batch.
- A query is a hit when its neighbour's MoA shares a label with its own (multi-MoA annotations
  are split on `sep`, "|"). The accuracy is the mean over treatments (queries), not over MoA
  classes. A query is *matchable* when some eligible neighbour shares a label; queries that can
  never be hits (a MoA with one compound, or, for NSCB, a MoA only in the query's batch) are
  reported in the table and left out of the accuracy by default (`only_matchable=True`), as the
  papers leave such MoAs out of the benchmark.

The compound of a treatment is the `compound` column (else the treatment itself), its batch the
`batch` column (else the plate): see `design.py`. Ties in similarity go to the neighbour listed
first (treatments sorted by name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

from bioembed_assets.profiles.aggregate import aggregate_to_wells
from bioembed_assets.schema import BATCH, COMPOUND, CONTROL_TYPE, MOA, PERTURBATION, PLATE, ControlType

_BLOCK_ELEMS = 1 << 22
NscAggregate = Literal["mean", "median"]
"""How a treatment's replicate wells make its profile."""


@dataclass(frozen=True)
class NeighbourAccuracy:
    """`accuracy`: mean hit rate over the counted queries (NaN if none); `table`: one row per
    treatment (NSCB: per treatment and batch) with its compound, MoA, nearest eligible neighbour,
    their similarity, `hit` and `matchable`; `n_counted`: the queries the accuracy averages."""

    accuracy: float
    table: pl.DataFrame
    n_counted: int


def nsc(meta: pl.DataFrame, X: np.ndarray, *, treatment_col: str = PERTURBATION, compound_col: str = COMPOUND,
        moa_col: str = MOA, control_col: str = CONTROL_TYPE, aggregate: Literal["mean", "median"] = "mean",
        sep: str = "|", only_matchable: bool = True) -> NeighbourAccuracy:
    """NSC: 1-NN (cosine) MoA accuracy of treatment profiles, neighbours of other compounds only."""
    return _neighbour_accuracy(meta, X, treatment_col, compound_col, moa_col, None, control_col, aggregate, sep,
                               only_matchable)


def nscb(meta: pl.DataFrame, X: np.ndarray, *, treatment_col: str = PERTURBATION, compound_col: str = COMPOUND,
         moa_col: str = MOA, batch_col: str = BATCH, control_col: str = CONTROL_TYPE,
         aggregate: Literal["mean", "median"] = "mean", sep: str = "|", only_matchable: bool = True) -> NeighbourAccuracy:
    """NSCB: as `nsc`, the neighbour also from another batch (`batch_col`, default `batch` else plate)."""
    return _neighbour_accuracy(meta, X, treatment_col, compound_col, moa_col, batch_col, control_col, aggregate, sep,
                               only_matchable)


def _labels(moa: list[str], sep: str) -> list[frozenset[str]]:
    return [frozenset(t.strip() for t in m.split(sep) if t.strip()) for m in moa]


def _column_or(meta: pl.DataFrame, col: str, fallback: str) -> pl.Expr:
    """`col` as text, null values (or a missing column) filled from `fallback`."""
    own = pl.col(col).cast(pl.String) if col in meta.columns else pl.lit(None, pl.String)
    return pl.coalesce(own, pl.col(fallback).cast(pl.String))


def _one_value_each(sub: pl.DataFrame, col: str, name: str, hint: str) -> None:
    multi = sub.group_by("t").agg(pl.col(col).n_unique()).filter(pl.col(col) > 1).sort("t")
    if multi.height:
        raise ValueError(f"treatment {multi['t'][0]!r} has several {name} values; expected one{hint}")


def _neighbour_accuracy(meta: pl.DataFrame, X: np.ndarray, treatment_col: str, compound_col: str, moa_col: str,
                        batch_col: str | None, control_col: str, aggregate: Literal["mean", "median"], sep: str,
                        only_matchable: bool) -> NeighbourAccuracy:
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] != meta.height:
        raise ValueError(f"X must be 2-D with {meta.height} rows (one per meta row), got {X.shape}")
    for c in (treatment_col, moa_col):
        if c not in meta.columns:
            raise ValueError(f"column {c!r} not in metadata (columns: {meta.columns})")
    batch_fallback = PLATE if batch_col == BATCH else batch_col
    if batch_fallback is not None and batch_fallback not in meta.columns:
        raise ValueError(f"column {batch_fallback!r} not in metadata (columns: {meta.columns})")
    keep = meta[moa_col].is_not_null() & meta[treatment_col].is_not_null()
    if control_col in meta.columns:
        keep &= (meta[control_col] != ControlType.NEGATIVE).fill_null(True)
    sub = meta.filter(keep).select(
        pl.col(treatment_col).cast(pl.String).alias("t"), _column_or(meta, compound_col, treatment_col).alias("c"),
        pl.col(moa_col).cast(pl.String).alias("m"),
        *([] if batch_col is None else [_column_or(meta, batch_col, batch_fallback).alias("b")]))
    key = ["t"] if batch_col is None else ["t", "b"]
    if sub.height == 0:
        raise ValueError(f"no rows with a {moa_col!r} annotation (other than negative controls)")
    _one_value_each(sub, "m", moa_col, f" (write several MoAs as one value separated by {sep!r})")
    _one_value_each(sub, "c", compound_col, "")
    if batch_col is not None and sub["b"].null_count():
        raise ValueError(f"column {batch_col!r} has null values in annotated rows; every row needs a batch")
    per_treatment = sub.group_by(key).agg(pl.col("c").first(), pl.col("m").first()).sort(key)
    _, cons = aggregate_to_wells(sub.select(key), X[keep.to_numpy()], by=key, method=aggregate)
    n = per_treatment.height
    Xn = cons.astype(np.float64)
    norm = np.linalg.norm(Xn, axis=1, keepdims=True)
    if (norm == 0).any():
        raise ValueError(f"cosine similarity is undefined for the all-zero profile of treatment "
                         f"{per_treatment['t'][int(np.argmax(norm == 0))]!r}")
    Xn /= norm
    compound = np.unique(per_treatment["c"].to_numpy(), return_inverse=True)[1].reshape(-1)
    labels = _labels(per_treatment["m"].to_list(), sep)
    vocab = {t: j for j, t in enumerate(sorted({t for s in labels for t in s}))}
    L = np.zeros((n, len(vocab)), dtype=np.float32)
    for i, s in enumerate(labels):
        L[i, [vocab[t] for t in s]] = 1.0
    batch = None if batch_col is None else np.unique(per_treatment["b"].to_numpy(), return_inverse=True)[1].reshape(-1)

    nb, sim, matchable = np.full(n, -1), np.full(n, np.nan), np.zeros(n, dtype=bool)
    step = max(1, _BLOCK_ELEMS // n)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        S = Xn[lo:hi] @ Xn.T
        excluded = compound[lo:hi, None] == compound[None, :]
        if batch is not None:
            excluded |= batch[lo:hi, None] == batch[None, :]
        S[excluded] = -np.inf
        j = np.argmax(S, axis=1)
        best = S[np.arange(hi - lo), j]
        ok = np.isfinite(best)
        nb[lo:hi], sim[lo:hi] = np.where(ok, j, -1), np.where(ok, best, np.nan)
        matchable[lo:hi] = (~excluded & ((L[lo:hi] @ L.T) > 0)).any(axis=1)
    hit = np.array([i >= 0 and bool(labels[k] & labels[i]) for k, i in enumerate(nb)])
    counted = matchable if only_matchable else np.ones(n, dtype=bool)
    accuracy = float(hit[counted].mean()) if counted.any() else float("nan")
    found = pl.Series(nb >= 0)
    pick = np.maximum(nb, 0)
    table = pl.DataFrame({
        "treatment": per_treatment["t"], "compound": per_treatment["c"], moa_col: per_treatment["m"],
        **({} if batch_col is None else {"batch": per_treatment["b"]}),
        "neighbour": pl.select(pl.when(found).then(per_treatment["t"][pick])).to_series(),
        "neighbour_compound": pl.select(pl.when(found).then(per_treatment["c"][pick])).to_series(),
        "neighbour_moa": pl.select(pl.when(found).then(per_treatment["m"][pick])).to_series(),
        "similarity": sim, "hit": hit, "matchable": matchable,
    })  # fmt: skip
    return NeighbourAccuracy(accuracy, table, int(counted.sum()))
