"""Numerics of the control-PCA steps (`pca_centerscale` = the card recipe, `tvn`) on raw, badly scaled
features: component choice (n_components / variance / tol), float64 where float32 cannot resolve the
kept components, scikit-learn equality, float32 == float64 input, save/load of the recorded choice."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

import bioembed_assets.profiles.normalize as normalize
from bioembed_assets.profiles.normalize import DEFAULT_TOL, PCACenterScale
from bioembed_assets.profiles.recipe import Recipe
from bioembed_assets.sources.synthetic_profiles import SyntheticProfilesConfig, generate_profiles


def _badly_scaled(seed: int = 0, d: int = 60, n_plates: int = 4, n_ctrl: int = 160, n_trt: int = 120,
                  n_perts: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw-CellProfiler-like float64 wells: feature scales log-uniform over 1e-4..1e4 with offsets of
    ~2 stds, blocks of features sharing one of 12 latent factors (correlated blocks), per-plate shift
    and scale, treated wells shifted along the latent factors, and 7 near-collinear features
    x_a + 0.5 x_b + r (x_a's scale) noise of two of the largest features: 4 with r = 1e-7 (rounding-
    noise eigenvalues, ~1e-14 of the largest) and 3 with r = 3e-3 (kept, but a near-cancellation that
    float32 arithmetic cannot resolve). Control eigenvalues span ~1 down to ~1e-23 of the largest."""
    rng = np.random.default_rng(seed)
    n_lat, resid = 12, np.array([1e-7] * 4 + [3e-3] * 3)
    base = d - resid.size
    scale = 10.0 ** rng.uniform(-4, 4, base)
    block = rng.integers(0, n_lat, base)
    load = rng.normal(size=base) * 0.9
    offset = scale * rng.normal(0, 2, base)
    effects = rng.normal(0, 1.0, (n_perts, n_lat)) * (rng.random(n_perts) < 0.6)[:, None]
    src = np.array([rng.choice(np.argsort(scale)[-8:], 2, replace=False) for _ in resid])
    Xs, plates, ctrl = [], [], []
    for p in range(n_plates):
        shift, mult = rng.normal(0, 0.3, base), 1 + rng.normal(0, 0.05, base)
        n = n_ctrl + n_trt
        Z = rng.normal(size=(n, n_lat))
        Z[n_ctrl:] += effects[rng.integers(0, n_perts, n_trt)]
        F = offset + scale * ((load * Z[:, block] + 0.5 * rng.normal(size=(n, base)) + shift) * mult)
        near = F[:, src[:, 0]] + 0.5 * F[:, src[:, 1]] + resid * scale[src[:, 0]] * rng.normal(size=(n, resid.size))
        Xs.append(np.concatenate([F, near], axis=1))
        plates += [f"P{p + 1}"] * n
        ctrl += [True] * n_ctrl + [False] * n_trt
    return np.concatenate(Xs), np.array(plates), np.array(ctrl)


def _sklearn_card(X: np.ndarray, plates: np.ndarray, ctrl: np.ndarray, k: int) -> np.ndarray:
    """The card recipe with scikit-learn: PCA (k components, exact SVD) on pooled controls, then per
    plate a StandardScaler fitted on the plate's projected controls."""
    Y = PCA(n_components=k, svd_solver="full").fit(X[ctrl]).transform(X)
    for p in np.unique(plates):
        m = plates == p
        Y[m] = StandardScaler().fit(Y[m & ctrl]).transform(Y[m])
    return Y


def _control_eigenvalues(X: np.ndarray, ctrl: np.ndarray) -> np.ndarray:
    C = X[ctrl] - X[ctrl].mean(axis=0)
    return np.linalg.svd(C, compute_uv=False) ** 2 / (C.shape[0] - 1)


