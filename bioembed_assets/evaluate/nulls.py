"""Null distributions of average precision and mAP p-values (in memory, one null per (M, L)).

Under the null, a query's M positives sit at uniformly random positions of its rank list of
length L = M + N, so AP = (1/M) sum_i i / r_i of a uniformly random M-subset of ranks. A group's
statistic is its mAP; its null follows copairs' dependence structure in both modes: members with
the same configuration (M, L) share one null draw (their null vectors are identical) and
different configurations are independent; the group null is the (weighted) mean (peers.md §2.6).

Modes (`null=`):

- `"exact"` (default). A configuration with comb(L, M) <= null_size is enumerated: its null is the
  exact AP distribution (copairs issue #105). A group whose members share one configuration, or
  whose configurations are all enumerated and few-valued (support product <= 2**20), gets the
  exact p-value P(null >= mAP). Other groups get a Monte-Carlo p-value
  (#{null_j >= mAP} + 1) / (null_size + 1) from `null_size` draws per configuration (exact
  configurations are sampled from their exact distribution; others by drawing min(M, N) distinct
  ranks, O(min(M, N)) per draw). Ties count as "at least as extreme" (within 1e-12), so the
  p-value is valid (P(p <= a) <= a under the null). Draws come from `default_rng([seed, M, L])`:
  a configuration's null does not depend on which other configurations exist.
- `"copairs"`: copairs 0.5.5 bit for bit (as with a fresh `cache_dir`): configurations sorted as
  `np.unique(axis=0)` sorts them, per-configuration seeds `default_rng(seed).integers(8096, size=n)`,
  nulls from a tiled `arange(L)` shuffled row-wise by `Generator.permuted` (generated in row chunks,
  which consumes the stream identically), float32 AP; the group null is the float32 mean of the
  members' vectors in row order; p = (#{null_j > float32(mAP)} + 1) / (null_size + 1) with a strict
  ">" (copairs #49: a perfect mAP always gets 1/(null_size+1), even when the null has mass at 1;
  a query with positives but no negatives then looks significant). Cost O(null_size * L) per
  configuration, memory O(chunk * L).

Differences between the modes: "exact" counts ties (>=) and has no Monte-Carlo error where it
enumerates, so it never calls a perfect mAP significant when the null reaches it often (e.g. M = L,
no negatives: p = 1); "copairs" reproduces copairs' numbers, including their optimism at ties.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np

NullMode = Literal["exact", "copairs"]
NULL_MODES: tuple[str, ...] = ("exact", "copairs")
TIE_TOL = 1e-12
"""Two APs / mAPs closer than this are the same value (float64 rounding of equal rationals)."""
CONVOLUTION_CAP = 1 << 20
_CHUNK_ELEMS = 1 << 23


# --------------------------------------------------------------------------- single configurations


def copairs_null(n_pos: int, n_total: int, null_size: int, seed: int) -> np.ndarray:
    """copairs' null for one configuration: float32 APs of `null_size` random rank lists, from
    `default_rng(seed)` permuting tiled `arange(n_total)` rows (generated in chunks of rows)."""
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if n_total < 2**16 else np.uint32
    base = np.arange(n_total, dtype=dtype)
    num = np.arange(1, n_pos + 1, dtype=np.float32)
    out = np.empty(null_size, dtype=np.float32)
    step = max(1, _CHUNK_ELEMS // max(n_total, 1))
    for s in range(0, null_size, step):
        idx = np.tile(base, (min(step, null_size - s), 1))
        rng.permuted(idx, axis=1, out=idx)
        rel = np.sort(idx[:, :n_pos], axis=1)
        out[s : s + idx.shape[0]] = ((num / (rel + 1)).sum(axis=1) / n_pos).astype(np.float32)
    return out


def _harmonic(n: int) -> np.ndarray:
    h = np.zeros(n + 1)
    h[1:] = np.cumsum(1.0 / np.arange(1, n + 1))
    return h


def ap_from_ranks(pos: np.ndarray, n_pos: int, n_total: int, negatives: bool = False) -> np.ndarray:
    """AP of rank lists given the sorted 0-based positions (rows) of the positives, or of the
    negatives when `negatives` (then AP = 1 - (1/M) sum_j j (H(n_{j+1}) - H(n_j + 1)), n_{N+1} = L)."""
    pos = np.asarray(pos, dtype=np.int64)
    if not negatives:
        return (np.arange(1, n_pos + 1) / (pos + 1)).sum(axis=1) / n_pos
    h = _harmonic(n_total)
    nxt = np.concatenate([pos[:, 1:], np.full((pos.shape[0], 1), n_total)], axis=1)
    j = np.arange(1, pos.shape[1] + 1)
    return 1.0 - (j * (h[nxt] - h[pos + 1])).sum(axis=1) / n_pos


def _subsets(n: int, k: int) -> np.ndarray:
    """All sorted k-subsets of range(n), one per row (lexicographic)."""
    out = np.arange(n - k + 1, dtype=np.int64)[:, None]
    for j in range(1, k):
        last = out[:, -1]
        cnt = (n - k + j) - last
        start = np.repeat(last + 1, cnt)
        offs = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        out = np.column_stack([np.repeat(out, cnt, axis=0), start + offs])
    return out


def _merge(values: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(values, kind="stable")
    v, p = values[order], probs[order]
    start = np.concatenate([[0], np.flatnonzero(np.diff(v) > TIE_TOL / 8) + 1])
    return v[start], np.add.reduceat(p, start)


def exact_null(n_pos: int, n_total: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact null AP distribution of a configuration by enumerating its comb(L, M) rank sets:
    (sorted distinct values, probabilities). Enumerates min(M, N)-subsets."""
    n_neg = n_total - n_pos
    if n_pos < 1 or n_neg < 0:
        raise ValueError(f"invalid configuration M={n_pos}, L={n_total}")
    if n_neg == 0:
        return np.ones(1), np.ones(1)
    k = min(n_pos, n_neg)
    ranks = _subsets(n_total, k)
    values = ap_from_ranks(ranks, n_pos, n_total, negatives=k < n_pos)
    return _merge(values, np.full(values.size, 1.0 / values.size))


