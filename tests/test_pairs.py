"""copairs-semantics AP (`evaluate.pairs`) and mAP p-values (`evaluate.nulls`) against copairs 0.5.5,
exact nulls against brute-force enumeration, and error handling."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pandas as pd
import polars as pl
import pytest
from copairs import map as cmap
from copairs.matching import assign_reference_index

from bioembed_assets.evaluate import nulls
from bioembed_assets.evaluate.nulls import ap_from_ranks, exact_null, group_p_values, sample_null
from bioembed_assets.evaluate.pairs import (
    UnpairedError,
    activity_average_precision,
    average_precision,
    consistency_average_precision,
    nonreplicate_average_precision,
)
from bioembed_assets.evaluate.retrieval import fraction_retrieved, mean_average_precision, mean_average_precision_by
from tests.conftest import SHARED_DATA

D = 16
LINCS = SHARED_DATA / "lincs-cp-SQ00015054/cytominer_eval/example_data/compound/SQ00015054_normalized_feature_select.csv.gz"


def _screen(seed: int = 0, n_perts: int = 30, controls_per_plate: int = 20) -> tuple[pd.DataFrame, np.ndarray]:
    """3 plates x (controls + perturbations x 4 replicates with ~8 % dropout), 2 doses, 2 batches,
    plate offsets; half of the perturbations shift the profile. float64 features."""
    rng = np.random.default_rng(seed)
    plates = ["P1", "P2", "P3"]
    offsets = {p: rng.normal(0, 0.4, D) for p in plates}
    rows, X = [], []
    for p in plates:
        for i in range(controls_per_plate):
            rows.append((p, "A" if i % 2 else "B", "DMSO", 0, "negative", "b1" if p != "P3" else "b2"))
            X.append(offsets[p] + rng.normal(size=D))
    for t in range(n_perts):
        effect = rng.normal(0, 1.2, D) if t % 2 == 0 else np.zeros(D)
        for r in range(4):
            if rng.random() < 0.08:
                continue
            p = plates[(t + r) % 3]
            rows.append((p, "AB"[r % 2], f"t{t:02d}", r % 2, "treatment", "b1" if p != "P3" else "b2"))
            X.append(offsets[p] + effect + rng.normal(size=D))
    meta = pd.DataFrame(rows, columns=["plate", "row", "pert", "dose", "control_type", "batch"])
    return meta, np.asarray(X)


def _copairs_ap(meta: pd.DataFrame, X: np.ndarray, *rules: list[str]) -> pd.DataFrame:
    return cmap.average_precision(meta, X, *rules, progress_bar=False)


def _assert_same_ap(ours: pl.DataFrame, ref: pd.DataFrame, atol: float = 1e-6) -> None:
    a, r = ours["average_precision"].to_numpy(), ref["average_precision"].to_numpy()
    np.testing.assert_array_equal(np.isnan(a), np.isnan(r))
    np.testing.assert_allclose(a, r, atol=atol, equal_nan=True)
    np.testing.assert_array_equal(ours["n_pos_pairs"].to_numpy(), ref["n_pos_pairs"].to_numpy())
    np.testing.assert_array_equal(ours["n_total_pairs"].to_numpy(), ref["n_total_pairs"].to_numpy())


RULES = {  # pos_sameby, pos_diffby, neg_sameby, neg_diffby (ref = copairs reference index)
    "activity_all_controls": (["pert", "ref"], [], [], ["pert", "ref"]),
    "activity_plate_controls": (["pert", "ref"], [], ["plate"], ["pert", "ref"]),
    "activity_other_plate_replicates": (["pert", "ref"], ["plate"], ["plate"], ["pert", "ref"]),
    "non_replicates": (["pert"], [], [], ["pert"]),
    "multi_column": (["pert", "ref", "batch"], ["plate", "row"], ["batch"], ["pert", "dose"]),
    "diffby_only_positives": ([], ["pert", "plate"], ["plate"], ["dose"]),
    "overlapping_pos_neg": (["pert"], [], ["plate"], []),
}


@pytest.mark.parametrize("name", list(RULES))
def test_ap_matches_copairs(name: str) -> None:
    meta, X = _screen(0)
    meta = assign_reference_index(meta, "control_type == 'negative'", reference_col="ref", default_value=-1)
    rules = RULES[name]
    ref = _copairs_ap(meta, X, *rules)
    ours = average_precision(pl.from_pandas(meta), X, *rules)
    assert ours.columns == [*meta.columns, "average_precision", "n_pos_pairs", "n_total_pairs"]
    _assert_same_ap(ours, ref, atol=1e-12)
    assert (ours["n_pos_pairs"] > 0).sum() >= 40 and ours["average_precision"].drop_nans().n_unique() > 10
    # tiny blocks (block boundaries inside groups, many candidate-cache switches) change nothing
    small = average_precision(pl.from_pandas(meta), X, *rules, block_elems=700)
    np.testing.assert_allclose(small["average_precision"], ours["average_precision"], atol=1e-12)
    # without copairs' float32 rounding of similarities, float64 data ranks the same here
    plain = average_precision(pl.from_pandas(meta), X, *rules, rounding="none")
    np.testing.assert_allclose(plain["average_precision"], ours["average_precision"], atol=1e-12)


def test_recipes_match_copairs_recipes() -> None:
    meta, X = _screen(1)
    m = assign_reference_index(meta, "control_type == 'negative'", reference_col="ref", default_value=-1)
    pm = pl.from_pandas(meta)
    negcon = pl.col("control_type") == "negative"
    for neg_sameby in ([], ["plate"]):
        ref = _copairs_ap(m, X, ["pert", "ref"], [], neg_sameby, ["pert", "ref"])
        ours = activity_average_precision(pm, X, "pert", negcon, neg_sameby=neg_sameby)
        assert ours.columns == [*meta.columns, "average_precision", "n_pos_pairs", "n_total_pairs"]
        _assert_same_ap(ours, ref, atol=1e-12)
    _assert_same_ap(nonreplicate_average_precision(pm, X, "pert"), _copairs_ap(meta, X, ["pert"], [], [], ["pert"]), 1e-12)


def test_consistency_with_large_groups_matches_copairs() -> None:
    """Groups of ~40 (> 16 positives per query): partner GEMM + sorted-row binary search paths."""
    rng = np.random.default_rng(2)
    labels = np.repeat(["a", "b", "c", "d"], [45, 40, 38, 7])
    centers = {k: rng.normal(0, 0.6, D) for k in "abcd"}
    X = np.stack([centers[k] + rng.normal(size=D) for k in labels])
    meta = pd.DataFrame({"moa": labels})
    ref = _copairs_ap(meta, X, ["moa"], [], [], ["moa"])
    ours = consistency_average_precision(pl.from_pandas(meta), X, "moa")
    _assert_same_ap(ours, ref, atol=1e-12)
    small = consistency_average_precision(pl.from_pandas(meta), X, "moa", block_elems=2000)
    np.testing.assert_allclose(small["average_precision"], ours["average_precision"], atol=1e-12)


def test_float32_features_agree_up_to_near_ties() -> None:
    meta, X = _screen(3)
    m = assign_reference_index(meta, "control_type == 'negative'", reference_col="ref", default_value=-1)
    X32 = X.astype(np.float32)
    ref = _copairs_ap(m, X32, ["pert", "ref"], [], [], ["pert", "ref"])
    ours = activity_average_precision(pl.from_pandas(meta), X32, "pert", pl.col("control_type") == "negative")
    _assert_same_ap(ours, ref, atol=1e-3)
    diff = np.abs(ours["average_precision"].to_numpy() - ref["average_precision"].to_numpy())
    assert np.nanmean(diff > 1e-9) < 0.01  # float32 near-ties only


def test_hand_computed_ties_and_edge_rows() -> None:
    # query [1,0]: replicate [1,1] ties with control [1,1] (positive first); control [1,0] above
    X = np.array([[1, 0], [1, 1], [1, 1], [1, 0], [0, 1], [0.2, 1], [0.1, 1], [3, 1]], dtype=np.float64)
    meta = pl.DataFrame({"pert": ["t", "t", "c", "c", "c", "u", "u", "solo"],
                         "plate": ["p1"] * 5 + ["p2"] * 3})  # fmt: skip
    negcon = pl.col("pert") == "c"
    ap = activity_average_precision(meta, X, "pert", negcon)
    np.testing.assert_allclose(ap["average_precision"], [0.5, 0.5, np.nan, np.nan, np.nan, 1.0, 1.0, np.nan], equal_nan=True)
    assert ap["n_pos_pairs"].to_list() == [1, 1, 0, 0, 0, 1, 1, 0]
    assert ap["n_total_pairs"].to_list() == [4, 4, 5, 5, 5, 4, 4, 3]  # solo: negatives only
    # plate p2 has no controls: its replicates have positives and no negatives -> AP 1 (copairs)
    ap = activity_average_precision(meta, X, "pert", negcon, neg_sameby=["plate"])
    assert ap["average_precision"].to_list()[5:7] == [1.0, 1.0] and ap["n_total_pairs"].to_list()[5:] == [1, 1, 0]
    ref = _copairs_ap(assign_reference_index(meta.to_pandas(), "pert == 'c'", reference_col="ref", default_value=-1),
                      X, ["pert", "ref"], [], ["plate"], ["pert", "ref"])
    _assert_same_ap(ap, ref)


def test_memory_is_bounded_by_the_block_not_the_pairs() -> None:
    """6,000 treatments x 1,500 controls = 9 M negative pairs (copairs: ~1 GB); blocks of 2**18."""
    rng = np.random.default_rng(0)
    n_t, n_c = 6000, 1500
    meta = pl.DataFrame({"pert": [f"t{i // 3}" for i in range(n_t)] + ["DMSO"] * n_c})
    X = rng.normal(size=(n_t + n_c, 32)).astype(np.float32)
    tracemalloc.start()
    ap = activity_average_precision(meta, X, "pert", pl.col("pert") == "DMSO", block_elems=1 << 18)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert ap["n_total_pairs"][0] == 2 + n_c
    assert peak < 40e6, f"peak traced memory {peak / 1e6:.0f} MB"


# --------------------------------------------------------------------------- mAP and p-values


def _copairs_map(ap: pd.DataFrame, sameby: list[str], null_size: int, seed: int, tmp_path) -> pd.DataFrame:
    out = cmap.mean_average_precision(ap, sameby, null_size, 0.05, seed, progress_bar=False, cache_dir=tmp_path / f"c{seed}")
    return out.sort_values(sameby).reset_index(drop=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_copairs_null_reproduces_copairs_pvalues_exactly(tmp_path, seed: int) -> None:
    meta, X = _screen(seed, n_perts=40)
    m = assign_reference_index(meta, "control_type == 'negative'", reference_col="ref", default_value=-1)
    rules = (["pert", "ref"], [], ["plate"], ["pert", "ref"])
    ap_ref = _copairs_ap(m, X, *rules)
    ref = _copairs_map(ap_ref, ["pert"], 4000, seed, tmp_path)
    ap = average_precision(pl.from_pandas(m), X, *rules)
    ours = mean_average_precision_by(ap, ["pert"], null_size=4000, seed=seed, null="copairs")
    assert ours.columns == ["pert", "mean_average_precision", "p_value", "corrected_p_value", "below_p",
                            "below_corrected_p", "n_rows"]  # fmt: skip
    assert ours["pert"].to_list() == ref["pert"].tolist()
    np.testing.assert_allclose(ours["mean_average_precision"], ref["mean_average_precision"], atol=1e-12)
    np.testing.assert_array_equal(ours["p_value"].to_numpy(), ref["p_value"].to_numpy())  # bit for bit
    np.testing.assert_array_equal(ours["corrected_p_value"].to_numpy(), ref["corrected_p_value"].to_numpy())
    np.testing.assert_array_equal(ours["below_corrected_p"].to_numpy(), ref["below_corrected_p"].to_numpy())
    assert len(np.unique(ap_ref[["n_pos_pairs", "n_total_pairs"]].dropna().to_numpy(), axis=0)) > 5
    # the array API gives the same numbers
    arr = mean_average_precision(ap["average_precision"].to_numpy(), ap["n_pos_pairs"].to_numpy(),
                                 ap["n_total_pairs"].to_numpy(), ap["pert"].to_numpy(), 4000, seed, null="copairs")
    np.testing.assert_array_equal(arr["p_value"].to_numpy(), ours["p_value"].to_numpy())
    # exact mode: same mAP, p-values statistically consistent (two estimates, sd <= 0.008)
    ex = mean_average_precision_by(ap, ["pert"], null_size=4000, seed=seed)
    assert np.abs(ex["p_value"].to_numpy() - ref["p_value"].to_numpy()).max() < 0.05
    assert fraction_retrieved(ex) == pytest.approx(ref["below_corrected_p"].mean(), abs=0.1)


def test_copairs_group_null_mean_of_many_members_in_row_order(tmp_path) -> None:
    """Groups of up to 45 members and several configurations: copairs' float32 member mean."""
    rng = np.random.default_rng(5)
    labels = np.repeat(list("abcdef"), [45, 30, 12, 6, 3, 2])
    X = rng.normal(size=(labels.size, D)) + np.stack([{"a": 0.5, "b": -0.3}.get(k, 0.0) * np.ones(D) for k in labels])
    meta = pd.DataFrame({"moa": labels, "plate": rng.choice(["p", "q"], labels.size)})
    rules = (["moa"], [], ["plate"], ["moa"])
    ref = _copairs_map(_copairs_ap(meta, X, *rules), ["moa"], 3000, 7, tmp_path)
    ours = mean_average_precision_by(average_precision(pl.from_pandas(meta), X, *rules), ["moa"], 3000, seed=7,
                                     null="copairs")
    np.testing.assert_array_equal(ours["p_value"].to_numpy(), ref["p_value"].to_numpy())


