"""Normalization recipe steps against their peers, on the same data, to 1e-5.

- standardize / mad_robustize per plate = pycytominer 1.7.1 `normalize(method=...)` run plate by plate
  (and standardize = scikit-learn's StandardScaler);
- sphere (PCA, ZCA, PCA-cor, ZCA-cor; fit on controls or all rows) = pycytominer `normalize(method="spherize")`;
  PCA outputs are compared up to the sign of each component (an eigenvector's sign is arbitrary);
- feature_select keeps exactly the columns pycytominer `feature_select` keeps;
- card = the scikit-learn recipe (PCA on controls, per-plate StandardScaler) and bit-for-bit `PCACenterScale`;
- tvn = EFAAR `tvn_on_controls` written plainly with numpy/scipy below (no peer is installed).

Real profiles from ../shared/data (skipped when absent): the LINCS plate SQ00015054 (384 wells, 454
features, DMSO controls) and the pediatric cancer atlas Round 3 bulk profiles (3 plates, 2996 raw
features with NaN; a third of the features in the default run).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import linalg
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from bioembed_assets.profiles.normalize import PCACenterScale
from bioembed_assets.profiles.recipe import Recipe
from tests.conftest import SHARED_DATA

pycytominer = pytest.importorskip("pycytominer")
from pycytominer.operations import Spherize  # noqa: E402

LINCS = SHARED_DATA / "lincs-cp-SQ00015054/cytominer_eval/example_data/compound/SQ00015054_normalized_feature_select.csv.gz"
PEDIATRIC = SHARED_DATA / "pediatric-cancer-atlas-profiles/3.preprocessing_features/data/bulk_profiles/Round_3_data"
CTRL_QUERY = "Metadata_pert_type == 'control'"
TOL = dict(atol=1e-5, rtol=1e-5)


def _screen(seed: int = 0, d: int = 20, n_ctrl: int = 60, n_trt: int = 90) -> tuple[pd.DataFrame, list[str]]:
    """3 plates of correlated features with plate shift/scale; treated wells get extra signal."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d))
    parts = []
    for p in ("P1", "P2", "P3"):
        shift, scale = rng.normal(0, 2, d), 1 + rng.normal(0, 0.2, d)
        for is_ctrl, n in ((True, n_ctrl), (False, n_trt)):
            Z = (rng.normal(size=(n, d)) @ mix + (0 if is_ctrl else rng.normal(0, 1, (n, d)))) * scale + shift
            part = pd.DataFrame(Z, columns=[f"f{i}" for i in range(d)])
            part.insert(0, "Metadata_Plate", p)
            part.insert(1, "Metadata_pert_type", "control" if is_ctrl else "trt")
            parts.append(part)
    df = pd.concat(parts, ignore_index=True)
    return df, [f"f{i}" for i in range(d)]