def _draw_subsets(rng: np.random.Generator, n: int, k: int, rows: int) -> np.ndarray:
    """`rows` uniformly random sorted k-subsets of range(n) (k <= n / 2)."""
    if k * k <= n:  # iid draws; rows with a repeat are redrawn (probability < 1/2)
        out = np.sort(rng.integers(0, n, size=(rows, k)), axis=1)
        bad = (np.diff(out, axis=1) == 0).any(axis=1)
        while bad.any():
            redo = np.sort(rng.integers(0, n, size=(int(bad.sum()), k)), axis=1)
            out[bad] = redo
            bad[bad] = (np.diff(redo, axis=1) == 0).any(axis=1)
        return out
    # enough iid draws to hold k distinct values (coupon collector), then a uniform k-subset of
    # the distinct values: the result is invariant under relabelling ranks, hence uniform
    draws = min(int(math.ceil(-n * math.log1p(-k / n) * 1.15)) + 16, 8 * n)
    out = np.empty((rows, k), dtype=np.int64)
    todo = np.arange(rows)
    while todo.size:
        d = np.sort(rng.integers(0, n, size=(todo.size, draws)), axis=1)
        dup = np.zeros(d.shape, dtype=bool)
        dup[:, 1:] = d[:, 1:] == d[:, :-1]
        ok = draws - dup.sum(axis=1) >= k
        keys = rng.random(d.shape)
        keys[dup] = 2.0
        pick = np.argpartition(keys[ok], k - 1, axis=1)[:, :k]
        out[todo[ok]] = np.sort(np.take_along_axis(d[ok], pick, axis=1), axis=1)
        todo = todo[~ok]
    return out