def test_multi_column_sameby_groups(tmp_path) -> None:
    meta, X = _screen(4)
    m = assign_reference_index(meta, "control_type == 'negative'", reference_col="ref", default_value=-1)
    rules = (["pert", "ref"], [], [], ["pert", "ref"])
    ref = _copairs_map(_copairs_ap(m, X, *rules), ["pert", "dose"], 2000, 3, tmp_path)
    ours = mean_average_precision_by(average_precision(pl.from_pandas(m), X, *rules), ["pert", "dose"], 2000, seed=3,
                                     null="copairs")
    assert ours.select("pert", "dose").rows() == list(ref[["pert", "dose"]].itertuples(index=False, name=None))
    np.testing.assert_array_equal(ours["p_value"].to_numpy(), ref["p_value"].to_numpy())
    np.testing.assert_array_equal(ours["n_rows"].to_numpy(), ref["indices"].map(len).to_numpy())


def _brute_ap(m: int, total: int) -> np.ndarray:
    return np.array([np.mean([(i + 1) / (p + 1) for i, p in enumerate(c)]) for c in itertools.combinations(range(total), m)])


@pytest.mark.parametrize(("m", "total"), [(1, 6), (2, 9), (3, 10), (7, 10), (9, 11), (5, 5), (4, 12)])
def test_exact_null_equals_brute_force_enumeration(m: int, total: int) -> None:
    values, probs = exact_null(m, total)
    brute = _brute_ap(m, total)
    u, c = np.unique(np.round(brute, 12), return_counts=True)
    np.testing.assert_allclose(values, u, atol=1e-12)
    np.testing.assert_allclose(probs, c / brute.size, atol=1e-15)
    # sampled draws follow the exact distribution (both rank representations)
    draws = sample_null(m, total, 100_000, np.random.default_rng(0))
    cdf = np.searchsorted(np.sort(draws), values + 1e-12, "right") / draws.size
    assert np.abs(cdf - np.cumsum(probs)).max() < 0.01


