"""Average precision with copairs 0.5.5 pair semantics, computed without materialising pairs.

Pair rules (as copairs' `average_precision`): rows i != j form a *positive* pair when they are
equal in every `pos_sameby` column and different in every `pos_diffby` column, and a *negative*
pair when equal in every `neg_sameby` column and different in every `neg_diffby` column. Pairs are
unordered and credited to both ends, so every row is a query. A pair matching both rules sits in
the query's list twice (once positive, once negative), as in copairs.

AP of a query: its positives and negatives ranked by cosine similarity, highest first; a
positive tied with a negative ranks first (copairs' stable lexsort). AP = (1/M) sum_i i / r_i
over the 1-based ranks r_i of the M positives. No positives: NaN; positives but no negatives: 1.
`n_pos_pairs` = M and `n_total_pairs` = M + N as copairs reports them (0 and 0 for rows in no pair;
0 and N for rows with negatives only).

Ties: copairs stores similarities as float32 and sorts on `1 - sim` in float32, so similarities
closer than float32 resolution tie (and the positive wins). `rounding="copairs"` (default)
ranks on exactly that key; `rounding="none"` ranks on the similarities in the features' dtype.

Algorithm: rows are grouped by their `neg_sameby` key; the queries of one group are processed in
blocks, each with one GEMM against the group's candidate negatives (candidates whose `neg_diffby`
value is shared by the whole block are dropped up front; other conflicts are masked). Positive
similarities are computed per query from its `pos_sameby` group (row-wise products for small
groups, a GEMM against the block's partner rows for large ones). For every positive, the number of
negatives with a strictly better key gives its rank. Memory is bounded by `block_elems` similarities
per block plus the features; pair counts (`n_pos_pairs`, `n_total_pairs`) come from group sizes by
inclusion-exclusion over the diffby columns, never from pair lists.

Deviations from copairs: cosine only (no other distances), plain column names only (copairs'
query-expression entries are broken in its mAP path anyway, peers.md §2.2), no
`normalized_average_precision` column, and no multilabel variant. Similarities come from a GEMM
instead of copairs' row-wise products, so float32 near-ties (within a few ulps) can resolve
differently: |ΔAP| ~1e-5 on rare queries with float32 features, ~1e-16 with float64.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

from bioembed_assets.schema import CONTROL_TYPE, PERTURBATION, ControlType

Rounding = Literal["copairs", "none"]

BLOCK_ELEMS = 1 << 22
"""Default number of similarities held per block (16 MiB in float32)."""

_SMALL_GROUP = 16  # positives per query up to which row-wise products / comparisons are used
_MAX_DIFFBY = 10  # inclusion-exclusion over 2**k column subsets


class UnpairedError(ValueError):
    """No positive or no negative pair exists under the given rules (copairs' UnpairedException)."""


@dataclass(frozen=True)
class PairRule:
    """Integer-coded pair rule: `same` = one group code per row (None: all rows one group),
    `diff` = one code array per diffby column."""

    same: np.ndarray | None
    diff: tuple[np.ndarray, ...]


# --------------------------------------------------------------------------- codes and counts


def combine_codes(codes: Sequence[np.ndarray], n: int) -> np.ndarray:
    """Dense int64 code of the tuple of `codes` per row (0..k-1); zeros when `codes` is empty."""
    if not codes:
        return np.zeros(n, dtype=np.int64)
    out = np.asarray(codes[0], dtype=np.int64)
    for c in codes[1:]:
        c = np.asarray(c, dtype=np.int64)
        out = out * (int(c.max()) + 1) + c
        if int(out.max()) > 1 << 40:
            out = np.unique(out, return_inverse=True)[1].reshape(-1)
    return np.unique(out, return_inverse=True)[1].reshape(-1).astype(np.int64)


def column_codes(meta: pl.DataFrame, col: str) -> np.ndarray:
    """Dense int64 codes of a metadata column; raises on a missing column or null values."""
    if col not in meta.columns:
        raise ValueError(f"column {col!r} not in metadata (columns: {meta.columns})")
    s = meta[col]
    if s.null_count():
        row = int(s.is_null().arg_max())
        raise ValueError(f"column {col!r} has {s.null_count()} null values (first at row {row}); pairing columns need values")
    if isinstance(s.dtype, (pl.List, pl.Array, pl.Struct, pl.Object)):
        raise ValueError(f"column {col!r} has nested dtype {s.dtype}; expected plain values (one label per row)")
    if s.dtype in (pl.Float32, pl.Float64) and s.is_nan().any():
        raise ValueError(f"column {col!r} has NaN values (first at row {int(s.is_nan().arg_max())})")
    if isinstance(s.dtype, (pl.Categorical, pl.Enum)):
        s = s.cast(pl.String)
    elif s.dtype == pl.Boolean:
        s = s.cast(pl.Int8)
    return (s.rank("dense").cast(pl.Int64) - 1).to_numpy()


def pair_counts(rule: PairRule, n: int) -> np.ndarray:
    """Number of partners of every row under `rule` (inclusion-exclusion over the diffby columns)."""
    k = len(rule.diff)
    if k > _MAX_DIFFBY:
        raise ValueError(f"at most {_MAX_DIFFBY} diffby columns are supported, got {k}")
    base = [] if rule.same is None else [rule.same]
    total = np.zeros(n, dtype=np.int64)
    for r in range(k + 1):
        for subset in itertools.combinations(rule.diff, r):
            key = combine_codes([*base, *subset], n)
            total += (-1) ** r * np.bincount(key)[key]
    if k == 0:
        total -= 1  # no self pairs
    return total


# --------------------------------------------------------------------------- features


def _check_features(X: np.ndarray, n: int | None = None) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"features must be 2-D (rows x features), got shape {X.shape}")
    if n is not None and X.shape[0] != n:
        raise ValueError(f"features have {X.shape[0]} rows but metadata has {n}; rows must be aligned")
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float32)
    if not np.isfinite(X).all():
        row = int(np.argmax(~np.isfinite(X).all(axis=1)))
        raise ValueError(f"features have non-finite values (NaN/inf), first at row {row}")
    return X