def _rel_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per component: max |a - b| over rows / std of b."""
    return np.abs(a.astype(np.float64) - b).max(axis=0) / b.astype(np.float64).std(axis=0)


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    return (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))


def _neighbours(Y: np.ndarray, k: int = 5) -> np.ndarray:
    U = Y.astype(np.float64) / np.linalg.norm(Y, axis=1, keepdims=True)
    S = U @ U.T
    np.fill_diagonal(S, -np.inf)
    return np.sort(np.argsort(-S, axis=1)[:, :k], axis=1)


D_PATHS = [60, 100]  # 640 controls: >= 10 d (scatter-matrix eigh) and < 10 d (thin SVD)


# ------------------------------------------------------------------------------------------------ (a) scikit-learn


@pytest.mark.parametrize("d", D_PATHS)
def test_card_float64_equals_sklearn_on_badly_scaled_features(d: int) -> None:
    X, plates, ctrl = _badly_scaled(d=d)
    recipe = Recipe.parse("card").fit(X, plates, ctrl)
    ours = recipe.transform(X, plates)
    step = recipe.steps[0]
    k = ours.shape[1]
    lam = _control_eigenvalues(X, ctrl)
    assert k == int((lam > DEFAULT_TOL * lam[0]).sum()) < d  # rounding-noise components are dropped
    assert step.pca_info_["selection"] == "tol" and step.pca_info_["n_components"] == k
    ref = _sklearn_card(X, plates, ctrl, k)
    sign = np.sign((ours * ref).sum(axis=0))
    np.testing.assert_allclose(ours, ref * sign, atol=1e-5, rtol=1e-5)
    model = PCACenterScale().fit(X, plates, ctrl)  # the card preset is PCACenterScale, bit for bit
    assert model.n_components == k and model.selection_ == "tol"
    assert np.array_equal(model.transform(X, plates), ours)


def test_card_preset_is_pca_centerscale_bit_for_bit_on_the_float64_path() -> None:
    """float32 rows computed in float64, including a plate first seen in transform."""
    X, plates, ctrl = _badly_scaled(seed=7)
    X32, fit = X.astype(np.float32), plates != "P4"
    recipe = Recipe.parse("card").fit(X32[fit], plates[fit], ctrl[fit])
    model = PCACenterScale().fit(X32[fit], plates[fit], ctrl[fit])
    assert recipe.steps[0].precision_ == model.precision_ == "float64"
    assert np.array_equal(recipe.transform(X32, plates, ctrl), model.transform(X32, plates, ctrl))


# ------------------------------------------------------------------------------------------------ (b, c) float32 == float64


@pytest.mark.parametrize("d", D_PATHS)
@pytest.mark.parametrize("spec", ["card", "tvn", "tvn(coral=false)"])
def test_float32_input_gives_the_float64_output_on_badly_scaled_features(spec: str, d: int) -> None:
    X, plates, ctrl = _badly_scaled(seed=1, d=d)
    X32 = X.astype(np.float32)
    r64, r32 = Recipe.parse(spec).fit(X, plates, ctrl), Recipe.parse(spec).fit(X32, plates, ctrl)
    y64, y32 = r64.transform(X, plates), r32.transform(X32, plates)
    assert y32.shape == y64.shape and y64.shape[1] < d
    assert r32.steps[0].pca_info_["n_components"] == r64.steps[0].pca_info_["n_components"]
    corr = np.abs(_corr(y32.astype(np.float64), y64.astype(np.float64)))
    assert corr.min() > 0.9999, (spec, corr.min(), int(corr.argmin()))
    assert _rel_diff(np.abs(y32), np.abs(y64)).max() < 1e-3
    # (c) the same nearest neighbours (cosine) of every well
    same = (_neighbours(y32) == _neighbours(y64)).all(axis=1)
    assert same.mean() >= 0.99, (spec, same.mean())
    # the kept near-cancellations of large features are more than float32 arithmetic resolves
    for r in (r32, r64):
        assert r.steps[0].precision_ == "float64"
        assert r.steps[0].pca_info_["float32_noise"] > normalize.FLOAT32_NOISE_MAX


@pytest.mark.parametrize("spec", ["card", "tvn(coral=false)"])
def test_float32_arithmetic_would_add_the_noise_the_rule_predicts(spec: str, monkeypatch) -> None:
    """Why the rule: forced to compute these float32 rows in float32, the output moves by more than
    1e-4 of a component's scale, within the predicted `float32_noise` (rms, an estimate from above)."""
    X, plates, ctrl = _badly_scaled(seed=1)
    X32 = X.astype(np.float32)
    auto = Recipe.parse(spec).fit(X32, plates, ctrl)
    y64 = auto.transform(X32, plates)  # float64 arithmetic on the same float32 numbers
    monkeypatch.setattr(normalize, "FLOAT32_NOISE_MAX", np.inf)
    forced = Recipe.parse(spec).fit(X32, plates, ctrl)
    assert forced.steps[0].precision_ == "float32"
    y32 = forced.transform(X32, plates)
    predicted = forced.steps[0].pca_info_["float32_noise"]
    assert predicted == auto.steps[0].pca_info_["float32_noise"] > 1e-4
    err = y32.astype(np.float64) - y64
    assert _rel_diff(y32, y64).max() > 1e-4
    assert err.std(axis=0).max() <= predicted