def test_ap_from_positive_and_negative_ranks_agree() -> None:
    rng = np.random.default_rng(0)
    total, m = 40, 25
    pos = np.sort(np.stack([rng.choice(total, m, replace=False) for _ in range(50)]), axis=1)
    neg = np.stack([np.setdiff1d(np.arange(total), r) for r in pos])
    np.testing.assert_allclose(ap_from_ranks(pos, m, total), ap_from_ranks(neg, m, total, negatives=True), atol=1e-13)


def _brute_group_p(members: list[tuple[int, int]], observed: float) -> float:
    """P(mean over members >= observed) with members sharing a configuration sharing one draw."""
    confs = sorted(set(members))
    w = np.array([members.count(c) for c in confs]) / len(members)
    dists = [_brute_ap(*c) for c in confs]
    total = np.zeros(1)
    for d, wc in zip(dists, w):
        total = (total[:, None] + wc * d[None, :]).ravel()
    return float(np.mean(total >= observed - 1e-12))


def test_exact_group_pvalues_equal_brute_force() -> None:
    members = [(2, 8), (2, 8), (2, 8), (1, 9), (1, 9), (3, 7), (2, 8)]  # groups below
    ap = np.array([0.9, 0.7, 1.0, 1.0, 0.5, 0.8, 0.3])
    group = np.array([0, 0, 1, 2, 2, 3, 4])  # 0: one config x2; 1: single; 2: one config; 3; 4
    n_pos, n_total = np.array(members).T
    mAP, p = group_p_values(ap, n_pos, n_total, group, 5, null_size=1000)
    for g in range(5):
        rows = np.flatnonzero(group == g)
        assert p[g] == pytest.approx(_brute_group_p([members[i] for i in rows], ap[rows].mean()), abs=1e-12)
    # a group mixing configurations: exact convolution
    group = np.array([0, 0, 0, 0, 0, 1, 1])
    mAP, p = group_p_values(ap, n_pos, n_total, group, 2, null_size=1000)
    assert p[0] == pytest.approx(_brute_group_p(members[:5], ap[:5].mean()), abs=1e-12)
    assert p[1] == pytest.approx(_brute_group_p(members[5:], ap[5:].mean()), abs=1e-12)


