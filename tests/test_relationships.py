"""Known-relationship recall against a direct numpy implementation of EFAAR's procedure."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from bioembed_assets.evaluate import relationships as rel_mod
from bioembed_assets.evaluate.relationships import known_relationship_recall, relationship_recall


def _efaar_reference(P: np.ndarray, names: list[str], pairs: list[tuple[str, str]], thresholds) -> dict[str, float]:
    """EFAAR `known_relationship_benchmark` written out directly: full cosine matrix, upper
    triangle as the null, sorted/deduplicated/present pairs as the query, searchsorted recall."""
    unit = P / np.linalg.norm(P, axis=1, keepdims=True)
    cos = unit @ unit.T
    null = np.sort(cos[np.triu_indices(len(names), k=1)])
    idx = {n: i for i, n in enumerate(names)}
    clean = {tuple(sorted(p)) for p in pairs if p[0] != p[1]}
    clean = sorted(p for p in clean if p[0] in idx and p[1] in idx)
    q = np.array([cos[idx[a], idx[b]] for a, b in clean])
    left = np.searchsorted(null, q, side="left") / len(null)
    right = np.searchsorted(null, q, side="right") / len(null)
    out = {"null_distribution_size": float(len(null)), "query_distribution_size": float(len(q))}
    for t in thresholds:
        lo, hi = min(t), max(t)
        out[f"recall_{lo}_{hi}"] = float(((right <= lo) | (left >= hi)).sum() / len(q))
    return out


def test_hand_checked_five_entities() -> None:
    # angles 0, 10, 50, 90, 180 degrees: 10 null similarities, all distinct
    ang = np.deg2rad([0, 10, 50, 90, 180])
    P = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    names = ["a", "b", "c", "d", "e"]
    # (a, b) is the most similar pair (top 10 %), (a, e) the least (bottom 10 %), (b, d) in between
    res = relationship_recall(P, names, [("b", "a"), ("a", "e"), ("b", "d"), ("a", "b"), ("c", "c"), ("a", "zz")],
                              thresholds=[(0.1, 0.9)], min_entities=2)
    assert res.metrics == {"null_distribution_size": 10.0, "query_distribution_size": 3.0, "recall_0.1_0.9": 2 / 3}
    assert res.pairs.select("entity1", "entity2").rows() == [("a", "b"), ("a", "e"), ("b", "d")]
    assert res.pairs["tail_0.1_0.9"].to_list() == [True, True, False]
    np.testing.assert_allclose(res.pairs["cosine_sim"], np.cos(np.deg2rad([10, 180, 80])), atol=1e-12)
    # (0.05, 0.95) on 10 values: bottom tail needs #{null <= q} <= 0 (impossible), top tail
    # #{null < q} >= 9.5 (impossible): nothing is recalled
    res = relationship_recall(P, names, [("a", "b"), ("a", "e")], thresholds=[(0.05, 0.95)], min_entities=2)
    assert res.metrics["recall_0.05_0.95"] == 0.0


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_direct_efaar_procedure(dtype) -> None:
    rng = np.random.default_rng(0)
    n, d = 150, 24
    names = [f"g{i:03d}" for i in range(n)]
    P = rng.normal(size=(n, d)) + rng.normal(size=(1, d))
    # related pairs are made similar; reversed/duplicate/self/missing pairs are cleaned up
    pairs = []
    for _ in range(120):
        a, b = rng.choice(n, 2, replace=False)
        P[b] = 0.5 * P[b] + 0.5 * P[a] if rng.random() < 0.5 else P[b]
        pairs.append((names[a], names[b]))
    pairs += [(b, a) for a, b in pairs[:10]] + [("g000", "g000"), ("g001", "missing")]
    thresholds = [(0.05, 0.95), (0.1, 0.9), (0.2, 0.7)]
    ref = _efaar_reference(P.astype(dtype).astype(np.float64), names, pairs, thresholds)
    res = relationship_recall(P.astype(dtype), names, pairs, thresholds, dtype=dtype, block_elems=997)
    assert set(res.metrics) == set(ref)
    for k, v in ref.items():
        assert res.metrics[k] == pytest.approx(v, abs=1e-12 if dtype == np.float64 else 1 / 120), k
    assert ref["recall_0.05_0.95"] > 0.2  # the planted relationships stand out


def test_ties_follow_searchsorted_semantics() -> None:
    """Duplicated profiles create tied similarities at the thresholds; counts use <= and <."""
    rng = np.random.default_rng(3)
    # Rows with four entries of +-1 have norm 2: unit vectors hold +-0.5 and every cosine is a sum of
    # +-0.25 terms, exact in floating point whatever the BLAS kernel or block shape (real ties).
    base = np.zeros((6, 8))
    for row in base:
        row[rng.choice(8, size=4, replace=False)] = rng.choice([-1.0, 1.0], size=4)
    P = np.concatenate([base, base, base[:3]])  # many exactly repeated similarities
    names = [f"e{i}" for i in range(len(P))]
    pairs = [(names[i], names[j]) for i in range(len(P)) for j in range(i + 1, len(P)) if (i + j) % 4 == 0]
    thresholds = [(0.05, 0.95), (0.1, 0.9), (0.25, 0.75), (0.5, 0.5)]
    res = relationship_recall(P, names, pairs, thresholds, min_entities=2, block_elems=50)
    ref = _efaar_reference(P, names, pairs, thresholds)
    assert res.metrics == pytest.approx(ref, abs=1e-12)


def test_known_relationship_recall_aggregates_rows(monkeypatch) -> None:
    rng = np.random.default_rng(1)
    genes = [f"G{i}" for i in range(30)]
    profiles = {g: rng.normal(size=8) for g in genes}
    rows = [(g, w) for g in genes for w in range(3)]
    X = np.stack([profiles[g] + rng.normal(0, 0.1, 8) for g, _ in rows])
    meta = pl.DataFrame({"perturbation": [g for g, _ in rows]})
    rels = pl.DataFrame({"entity1": genes[:10], "entity2": genes[10:20]})
    monkeypatch.setattr(rel_mod, "_BINS", 64)  # coarse histogram: many values per bin
    res = known_relationship_recall(meta, X, rels)
    means = np.stack([X[[i for i, (g, _) in enumerate(rows) if g == gene]].mean(axis=0) for gene in sorted(genes)])
    ref = _efaar_reference(means.astype(np.float32).astype(np.float64), sorted(genes), list(zip(genes[:10], genes[10:20])),
                           [(0.05, 0.95), (0.1, 0.9)])
    assert res.metrics == pytest.approx(ref, abs=1e-12)


def test_errors() -> None:
    P = np.random.default_rng(0).normal(size=(10, 3))
    names = [str(i) for i in range(10)]
    with pytest.raises(ValueError, match="at least 20"):
        relationship_recall(P, names, [("0", "1")])
    with pytest.raises(ValueError, match="no annotated pair"):
        relationship_recall(P, names, [("0", "x")], min_entities=2)
    with pytest.raises(ValueError, match="unique"):
        relationship_recall(P, ["a"] * 10, [("a", "b")], min_entities=2)
    with pytest.raises(ValueError, match="0 <= l <= h <= 1"):
        relationship_recall(P, names, [("0", "1")], thresholds=[(0.1, 1.5)], min_entities=2)
    with pytest.raises(ValueError, match="null values"):
        known_relationship_recall(pl.DataFrame({"perturbation": [None] + names[1:]}), P, [("1", "2")], min_entities=2)