@pytest.mark.parametrize("spec", ["card", "tvn"])
def test_well_scaled_embeddings_keep_every_component_and_the_float32_path(spec: str) -> None:
    meta, X = generate_profiles(SyntheticProfilesConfig(n_rows=6000, n_features=128, wells_per_plate=384,
                                                        controls_per_plate=100, seed=3))
    plates, ctrl = meta["plate"].to_numpy(), (meta["control_type"] == "negative").to_numpy()
    step = Recipe.parse(spec).fit(X, plates, ctrl).steps[0]
    assert step.precision_ == "float32" and step.pca_info_["float32_noise"] < 1e-5
    assert step.pca_info_["selection"] == "all" and step.components_.shape[0] == 128


def test_exactly_null_component_is_dropped_by_default_and_centred_with_tol_zero() -> None:
    X, plates, ctrl = _badly_scaled(seed=2, d=20)
    X = X[:, :8].copy()
    X[:, 7] = X[:, 0]  # rank-deficient
    X = X.astype(np.float32)
    assert PCACenterScale().fit_transform(X, plates, ctrl).shape[1] < 8
    out = PCACenterScale(tol=0).fit_transform(X, plates, ctrl)  # no tolerance: kept, only centred (scale 1)
    assert out.shape[1] == 8 and np.isfinite(out).all() and np.abs(out[:, 7]).max() < 1e-3


# ------------------------------------------------------------------------------------------------ (d) options


def test_component_options_keep_the_right_number_of_components() -> None:
    X, plates, ctrl = _badly_scaled(seed=3)
    lam = _control_eigenvalues(X, ctrl)
    k_tol = int((lam > DEFAULT_TOL * lam[0]).sum())

    def fitted(spec: str) -> tuple[int, str]:
        info = Recipe.parse(spec).fit(X, plates, ctrl).steps[0].pca_info_
        return info["n_components"], info["selection"]

    assert fitted("pca_centerscale(n_components=5)") == (5, "n_components")
    assert fitted(f"pca_centerscale(n_components={k_tol + 5})") == (k_tol, "tol")  # never the noise components
    assert fitted("pca_centerscale(tol=1e-4)") == (int((lam > 1e-4 * lam[0]).sum()), "tol")
    assert fitted("pca_centerscale(tol=0)") == (X.shape[1], "all")
    k99 = PCA(n_components=0.99, svd_solver="full").fit(X[ctrl]).n_components_
    assert fitted("pca_centerscale(variance=0.99)") == (k99, "variance")
    assert fitted("pca_centerscale(variance=0.99,n_components=1)") == (1, "n_components")
    info = Recipe.parse("pca_centerscale(variance=0.99)").fit(X, plates, ctrl).steps[0].pca_info_
    assert info["explained_variance"] > 0.99
    # tvn: the same options on the PCA of the controls scaled to unit variance
    Z = (X - X[ctrl].mean(axis=0)) / X[ctrl].std(axis=0)
    lam_z = _control_eigenvalues(Z, ctrl)
    for spec, k in [("tvn", int((lam_z > DEFAULT_TOL * lam_z[0]).sum())), ("tvn(tol=0.01)", int((lam_z > 0.01 * lam_z[0]).sum())),
                    ("tvn(variance=0.9)", PCA(n_components=0.9, svd_solver="full").fit(Z[ctrl]).n_components_),
                    ("tvn(n_components=7,coral=false)", 7)]:
        recipe = Recipe.parse(spec).fit(X, plates, ctrl)
        assert recipe.steps[0].pca_info_["n_components"] == k == len(recipe.output_features), spec
    assert Recipe.parse("tvn").fit(X, plates, ctrl).steps[0].pca_info_["n_components"] == X.shape[1] - 4  # the 4 near-collinear


