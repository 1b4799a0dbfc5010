"""Retrieval metrics compatible with copairs 0.5.5: activity / consistency AP, mAP, p-values.

AP (per query): rank the query's positives and negatives by cosine similarity (highest first;
a positive tied with a negative ranks first, as copairs' stable lexsort does) and average the
precision at the positive ranks: AP = (1/M) sum_i i / r_i. Rows without positives get NaN;
rows with positives but no negatives get AP = 1 (as copairs).

Computed without materialising pairs: for a block of queries one GEMM against the candidate
negatives plus the block's replicate groups, then, per positive, the number of negatives with a
strictly higher similarity (vectorised comparisons; a row sort + binary search for queries with
more than 32 positives).

Significance (copairs `mean_average_precision`): one permutation null of `null_size` random APs
per (M, L) configuration; a group's null is the element-wise mean of its members' nulls (members
sharing a configuration share the same vector, as in copairs); p = (#{null > mAP} + 1) /
(null_size + 1); Benjamini–Hochberg across groups. The random stream differs from copairs', so
p-values agree statistically, not bit-for-bit.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import polars as pl

from bioembed_assets.profiles.aggregate import aggregate_to_wells
from bioembed_assets.schema import CONTROL_TYPE, MOA, PERTURBATION, ControlType

_BLOCK_ELEMS = 1 << 22  # similarities held per block (b x columns)


def _unit_rows(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (rows x features), got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    if not np.isfinite(X).all():
        row = int(np.argmax(~np.isfinite(X).all(axis=1)))
        raise ValueError(f"X has non-finite values (NaN/inf), first at row {row}")
    norm = np.linalg.norm(X, axis=1, keepdims=True)
    if (norm == 0).any():
        row = int(np.argmax(norm[:, 0] == 0))
        raise ValueError(f"cosine similarity is undefined for all-zero rows (first at row {row})")
    return X / norm


def _ap_core(
    Xn: np.ndarray, q_idx: np.ndarray, q_lab: np.ndarray, neg_idx: np.ndarray, neg_lab: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AP of each query row; positives = other queries with the same label, negatives = the
    `neg_idx` rows whose label differs from the query's. Labels are integer codes.

    Returns (ap, n_pos, n_neg) aligned with `q_idx`.
    """
    nq = q_idx.size
    ap = np.full(nq, np.nan)
    n_pos = np.zeros(nq, dtype=np.int64)
    n_neg = np.zeros(nq, dtype=np.int64)
    if nq == 0:
        return ap, n_pos, n_neg
    # sort queries by replicate-group size, then label: groups stay contiguous and a block's
    # queries have similar numbers of positives
    order = np.lexsort((q_lab, np.bincount(q_lab)[q_lab]))
    lab_s = q_lab[order]
    idx_s = q_idx[order]
    # group [start, end) of every query in sorted order
    brk = np.flatnonzero(np.diff(lab_s)) + 1
    g_start = np.concatenate([[0], brk])
    g_end = np.concatenate([brk, [nq]])
    gid = np.repeat(np.arange(g_start.size), g_end - g_start)
    qs, qe = g_start[gid], g_end[gid]
    m_all = qe - qs - 1
    n_pos[order] = m_all
    # negatives per query: candidates with a different label
    nl_sorted = np.sort(neg_lab)
    same = np.searchsorted(nl_sorted, lab_s, "right") - np.searchsorted(nl_sorted, lab_s, "left")
    n_neg[order] = neg_idx.size - same
    Xneg = Xn[neg_idx]
    n_cand = neg_idx.size
    b = max(1, _BLOCK_ELEMS // (n_cand + 2 * int(m_all.max()) + 1))
    ap_s = np.full(nq, np.nan)
    for lo in range(m_all.searchsorted(1), nq, b):  # queries without positives keep NaN
        hi = min(lo + b, nq)
        mb = int(m_all[hi - 1])
        j = np.arange(mb)
        c_lo, c_hi = int(qs[lo]), int(qe[hi - 1])  # replicate rows needed by this block
        Q = Xn[idx_s[lo:hi]]
        S_neg = Q @ Xneg.T
        S_grp = Q @ Xn[idx_s[c_lo:c_hi]].T
        m = m_all[lo:hi]
        # j-th positive of query p: group member qs + j, skipping p itself
        member = qs[lo:hi, None] + j + (j >= (np.arange(lo, hi) - qs[lo:hi])[:, None])
        valid = j < m[:, None]
        S_pos = np.take_along_axis(S_grp, np.where(valid, member - c_lo, 0), axis=1)
        if same[lo:hi].any():  # candidates sharing the query's label are not negatives
            S_neg[neg_lab[None, :] == lab_s[lo:hi, None]] = -np.inf
        # number of negatives scoring strictly higher than each positive (ties: positive first)
        if mb <= 32:
            above = np.stack([np.count_nonzero(S_neg > S_pos[:, k : k + 1], axis=1) for k in range(mb)], axis=1)
        else:
            S_neg.sort(axis=1)
            above = np.stack([n_cand - np.searchsorted(S_neg[r], S_pos[r], "right") for r in range(hi - lo)])
        # positives by decreasing similarity = increasing `above`; padding slots last
        above = np.sort(np.where(valid, above, np.iinfo(np.int64).max // 2), axis=1)
        prec = np.where(valid, (j + 1) / (j + 1 + above), 0.0)
        ap_s[lo:hi] = prec.sum(axis=1) / m
    ap[order] = ap_s
    return ap, n_pos, n_neg


def _codes(*arrays: np.ndarray) -> list[np.ndarray]:
    """Integer codes of the labels in `arrays`, on a common vocabulary."""
    allv = np.concatenate([np.asarray(a).astype(str) for a in arrays])
    _, inv = np.unique(allv, return_inverse=True)
    out, s = [], 0
    for a in arrays:
        out.append(inv[s : s + len(a)].reshape(-1))
        s += len(a)
    return out


def average_precision_vs_controls(
    X: np.ndarray, perturbation: np.ndarray, is_negative_control: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """copairs "phenotypic activity" AP per row: (ap, n_pos, n_total).

    Positives = other non-control rows of the same perturbation; negatives = all negative-control
    rows with a different perturbation label (copairs' reference-index recipe). Control rows get
    AP NaN, n_pos 0 and n_total = number of rows with a different perturbation (as copairs).
    """
    Xn = _unit_rows(X)
    n = Xn.shape[0]
    pert = np.asarray(perturbation)
    ctrl = np.asarray(is_negative_control, dtype=bool)
    if pert.shape != (n,) or ctrl.shape != (n,):
        raise ValueError(f"perturbation and is_negative_control need one entry per row ({n})")
    (code,) = _codes(pert)
    q_idx, neg_idx = np.flatnonzero(~ctrl), np.flatnonzero(ctrl)
    ap_q, m, nn = _ap_core(Xn, q_idx, code[q_idx], neg_idx, code[neg_idx])
    ap = np.full(n, np.nan)
    n_pos = np.zeros(n, dtype=np.int64)
    n_total = n - np.bincount(code)[code]  # controls: every row of another perturbation
    ap[q_idx], n_pos[q_idx], n_total[q_idx] = ap_q, m, m + nn
    return ap, n_pos, n_total


def bh_fdr(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (monotone, capped at 1); NaN stays NaN."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    if q.size == 0:
        return out
    order = np.argsort(q)
    adj = q[order] * q.size / np.arange(1, q.size + 1)
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    res = np.empty_like(q)
    res[order] = np.minimum(adj, 1.0)
    out[ok] = res
    return out


def _null_ap(m: int, total: int, null_size: int, rng: np.random.Generator) -> np.ndarray:
    """APs of `null_size` random rank lists of length `total` with `m` positives."""
    if m >= total:
        return np.ones(null_size)
    if m * m <= total:  # few collisions expected: sample positions, redraw rows with repeats
        pos = rng.integers(0, total, size=(null_size, m))
        pos.sort(axis=1)
        while True:
            dup = (np.diff(pos, axis=1) == 0).any(axis=1)
            if not dup.any():
                break
            redo = rng.integers(0, total, size=(int(dup.sum()), m))
            redo.sort(axis=1)
            pos[dup] = redo
    else:  # positions of the m smallest of `total` random keys
        pos = np.empty((null_size, m), dtype=np.int64)
        step = max(1, (1 << 22) // total)
        for s in range(0, null_size, step):
            keys = rng.random((min(step, null_size - s), total))
            pos[s : s + step] = np.sort(np.argpartition(keys, m - 1, axis=1)[:, :m], axis=1)
    return (np.arange(1, m + 1) / (pos + 1)).mean(axis=1)


def mean_average_precision(
    ap: np.ndarray,
    n_pos: np.ndarray,
    n_total: np.ndarray,
    groups: np.ndarray,
    null_size: int = 10000,
    seed: int = 0,
    threshold: float = 0.05,
) -> pl.DataFrame:
    """mAP per group with permutation p-values and BH-corrected p-values (copairs semantics).

    Rows with NaN AP or n_pos == 0 are dropped first. Columns: group, mean_average_precision,
    p_value, corrected_p_value, below_p, below_corrected_p, n_rows; sorted by group.
    """
    if null_size < 1:
        raise ValueError(f"null_size must be >= 1, got {null_size}")
    ap = np.asarray(ap, dtype=np.float64)
    n_pos, n_total = np.asarray(n_pos, dtype=np.int64), np.asarray(n_total, dtype=np.int64)
    groups = np.asarray(groups)
    if not (ap.shape == n_pos.shape == n_total.shape == groups.shape) or ap.ndim != 1:
        raise ValueError("ap, n_pos, n_total and groups must be 1-D arrays of equal length")
    keep = ~np.isnan(ap) & (n_pos > 0)
    ap, n_pos, n_total, groups = ap[keep], n_pos[keep], n_total[keep], groups[keep]
    schema = {
        "group": pl.Series(groups[:0]).dtype if groups.size else pl.String,
        "mean_average_precision": pl.Float64, "p_value": pl.Float64, "corrected_p_value": pl.Float64,
        "below_p": pl.Boolean, "below_corrected_p": pl.Boolean, "n_rows": pl.Int64,
    }  # fmt: skip
    if ap.size == 0:
        return pl.DataFrame(schema=schema)
    g_lab, g_code = np.unique(groups, return_inverse=True)
    g_code = g_code.reshape(-1)
    n_g = np.bincount(g_code)
    mAP = np.bincount(g_code, weights=ap) / n_g
    confs, c_code = np.unique(np.stack([n_pos, n_total], axis=1), axis=0, return_inverse=True)
    c_code = c_code.reshape(-1)
    seeds = np.random.default_rng(seed).integers(2**63 - 1, size=len(confs))
    nulls = np.stack(
        [_null_ap(int(m), int(t), null_size, np.random.default_rng(s)) for (m, t), s in zip(confs, seeds)]
    )
    # A group's null is the mean of its members' nulls, so it depends only on the multiset of
    # member configurations: compute it once per distinct multiset, then count by binary search.
    key, cnt = np.unique(g_code * len(confs) + c_code, return_counts=True)
    kg, kc = key // len(confs), key % len(confs)
    seg = np.concatenate([[0], np.cumsum(np.bincount(kg, minlength=len(g_lab)))])
    sig = np.stack([kc, cnt], axis=1)
    sig_id: dict[bytes, int] = {}
    g_sig = np.array([sig_id.setdefault(sig[a:b].tobytes(), len(sig_id)) for a, b in zip(seg[:-1], seg[1:])])
    p = np.empty(len(g_lab))
    tol = 1e-9  # strict ">" in exact arithmetic: rounding of exact ties must not count
    by_sig = np.argsort(g_sig, kind="stable")
    for members in np.split(by_sig, np.flatnonzero(np.diff(g_sig[by_sig])) + 1):
        a, b = seg[members[0]], seg[members[0] + 1]
        gnull = np.sort(cnt[a:b] @ nulls[kc[a:b]] / n_g[members[0]])
        above = null_size - np.searchsorted(gnull, mAP[members] + tol, side="right")
        p[members] = (above + 1) / (null_size + 1)
    q = bh_fdr(p)
    return pl.DataFrame(
        {
            "group": g_lab,
            "mean_average_precision": mAP,
            "p_value": p,
            "corrected_p_value": q,
            "below_p": p < threshold,
            "below_corrected_p": q < threshold,
            "n_rows": n_g.astype(np.int64),
        }
    )


def replicate_map(
    meta: pl.DataFrame,
    X: np.ndarray,
    pert_col: str = PERTURBATION,
    control_col: str = CONTROL_TYPE,
    null_size: int = 10000,
    seed: int = 0,
    threshold: float = 0.05,
) -> pl.DataFrame:
    """Phenotypic activity: replicate retrieval against negative controls, mAP per perturbation.

    Negative controls are rows with `control_col == "negative"`; positive controls are scored
    like treatments. Perturbations with a single replicate have no positives and are omitted.
    The output's first column is named `pert_col` (instead of `group`).
    """
    if meta[pert_col].null_count():
        raise ValueError(f"column {pert_col!r} has {meta[pert_col].null_count()} null values")
    pert = meta[pert_col].cast(pl.String).to_numpy()
    neg = (meta[control_col] == ControlType.NEGATIVE).fill_null(False).to_numpy()
    ap, n_pos, n_total = average_precision_vs_controls(X, pert, neg)
    out = mean_average_precision(ap, n_pos, n_total, pert, null_size, seed, threshold)
    return out.rename({"group": pert_col})


def fraction_retrieved(map_df: pl.DataFrame) -> float:
    """Share of groups whose BH-corrected p-value is below the threshold (NaN if empty)."""
    if map_df.height == 0:
        return float("nan")
    return float(map_df["below_corrected_p"].cast(pl.Float64).mean())


def average_precision_consistency(X: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """copairs consistency AP per row (pos_sameby=[label], neg_diffby=[label]): (ap, n_pos, n_total)."""
    Xn = _unit_rows(X)
    (code,) = _codes(np.asarray(labels))
    idx = np.arange(Xn.shape[0])
    ap, m, nn = _ap_core(Xn, idx, code, idx, code)
    return ap, m, m + nn


def moa_map(
    meta: pl.DataFrame,
    X: np.ndarray,
    moa_col: str = MOA,
    pert_col: str = PERTURBATION,
    control_col: str = CONTROL_TYPE,
    null_size: int = 10000,
    seed: int = 0,
    threshold: float = 0.05,
    perturbations: Collection[str] | None = None,
) -> pl.DataFrame:
    """Phenotypic consistency: mAP per MoA of retrieving same-MoA perturbations.

    Non-negative-control rows with a non-null MoA are aggregated to one consensus profile per
    perturbation (median); each consensus profile queries the other perturbations, with
    positives = same MoA and negatives = different MoA. A perturbation annotated with several
    MoAs is rejected (single-label only). `perturbations` optionally restricts the analysis,
    e.g. to the phenotypically active ones (copairs' consistency recipe). The output's first
    column is named `moa_col`.
    """
    keep = meta[moa_col].is_not_null() & meta[pert_col].is_not_null()
    if perturbations is not None:
        keep &= meta[pert_col].cast(pl.String).is_in(list(perturbations))
    if control_col in meta.columns:
        keep &= (meta[control_col] != ControlType.NEGATIVE).fill_null(True)
    mask = keep.to_numpy()
    sub = meta.filter(keep).select(pl.col(pert_col).cast(pl.String), pl.col(moa_col).cast(pl.String))
    multi = sub.group_by(pert_col).agg(pl.col(moa_col).n_unique()).filter(pl.col(moa_col) > 1)
    if multi.height:
        raise ValueError(f"perturbation {multi[pert_col][0]!r} has several {moa_col} values; expected one")
    if sub.height == 0:
        empty = np.array([], dtype=str)
        return mean_average_precision(np.array([]), empty.astype(int), empty.astype(int), empty).rename({"group": moa_col})
    cons_meta, cons = aggregate_to_wells(sub, np.asarray(X)[mask], by=(pert_col,), method="median")
    moa = cons_meta[moa_col].to_numpy()
    ap, n_pos, n_total = average_precision_consistency(cons, moa)
    out = mean_average_precision(ap, n_pos, n_total, moa, null_size, seed, threshold)
    return out.rename({"group": moa_col})
