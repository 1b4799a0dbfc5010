"""`feature_select`: drop uninformative or redundant feature columns, as pycytominer `feature_select`.

Operations run in the order given, each on the features the previous ones kept (as pycytominer
does); statistics come from the fit rows (`on=all`, default, or `on=controls`):

- `nan`: drop features whose fraction of NaN rows is above `na_cutoff` (pycytominer
  `drop_na_columns`; default cutoff 0 here, 0.05 in pycytominer: later numeric steps reject NaN).
- `variance`: drop near-constant features by frequency and uniqueness (pycytominer
  `frequency_threshold`, JUMP's `variance_threshold`): NaN values are ignored; frequency ratio =
  count of the second most common value / count of the most common (0 with fewer than two
  distinct values), dropped when below `freq_cut`; unique ratio = distinct values / fit rows,
  dropped when below `unique_cut`.
- `min_variance`: drop features whose population variance (NaN ignored) is <= `min_variance`
  (pycytominer 1.7's `variance_threshold`).
- `variant`: keep only features that vary on the negative controls of every plate, as the JUMP
  recipe's `var` step (`select_variant_features`): on each plate's control rows, MAD (unscaled,
  NaN ignored) != 0 and |MAD / median| > `coef_var_cut` (1e-3; a zero median counts as 0, so the
  feature is dropped). Plates without control rows among the fit rows are skipped. This is what keeps
  a per-plate `mad_robustize` from dividing by a zero MAD on few controls.
- `correlation`: Pearson correlation matrix of the features (pairwise-complete rows when NaN are
  present, as pandas); every feature gets the sum of its absolute correlations; for every pair
  with correlation (signed) above `corr_threshold`, the member with the larger sum is dropped,
  all pairs at once (pycytominer `correlation_threshold`; equal sums, e.g. of duplicated columns,
  are ordered by numpy's default quicksort, as pandas' `sort_values` orders them there).
- `blocklist`: drop the listed feature names that are present; `@default` stands for the
  known-noisy CellProfiler features of pycytominer's default blocklist (`default_blocklist.txt`).

The kept feature names are stored; `transform` selects those columns (NaN may pass through
kept columns; the next numeric step rejects it, naming the row and feature).
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from bioembed_assets.profiles.steps import FitData, Opt, Step, choice_opt, float_opt, list_opt

OPS = ("nan", "variance", "min_variance", "variant", "correlation", "blocklist")
_OP_OPTIONS = {"nan": ("na_cutoff",), "variance": ("freq_cut", "unique_cut"), "min_variance": ("min_variance",),
               "variant": ("coef_var_cut",), "correlation": ("corr_threshold",), "blocklist": ("blocklist",)}
_BLOCKLIST_FILE = Path(__file__).with_name("default_blocklist.txt")
_COLUMN_BLOCK = 64  # columns sorted at a time by the variance operation


@cache
def default_blocklist() -> tuple[str, ...]:
    """Feature names of the packaged default blocklist (`@default`)."""
    lines = (ln.split("#", 1)[0].strip() for ln in _BLOCKLIST_FILE.read_text().splitlines())
    return tuple(ln for ln in lines if ln)


def _parse_ops(v: Any) -> tuple[str, ...]:
    ops = tuple(v) if isinstance(v, (list, tuple)) else (str(v),)
    ops = tuple(o.lower() for o in ops)
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ValueError(f"feature_select: unknown operation(s) {unknown}; known operations: {list(OPS)}")
    if len(set(ops)) != len(ops):
        raise ValueError(f"feature_select: operation listed twice in {list(ops)}")
    return ops


# ----------------------------------------------------------------------------------------- statistics


def nan_fraction(Z: np.ndarray) -> np.ndarray:
    return np.isnan(Z).sum(axis=0) / max(Z.shape[0], 1)


def nan_variance(Z: np.ndarray) -> np.ndarray:
    """Population variance of each column over its non-NaN values (NaN for all-NaN columns)."""
    Z = np.asarray(Z, dtype=np.float64)
    M = ~np.isnan(Z)
    cnt = M.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = np.where(M, Z, 0.0).sum(axis=0) / cnt
        dev = np.where(M, Z - mu, 0.0)
        return (dev * dev).sum(axis=0) / cnt


def frequency_stats(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: (count of 2nd most common value / count of most common, number of distinct
    values), NaN ignored; the ratio is 0 for columns with fewer than two distinct values."""
    n, d = Z.shape
    ratio, n_unique = np.zeros(d), np.zeros(d, dtype=np.int64)
    for lo in range(0, d, _COLUMN_BLOCK):
        T = np.sort(np.ascontiguousarray(Z[:, lo : lo + _COLUMN_BLOCK].T), axis=1)  # NaN sort last
        b = T.shape[0]
        valid = ~np.isnan(T)
        start = valid.copy()
        start[:, 1:] &= T[:, 1:] != T[:, :-1]
        runs = start.sum(axis=1)
        n_unique[lo : lo + b] = runs
        # run lengths, grouped by column (row-major order of the run starts)
        pos = np.flatnonzero(start)
        col = pos // n
        nxt = np.append(pos[1:], 0)
        last = np.append(col[1:] != col[:-1], True)
        length = np.where(last, col * n + valid.sum(axis=1)[col], nxt) - pos
        has = runs > 0
        first = np.concatenate([[0], np.cumsum(runs)[:-1]])[has]
        top1 = np.maximum.reduceat(length, first)
        n_top = np.add.reduceat((length == np.repeat(top1, runs[has])).astype(np.int64), first)
        below = np.where(length < np.repeat(top1, runs[has]), length, 0)
        top2 = np.where(n_top > 1, top1, np.maximum.reduceat(below, first))
        ratio[lo + np.flatnonzero(has)] = np.where(runs[has] > 1, top2 / top1, 0.0)
    return ratio, n_unique


