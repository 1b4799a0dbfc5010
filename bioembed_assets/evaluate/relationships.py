"""Known-relationship recall with EFAAR's `known_relationship_benchmark` semantics (peers.md §4.1).

1. One profile per perturbation (mean of its rows by default, as the EFAAR/OpenPhenom recipe).
2. Null: the cosine similarities of all N(N-1)/2 unordered pairs of distinct perturbations.
3. Query: the similarities of the annotated pairs whose two entities are both present (pairs
   are sorted, self pairs and duplicates dropped, as EFAAR's `filter_relationships`).
4. `recall_{l}_{h}`: the share of query pairs with searchsorted(null, q, "right") / T <= l (bottom
   tail) or searchsorted(null, q, "left") / T >= h (top tail), T = null size; defaults
   (0.05, 0.95) and (0.1, 0.9).

Instead of EFAAR's N x N float64 pandas matrix and a sort of the whole null, the similarities are
computed in row blocks of the upper triangle (memory bounded by `block_elems`). The tail tests only
need two order statistics per threshold pair: #{null <= q} <= m  <=>  q < v_(m+1), and
#{null < q} >= m  <=>  q > v_(m) (v sorted ascending). They are found exactly in two passes over
the blocks: a 2**20-bin histogram of the similarities, then the values of the bins holding the
wanted ranks. Similarities are float64 by default (`dtype=np.float32` halves the GEMM time; EFAAR
computes in the features' dtype).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

from bioembed_assets.profiles.aggregate import aggregate_to_wells
from bioembed_assets.schema import PERTURBATION

DEFAULT_THRESHOLDS: tuple[tuple[float, float], ...] = ((0.05, 0.95), (0.1, 0.9))
BLOCK_ELEMS = 1 << 23
_BINS = 1 << 20


@dataclass(frozen=True)
class RelationshipRecall:
    """`metrics`: null_distribution_size, query_distribution_size and recall_{l}_{h} per threshold
    pair (EFAAR's keys); `pairs`: the query pairs (entity1 < entity2) with their cosine similarity
    and, per threshold pair, whether it falls in a tail (`tail_{l}_{h}`)."""

    metrics: dict[str, float]
    pairs: pl.DataFrame


def _normalise_pairs(relationships: pl.DataFrame | Sequence[tuple[str, str]]) -> pl.DataFrame:
    if isinstance(relationships, pl.DataFrame):
        cols = ["entity1", "entity2"] if {"entity1", "entity2"} <= set(relationships.columns) else relationships.columns[:2]
        if len(cols) < 2:
            raise ValueError(f"relationships need two entity columns, got {relationships.columns}")
        rel = relationships.select(pl.col(cols[0]).cast(pl.String).alias("a"), pl.col(cols[1]).cast(pl.String).alias("b"))
    else:
        rel = pl.DataFrame([tuple(map(str, p)) for p in relationships], schema=["a", "b"], orient="row")
    rel = rel.drop_nulls()
    return (rel.select(pl.min_horizontal("a", "b").alias("entity1"), pl.max_horizontal("a", "b").alias("entity2"))
            .filter(pl.col("entity1") != pl.col("entity2")).unique(maintain_order=True))


def known_relationship_recall(
    meta: pl.DataFrame,
    X: np.ndarray,
    relationships: pl.DataFrame | Sequence[tuple[str, str]],
    pert_col: str = PERTURBATION,
    thresholds: Sequence[tuple[float, float]] = DEFAULT_THRESHOLDS,
    *,
    aggregate: Literal["mean", "median"] = "mean",
    min_entities: int = 20,
    dtype: type[np.floating] = np.float64,
    block_elems: int = BLOCK_ELEMS,
) -> RelationshipRecall:
    """EFAAR known-relationship recall of annotated perturbation pairs (see the module docstring).

    `relationships`: a table with `entity1`/`entity2` columns (else its first two columns) or a
    sequence of pairs, naming `pert_col` values. Raises if fewer than `min_entities`
    perturbations, or no annotated pair with both entities present.
    """
    if pert_col not in meta.columns:
        raise ValueError(f"column {pert_col!r} not in metadata (columns: {meta.columns})")
    if meta[pert_col].null_count():
        raise ValueError(f"column {pert_col!r} has {meta[pert_col].null_count()} null values "
                         f"(first at row {int(meta[pert_col].is_null().arg_max())})")
    names_meta, P = aggregate_to_wells(meta.select(pl.col(pert_col).cast(pl.String)), np.asarray(X), by=(pert_col,),
                                       method=aggregate)
    return relationship_recall(P, names_meta[pert_col].to_list(), relationships, thresholds, min_entities=min_entities,
                               dtype=dtype, block_elems=block_elems)


def relationship_recall(
    profiles: np.ndarray,
    entities: Sequence[str],
    relationships: pl.DataFrame | Sequence[tuple[str, str]],
    thresholds: Sequence[tuple[float, float]] = DEFAULT_THRESHOLDS,
    *,
    min_entities: int = 20,
    dtype: type[np.floating] = np.float64,
    block_elems: int = BLOCK_ELEMS,
) -> RelationshipRecall:
    """As `known_relationship_recall` on one profile per entity (rows of `profiles`)."""
    P = np.asarray(profiles)
    names = [str(e) for e in entities]
    n = len(names)
    if P.ndim != 2 or P.shape[0] != n:
        raise ValueError(f"profiles must be 2-D with one row per entity ({n}), got {P.shape}")
    if len(set(names)) != n:
        raise ValueError("entity names must be unique (one profile per perturbation)")
    if n < max(2, min_entities):
        raise ValueError(f"{n} entities; the benchmark needs at least {max(2, min_entities)}")
    if not np.isfinite(P).all():
        raise ValueError(f"profiles have non-finite values, first in entity {names[int(np.argmax(~np.isfinite(P).all(1)))]!r}")
    Xn = P.astype(dtype)
    norm = np.linalg.norm(Xn, axis=1, keepdims=True)
    if (norm == 0).any():
        raise ValueError(f"cosine similarity is undefined for the all-zero profile of {names[int(np.argmax(norm[:, 0] == 0))]!r}")
    Xn /= norm
    pairs = [(min(t), max(t)) for t in thresholds]
    for lo_t, hi_t in pairs:
        if not 0 <= lo_t <= hi_t <= 1:
            raise ValueError(f"threshold pairs must satisfy 0 <= l <= h <= 1, got {(lo_t, hi_t)}")

    rel = _normalise_pairs(relationships)
    index = {e: i for i, e in enumerate(names)}
    rel = rel.filter(pl.col("entity1").is_in(names) & pl.col("entity2").is_in(names))
    if rel.height == 0:
        raise ValueError("no annotated pair has both entities among the profiles")
    i = np.array([index[e] for e in rel["entity1"]], dtype=np.int64)
    j = np.array([index[e] for e in rel["entity2"]], dtype=np.int64)
    qi, qj = np.minimum(i, j), np.maximum(i, j)

    total = n * (n - 1) // 2
    ranks: dict[int, float] = {}
    rules = []
    for lo_t, hi_t in pairs:
        m_low = min(total, int(np.floor(lo_t * total)) + 2)  # largest m with m / T <= l
        while m_low > 0 and m_low / total > lo_t:
            m_low -= 1
        m_high = max(0, int(np.ceil(hi_t * total)) - 2)  # smallest m with m / T >= h
        while m_high / total < hi_t:
            m_high += 1
        rules.append((m_low, m_high))
        if m_low + 1 <= total:
            ranks[m_low + 1] = np.nan
        if 1 <= m_high <= total:
            ranks[m_high] = np.nan

    tri = _Triangle(Xn, block_elems)
    q = np.empty(qi.size, dtype=Xn.dtype)
    order = np.argsort(qi, kind="stable")
    hist = np.zeros(_BINS, dtype=np.int64)
    for lo, hi, S, vals in tri.blocks():  # pass 1: histogram + query similarities
        hist += np.bincount(_bin(vals), minlength=_BINS)
        a, b = np.searchsorted(qi[order], [lo, hi])
        sel = order[a:b]
        q[sel] = S[qi[sel] - lo, qj[sel] - lo]
    cum = np.cumsum(hist)
    want = {r: int(np.searchsorted(cum, r, "left")) for r in ranks}
    bins = np.array(sorted(set(want.values())))
    found_v, found_c = [], []
    for _, _, _, vals in tri.blocks():  # pass 2: the values in the bins holding the wanted ranks
        v = vals[np.isin(_bin(vals), bins)]
        if v.size:
            u, c = np.unique(v, return_counts=True)
            found_v.append(u)
            found_c.append(c)
    u, inv = np.unique(np.concatenate(found_v), return_inverse=True)
    c = np.bincount(inv.reshape(-1), weights=np.concatenate(found_c)).astype(np.int64)
    ub = _bin(u)
    for r, b_r in want.items():
        before = int(cum[b_r - 1]) if b_r > 0 else 0
        in_bin = ub == b_r
        ranks[r] = float(u[in_bin][np.searchsorted(np.cumsum(c[in_bin]), r - before, "left")])

    metrics: dict[str, float] = {"null_distribution_size": float(total), "query_distribution_size": float(q.size)}
    out = rel.with_columns(pl.Series("cosine_sim", q.astype(np.float64)))
    for (lo_t, hi_t), (m_low, m_high) in zip(pairs, rules):
        low = q < ranks[m_low + 1] if m_low + 1 <= total else np.ones(q.size, dtype=bool)
        high = q > ranks[m_high] if m_high >= 1 else np.ones(q.size, dtype=bool)
        tail = low | high
        metrics[f"recall_{lo_t}_{hi_t}"] = float(tail.mean())
        out = out.with_columns(pl.Series(f"tail_{lo_t}_{hi_t}", tail))
    return RelationshipRecall(metrics, out)


def _bin(v: np.ndarray) -> np.ndarray:
    """Monotone histogram bin of a similarity (2**20 equal bins over [-1, 1], clipped)."""
    return np.clip(np.floor((v + 1.0) * (_BINS / 2)), 0, _BINS - 1).astype(np.int64)


class _Triangle:
    """Row blocks of the strict upper triangle of Xn Xn^T, the same blocks on every pass (so
    every pass sees bit-identical similarities)."""

    def __init__(self, Xn: np.ndarray, block_elems: int) -> None:
        self.Xn = Xn
        n = Xn.shape[0]
        self.spans, lo = [], 0
        while lo < n - 1:
            hi = min(n - 1, lo + max(1, block_elems // (n - lo)))
            self.spans.append((lo, hi))
            lo = hi

    def blocks(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        for lo, hi in self.spans:
            S = self.Xn[lo:hi] @ self.Xn[lo:].T
            upper = np.arange(S.shape[1])[None, :] > np.arange(hi - lo)[:, None]
            yield lo, hi, S, S[upper]
