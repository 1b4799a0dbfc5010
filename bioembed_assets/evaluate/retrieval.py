"""Retrieval metrics compatible with copairs 0.5.5: activity / consistency AP, mAP, p-values.

Thin array- and table-level wrappers over `evaluate.pairs` (AP with copairs' pair rules, computed
by block GEMMs without materialising pairs) and `evaluate.nulls` (per-configuration nulls, group
p-values; `null="exact"` by default, `null="copairs"` reproduces copairs bit for bit). BH via
`bh_fdr` (statsmodels' `fdr_bh` arithmetic). "Fraction retrieved" = share of groups with
`below_corrected_p` (copairs / JUMP papers).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import polars as pl

from bioembed_assets.evaluate.nulls import NullMode, group_p_values
from bioembed_assets.evaluate.pairs import (
    PairRule,
    Rounding,
    ap_core,
    column_codes,
    combine_codes,
)
from bioembed_assets.evaluate.pairs import _check_features as _check_x
from bioembed_assets.profiles.aggregate import aggregate_to_wells
from bioembed_assets.schema import CONTROL_TYPE, MOA, PERTURBATION, ControlType

_BLOCK_ELEMS = 1 << 22  # similarities held per block (b x columns); read at call time


def _codes(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    return np.unique(labels.astype(str), return_inverse=True)[1].reshape(-1).astype(np.int64)


def average_precision_vs_controls(
    X: np.ndarray, perturbation: np.ndarray, is_negative_control: np.ndarray, *, rounding: Rounding = "copairs"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """copairs "phenotypic activity" AP per row: (ap, n_pos, n_total).

    Positives = other non-control rows of the same perturbation; negatives = all negative-control
    rows with a different perturbation label (copairs' reference-index recipe). Control rows get
    AP NaN, n_pos 0 and n_total = number of rows with a different perturbation (as copairs).
    Unlike copairs (and `pairs.average_precision`), data without any negative (or positive)
    pair does not raise: the rows get AP 1 (or NaN).
    """
    X = _check_x(X)
    n = X.shape[0]
    pert = np.asarray(perturbation)
    ctrl = np.asarray(is_negative_control, dtype=bool)
    if pert.shape != (n,) or ctrl.shape != (n,):
        raise ValueError(f"perturbation and is_negative_control need one entry per row ({n})")
    code = _codes(pert)
    ref = np.where(ctrl, np.arange(n), -1)
    ref = np.unique(ref, return_inverse=True)[1].reshape(-1).astype(np.int64)
    pos = PairRule(combine_codes([code, ref], n), ())
    neg = PairRule(None, (code, ref))
    ap, n_pos, n_neg = ap_core(X, pos, neg, rounding, _BLOCK_ELEMS, strict=False)
    return ap, n_pos, n_pos + n_neg


def average_precision_consistency(
    X: np.ndarray, labels: np.ndarray, *, rounding: Rounding = "copairs"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """copairs consistency AP per row (pos_sameby=[label], neg_diffby=[label]): (ap, n_pos, n_total)."""
    X = _check_x(X)
    code = _codes(labels)
    if code.size != X.shape[0]:
        raise ValueError(f"labels need one entry per row ({X.shape[0]}), got {code.size}")
    ap, n_pos, n_neg = ap_core(X, PairRule(code, ()), PairRule(None, (code,)), rounding, _BLOCK_ELEMS, strict=False)
    return ap, n_pos, n_pos + n_neg


def bh_fdr(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (statsmodels `fdr_bh` arithmetic: p / (i / n), running
    minimum from the largest, capped at 1); NaN stays NaN."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    if q.size == 0:
        return out
    order = np.argsort(q)
    adj = q[order] / (np.arange(1, q.size + 1) / float(q.size))
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    adj[adj > 1] = 1
    res = np.empty_like(q)
    res[order] = adj
    out[ok] = res
    return out


_MAP_SCHEMA = {
    "mean_average_precision": pl.Float64, "p_value": pl.Float64, "corrected_p_value": pl.Float64,
    "below_p": pl.Boolean, "below_corrected_p": pl.Boolean, "n_rows": pl.Int64,
}  # fmt: skip


def _map_columns(mAP: np.ndarray, p: np.ndarray, n_rows: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    q = bh_fdr(p)
    return {"mean_average_precision": mAP, "p_value": p, "corrected_p_value": q,
            "below_p": p < threshold, "below_corrected_p": q < threshold, "n_rows": n_rows.astype(np.int64)}  # fmt: skip


def _valid_rows(ap: np.ndarray, n_pos: np.ndarray, n_total: np.ndarray) -> np.ndarray:
    if (n_total < n_pos).any():
        raise ValueError(f"n_total < n_pos at row {int(np.argmax(n_total < n_pos))}")
    return ~np.isnan(ap) & (n_pos > 0)


def mean_average_precision(
    ap: np.ndarray,
    n_pos: np.ndarray,
    n_total: np.ndarray,
    groups: np.ndarray,
    null_size: int = 10000,
    seed: int = 0,
    threshold: float = 0.05,
    *,
    null: NullMode = "exact",
) -> pl.DataFrame:
    """mAP per group with permutation p-values and BH-corrected p-values.

    Rows with NaN AP or n_pos == 0 are dropped first (as copairs). `null` selects the null
    (`evaluate.nulls`): "exact" (default; exact where comb(L, M) <= null_size, P(null >= mAP))
    or "copairs" (copairs 0.5.5's numbers). Columns: group, mean_average_precision, p_value,
    corrected_p_value, below_p, below_corrected_p, n_rows; sorted by group.
    """
    if null_size < 1:
        raise ValueError(f"null_size must be >= 1, got {null_size}")
    ap = np.asarray(ap, dtype=np.float64)
    n_pos, n_total = np.asarray(n_pos, dtype=np.int64), np.asarray(n_total, dtype=np.int64)
    groups = np.asarray(groups)
    if not (ap.shape == n_pos.shape == n_total.shape == groups.shape) or ap.ndim != 1:
        raise ValueError("ap, n_pos, n_total and groups must be 1-D arrays of equal length")
    keep = _valid_rows(ap, n_pos, n_total)
    ap, n_pos, n_total, groups = ap[keep], n_pos[keep], n_total[keep], groups[keep]
    group_dtype = pl.Series(groups[:0]).dtype if groups.size else pl.String
    if ap.size == 0:
        return pl.DataFrame(schema={"group": group_dtype, **_MAP_SCHEMA})
    g_lab, g_code = np.unique(groups, return_inverse=True)
    g_code = g_code.reshape(-1)
    mAP, p = group_p_values(ap, n_pos, n_total, g_code, len(g_lab), null_size, seed, null)
    return pl.DataFrame({"group": g_lab, **_map_columns(mAP, p, np.bincount(g_code), threshold)})


def mean_average_precision_by(
    ap_df: pl.DataFrame,
    sameby: Sequence[str],
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    *,
    null: NullMode = "exact",
) -> pl.DataFrame:
    """copairs-style `mean_average_precision` on an AP table (the output of
    `evaluate.pairs.average_precision` or a recipe): one row per `sameby` group with the
    `sameby` columns, mean_average_precision, p_value, corrected_p_value, below_p,
    below_corrected_p and n_rows, sorted by `sameby`."""
    if isinstance(sameby, str):
        raise TypeError("sameby must be a list of column names")
    sameby = list(sameby)
    need = ["average_precision", "n_pos_pairs", "n_total_pairs"]
    missing = [c for c in [*need, *sameby] if c not in ap_df.columns]
    if missing or not sameby:
        raise ValueError(f"ap_df needs columns {need} and the sameby columns {sameby}; missing {missing}")
    ap = ap_df["average_precision"].to_numpy().astype(np.float64)
    n_pos = ap_df["n_pos_pairs"].to_numpy().astype(np.int64)
    n_total = ap_df["n_total_pairs"].to_numpy().astype(np.int64)
    keep = _valid_rows(ap, n_pos, n_total)
    sub = ap_df.filter(pl.Series(keep))
    keys = sub.select(sameby)
    if sub.height == 0:
        return keys.clear().with_columns([pl.lit(None, dtype=t).alias(c) for c, t in _MAP_SCHEMA.items()])
    g = combine_codes([column_codes(keys, c) for c in sameby], keys.height)
    n_groups = int(g.max()) + 1
    mAP, p = group_p_values(ap[keep], n_pos[keep], n_total[keep], g, n_groups, null_size, seed, null)
    first = np.full(n_groups, -1)
    first[g[::-1]] = np.arange(g.size)[::-1]
    out = keys[first].with_columns(**{k: pl.Series(k, v) for k, v in
                                      _map_columns(mAP, p, np.bincount(g, minlength=n_groups), threshold).items()})
    return out.sort(sameby)


def replicate_map(
    meta: pl.DataFrame,
    X: np.ndarray,
    pert_col: str = PERTURBATION,
    control_col: str = CONTROL_TYPE,
    null_size: int = 10000,
    seed: int = 0,
    threshold: float = 0.05,
    *,
    null: NullMode = "exact",
    neg_sameby: Sequence[str] = (),
    pos_diffby: Sequence[str] = (),
) -> pl.DataFrame:
    """Phenotypic activity: replicate retrieval against negative controls, mAP per perturbation.

    Negative controls are rows with `control_col == "negative"`; positive controls are scored
    like treatments. Perturbations with a single replicate have no positives and are omitted.
    `neg_sameby=[plate]` restricts negatives to the query's plate (JUMP), `pos_diffby=[plate]`
    drops same-plate replicate pairs. The output's first column is named `pert_col`.
    """
    if meta[pert_col].null_count():
        raise ValueError(f"column {pert_col!r} has {meta[pert_col].null_count()} null values")
    X = _check_x(X, meta.height)
    n = meta.height
    pert = meta[pert_col].cast(pl.String).to_numpy()
    negcon = (meta[control_col] == ControlType.NEGATIVE).fill_null(False).to_numpy()
    code = _codes(pert)
    ref = np.unique(np.where(negcon, np.arange(n), -1), return_inverse=True)[1].reshape(-1).astype(np.int64)
    pos = PairRule(combine_codes([code, ref], n), tuple(column_codes(meta, c) for c in pos_diffby))
    neg = PairRule(combine_codes([column_codes(meta, c) for c in neg_sameby], n) if neg_sameby else None, (code, ref))
    ap, n_pos, n_neg = ap_core(X, pos, neg, "copairs", _BLOCK_ELEMS, strict=False)  # no controls: AP 1, as before
    return mean_average_precision(ap, n_pos, n_pos + n_neg, pert, null_size, seed, threshold, null=null).rename(
        {"group": pert_col})


def fraction_retrieved(map_df: pl.DataFrame) -> float:
    """Share of groups whose BH-corrected p-value is below the threshold (NaN if empty)."""
    if map_df.height == 0:
        return float("nan")
    return float(map_df["below_corrected_p"].cast(pl.Float64).mean())


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
    *,
    null: NullMode = "exact",
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
    out = mean_average_precision(ap, n_pos, n_total, moa, null_size, seed, threshold, null=null)
    return out.rename({"group": moa_col})