def test_exact_mode_falls_back_to_sampling(monkeypatch) -> None:
    members = [(2, 8), (1, 9), (3, 7), (2, 10)]
    ap = np.array([0.8, 0.6, 0.9, 0.7])
    n_pos, n_total = np.array(members).T
    exact = _brute_group_p(members, ap.mean())
    monkeypatch.setattr(nulls, "CONVOLUTION_CAP", 10)  # too many values: sample the exact nulls
    _, p = group_p_values(ap, n_pos, n_total, np.zeros(4, dtype=np.int64), 1, null_size=100_000, seed=1)
    assert p[0] == pytest.approx(exact, abs=4 * np.sqrt(exact * (1 - exact) / 100_000) + 1e-5)
    # configurations with more rank sets than null_size are sampled: M = 3 of L = 30 (4060 sets)
    values, probs = exact_null(3, 30)
    obs = float(values[int(0.97 * values.size)])
    want = probs[values >= obs - 1e-12].sum()
    _, p = group_p_values(np.array([obs]), np.array([3]), np.array([30]), np.zeros(1, dtype=np.int64), 1, 200_000)
    assert p[0] == pytest.approx(want, abs=4 * np.sqrt(want / 200_000))


def test_null_modes_on_perfect_and_negative_free_groups() -> None:
    g = np.zeros(3, dtype=np.int64)
    # M = L (no negatives): AP 1 always; copairs (strict >) says p = 1/(n+1), exact says 1
    _, p_cop = group_p_values(np.ones(3), np.full(3, 2), np.full(3, 2), g, 1, 99, mode="copairs")
    _, p_ex = group_p_values(np.ones(3), np.full(3, 2), np.full(3, 2), g, 1, 99)
    assert p_cop[0] == pytest.approx(0.01) and p_ex[0] == 1.0
    with pytest.raises(ValueError, match="null must be one of"):
        group_p_values(np.ones(3), np.full(3, 2), np.full(3, 5), g, 1, 99, mode="fast")