def sample_null(n_pos: int, n_total: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` float64 AP draws of a configuration (uniform min(M, N)-subsets of ranks)."""
    n_neg = n_total - n_pos
    if n_neg == 0:
        return np.ones(size)
    k = min(n_pos, n_neg)
    out = np.empty(size)
    step = max(1, _CHUNK_ELEMS // (8 * k))
    for s in range(0, size, step):
        r = min(step, size - s)
        out[s : s + r] = ap_from_ranks(_draw_subsets(rng, n_total, k, r), n_pos, n_total, negatives=k < n_pos)
    return out


def n_rank_sets(n_pos: int, n_total: int, cap: int) -> int:
    """comb(L, M), or cap + 1 when it exceeds `cap` (without computing huge binomials)."""
    k = min(n_pos, n_total - n_pos)
    if k < 0:
        return 0
    log = math.lgamma(n_total + 1) - math.lgamma(k + 1) - math.lgamma(n_total - k + 1)
    if log > math.log(cap) + 1:
        return cap + 1
    return min(math.comb(n_total, k), cap + 1)


# --------------------------------------------------------------------------- groups


def _count_tail(vecs_rows: np.ndarray, thr: np.ndarray, strict: bool) -> np.ndarray:
    """#{v > thr} (strict) or #{v >= thr} per row of `vecs_rows`."""
    return np.count_nonzero(vecs_rows > thr[:, None] if strict else vecs_rows >= thr[:, None], axis=1)


def _tuple_counts(
    V: np.ndarray,
    T: np.ndarray,
    W: np.ndarray | None,
    row_of_group: np.ndarray,
    thr: np.ndarray,
    strict: bool,
) -> np.ndarray:
    """Tail counts of group nulls built from rows of `V`: group g uses tuple row r = row_of_group[g]
    of config ids T[r] and weights W[r] (weighted sum, float64) or, with W None, copairs' float32
    mean in column order. Rows shared by many groups are sorted once and binary-searched."""
    u, k = T.shape
    S = V.shape[1]
    counts = np.empty(row_of_group.size, dtype=np.int64)
    order = np.argsort(row_of_group, kind="stable")
    bounds = np.searchsorted(row_of_group[order], np.arange(u + 1))
    per_row = np.diff(bounds)
    bs = max(1, (1 << 23) // S)
    for r0 in range(0, u, bs):
        rows = np.arange(r0, min(u, r0 + bs))
        if W is None:
            acc = V[T[rows, 0]].copy()
            for j in range(1, k):
                acc += V[T[rows, j]]
            np.true_divide(acc, np.intp(k), out=acc, casting="unsafe")  # as numpy's float32 mean
        else:
            acc = W[rows, 0, None] * V[T[rows, 0]]
            for j in range(1, k):
                acc += W[rows, j, None] * V[T[rows, j]]
        heavy = per_row[rows] >= 16
        for i in np.flatnonzero(heavy):
            g = order[bounds[rows[i]] : bounds[rows[i] + 1]]
            srt = np.sort(acc[i])
            counts[g] = S - np.searchsorted(srt, thr[g], "right" if strict else "left")
        light = order[bounds[r0] : bounds[rows[-1] + 1]]
        light = light[~heavy[row_of_group[light] - r0]]
        gs = max(1, (1 << 23) // S)
        for a in range(0, light.size, gs):
            g = light[a : a + gs]
            counts[g] = _count_tail(acc[row_of_group[g] - r0], thr[g], strict)
    return counts


def _signature_rows(group: np.ndarray, conf: np.ndarray, n_groups: int, n_conf: int, ordered: bool):
    """Per group, the tuple of member configurations: ordered (row order, for copairs' float32
    mean) or as a multiset (distinct configs + counts). Groups are bucketed by tuple length.
    Yields (groups, T unique tuples, counts-or-None, row_of_group)."""
    if ordered:
        by_group = conf[np.argsort(group, kind="stable")]
        sizes = np.bincount(group, minlength=n_groups)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        for k in np.unique(sizes):
            gs = np.flatnonzero(sizes == k)
            T = by_group[starts[gs][:, None] + np.arange(k)]
            uT, inv = np.unique(T, axis=0, return_inverse=True)
            yield gs, uT, None, inv.reshape(-1)
        return
    key, cnt = np.unique(group.astype(np.int64) * n_conf + conf, return_counts=True)
    kg, kc = key // n_conf, key % n_conf
    n_distinct = np.bincount(kg, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(n_distinct)[:-1]])
    for k in np.unique(n_distinct):
        gs = np.flatnonzero(n_distinct == k)
        idx = starts[gs][:, None] + np.arange(k)
        sig = np.concatenate([kc[idx], cnt[idx]], axis=1)
        usig, inv = np.unique(sig, axis=0, return_inverse=True)
        yield gs, usig[:, :k], usig[:, k:], inv.reshape(-1)


def group_p_values(
    ap: np.ndarray,
    n_pos: np.ndarray,
    n_total: np.ndarray,
    group: np.ndarray,
    n_groups: int,
    null_size: int,
    seed: int = 0,
    mode: NullMode = "exact",
    max_workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(mAP, p-value) of every group 0..n_groups-1 from the rows' AP and configuration.

    Rows must be valid (AP not NaN, n_pos >= 1, n_total >= n_pos) and in the caller's row order
    (copairs mode averages member nulls in that order). See the module docstring for the modes.
    """
    if mode not in NULL_MODES:
        raise ValueError(f"null must be one of {NULL_MODES}, got {mode!r}")
    if null_size < 1:
        raise ValueError(f"null_size must be >= 1, got {null_size}")
    group = np.asarray(group, dtype=np.int64)
    sizes = np.bincount(group, minlength=n_groups)
    if (sizes == 0).any():
        raise ValueError(f"group {int(np.argmax(sizes == 0))} has no rows")
    mAP = np.bincount(group, weights=ap, minlength=n_groups) / sizes
    confs, conf = np.unique(np.stack([n_pos, n_total], axis=1), axis=0, return_inverse=True)
    conf = conf.reshape(-1)
    workers = max_workers or min(len(confs), os.cpu_count() or 1)
    p = np.empty(n_groups)
    if mode == "copairs":
        seeds = np.random.default_rng(seed).integers(8096, size=len(confs))
        with ThreadPoolExecutor(workers) as ex:
            V = np.stack(list(ex.map(lambda i: copairs_null(int(confs[i, 0]), int(confs[i, 1]), null_size, seeds[i]),
                                     range(len(confs)))))
        thr = mAP.astype(np.float32)  # copairs compares its float32 null with the mAP as float32
        for gs, T, _, row in _signature_rows(group, conf, n_groups, len(confs), ordered=True):
            p[gs] = (_tuple_counts(V, T, None, row, thr[gs], strict=True) + 1) / (null_size + 1)
        return mAP, p

    thr = mAP - TIE_TOL
    exact: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for c, (m, total) in enumerate(confs):
        if n_rank_sets(int(m), int(total), null_size) <= null_size:
            exact[c] = exact_null(int(m), int(total))
    samples: dict[int, np.ndarray] = {}

    def sample(c: int) -> np.ndarray:
        if c not in samples:
            m, total = int(confs[c, 0]), int(confs[c, 1])
            rng = np.random.default_rng([seed, m, total])
            if c in exact:
                v, pr = exact[c]
                cdf = np.cumsum(pr)
                samples[c] = v[np.minimum(np.searchsorted(cdf, rng.random(null_size) * cdf[-1], "right"), v.size - 1)]
            else:
                samples[c] = sample_null(m, total, null_size, rng)
        return samples[c]

    def tail(v: np.ndarray, pr: np.ndarray, t: np.ndarray) -> np.ndarray:
        right = np.concatenate([np.cumsum(pr[::-1])[::-1], [0.0]])
        return np.minimum(right[np.searchsorted(v, t, "left")], 1.0)

    for gs, T, C, row in _signature_rows(group, conf, n_groups, len(confs), ordered=False):
        k = T.shape[1]
        by_row = np.argsort(row, kind="stable")
        bounds = np.searchsorted(row[by_row], np.arange(T.shape[0] + 1))
        W = C / C.sum(axis=1, keepdims=True)
        sampled_rows = []
        for r in range(T.shape[0]):
            g = gs[by_row[bounds[r] : bounds[r + 1]]]
            cs = [int(c) for c in T[r]]
            if k == 1 and cs[0] not in exact:  # one sampled configuration: its sorted draws
                srt = np.sort(sample(cs[0]))
                p[g] = (null_size - np.searchsorted(srt, thr[g], "left") + 1) / (null_size + 1)
                continue
            conv = None  # one configuration is its own exact null; several are convolved
            if all(c in exact for c in cs):
                conv = exact[cs[0]] if k == 1 else _convolve([exact[c] for c in cs], W[r])
            if conv is None:
                sampled_rows.append(r)
            else:
                p[g] = tail(*conv, thr[g])
        if sampled_rows:
            sr = np.asarray(sampled_rows)
            used, Tc = np.unique(T[sr], return_inverse=True)
            V = np.stack([sample(int(c)) for c in used])
            remap = np.full(T.shape[0], -1)
            remap[sr] = np.arange(sr.size)
            sel = remap[row] >= 0
            g = gs[sel]
            cnt = _tuple_counts(V, Tc.reshape(sr.size, k), W[sr], remap[row[sel]], thr[g], strict=False)
            p[g] = (cnt + 1) / (null_size + 1)
    return mAP, p


def _convolve(dists: list[tuple[np.ndarray, np.ndarray]], weights: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Distribution of sum_c w_c A_c for independent discrete A_c, or None when too many values."""
    vals, probs = np.zeros(1), np.ones(1)
    for (v, pr), w in zip(dists, weights):
        if vals.size * v.size > CONVOLUTION_CAP:
            return None
        vals, probs = _merge((vals[:, None] + w * v[None, :]).ravel(), (probs[:, None] * pr[None, :]).ravel())
    return vals, probs