def _norms(X: np.ndarray) -> np.ndarray:
    norm = np.empty(X.shape[0], dtype=X.dtype)
    step = max(1, (1 << 22) // max(X.shape[1], 1))
    for lo in range(0, X.shape[0], step):  # chunked np.linalg.norm: same per-row arithmetic as copairs'
        norm[lo : lo + step] = np.linalg.norm(X[lo : lo + step], axis=1)
    if (norm == 0).any():
        raise ValueError(f"cosine similarity is undefined for all-zero rows (first at row {int(np.argmax(norm == 0))})")
    return norm


def _keys(S: np.ndarray, rounding: Rounding) -> np.ndarray:
    """Ranking keys, smaller = better: float32 `1 - sim` (copairs) or `-sim`; may reuse `S`."""
    if rounding == "copairs":
        if S.dtype != np.float32:
            S = S.astype(np.float32)
        return np.subtract(np.float32(1), S, out=S)
    return np.negative(S, out=S)


# --------------------------------------------------------------------------- AP core


class _Candidates:
    """Normalised candidate negatives of one neg_sameby group, minus the rows whose value in some
    diffby column is shared by a whole block of queries (those can never be its negatives)."""

    def __init__(self, X: np.ndarray, norm: np.ndarray, rows: np.ndarray, rule: PairRule, excluded: dict[int, int]):
        keep = np.ones(rows.size, dtype=bool)
        for c, v in excluded.items():
            keep &= rule.diff[c][rows] != v
        self.rows = rows[keep]
        self.Xn = X[self.rows] / norm[self.rows, None]
        self.sorted_codes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for c in range(len(rule.diff)):
            if c not in excluded:
                codes = rule.diff[c][self.rows]
                order = np.argsort(codes, kind="stable")
                self.sorted_codes[c] = (codes[order], order)


def _mask_conflicts(Kneg: np.ndarray, q_codes: np.ndarray, sorted_codes: np.ndarray, order: np.ndarray) -> None:
    """Set Kneg[i, j] = inf where candidate j shares the query's code (sparse when few conflicts)."""
    lo = np.searchsorted(sorted_codes, q_codes, "left")
    hi = np.searchsorted(sorted_codes, q_codes, "right")
    cnt = hi - lo
    total = int(cnt.sum())
    if total == 0:
        return
    b, nc = Kneg.shape
    if total * 4 > b * nc:  # dense
        codes = np.empty_like(sorted_codes)
        codes[order] = sorted_codes
        Kneg[q_codes[:, None] == codes[None, :]] = np.inf
        return
    rows = np.repeat(np.arange(b), cnt)
    pos = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt) + np.repeat(lo, cnt)
    Kneg[rows, order[pos]] = np.inf