# --------------------------------------------------------------------------- errors


def test_errors_name_the_problem() -> None:
    meta, X = _screen(0)
    pm = pl.from_pandas(meta)
    bad = X.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="row 7"):
        average_precision(pm, bad, ["pert"], [], [], ["pert"])
    with pytest.raises(ValueError, match="rows must be aligned"):
        average_precision(pm, X[:-1], ["pert"], [], [], ["pert"])
    with pytest.raises(ValueError, match=r"column 'pert' has 1 null values \(first at row 4\)"):
        average_precision(pm.with_columns(pl.when(pl.int_range(pl.len()) == 4).then(None).otherwise("pert").alias("pert")),
                          X, ["pert"], [], [], ["pert"])
    with pytest.raises(ValueError, match="'nope' not in metadata"):
        average_precision(pm, X, ["nope"], [], [], ["pert"])
    with pytest.raises(ValueError, match="must be disjoint"):
        average_precision(pm, X, ["pert"], ["pert"], [], ["pert"])
    with pytest.raises(ValueError, match="both empty"):
        average_precision(pm, X, ["pert"], [], [], [])
    with pytest.raises(TypeError, match="lists of column names"):
        average_precision(pm, X, "pert", [], [], ["pert"])
    with pytest.raises(UnpairedError, match="no positive pairs"):
        average_precision(pm.with_row_index("uid"), X, ["uid"], [], [], ["pert"])
    with pytest.raises(UnpairedError, match="no negative pairs"):
        average_precision(pm.with_columns(pl.lit("x").alias("one")), X, ["pert"], [], [], ["one"])
    zero = X.copy()
    zero[5] = 0
    with pytest.raises(ValueError, match="all-zero rows.*row 5"):
        average_precision(pm, zero, ["pert"], [], [], ["pert"])
    with pytest.raises(UnpairedError, match="no negative-control rows"):
        activity_average_precision(pm, X, "pert", pl.col("pert") == "nothing")


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def lincs() -> tuple[pl.DataFrame, np.ndarray]:
    if not LINCS.exists():
        pytest.skip(f"real LINCS plate not available at {LINCS}")
    df = pl.read_csv(LINCS, infer_schema_length=10000)
    feats = [c for c in df.columns if not c.startswith("Metadata_")]
    return df.select(pl.exclude(feats)), df.select(feats).to_numpy().astype(np.float64)


