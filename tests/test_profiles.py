"""Well aggregation and the OpenPhenom PCA-CenterScale normalisation."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from bioembed_assets.profiles.aggregate import aggregate_to_wells
from bioembed_assets.profiles.normalize import PCACenterScale


def _cells(seed: int = 0) -> tuple[pl.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = 900
    plate = rng.choice(["P2", "P1"], n)
    well = rng.choice([f"A{i:02d}" for i in range(1, 13)], n)
    pert = np.array([f"cmpd{int(w[1:]) % 4}" for w in well])
    meta = pl.DataFrame(
        {
            "plate": plate,
            "well": well,
            "perturbation": pert,
            "control_type": np.where(pert == "cmpd0", "negative", "treatment"),
            "moa": [None if p == "cmpd0" else f"moa{p[-1]}" for p in pert],
            "site": rng.integers(1, 5, n),  # varies within a well: must be dropped
        }
    )
    return meta, rng.normal(size=(n, 7)).astype(np.float32)


@pytest.mark.parametrize("method", ["median", "mean"])
def test_aggregate_matches_polars_group_by(method: str) -> None:
    meta, X = _cells()
    out_meta, out = aggregate_to_wells(meta, X, method=method)
    feats = [f"f{i}" for i in range(X.shape[1])]
    naive = (
        pl.concat([meta, pl.DataFrame(X.astype(np.float64), schema=feats)], how="horizontal")
        .group_by("plate", "well")
        .agg(getattr(pl.col(feats), method)(), pl.len().alias("n"))
        .sort("plate", "well")
    )
    assert out.dtype == np.float32 and out.shape == (naive.height, X.shape[1])
    np.testing.assert_allclose(out, naive.select(feats).to_numpy(), rtol=1e-6, atol=1e-6)
    assert out_meta.columns == ["plate", "well", "perturbation", "control_type", "moa", "n_cells"]
    assert out_meta["n_cells"].to_list() == naive["n"].to_list()
    assert out_meta.select("plate", "well").equals(naive.select("plate", "well"))
    # constant metadata is carried over, including nulls
    first = meta.group_by("plate", "well").agg(pl.col("moa").first()).sort("plate", "well")
    assert out_meta["moa"].to_list() == first["moa"].to_list()


def test_aggregate_sums_existing_n_cells_and_custom_keys() -> None:
    meta = pl.DataFrame({"perturbation": ["a", "a", "b"], "n_cells": [3, 4, 5], "moa": ["x", "x", "y"]})
    X = np.array([[1.0], [3.0], [5.0]], dtype=np.float32)
    m, out = aggregate_to_wells(meta, X, by=("perturbation",), method="mean")
    assert m["n_cells"].to_list() == [7, 5] and m["moa"].to_list() == ["x", "y"]
    np.testing.assert_array_equal(out[:, 0], [2.0, 5.0])


def test_aggregate_rejects_nan_naming_the_group() -> None:
    meta, X = _cells()
    X[17, 3] = np.nan
    plate, well = meta["plate"][17], meta["well"][17]
    with pytest.raises(ValueError, match=f"plate='{plate}', well='{well}'"):
        aggregate_to_wells(meta, X)


def _plates(seed: int = 0, d: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3 plates x (40 controls + 60 treatments), correlated features, plate shift and scale."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d))
    Xs, plates, ctrl = [], [], []
    for p in ("P1", "P2", "P3"):
        shift, scale = rng.normal(0, 2, d), 1 + rng.normal(0, 0.2, d)
        for is_ctrl, n in ((True, 40), (False, 60)):
            Z = rng.normal(size=(n, d)) @ mix + (0 if is_ctrl else rng.normal(0, 1, (n, d)))
            Xs.append(Z * scale + shift)
            plates += [p] * n
            ctrl += [is_ctrl] * n
    return np.concatenate(Xs).astype(np.float32), np.array(plates), np.array(ctrl)


def _sklearn_card(X: np.ndarray, plates: np.ndarray, ctrl: np.ndarray) -> np.ndarray:
    pca = PCA().fit(X[ctrl].astype(np.float64))
    Y = pca.transform(X.astype(np.float64))
    for p in np.unique(plates):
        m = plates == p
        Y[m] = StandardScaler().fit(Y[m & ctrl]).transform(Y[m])
    return Y


def _assert_equal_up_to_column_sign(a: np.ndarray, b: np.ndarray, tol: float) -> None:
    sign = np.sign((a * b).sum(axis=0))
    np.testing.assert_allclose(a, b * sign, atol=tol, rtol=tol)


@pytest.mark.parametrize("d", [12, 40])  # covariance-eigh path (n_ctrl >= 10 d) and SVD path
def test_pca_centerscale_equals_sklearn_card_recipe(d: int) -> None:
    X, plates, ctrl = _plates(d=d)
    model = PCACenterScale().fit(X, plates, ctrl)
    assert model.n_components == X.shape[1]
    ours = model.transform(X, plates, ctrl)
    assert ours.dtype == np.float32
    _assert_equal_up_to_column_sign(ours, _sklearn_card(X, plates, ctrl), 1e-5)
    # per-plate controls are standardised
    for p in np.unique(plates):
        c = ours[(plates == p) & ctrl]
        np.testing.assert_allclose(c.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(c.std(0), 1, atol=1e-5)


def test_pca_centerscale_n_components_and_save_load(tmp_path) -> None:
    X, plates, ctrl = _plates(1)
    model = PCACenterScale(n_components=5).fit(X, plates, ctrl)
    out = model.transform(X, plates)
    assert out.shape == (X.shape[0], 5)
    pca = PCA(n_components=5).fit(X[ctrl].astype(np.float64))
    ref = pca.transform(X.astype(np.float64))
    for p in np.unique(plates):
        m = plates == p
        ref[m] = StandardScaler().fit(ref[m & ctrl]).transform(ref[m])
    _assert_equal_up_to_column_sign(out, ref, 1e-5)

    model.save(tmp_path / "norm")
    loaded = PCACenterScale.load(tmp_path / "norm")
    assert (loaded.recipe, loaded.n_components, loaded.batches_) == ("card", 5, ["P1", "P2", "P3"])
    np.testing.assert_array_equal(loaded.transform(X, plates), out)


def test_pca_centerscale_unseen_batch_fits_its_own_scaler() -> None:
    X, plates, ctrl = _plates(2)
    fit = plates != "P3"
    model = PCACenterScale().fit(X[fit], plates[fit], ctrl[fit])
    out = model.transform(X, plates, ctrl)
    # float32 rows are projected in float32: a row's value may differ in the last bit with the other
    # rows of the call (the BLAS kernel handles the last rows of a block differently)
    np.testing.assert_allclose(out[fit], model.transform(X[fit], plates[fit]), rtol=1e-6, atol=1e-6)
    m = plates == "P3"
    Y = (X[m].astype(np.float64) - model.mean_) @ model.components_.T
    ref = StandardScaler().fit(Y[ctrl[m]]).transform(Y)
    np.testing.assert_allclose(out[m], ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="'P3'.*not seen"):
        model.transform(X, plates)  # no is_control for the new batch
    lonely = ctrl & ~(m & (np.cumsum(m & ctrl) > 1))  # P3 keeps a single control row
    with pytest.raises(ValueError, match="batch 'P3' has 1 control rows"):
        model.transform(X, plates, lonely)


def test_pca_centerscale_errors() -> None:
    X, plates, ctrl = _plates(3)
    bad = X.copy()
    bad[5, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        PCACenterScale().fit(bad, plates, ctrl)
    no_ctrl_p2 = ctrl & (plates != "P2")
    with pytest.raises(ValueError, match="batch 'P2' has 0 control rows"):
        PCACenterScale().fit(X, plates, no_ctrl_p2)
    with pytest.raises(ValueError, match="at least 2 control rows"):
        PCACenterScale().fit(X, plates, np.zeros_like(ctrl))
    with pytest.raises(ValueError, match="n_components"):
        PCACenterScale(n_components=50).fit(X, plates, ctrl)
    model = PCACenterScale().fit(X, plates, ctrl)
    with pytest.raises(ValueError, match="non-finite"):
        model.transform(bad, plates)


def test_pca_centerscale_zero_variance_component_gets_scale_one() -> None:
    X, plates, ctrl = _plates(4, d=4)
    X[:, 3] = X[:, 0]  # rank-deficient: last component has zero variance everywhere
    out = PCACenterScale(tol=0).fit_transform(X, plates, ctrl)
    assert np.isfinite(out).all()
    assert np.abs(out[:, 3]).max() < 1e-3  # centred, not blown up