def invariant_on_controls(Z: np.ndarray, plate: np.ndarray, control: np.ndarray, cut: float) -> np.ndarray:
    """Columns that some plate's control rows leave (nearly) constant: MAD == 0 or |MAD / median| <= cut
    (a zero median: ratio 0), MAD unscaled, NaN ignored (the JUMP recipe's variant-feature rule)."""
    drop = np.zeros(Z.shape[1], dtype=bool)
    for g in np.unique(plate[control]):
        C = np.asarray(Z[control & (plate == g)], dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN statistics, dropped below
            med = np.nanmedian(C, axis=0)
            mad = np.nanmedian(np.abs(C - med), axis=0)
            ratio = np.nan_to_num(np.abs(mad / med), nan=0.0, posinf=0.0)
        drop |= ~(mad != 0) | ~(ratio > cut)
    return drop


def pearson(Z: np.ndarray) -> np.ndarray:
    """Pearson correlation matrix of the columns; pairwise-complete rows when NaN are present;
    NaN for pairs without variance."""
    Z = np.asarray(Z, dtype=np.float64)
    M = ~np.isnan(Z)
    with np.errstate(invalid="ignore", divide="ignore"):
        if M.all():
            C = Z - Z.mean(axis=0)
            ss = np.sqrt((C * C).sum(axis=0))
            R = (C.T @ C) / np.outer(ss, ss)
        else:
            mu = np.where(M, Z, 0.0).sum(axis=0) / np.maximum(M.sum(axis=0), 1)
            X0 = np.where(M, Z - mu, 0.0)
            Mf = M.astype(np.float64)
            N = Mf.T @ Mf
            S = X0.T @ Mf  # S[i, j] = sum of x_i over rows where both i and j are present
            Q = (X0 * X0).T @ Mf
            P = X0.T @ X0
            cov = P - S * S.T / N
            var_i, var_j = Q - S * S / N, Q.T - S.T * S.T / N
            R = cov / np.sqrt(var_i * var_j)
            R[N < 2] = np.nan
        R[~np.isfinite(R)] = np.nan
    return np.clip(R, -1.0, 1.0)


def correlated_to_drop(R: np.ndarray, threshold: float) -> np.ndarray:
    """Indices dropped by pycytominer's correlation_threshold rule on correlation matrix R."""
    total = np.nansum(np.abs(R), axis=0)
    rank = np.empty(total.size, dtype=np.int64)
    rank[np.argsort(total, kind="quicksort")] = np.arange(total.size)  # pandas' default sort: same order of ties
    with np.errstate(invalid="ignore"):
        a, b = np.nonzero(np.tril(R > threshold, k=-1))
    return np.unique(np.where(rank[a] > rank[b], a, b))


# ----------------------------------------------------------------------------------------- the step


class FeatureSelect(Step):
    name = "feature_select"
    positional = Opt("ops", ("nan", "variance", "correlation"), _parse_ops, lambda t: ",".join(t),
                     help=f"operations, in order: {', '.join(OPS)}")
    options = (
        choice_opt("on", ("all", "controls"), "all", help="rows the statistics are computed on"),
        float_opt("na_cutoff", 0.0, lo=0.0, hi=1.0, help="nan: drop features with a larger NaN fraction"),
        float_opt("freq_cut", 0.05, lo=0.0, hi=1.0, help="variance: minimum 2nd/1st most common value count ratio"),
        float_opt("unique_cut", 0.01, lo=0.0, hi=1.0, help="variance: minimum distinct values / rows"),
        float_opt("min_variance", 1e-6, lo=0.0, help="min_variance: drop features with variance <= this"),
        float_opt("coef_var_cut", 1e-3, lo=0.0, help="variant: minimum |MAD / median| on every plate's controls"),
        float_opt("corr_threshold", 0.9, lo=0.0, hi=1.0, help="correlation: drop one of each pair above this"),
        list_opt("blocklist", ("@default",), help="blocklist: feature names to drop; @default = packaged list"),
    )
    numeric = False
    summary = "drop features by NaN fraction, frequency/uniqueness, variance, correlation, blocklist"

    def check_options(self) -> None:
        ops = self.opts["ops"]
        if not ops:
            raise ValueError(f"feature_select needs at least one operation: {list(OPS)}")

    def relevant_options(self) -> list[str]:
        return ["on"] + [name for op in self.opts["ops"] for name in _OP_OPTIONS[op]]

    def check_given(self, given: set[str]) -> None:
        """Options given in the recipe string must belong to a listed operation."""
        wanted = set(self.relevant_options())
        stray = sorted(given - wanted - {"ops"})
        if stray:
            owners = {name: op for op, names in _OP_OPTIONS.items() for name in names}
            hint = ", ".join(f"{s} needs operation {owners[s]!r}" for s in stray if s in owners)
            raise ValueError(f"feature_select: option(s) {stray} do not apply to operations {list(self.opts['ops'])}"
                             + (f" ({hint})" if hint else ""))

    def blocklist_names(self) -> set[str]:
        out: set[str] = set()
        for item in self.opts["blocklist"]:
            if item.startswith("@"):
                if item != "@default":
                    raise ValueError(f"feature_select: unknown named blocklist {item!r}; known: ['@default']")
                out.update(default_blocklist())
            else:
                out.add(item)
        return out

    def fit(self, data: FitData) -> None:
        Z = data.X
        names = list(data.features)
        if np.isinf(Z).any():
            r, c = (int(v[0]) for v in np.nonzero(np.isinf(Z)))
            raise ValueError(f"feature_select: infinite value at row {int(data.rows[r])}, feature {names[c]!r}; "
                             "only NaN is handled (by the nan operation)")
        keep = np.arange(len(names))
        excluded: dict[str, list[str]] = {}
        o = self.opts
        for op in o["ops"]:
            sub = Z[:, keep]
            if op == "nan":
                drop = nan_fraction(sub) > o["na_cutoff"]
            elif op == "variance":
                ratio, n_unique = frequency_stats(sub)
                drop = (ratio < o["freq_cut"]) | (n_unique / max(Z.shape[0], 1) < o["unique_cut"])
            elif op == "min_variance":
                drop = ~(nan_variance(sub) > o["min_variance"])
            elif op == "variant":
                drop = invariant_on_controls(sub, data.batch, data.control, o["coef_var_cut"])
            elif op == "correlation":
                drop = np.zeros(keep.size, dtype=bool)
                drop[correlated_to_drop(pearson(sub), o["corr_threshold"])] = True
            else:
                block = self.blocklist_names()
                drop = np.array([names[j] in block for j in keep], dtype=bool)
            excluded[op] = [names[j] for j in keep[drop]]
            keep = keep[~drop]
        if keep.size == 0:
            raise ValueError(f"feature_select: operations {list(o['ops'])} removed all {len(names)} features "
                             f"(on {Z.shape[0]} fit rows); excluded per operation: "
                             f"{ {k: len(v) for k, v in excluded.items()} }")
        self.in_features_ = names
        self.keep_ = keep
        self.excluded_ = excluded
        self.fitted = True

    def apply(self, Z: np.ndarray, tidx: np.ndarray, tables: dict[str, np.ndarray]) -> np.ndarray:
        return Z[:, self.keep_]

    def output_features(self, features: list[str]) -> list[str]:
        return [features[j] for j in self.keep_]

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"in_features": self.in_features_, "excluded": self.excluded_}, {"keep": self.keep_}

    def load_state(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.in_features_, self.excluded_ = list(params["in_features"]), dict(params["excluded"])
        self.keep_ = arrays["keep"].astype(np.int64)
        self.fitted = True