def _count_better(Kneg: np.ndarray, Kpos: np.ndarray) -> np.ndarray:
    """For every positive key, the number of negative keys strictly smaller (per row)."""
    b, k = Kpos.shape
    if k <= _SMALL_GROUP:
        out = np.empty((b, k), dtype=np.int64)
        for j in range(k):
            out[:, j] = np.count_nonzero(Kneg < Kpos[:, j : j + 1], axis=1)
        return out
    Kneg.sort(axis=1)
    n = Kneg.shape[1]
    lo = np.zeros((b, k), dtype=np.int64)
    hi = np.full((b, k), n, dtype=np.int64)
    rows = np.arange(b)[:, None]
    while True:  # vectorised binary search: first index whose key is >= the positive's key
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) >> 1
        less = Kneg[rows, np.minimum(mid, n - 1)] < Kpos
        lo = np.where(active & less, mid + 1, lo)
        hi = np.where(active & ~less, mid, hi)


def ap_core(
    X: np.ndarray,
    pos: PairRule,
    neg: PairRule,
    rounding: Rounding = "copairs",
    block_elems: int = BLOCK_ELEMS,
    strict: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ap, n_pos, n_neg) per row for integer-coded rules; `X` already checked (float32/64).
    `strict` raises `UnpairedError` when no positive or no negative pair exists (as copairs);
    otherwise such data just gives NaN / 1.0 APs."""
    if rounding not in ("copairs", "none"):
        raise ValueError(f"rounding must be 'copairs' or 'none', got {rounding!r}")
    n, d = X.shape
    n_pos = pair_counts(pos, n)
    n_neg = pair_counts(neg, n)
    if strict and not n_pos.any():
        raise UnpairedError("no positive pairs: no two rows satisfy the positive rule (pos_sameby equal, pos_diffby different)")
    if strict and not n_neg.any():
        raise UnpairedError("no negative pairs: no two rows satisfy the negative rule (neg_sameby equal, neg_diffby different)")
    norm = _norms(X)
    ap = np.full(n, np.nan)
    ap[(n_pos > 0) & (n_neg == 0)] = 1.0
    q = np.flatnonzero((n_pos > 0) & (n_neg > 0))
    if q.size == 0:
        return ap, n_pos, n_neg

    gpos = np.zeros(n, dtype=np.int64) if pos.same is None else pos.same
    pos_order = np.argsort(gpos, kind="stable")
    gsize = np.bincount(gpos)
    gstart = np.concatenate([[0], np.cumsum(gsize)[:-1]])
    gneg = np.zeros(n, dtype=np.int64) if neg.same is None else neg.same
    neg_order = np.argsort(gneg, kind="stable")
    nsize = np.bincount(gneg)
    nstart = np.concatenate([[0], np.cumsum(nsize)[:-1]])

    row_gsize = gsize[gpos]
    q = q[np.lexsort((q, gpos[q], row_gsize[q], gneg[q]))]
    seg = np.flatnonzero(np.diff(gneg[q])) + 1
    cache: tuple[tuple, _Candidates] | None = None
    for qs in np.split(q, seg):
        g = int(gneg[qs[0]])
        members = neg_order[nstart[g] : nstart[g] + nsize[g]]  # ascending (stable argsort)
        counts = [np.unique(codes[members], return_counts=True) for codes in neg.diff]
        lo = 0
        while lo < qs.size:
            # a first block sized for all group members fixes which diffby values the block's
            # queries share: members with such a value are no candidates and are dropped when
            # they are >= 1/8 of the group (else masked); the block then grows to the candidate
            # count for as long as its queries keep sharing those values
            hi = _block_end(qs, lo, members.size, row_gsize, d, block_elems)
            excluded = {}
            for c, codes in enumerate(neg.diff):
                v = codes[qs[lo:hi]]
                if (v == v[0]).all():
                    vals, cnt = counts[c]
                    at = np.searchsorted(vals, v[0])
                    if at < vals.size and vals[at] == v[0] and 8 * cnt[at] >= members.size:
                        excluded[c] = int(v[0])
            key = (g, tuple(sorted(excluded.items())))
            if cache is None or cache[0] != key:
                cache = (key, _Candidates(X, norm, members, neg, excluded))
            cand = cache[1]
            if cand.rows.size < members.size:
                hi = _block_end(qs, lo, cand.rows.size, row_gsize, d, block_elems)
                for c, v in excluded.items():
                    differs = np.flatnonzero(neg.diff[c][qs[lo:hi]] != v)
                    hi = lo + int(differs[0]) if differs.size else hi
            qb = qs[lo:hi]
            lo += _block(X, norm, qb, cand, pos, neg, gpos, pos_order, gstart, gsize, rounding, block_elems, ap)
    return ap, n_pos, n_neg


def _block_end(qs: np.ndarray, lo: int, n_cand: int, group_size: np.ndarray, d: int, block_elems: int) -> int:
    """End of the block starting at `lo` so that similarities + positive gathers fit `block_elems`."""

    def per_row(k: int) -> int:
        return n_cand + (k * (d + 1) if k <= _SMALL_GROUP else 3 * k) + 1

    k_lo = int(group_size[qs[lo]])
    hi = min(qs.size, lo + max(1, block_elems // per_row(k_lo)))
    k_hi = int(group_size[qs[hi - 1]])
    if k_hi > k_lo:
        hi = min(hi, lo + max(1, block_elems // per_row(k_hi)))
    return hi


def _block(
    X: np.ndarray,
    norm: np.ndarray,
    qb: np.ndarray,
    cand: _Candidates,
    pos: PairRule,
    neg: PairRule,
    gpos: np.ndarray,
    pos_order: np.ndarray,
    gstart: np.ndarray,
    gsize: np.ndarray,
    rounding: Rounding,
    block_elems: int,
    ap: np.ndarray,
) -> int:
    """AP of the block's queries (written into `ap`); returns how many queries were processed
    (fewer than `qb.size` when the partner set of a large-group block had to be split)."""
    b = qb.size
    Qn = X[qb] / norm[qb, None]
    # positive partners: the query's pos_sameby group, minus itself and diffby conflicts
    g = gpos[qb]
    K = int(gsize[g].max())
    j = np.arange(K)
    inside = j[None, :] < gsize[g][:, None]
    P = pos_order[np.where(inside, gstart[g][:, None] + j, 0)]
    valid = inside & (P != qb[:, None])
    for codes in pos.diff:
        valid &= codes[P] != codes[qb][:, None]
    if K <= _SMALL_GROUP:
        Pn = X[P]
        Pn /= norm[P][..., None]
        S_pos = (Qn[:, None, :] * Pn).sum(axis=2)  # row-wise products, as copairs computes them
    else:
        U = np.unique(P[valid])
        if b > 1 and b * U.size > 2 * block_elems:
            return _block(X, norm, qb[: b // 2], cand, pos, neg, gpos, pos_order, gstart, gsize, rounding, block_elems, ap)
        S_u = Qn @ (X[U] / norm[U, None]).T
        S_pos = np.take_along_axis(S_u, np.searchsorted(U, np.where(valid, P, U[0])), axis=1)
    Kpos = _keys(S_pos, rounding)
    Kpos[~valid] = np.inf
    Kpos.sort(axis=1)  # best positive first; padding last
    m = valid.sum(axis=1)
    # negatives
    Kneg = _keys(Qn @ cand.Xn.T, rounding)
    for c, (sorted_codes, order) in cand.sorted_codes.items():
        _mask_conflicts(Kneg, neg.diff[c][qb], sorted_codes, order)
    at = np.searchsorted(cand.rows, qb)
    own = (at < cand.rows.size) & (cand.rows[np.minimum(at, cand.rows.size - 1)] == qb)
    Kneg[np.flatnonzero(own), at[own]] = np.inf  # no self pair
    better = _count_better(Kneg, Kpos)
    i = np.arange(1, K + 1)
    prec = np.where(i[None, :] <= m[:, None], i / (i + better), 0.0)
    ap[qb] = prec.sum(axis=1) / m
    return b


# --------------------------------------------------------------------------- public API


def _rule(meta: pl.DataFrame, sameby: Sequence[str], diffby: Sequence[str], name: str) -> PairRule:
    if isinstance(sameby, str) or isinstance(diffby, str):
        raise TypeError(f"{name}_sameby/{name}_diffby must be lists of column names, not strings")
    sameby, diffby = list(sameby), list(diffby)
    if not sameby and not diffby:
        raise ValueError(f"{name}_sameby and {name}_diffby are both empty; give at least one column")
    both = set(sameby) & set(diffby)
    if both:
        raise ValueError(f"{name}_sameby and {name}_diffby must be disjoint; both contain {sorted(both)}")
    n = meta.height
    same = combine_codes([column_codes(meta, c) for c in sameby], n) if sameby else None
    return PairRule(same, tuple(column_codes(meta, c) for c in diffby))


def average_precision(
    meta: pl.DataFrame,
    X: np.ndarray,
    pos_sameby: Sequence[str],
    pos_diffby: Sequence[str],
    neg_sameby: Sequence[str],
    neg_diffby: Sequence[str],
    *,
    rounding: Rounding = "copairs",
    block_elems: int = BLOCK_ELEMS,
) -> pl.DataFrame:
    """AP of every row under copairs' pair rules (see the module docstring).

    Returns `meta` plus `average_precision` (Float64, NaN without positives), `n_pos_pairs` and
    `n_total_pairs` (Int64). Raises ValueError on misaligned/NaN features, missing or null
    pairing columns, and `UnpairedError` when no positive or no negative pair exists.
    """
    if not isinstance(meta, pl.DataFrame):
        raise TypeError(f"meta must be a polars DataFrame, got {type(meta).__name__}")
    X = _check_features(X, meta.height)
    pos = _rule(meta, pos_sameby, pos_diffby, "pos")
    neg = _rule(meta, neg_sameby, neg_diffby, "neg")
    ap, n_pos, n_neg = ap_core(X, pos, neg, rounding, block_elems)
    return meta.with_columns(
        pl.Series("average_precision", ap, dtype=pl.Float64),
        pl.Series("n_pos_pairs", n_pos, dtype=pl.Int64),
        pl.Series("n_total_pairs", n_pos + n_neg, dtype=pl.Int64),
    )


def _negcon_mask(meta: pl.DataFrame, negcon: pl.Expr | np.ndarray | None) -> np.ndarray:
    if negcon is None:
        negcon = pl.col(CONTROL_TYPE) == ControlType.NEGATIVE
    if isinstance(negcon, pl.Expr):
        mask = meta.select(negcon.fill_null(False)).to_series().to_numpy()
    else:
        mask = np.asarray(negcon)
    if mask.dtype != bool or mask.shape != (meta.height,):
        raise ValueError(f"negcon must select rows as one boolean per row ({meta.height}), got {mask.dtype} {mask.shape}")
    if not mask.any():
        raise UnpairedError("no negative-control rows selected by negcon")
    return mask


_REF = "__bioembed_reference_index"


def activity_average_precision(
    meta: pl.DataFrame,
    X: np.ndarray,
    pert_col: str = PERTURBATION,
    negcon: pl.Expr | np.ndarray | None = None,
    *,
    pos_sameby: Sequence[str] = (),
    pos_diffby: Sequence[str] = (),
    neg_sameby: Sequence[str] = (),
    rounding: Rounding = "copairs",
    block_elems: int = BLOCK_ELEMS,
) -> pl.DataFrame:
    """Replicate retrieval against negative controls (copairs' reference-index recipe).

    Positives: other rows of the same `pert_col` value that are not negative controls; negatives:
    negative-control rows with a different `pert_col` value. `negcon` selects the controls (a
    polars expression or boolean array; default `control_type == "negative"`). `neg_sameby=[plate]`
    keeps only the query's plate's controls (JUMP); `pos_diffby=[plate]` drops same-plate replicate
    pairs. Controls get AP NaN. Equals copairs with `assign_reference_index` and
    pos_sameby=[pert, ref, *pos_sameby], neg_diffby=[pert, ref].
    """
    mask = _negcon_mask(meta, negcon)
    ref = np.where(mask, np.arange(meta.height), -1)
    m = meta.with_columns(pl.Series(_REF, ref, dtype=pl.Int64))
    out = average_precision(m, X, [pert_col, _REF, *pos_sameby], pos_diffby, neg_sameby, [pert_col, _REF],
                            rounding=rounding, block_elems=block_elems)
    return out.drop(_REF)


def nonreplicate_average_precision(
    meta: pl.DataFrame,
    X: np.ndarray,
    pert_col: str = PERTURBATION,
    *,
    pos_diffby: Sequence[str] = (),
    neg_sameby: Sequence[str] = (),
    rounding: Rounding = "copairs",
    block_elems: int = BLOCK_ELEMS,
) -> pl.DataFrame:
    """Replicate retrieval against non-replicates: positives = other rows of the same `pert_col`
    value, negatives = all rows of other values (controls included, and controls are queries
    too; filter rows beforehand to change that)."""
    return average_precision(meta, X, [pert_col], pos_diffby, neg_sameby, [pert_col],
                             rounding=rounding, block_elems=block_elems)


def consistency_average_precision(
    meta: pl.DataFrame,
    X: np.ndarray,
    label_col: str,
    *,
    rounding: Rounding = "copairs",
    block_elems: int = BLOCK_ELEMS,
) -> pl.DataFrame:
    """Consistency (e.g. MoA) retrieval on consensus profiles: positives share `label_col`,
    negatives have a different label (copairs pos_sameby=[label], neg_diffby=[label])."""
    return average_precision(meta, X, [label_col], [], [], [label_col], rounding=rounding, block_elems=block_elems)