def _arrays(df: pd.DataFrame, feats: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return df[feats].to_numpy(), df["Metadata_Plate"].to_numpy(), (df["Metadata_pert_type"] == "control").to_numpy()


def _meta(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("Metadata_")]


def _pycy_per_plate(df: pd.DataFrame, feats: list[str], method: str, samples: str) -> np.ndarray:
    """pycytominer has no per-plate option (issue #154): users loop over plates."""
    out = []
    for _, sub in df.groupby("Metadata_Plate", sort=False):
        norm = pycytominer.normalize(sub, features=feats, meta_features=_meta(df), samples=samples, method=method)
        out.append(norm[feats].to_numpy())
    return np.concatenate(out)


def _same_up_to_sign(ours: np.ndarray, ref: np.ndarray) -> None:
    sign = np.sign((ours * ref).sum(axis=0))
    np.testing.assert_allclose(ours * sign, ref, **TOL)


@pytest.mark.parametrize("method", ["standardize", "mad_robustize"])
@pytest.mark.parametrize("on", ["controls", "all"])
def test_per_plate_scaling_equals_pycytominer(method: str, on: str) -> None:
    df, feats = _screen()
    X, plates, ctrl = _arrays(df, feats)
    ours = Recipe.parse(f"{method}(on={on},by=plate)").fit(X, plates, ctrl).transform(X, plates)
    assert ours.dtype == np.float32
    ref = _pycy_per_plate(df, feats, method, CTRL_QUERY if on == "controls" else "all")
    np.testing.assert_allclose(ours, ref, **TOL)
    if method == "standardize":  # and scikit-learn's StandardScaler, per plate
        sk = np.empty_like(X)
        for p in np.unique(plates):
            m = plates == p
            sk[m] = StandardScaler().fit(X[m & ctrl] if on == "controls" else X[m]).transform(X[m])
        np.testing.assert_allclose(ours, sk, **TOL)


def test_global_standardize_equals_sklearn_and_float32_input() -> None:
    df, feats = _screen(1)
    X, plates, ctrl = _arrays(df, feats)
    ref = StandardScaler().fit(X).transform(X)
    for data in (X, X.astype(np.float32)):
        ours = Recipe.parse("standardize(on=all,by=global)").fit(data, plates, ctrl).transform(data, plates)
        np.testing.assert_allclose(ours, StandardScaler().fit(data.astype(np.float64)).transform(data), **TOL)
    np.testing.assert_allclose(ours, ref, atol=1e-4)  # float32 input rounds the data itself


@pytest.mark.parametrize("method", ["PCA", "ZCA", "PCA-cor", "ZCA-cor"])
@pytest.mark.parametrize("on", ["controls", "all"])
def test_sphere_equals_pycytominer(method: str, on: str) -> None:
    df, feats = _screen(2)
    X, plates, ctrl = _arrays(df, feats)
    ref = pycytominer.normalize(df, features=feats, meta_features=_meta(df), method="spherize", spherize_method=method,
                                samples=CTRL_QUERY if on == "controls" else "all")
    recipe = Recipe.parse(f"sphere(method={method.lower()},on={on},reg=0)").fit(X, plates, ctrl, feature_names=feats)
    ours = recipe.transform(X, plates)
    if method.startswith("PCA"):
        assert recipe.output_features == [c for c in ref.columns if c.startswith("PC")]
        _same_up_to_sign(ours, ref.drop(columns=_meta(df)).to_numpy())
    else:
        assert recipe.output_features == feats
        np.testing.assert_allclose(ours, ref[feats].to_numpy(), **TOL)
    fit = ours[ctrl] if on == "controls" else ours  # whitened: identity covariance on the fit rows
    np.testing.assert_allclose(np.cov(fit, rowvar=False), np.eye(len(feats)), atol=1e-4)


def test_sphere_rejects_collinear_features_that_pycytominer_whitens_silently() -> None:
    df, feats = _screen(3)
    df["f_sum"] = df["f0"] + df["f1"]  # exactly collinear
    feats = feats + ["f_sum"]
    X, plates, ctrl = _arrays(df, feats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spherize = Spherize(method="ZCA-cor").fit(df.loc[ctrl, feats])
    assert np.abs(spherize.W).max() > 1e5  # no error: the null direction gets a huge gain
    with pytest.raises(ValueError, match=r"exactly collinear.*'f0'.*'f1'.*'f_sum'"):
        Recipe.parse("sphere(method=zca-cor)").fit(X, plates, ctrl, feature_names=feats)


def _sklearn_card(X: np.ndarray, plates: np.ndarray, ctrl: np.ndarray) -> np.ndarray:
    Y = PCA().fit(X[ctrl]).transform(X)
    for p in np.unique(plates):
        m = plates == p
        Y[m] = StandardScaler().fit(Y[m & ctrl]).transform(Y[m])
    return Y


def test_card_equals_sklearn_recipe_and_pca_centerscale_bit_for_bit() -> None:
    df, feats = _screen(4)
    X, plates, ctrl = _arrays(df, feats)
    X = X.astype(np.float32)
    ours = Recipe.parse("card").fit(X, plates, ctrl).transform(X, plates)
    assert np.array_equal(ours, PCACenterScale().fit(X, plates, ctrl).transform(X, plates))
    _same_up_to_sign(ours, _sklearn_card(X.astype(np.float64), plates, ctrl))


def _tvn_reference(X: np.ndarray, plates: np.ndarray, ctrl: np.ndarray, coral: bool, by_batch: bool,
                   lam: float = 0.5) -> np.ndarray:
    """EFAAR tvn_on_controls, plainly: scale on controls, PCA on controls, scale on controls, CORAL per plate."""
    X = X.astype(np.float64).copy()

    def centerscale(Z: np.ndarray) -> np.ndarray:
        if not by_batch:
            return (Z - Z[ctrl].mean(0)) / Z[ctrl].std(0)
        for p in np.unique(plates):
            m = plates == p
            Z[m] = (Z[m] - Z[m & ctrl].mean(0)) / Z[m & ctrl].std(0)
        return Z

    Z = centerscale(X)
    C = Z[ctrl] - Z[ctrl].mean(0)
    _, _, Vt = np.linalg.svd(C, full_matrices=False)
    Z = centerscale((Z - Z[ctrl].mean(0)) @ Vt.T)
    if coral:
        for p in np.unique(plates):
            m = plates == p
            cov = np.cov(Z[m & ctrl], rowvar=False, ddof=1) + lam * np.eye(Z.shape[1])
            Z[m] = Z[m] @ np.real(linalg.fractional_matrix_power(cov, -0.5))
    return Z


@pytest.mark.parametrize("spec,coral,by_batch,n_ctrl", [
    ("tvn", True, False, 60), ("tvn(coral=false)", False, False, 60), ("tvn(by=plate,lam=2)", True, True, 60),
    ("tvn", True, False, 10),  # fewer controls per plate than dimensions: CORAL from the Gram matrix
])
def test_tvn_equals_plain_formula(spec: str, coral: bool, by_batch: bool, n_ctrl: int) -> None:
    df, feats = _screen(5, d=16, n_ctrl=n_ctrl)
    X, plates, ctrl = _arrays(df, feats)
    recipe = Recipe.parse(spec)
    ours = recipe.fit(X, plates, ctrl).transform(X, plates)
    ref = _tvn_reference(X, plates, ctrl, coral, by_batch, lam=2.0 if "lam=2" in spec else 0.5)
    _same_up_to_sign(ours, ref)
    assert recipe.output_features == [f"PC{i}" for i in range(1, 17)]


def test_feature_select_equals_pycytominer_synthetic() -> None:
    """Every operation has something to remove: NaN-heavy, near-constant, correlated and blocklisted columns."""
    df, feats = _screen(6, d=30)
    rng = np.random.default_rng(6)
    n = len(df)
    df["f_nan"] = np.where(rng.random(n) < 0.2, np.nan, rng.normal(size=n))
    df["f_fewnan"] = np.where(rng.random(n) < 0.01, np.nan, rng.normal(size=n))
    df["f_rare"] = np.where(rng.random(n) < 0.02, 1.0, 0.0)  # freq ratio < 0.05
    df["f_levels"] = rng.integers(0, 3, n).astype(float)  # few unique values
    df["f_tiny"] = 1 + 1e-5 * rng.normal(size=n)  # variance < 1e-6
    df["f_dup"] = df["f3"] * 2 + 1e-3 * rng.normal(size=n)  # correlated with f3
    df["Nuclei_Granularity_14_DNA"] = rng.normal(size=n)  # in the default blocklist
    feats = feats + ["f_nan", "f_fewnan", "f_rare", "f_levels", "f_tiny", "f_dup", "Nuclei_Granularity_14_DNA"]
    cases = [
        ("variance,correlation,nan,na_cutoff=0.05", ["frequency_threshold", "correlation_threshold", "drop_na_columns"], {}),
        ("nan,min_variance,blocklist,na_cutoff=0.1", ["drop_na_columns", "variance_threshold", "blocklist"], {"na_cutoff": 0.1}),
        ("correlation,variance,corr_threshold=0.5,freq_cut=0.1,unique_cut=0.1", ["correlation_threshold", "frequency_threshold"],
         {"corr_threshold": 0.5, "freq_cut": 0.1, "unique_cut": 0.1}),
    ]
    X, plates, ctrl = _arrays(df, feats)
    for ops, pycy_ops, kwargs in cases:
        for on, samples in (("all", "all"), ("controls", CTRL_QUERY)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = pycytominer.feature_select(df, features=feats, operation=pycy_ops, samples=samples, **kwargs)
            kept = [c for c in ref.columns if c in feats]
            recipe = Recipe.parse(f"feature_select({ops},on={on})").fit(X, plates, ctrl, feature_names=feats)
            assert recipe.output_features == kept, (ops, on)
            assert len(kept) < len(feats)


# ------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def lincs() -> pd.DataFrame:
    if not LINCS.exists():
        pytest.skip(f"real profiles not found: {LINCS}")
    return pd.read_csv(LINCS)


@pytest.mark.realdata
@pytest.mark.parametrize("method", ["standardize", "mad_robustize"])
def test_lincs_scaling_on_dmso_equals_pycytominer(lincs: pd.DataFrame, method: str) -> None:
    meta = _meta(lincs)
    feats = [c for c in lincs.columns if c not in meta]
    dmso = (lincs["Metadata_broad_sample"] == "DMSO").to_numpy()
    ref = pycytominer.normalize(lincs, features=feats, meta_features=meta, method=method,
                                samples="Metadata_broad_sample == 'DMSO'")
    X = lincs[feats].to_numpy()
    ours = Recipe.parse(method if method == "standardize" else "mad").fit(X, lincs["Metadata_Plate"], dmso).transform(
        X, lincs["Metadata_Plate"])
    np.testing.assert_allclose(ours, ref[feats].to_numpy(), **TOL)


@pytest.mark.realdata
@pytest.mark.parametrize("method", ["PCA", "ZCA", "PCA-cor", "ZCA-cor"])
def test_lincs_sphere_equals_pycytominer(lincs: pd.DataFrame, method: str) -> None:
    """Fit on all 384 wells: 120 of the 454 features (fewer fit rows than features is singular)."""
    meta = _meta(lincs)
    feats = [c for c in lincs.columns if c not in meta][:120]
    ref = pycytominer.normalize(lincs, features=feats, meta_features=meta, method="spherize", spherize_method=method)
    X = lincs[feats].to_numpy()
    plates = lincs["Metadata_Plate"].to_numpy()
    ours = Recipe.parse(f"sphere(method={method},on=all)").fit(X, plates, np.zeros(len(X), bool)).transform(X, plates)
    R = ref.drop(columns=meta).to_numpy()
    if method.startswith("PCA"):
        _same_up_to_sign(ours, R)
    else:
        np.testing.assert_allclose(ours, R, **TOL)


@pytest.mark.realdata
def test_lincs_sphere_needs_reg_with_fewer_controls_than_features(lincs: pd.DataFrame) -> None:
    meta = _meta(lincs)
    feats = [c for c in lincs.columns if c not in meta]
    X, plates = lincs[feats].to_numpy(), lincs["Metadata_Plate"].to_numpy()
    dmso = (lincs["Metadata_broad_sample"] == "DMSO").to_numpy()
    with pytest.raises(ValueError, match=r"24 fit rows for 454 features.*singular.*reg > 0"):
        Recipe.parse("sphere").fit(X, plates, dmso)
    out = Recipe.parse("sphere(reg=0.1)").fit(X, plates, dmso).transform(X, plates)
    assert np.isfinite(out).all()


@pytest.mark.realdata
@pytest.mark.parametrize("ops,pycy_ops,kwargs", [
    ("variance,correlation", ["frequency_threshold", "correlation_threshold"], {}),
    ("correlation,min_variance,corr_threshold=0.6,min_variance=1.0", ["correlation_threshold", "variance_threshold"],
     {"corr_threshold": 0.6, "min_variance": 1.0}),
])
def test_lincs_feature_select_equals_pycytominer(lincs: pd.DataFrame, ops: str, pycy_ops: list[str], kwargs: dict) -> None:
    meta = _meta(lincs)
    feats = [c for c in lincs.columns if c not in meta]
    ref = pycytominer.feature_select(lincs, features=feats, operation=pycy_ops, **kwargs)
    X = lincs[feats].to_numpy()
    ours = Recipe.parse(f"feature_select({ops})").fit(X, lincs["Metadata_Plate"], np.ones(len(X), bool), feature_names=feats)
    assert ours.output_features == [c for c in ref.columns if c in feats]


def _pediatric(every: int) -> tuple[pd.DataFrame, list[str]]:
    files = sorted(PEDIATRIC.glob("*_bulk_annotated.parquet"))
    if not files:
        pytest.skip(f"real profiles not found: {PEDIATRIC}")
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    feats = [c for c in df.columns if not c.startswith("Metadata_")][::every]
    return df[_meta(df) + feats], feats


def _pediatric_vs_pycytominer(every: int) -> None:
    df, feats = _pediatric(every)
    X, plates = df[feats].to_numpy(), df["Metadata_Plate"].to_numpy()
    assert np.isnan(X).any()
    # correlation before nan: pycytominer's pandas pairwise-complete correlation path
    ops = ["frequency_threshold", "correlation_threshold", "drop_na_columns", "blocklist"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        selected = pycytominer.feature_select(df, features=feats, operation=ops)
    kept = [c for c in selected.columns if c in feats]
    recipe = Recipe.parse("feature_select(variance,correlation,nan,blocklist,na_cutoff=0.05)|standardize(on=all,by=plate)")
    # pycytominer's na_cutoff keeps columns with a few NaN; our standardize rejects them: drop them first
    with pytest.raises(ValueError, match=r"non-finite values.*row \d+, feature '\w+'"):
        recipe.fit(X, plates, np.zeros(len(X), bool), feature_names=feats)
    recipe = Recipe.parse("feature_select(variance,correlation,nan,blocklist,na_cutoff=0.05)")
    assert recipe.fit(X, plates, np.zeros(len(X), bool), feature_names=feats).output_features == kept
    # the full recipe: drop every NaN column, then per-plate standardize on all wells
    recipe = Recipe.parse("feature_select(nan,variance,correlation,blocklist)|standardize(on=all,by=plate)")
    ours = recipe.fit(X, plates, np.zeros(len(X), bool), feature_names=feats).transform(X, plates)
    ops = ["drop_na_columns", "frequency_threshold", "correlation_threshold", "blocklist"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        selected = pycytominer.feature_select(df, features=feats, operation=ops, na_cutoff=0.0)
    kept = [c for c in selected.columns if c in feats]
    assert recipe.output_features == kept
    ref = _pycy_per_plate(selected, kept, "standardize", "all")
    np.testing.assert_allclose(ours, ref, **TOL)


@pytest.mark.realdata
def test_pediatric_feature_select_and_standardize_equal_pycytominer() -> None:
    _pediatric_vs_pycytominer(every=3)


@pytest.mark.realdata
@pytest.mark.slow
def test_pediatric_all_features_equal_pycytominer() -> None:
    _pediatric_vs_pycytominer(every=1)