@pytest.mark.realdata
def test_lincs_plate_activity_and_moa_match_copairs(lincs, tmp_path) -> None:
    meta, X = lincs
    assert meta.height == 384 and X.shape[1] == 454
    pm = meta.to_pandas()
    m = assign_reference_index(pm, "Metadata_broad_sample == 'DMSO'", reference_col="ref", default_value=-1)
    rules = (["Metadata_broad_sample", "ref"], [], [], ["Metadata_broad_sample", "ref"])
    ap_ref = _copairs_ap(m, X, *rules)
    ap = activity_average_precision(meta, X, "Metadata_broad_sample", pl.col("Metadata_broad_sample") == "DMSO")
    _assert_same_ap(ap, ap_ref, atol=1e-9)
    ref = _copairs_map(ap_ref, ["Metadata_broad_sample"], 10000, 0, tmp_path)
    ours = mean_average_precision_by(ap, ["Metadata_broad_sample"], 10000, seed=0, null="copairs")
    np.testing.assert_allclose(ours["mean_average_precision"], ref["mean_average_precision"], atol=1e-12)
    np.testing.assert_array_equal(ours["p_value"].to_numpy(), ref["p_value"].to_numpy())
    np.testing.assert_array_equal(ours["corrected_p_value"].to_numpy(), ref["corrected_p_value"].to_numpy())
    assert 0.3 < fraction_retrieved(ours) < 1.0
    # MoA consistency on consensus (median) profiles of annotated compounds, "a|b" as one label
    ann = meta.with_row_index("i").filter(pl.col("Metadata_moa").is_not_null() & (pl.col("Metadata_broad_sample") != "DMSO"))
    cons = ann.group_by("Metadata_broad_sample", maintain_order=True).agg(pl.col("i"), pl.col("Metadata_moa").first())
    Xc = np.stack([np.median(X[i.to_list()], axis=0) for i in cons["i"]])
    cm = cons.select("Metadata_broad_sample", "Metadata_moa")
    ref_moa = _copairs_ap(cm.to_pandas(), Xc, ["Metadata_moa"], [], [], ["Metadata_moa"])
    _assert_same_ap(consistency_average_precision(cm, Xc, "Metadata_moa"), ref_moa, atol=1e-9)
