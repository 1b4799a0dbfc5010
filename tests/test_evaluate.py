"""Retrieval metrics against copairs 0.5.5, BH against statsmodels, batch scores and plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import polars as pl
import pytest
from copairs import map as cmap
from copairs.matching import assign_reference_index
from statsmodels.stats.multitest import multipletests

from bioembed_assets.evaluate import retrieval
from bioembed_assets.evaluate.batch import batch_effect_scores
from bioembed_assets.evaluate.plots import embedding_map_png, map_vs_pvalue_png
from bioembed_assets.evaluate.retrieval import (
    average_precision_consistency,
    average_precision_vs_controls,
    bh_fdr,
    fraction_retrieved,
    mean_average_precision,
    moa_map,
    replicate_map,
)

D = 24


def _activity_data(
    seed: int = 0, ctrl_names: tuple[str, ...] = ("DMSO",), n_posctrl: int = 0
) -> tuple[pd.DataFrame, np.ndarray]:
    """~290 wells: 3 plates x 30 negative controls, 50 perturbations x 4 replicates (half
    active, half null; ~5 % dropout so configurations vary), plate offsets; optionally a
    positive control with `n_posctrl` replicates."""
    rng = np.random.default_rng(seed)
    plates = ["P1", "P2", "P3"]
    offsets = {p: rng.normal(0, 0.3, D) for p in plates}
    rows, X = [], []
    for p in plates:
        for i in range(30):
            rows.append({"plate": p, "perturbation": ctrl_names[i % len(ctrl_names)], "control_type": "negative"})
            X.append(offsets[p] + rng.normal(size=D))
    for t in range(50):
        effect = rng.normal(0, 1.5, D) if t < 25 else np.zeros(D)
        for r in range(4):
            if rng.random() < 0.05:
                continue
            p = plates[(t + r) % 3]
            rows.append({"plate": p, "perturbation": f"t{t:02d}", "control_type": "treatment"})
            X.append(offsets[p] + effect + rng.normal(size=D))
    effect = rng.normal(0, 0.5, D)
    for r in range(n_posctrl):
        rows.append({"plate": plates[r % 3], "perturbation": "pos", "control_type": "positive"})
        X.append(offsets[plates[r % 3]] + effect + rng.normal(size=D))
    return pd.DataFrame(rows), np.asarray(X)


def _copairs_activity(meta: pd.DataFrame, X: np.ndarray, tmp_path, null_size: int = 10000):
    m = assign_reference_index(meta, "control_type == 'negative'", reference_col="ref", default_value=-1)
    ap = cmap.average_precision(m, X, ["perturbation", "ref"], [], [], ["perturbation", "ref"], progress_bar=False)
    mp = cmap.mean_average_precision(
        ap, ["perturbation"], null_size, 0.05, 0, progress_bar=False, cache_dir=tmp_path / "copairs"
    )
    return ap, mp.sort_values("perturbation").reset_index(drop=True)


@pytest.mark.parametrize(("ctrl_names", "n_posctrl"), [(("DMSO",), 0), (("DMSO", "empty"), 45)])
def test_activity_ap_matches_copairs(tmp_path, monkeypatch, ctrl_names, n_posctrl) -> None:
    meta, X = _activity_data(0, ctrl_names, n_posctrl)  # 45 replicates: the sort + search path
    ref, _ = _copairs_activity(meta, X, tmp_path, null_size=100)
    ap, n_pos, n_total = average_precision_vs_controls(
        X, meta["perturbation"].to_numpy(), (meta["control_type"] == "negative").to_numpy()
    )
    np.testing.assert_array_equal(np.isnan(ap), ref["average_precision"].isna().to_numpy())
    np.testing.assert_array_equal(n_pos, ref["n_pos_pairs"].to_numpy())
    np.testing.assert_array_equal(n_total, ref["n_total_pairs"].to_numpy())
    np.testing.assert_allclose(ap, ref["average_precision"].to_numpy(), atol=1e-6, equal_nan=True)
    assert len(np.unique(np.stack([n_pos, n_total])[:, ~np.isnan(ap)], axis=1).T) > 1  # several configs
    # float32 input: same pairs, APs equal up to float32 near-ties
    neg = (meta["control_type"] == "negative").to_numpy()
    ap32, n_pos32, _ = average_precision_vs_controls(X.astype(np.float32), meta["perturbation"].to_numpy(), neg)
    np.testing.assert_array_equal(n_pos32, n_pos)
    np.testing.assert_allclose(ap32, ap, atol=1e-3, equal_nan=True)
    # tiny blocks (many block boundaries inside replicate groups) give identical results
    monkeypatch.setattr(retrieval, "_BLOCK_ELEMS", 300)
    ap_small, *_ = average_precision_vs_controls(X, meta["perturbation"].to_numpy(), neg)
    np.testing.assert_allclose(ap_small, ap, atol=1e-12, equal_nan=True)


def test_map_and_pvalues_match_copairs(tmp_path) -> None:
    meta, X = _activity_data(1)
    ref_ap, ref = _copairs_activity(meta, X, tmp_path)
    ap, n_pos, n_total = average_precision_vs_controls(
        X, meta["perturbation"].to_numpy(), (meta["control_type"] == "negative").to_numpy()
    )
    ours = mean_average_precision(ap, n_pos, n_total, meta["perturbation"].to_numpy(), null_size=10000, seed=3)
    assert ours.columns == ["group", "mean_average_precision", "p_value", "corrected_p_value",
                            "below_p", "below_corrected_p", "n_rows"]  # fmt: skip
    assert ours["group"].to_list() == ref["perturbation"].tolist()
    np.testing.assert_allclose(ours["mean_average_precision"], ref["mean_average_precision"], atol=1e-6)
    p, p_ref = ours["p_value"].to_numpy(), ref["p_value"].to_numpy()
    assert np.abs(p - p_ref).max() < 0.03  # two independent estimates with null_size 1e4: sd <= 0.007
    clear = (p_ref < 1e-3) | (p_ref > 0.2)
    np.testing.assert_array_equal((p < 0.05)[clear], (p_ref < 0.05)[clear])
    clear_q = (ref["corrected_p_value"] < 1e-3) | (ref["corrected_p_value"] > 0.2)
    np.testing.assert_array_equal(ours["below_corrected_p"].to_numpy()[clear_q], ref["below_corrected_p"][clear_q])
    # the data has 25 active and 25 null perturbations
    active = np.array([int(g[1:]) < 25 for g in ours["group"]])
    assert ours["below_corrected_p"].to_numpy()[active].mean() > 0.9
    assert ours["below_corrected_p"].to_numpy()[~active].mean() < 0.2


def test_replicate_map_on_polars_meta() -> None:
    meta, X = _activity_data(2)
    meta = pl.from_pandas(meta)
    meta = meta.with_columns(
        pl.when(pl.col("perturbation") == "t00").then(pl.lit("positive")).otherwise("control_type").alias("control_type")
    )
    out = replicate_map(meta, X.astype(np.float32), null_size=2000)
    assert out.columns[0] == "perturbation" and out.height == 50 and "DMSO" not in out["perturbation"].to_list()
    assert "t00" in out["perturbation"].to_list()  # positive controls are scored like treatments
    assert 0.4 < fraction_retrieved(out) < 0.65
    assert map_vs_pvalue_png(out).startswith(b"\x89PNG")


def test_hand_computed_ap_with_optimistic_ties(tmp_path) -> None:
    # query t1=[1,0]; its replicate [1,1] ties with control c1=[1,1]; control c2=[1,0] is above
    X = np.array([[1, 0], [1, 1], [1, 1], [1, 0], [0, 1], [0.2, 1], [0.1, 1]], dtype=np.float64)
    pert = np.array(["t", "t", "c", "c", "c", "u", "u"])
    ctrl = pert == "c"
    ap, n_pos, n_total = average_precision_vs_controls(X, pert, ctrl)
    # t[0]: list c2(1.0) > {t[1] ~ c1}(0.707, positive first) > c3(0) -> rank 2 -> AP 1/2
    # t[1]: c1(1.0) > {t[0] ~ c2 ~ c3}(0.707) -> rank 2 -> AP 1/2 (pessimistic would be 1/4)
    # u[5]: u[6] is its nearest neighbour among {u6, c1, c2, c3} -> AP 1
    np.testing.assert_allclose(ap, [0.5, 0.5, np.nan, np.nan, np.nan, 1.0, 1.0], equal_nan=True)
    np.testing.assert_array_equal(n_pos, [1, 1, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(n_total, [4, 4, 4, 4, 4, 4, 4])
    meta = pd.DataFrame({"perturbation": pert, "control_type": np.where(ctrl, "negative", "treatment")})
    ref, _ = _copairs_activity(meta, X, tmp_path, null_size=10)
    np.testing.assert_allclose(ap, ref["average_precision"], equal_nan=True)

    # 3 positives at ranks 1, 3, 5 (two negatives strictly between): AP = (1/1 + 2/3 + 3/5) / 3
    q = np.array([[1.0, 0.0]])
    sims = np.array([0.99, 0.9, 0.8, 0.7, 0.6, 0.5])  # pos, neg, pos, neg, pos, neg
    pts = np.stack([sims, np.sqrt(1 - sims**2)], axis=1)
    X2 = np.concatenate([q, pts[[0, 2, 4]], pts[[1, 3, 5]]])
    pert2 = np.array(["a"] * 4 + ["c"] * 3)
    ap2, _, _ = average_precision_vs_controls(X2, pert2, pert2 == "c")
    assert ap2[0] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_no_negatives_gives_ap_one_and_perfect_map_min_p() -> None:
    X = np.random.default_rng(0).normal(size=(4, 3))
    ap, n_pos, n_total = average_precision_vs_controls(X, np.array(["a", "a", "b", "b"]), np.zeros(4, bool))
    np.testing.assert_array_equal(ap, 1.0)
    np.testing.assert_array_equal(n_total, 1)
    args = (np.ones(3), np.full(3, 2), np.full(3, 20), np.array(["g"] * 3))
    # copairs: strict ">" gives a perfect mAP the smallest p-value, 1 / (null_size + 1)
    assert mean_average_precision(*args, null_size=999, null="copairs")["p_value"][0] == pytest.approx(1 / 1000)
    # exact: comb(20, 2) = 190 rank sets, one of them perfect -> P(null >= 1) = 1/190
    assert mean_average_precision(*args, null_size=999)["p_value"][0] == pytest.approx(1 / 190)
    # no negatives (M = L): every rank list is perfect, so AP = 1 is no evidence at all
    assert mean_average_precision(*args[:2], np.full(3, 2), args[3], null_size=999)["p_value"][0] == 1.0


def test_group_null_shares_vectors_within_a_configuration() -> None:
    """peers.md §2.6: APs (0.45, 0.5, 0.4, 0.55), M = 3: p = 0.034 when all L = 33 (shared null),
    p = 0.00035 when L = 33..36 (independent member nulls)."""
    ap = np.array([0.45, 0.5, 0.4, 0.55])
    g = np.array(["x"] * 4)
    same = mean_average_precision(ap, np.full(4, 3), np.full(4, 33), g, null_size=20000)
    diff = mean_average_precision(ap, np.full(4, 3), np.arange(33, 37), g, null_size=20000)
    assert same["p_value"][0] == pytest.approx(0.034, abs=0.006)
    assert diff["p_value"][0] < 0.0015
    assert same["n_rows"][0] == 4


def test_bh_matches_statsmodels() -> None:
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=200), rng.uniform(0, 1e-3, 20), [0.5, 0.5, 0.5, 1.0, 0.0]])
    np.testing.assert_allclose(bh_fdr(p), multipletests(p, method="fdr_bh")[1], rtol=1e-12)
    assert np.isnan(bh_fdr(np.array([0.1, np.nan]))[1])


def _moa_data(seed: int) -> tuple[pl.DataFrame, np.ndarray]:
    """8 MoAs x 4 perturbations x 3 wells + 12 negative controls (null MoA)."""
    rng = np.random.default_rng(seed)
    rows, X = [], []
    for k in range(8):
        moa_effect = rng.normal(0, 1.0, D)
        for j in range(4):
            pert_effect = moa_effect + rng.normal(0, 0.3, D)
            for _ in range(3):
                rows.append({"perturbation": f"p{k}_{j}", "moa": f"moa{k}", "control_type": "treatment"})
                X.append(pert_effect + rng.normal(0, 0.5, D))
    for _ in range(12):
        rows.append({"perturbation": "DMSO", "moa": None, "control_type": "negative"})
        X.append(rng.normal(0, 0.5, D))
    return pl.DataFrame(rows), np.asarray(X, dtype=np.float32)


def test_moa_map_structured_vs_shuffled() -> None:
    meta, X = _moa_data(0)
    out = moa_map(meta, X, null_size=2000)
    assert out.columns[0] == "moa" and out.height == 8
    assert out["n_rows"].to_list() == [4] * 8  # one consensus profile per perturbation
    sub = moa_map(meta, X, null_size=200, perturbations=[f"p{k}_{j}" for k in range(3) for j in range(4)])
    assert sub["moa"].to_list() == ["moa0", "moa1", "moa2"]
    assert out["mean_average_precision"].min() > 0.8 and fraction_retrieved(out) == 1.0
    perts = meta.filter(pl.col("moa").is_not_null())["perturbation"].unique().sort().to_list()
    shuffled = dict(zip(perts, np.random.default_rng(1).permutation([f"moa{i // 4}" for i in range(32)])))
    meta_s = meta.with_columns(pl.col("perturbation").replace_strict(shuffled, default=None).alias("moa"))
    out_s = moa_map(meta_s, X, null_size=2000)
    # random ranking with M = 3 of L = 31: expected AP ~ 0.17
    assert out_s["mean_average_precision"].mean() < 0.3 and fraction_retrieved(out_s) <= 0.25


def test_consistency_ap_matches_copairs() -> None:
    meta, X = _moa_data(3)
    rng = np.random.default_rng(0)
    Z, labels = X[:60].astype(np.float64), np.array(meta["moa"][:60].to_list())
    Z = Z + rng.normal(0, 2, Z.shape)
    ap, n_pos, n_total = average_precision_consistency(Z, labels)
    ref = cmap.average_precision(pd.DataFrame({"moa": labels}), Z, ["moa"], [], [], ["moa"], progress_bar=False)
    np.testing.assert_allclose(ap, ref["average_precision"], atol=1e-6)
    np.testing.assert_array_equal(n_pos, ref["n_pos_pairs"])
    np.testing.assert_array_equal(n_total, ref["n_total_pairs"])


def test_moa_map_rejects_multiple_moas_per_perturbation() -> None:
    meta = pl.DataFrame({"perturbation": ["a", "a", "b"], "moa": ["x", "y", "x"], "control_type": ["treatment"] * 3})
    with pytest.raises(ValueError, match="'a' has several moa"):
        moa_map(meta, np.eye(3, dtype=np.float32))


def test_nan_features_rejected() -> None:
    X = np.ones((4, 2))
    X[2, 1] = np.nan
    with pytest.raises(ValueError, match="row 2"):
        average_precision_vs_controls(X, np.array(["a", "a", "c", "c"]), np.array([0, 0, 1, 1], bool))


def test_batch_scores_drop_after_removing_plate_offsets() -> None:
    rng = np.random.default_rng(0)
    plates = np.repeat(["P1", "P2", "P3", "P4"], 40)
    offsets = {p: rng.normal(0, 1.5, D) for p in np.unique(plates)}
    X = rng.normal(size=(plates.size, D)) + np.stack([offsets[p] for p in plates]) + 3.0
    is_ctrl = np.ones(plates.size, bool)
    is_ctrl[::5] = False  # treatments are ignored through the mask
    X[~is_ctrl] += rng.normal(0, 5, (int((~is_ctrl).sum()), D))
    before = batch_effect_scores(X, plates, mask=is_ctrl)
    fixed = X - np.stack([offsets[p] for p in plates])
    after = batch_effect_scores(fixed, plates, mask=is_ctrl)
    assert before["batch_chance"] == after["batch_chance"] == 0.25
    assert before["batch_knn_accuracy"] > 0.9 and before["batch_silhouette"] > 0.2
    assert after["batch_knn_accuracy"] < 0.45 and after["batch_silhouette"] < 0.05
    # mixing, higher = better (5 random draws from 4 batches average ~0.76 of the maximum)
    assert before["batch_knn_entropy"] < 0.3 < 0.65 < after["batch_knn_entropy"] <= 1.0
    assert np.isnan(batch_effect_scores(X, np.full(plates.size, "P1"))["batch_silhouette"])


def test_batch_knn_entropy_hand_checked() -> None:
    # two tight clusters, each holding one batch: every neighbourhood is single-batch -> 0
    X = np.array([[1, 0.01 * i] for i in range(6)] + [[0.01 * i, 1] for i in range(6)])
    sep = batch_effect_scores(X, np.repeat(["a", "b"], 6), k=3)
    assert sep["batch_knn_entropy"] == pytest.approx(0.0) and sep["batch_knn_accuracy"] == 1.0
    # equally spaced points on an arc, batches a,a,b,b,a,a,b,b: the 2 nearest neighbours of every
    # point are one a and one b (entropy log 2 / log 2 = 1); alternating a,b,a,b gives inner
    # points two neighbours of the other batch (0) and only the 2 end points mixed ones: 2/8
    X = np.stack([np.cos(np.linspace(0, 0.5, 8)), np.sin(np.linspace(0, 0.5, 8))], axis=1)
    assert batch_effect_scores(X, np.array(list("aabbaabb")), k=2)["batch_knn_entropy"] == pytest.approx(1.0)
    assert batch_effect_scores(X, np.array(list("abababab")), k=2)["batch_knn_entropy"] == pytest.approx(0.25)


def test_batch_knn_ignores_same_perturbation_neighbours_when_asked() -> None:
    # each perturbation's replicates sit together on one plate: without `groups` the replicates
    # make the plate perfectly predictable; excluding same-perturbation neighbours leaves no plate signal
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 3, (12, D))
    pert = np.repeat(np.arange(12), 4)
    plates = np.where(pert % 2 == 0, "P1", "P2")
    X = centres[pert] + rng.normal(0, 0.2, (pert.size, D))
    naive = batch_effect_scores(X, plates, k=3)
    fair = batch_effect_scores(X, plates, k=3, groups=pert)
    assert naive["batch_knn_accuracy"] == 1.0
    assert fair["batch_knn_accuracy"] < 0.75 and fair["batch_knn_entropy"] > naive["batch_knn_entropy"]


def test_embedding_map_png() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 10)).astype(np.float32)
    png = embedding_map_png(
        X,
        {"plate": np.repeat([f"P{i}" for i in range(30)], 10), "n_cells": rng.integers(10, 500, 300)},
        "test",
    )
    assert png.startswith(b"\x89PNG")
    assert map_vs_pvalue_png(pl.DataFrame(schema={"mean_average_precision": pl.Float64})).startswith(b"\x89PNG")


def test_replicate_map_options_match_the_table_api() -> None:
    from bioembed_assets.evaluate.pairs import activity_average_precision
    from bioembed_assets.evaluate.retrieval import mean_average_precision_by

    meta, X = _activity_data(4)
    meta = pl.from_pandas(meta)
    for kw in ({}, {"neg_sameby": ["plate"]}, {"neg_sameby": ["plate"], "pos_diffby": ["plate"]}):
        out = replicate_map(meta, X, null_size=500, null="copairs", **kw)
        ap = activity_average_precision(meta, X, "perturbation", **kw)
        ref = mean_average_precision_by(ap, ["perturbation"], 500, null="copairs")
        assert out.drop("perturbation").equals(ref.drop("perturbation"))
    # a screen without negative controls is scored leniently (every AP 1), not an error
    no_ctrl = meta.filter(pl.col("control_type") != "negative")
    keep = (meta["control_type"] != "negative").to_numpy()
    out = replicate_map(no_ctrl, X[keep], null_size=100)
    assert (out["mean_average_precision"] == 1.0).all() and not out["below_corrected_p"].any()