def test_component_options_have_canonical_specs_and_are_checked() -> None:
    assert Recipe.parse("card").spec == "pca_centerscale(n_components=all)"
    assert Recipe.parse(f"pca_centerscale(tol={DEFAULT_TOL},variance=1)").spec == "pca_centerscale(n_components=all)"
    assert (Recipe.parse("pca_centerscale(tol=1e-6, variance=0.95, n_components=10)").spec
            == "pca_centerscale(n_components=10,variance=0.95,tol=1e-06)")
    assert Recipe.parse("tvn(tol=0)").spec == "tvn(by=global,n_components=all,tol=0.0,coral=true,lam=0.5)"
    assert Recipe.parse("tvn(variance=0.5,coral=false)").spec == "tvn(by=global,n_components=all,variance=0.5,coral=false)"
    for text, match in [("pca_centerscale(variance=0)", r"variance='0' must be in \(0.0, 1.0\]"),
                        ("pca_centerscale(variance=1.5)", r"variance='1.5' must be in"),
                        ("tvn(tol=-1)", r"tol='-1' must be in \[0.0, 1.0\]"),
                        ("pca_centerscale(tol=1)", r"pca_centerscale: tol must be in \[0, 1\)")]:
        with pytest.raises(ValueError, match=match):
            Recipe.parse(text)
    with pytest.raises(ValueError, match=r"tol must be in \[0, 1\)"):
        PCACenterScale(tol=1.0)


# ------------------------------------------------------------------------------------------------ (e) save / load


@pytest.mark.parametrize("spec", ["card", "tvn", "pca_centerscale(variance=0.999)"])
def test_save_load_keeps_the_choice_and_the_precision(spec: str, tmp_path) -> None:
    X, plates, ctrl = _badly_scaled(seed=4)
    X32 = X.astype(np.float32)
    fit = plates != "P4"
    recipe = Recipe.parse(spec).fit(X32[fit], plates[fit], ctrl[fit])
    out = recipe.transform(X32, plates, ctrl)  # P4 is new: its scaler is fitted on its own controls
    recipe.save(tmp_path / "norm")
    params = json.loads((tmp_path / "norm" / "recipe.json").read_text())["steps"][0]["params"]
    step = recipe.steps[0]
    assert params["pca"] == step.pca_info_ and params["pca"]["n_components"] == out.shape[1]
    assert params["pca"]["precision"] == step.precision_
    loaded = Recipe.load(tmp_path / "norm")
    assert loaded.spec == recipe.spec and loaded.steps[0].precision_ == step.precision_
    np.testing.assert_array_equal(loaded.steps[0].eigenvalues_, step.eigenvalues_)
    assert np.array_equal(loaded.transform(X32, plates, ctrl), out)


def test_states_saved_before_the_choice_existed_still_load(tmp_path) -> None:
    """A recipe saved without the `pca` record and eigenvalues loads, with the old float32 path."""
    X, plates, ctrl = _badly_scaled(seed=5)
    X32 = X.astype(np.float32)
    recipe = Recipe.parse("card").fit(X32, plates, ctrl)
    recipe.save(tmp_path / "norm")
    info = json.loads((tmp_path / "norm" / "recipe.json").read_text())
    del info["steps"][0]["params"]["pca"]
    (tmp_path / "norm" / "recipe.json").write_text(json.dumps(info))
    with np.load(tmp_path / "norm" / "arrays.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "s0.eigenvalues"}
    np.savez(tmp_path / "norm" / "arrays.npz", **arrays)
    loaded = Recipe.load(tmp_path / "norm")
    assert loaded.spec == "pca_centerscale(n_components=all)"
    assert loaded.steps[0].precision_ == "float32" and loaded.steps[0].eigenvalues_ is None
    ref = recipe.steps[0]
    expected = normalize.project_scale(X32, ref.mean_, ref.components_, ref.batch_mean_, ref.batch_scale_,
                                       np.unique(plates, return_inverse=True)[1], precision="float32")
    np.testing.assert_allclose(loaded.transform(X32, plates), expected, rtol=1e-6, atol=1e-6)


def test_pca_centerscale_save_load_records_the_choice(tmp_path) -> None:
    X, plates, ctrl = _badly_scaled(seed=6)
    model = PCACenterScale(variance=0.999).fit(X, plates, ctrl)
    model.save(tmp_path / "m")
    loaded = PCACenterScale.load(tmp_path / "m")
    assert (loaded.n_components, loaded.selection_, loaded.precision_, loaded.variance, loaded.tol) == (
        model.n_components, "variance", model.precision_, 0.999, DEFAULT_TOL)
    assert np.array_equal(loaded.transform(X, plates), model.transform(X, plates))
    info = json.loads((tmp_path / "m" / "pca_centerscale.json").read_text())
    legacy = {k: info[k] for k in ("recipe", "n_components", "batches")}  # written before variance / tol
    (tmp_path / "m" / "pca_centerscale.json").write_text(json.dumps(legacy))
    old = PCACenterScale.load(tmp_path / "m")
    assert (old.tol, old.variance, old.precision_) == (0.0, 1.0, "float32")
    assert np.array_equal(old.transform(X, plates), model.transform(X, plates))  # float64 rows: float64 either way
