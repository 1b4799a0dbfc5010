"""Batch correction the JUMP way: the `inverse_normal` and `harmony` recipe steps against scipy and
harmonypy on the same data, and the `jump_harmony` preset (var -> mad -> int -> featselect -> harmony)."""

from __future__ import annotations

import harmonypy
import numpy as np
import pytest
import scipy.stats as ss

from bioembed_assets.evaluate.batch import batch_effect_scores
from bioembed_assets.profiles.harmony import Harmony, ridge_corrections
from bioembed_assets.profiles.rank_int import InverseNormal
from bioembed_assets.profiles.recipe import PRESETS, Recipe
from bioembed_assets.profiles.selection import FeatureSelect, default_blocklist
from bioembed_assets.profiles.steps import FitData

BLOM = 3.0 / 8.0


def _int_reference(X: np.ndarray, c: float = BLOM) -> np.ndarray:
    """JUMP's rank_int_array(stochastic=False) per column: norm.ppf((rank - c) / (n - 2c + 1)), average ties."""
    return ss.norm.ppf((ss.rankdata(X, method="average", axis=0) - c) / (X.shape[0] - 2 * c + 1))


def _fit_data(X: np.ndarray, batches: np.ndarray | None = None) -> FitData:
    labels, codes = np.unique(np.zeros(len(X), dtype=int) if batches is None else batches, return_inverse=True)
    return FitData(X, codes.reshape(-1), [str(v) for v in labels], np.ones(len(X), dtype=bool),
                   [f"f{j}" for j in range(X.shape[1])], np.arange(len(X)))


def _screen(seed: int = 0, noise_seed: int | None = None, d: int = 20, n_batches: int = 4, n_groups: int = 5,
            per: int = 25, shift: float = 4.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of `n_groups` biological groups in every batch, each batch shifted by N(0, shift^2) per feature
    (a strong batch effect: raw rows are kNN-classified by batch perfectly). `noise_seed` draws new wells
    of the same groups and batches."""
    rng = np.random.default_rng(seed)
    centers, shifts = rng.normal(0, 3, (n_groups, d)), rng.normal(0, shift, (n_batches, d))
    b = np.repeat(np.arange(n_batches), n_groups * per)
    g = np.tile(np.repeat(np.arange(n_groups), per), n_batches)
    noise = rng if noise_seed is None else np.random.default_rng(noise_seed)
    X = centers[g] + shifts[b] + noise.normal(0, 1, (b.size, d))
    return X, np.array([f"W{i + 1}" for i in b]), g


def _harmonypy(X: np.ndarray, batches: np.ndarray, step: Harmony, **kwargs) -> harmonypy.Harmony:
    """harmonypy itself with the step's settings (its defaults otherwise)."""
    o = step.opts
    return harmonypy.run_harmony(X, {"batch": batches}, "batch", nclust=step.n_clusters_for(len(X)),
                                 max_iter_harmony=o["max_iter"], theta=o["theta"], sigma=o["sigma"],
                                 random_state=o["seed"], verbose=False, **kwargs)


def _rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref - ref.mean(axis=0)))


# ------------------------------------------------------------------------------------------- inverse_normal


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("c", [BLOM, 0.0, 0.5])
def test_inverse_normal_on_its_fit_rows_is_the_rank_formula_exactly(ties: bool, c: float) -> None:
    rng = np.random.default_rng(0)
    X = rng.lognormal(size=(300, 6))
    if ties:
        X = np.round(X, 1)  # many tied values: they share the average of their ranks
        assert all(np.unique(X[:, j]).size < 300 for j in range(6))
    step = InverseNormal(c=c)
    step.fit(_fit_data(X))
    Y = step.apply(X, np.zeros(300, dtype=np.int64), {})
    assert np.array_equal(Y, _int_reference(X, c))  # bit for bit, float64
    if c == BLOM and not ties:  # JUMP's default stochastic tie-breaking changes nothing without ties
        assert np.array_equal(Y, ss.norm.ppf((ss.rankdata(X, method="ordinal", axis=0) - c) / (300 - 2 * c + 1)))


def test_inverse_normal_maps_new_values_through_the_fit_distribution() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 3)) ** 3
    step = InverseNormal()
    step.fit(_fit_data(X))
    ref = _int_reference(X)
    lo, hi = X.min(axis=0), X.max(axis=0)
    new = np.array([lo - 5, hi + 5, X[7], (np.sort(X, axis=0)[10] + np.sort(X, axis=0)[11]) / 2])
    Y = step.apply(new, np.zeros(4, dtype=np.int64), {})
    assert np.array_equal(Y[0], ref.min(axis=0)) and np.array_equal(Y[1], ref.max(axis=0))  # clamped to the fit range
    assert np.array_equal(Y[2], ref[7])  # a fit value keeps its score
    between = ss.norm.ppf((11.5 - BLOM) / (200 + 0.25))  # halfway between the 11th and 12th values: rank 11.5
    np.testing.assert_allclose(Y[3], between, rtol=0, atol=1e-12)


def test_inverse_normal_caps_stored_quantiles_and_interpolates_ranks() -> None:
    rng = np.random.default_rng(2)
    n, cap = 6000, 500
    X = rng.standard_t(3, size=(n, 4))
    step = InverseNormal(max_points=cap)
    step.fit(_fit_data(X))
    assert step.knots_.shape[0] == 4 and cap // 2 < step.knots_.shape[1] <= cap and step.n_knots_.max() <= cap
    Y = step.apply(X, np.zeros(n, dtype=np.int64), {})
    ref = _int_reference(X)
    z_max = -ss.norm.ppf((1 - BLOM) / (n + 0.25))
    assert np.abs(Y - ref).max() <= 2 * z_max / (cap - 1)  # the spacing of the stored scores, 0.0149 (measured 0.0117)
    assert np.abs(Y - ref).mean() < 1e-3 and np.corrcoef(Y.ravel(), ref.ravel())[0, 1] > 0.999999
    extremes = np.concatenate([np.argmin(X, axis=0), np.argmax(X, axis=0)])
    assert np.array_equal(Y[extremes, np.tile(np.arange(4), 2)], ref[extremes, np.tile(np.arange(4), 2)])


def test_inverse_normal_on_controls_ranks_against_the_controls(tmp_path) -> None:
    rng = np.random.default_rng(3)
    X = rng.gamma(2.0, size=(240, 5))
    plates = np.repeat(["P1", "P2", "P3"], 80)
    ctrl = rng.random(240) < 0.3
    recipe = Recipe.parse("inverse_normal(on=controls)").fit(X, plates, ctrl)
    assert recipe.spec == "inverse_normal(on=controls,c=0.375,max_points=2000)"
    Y = recipe.transform(X, plates, ctrl)
    np.testing.assert_array_equal(Y[ctrl], _int_reference(X[ctrl]).astype(np.float32))
    order = np.argsort(X, axis=0)
    assert (np.diff(np.take_along_axis(Y, order, axis=0), axis=0) >= 0).all()  # monotone in the value
    recipe.save(tmp_path / "r")
    assert np.array_equal(Recipe.load(tmp_path / "r").transform(X, plates), Y)


# ------------------------------------------------------------------------------------------------- harmony


def test_harmony_stores_harmonypys_final_mixture_of_experts_correction() -> None:
    """The stored per-cluster, per-batch ridge corrections, applied with harmonypy's own soft
    assignments R, give harmonypy's Z_corr (to its float32 arithmetic: measured max |diff| 1.5e-6)."""
    X, b, _ = _screen(0)
    codes = np.unique(b, return_inverse=True)[1]
    ho = _harmonypy(X, b, Harmony())
    R, Zc = np.asarray(ho.R), np.asarray(ho.Z_corr)
    W, O, E = ridge_corrections(X, codes, 4, R, None)
    assert W.shape == (4, ho.K, 20)
    np.testing.assert_allclose(X - np.einsum("nk,nkd->nd", R, W[codes]), Zc, rtol=0, atol=2e-5)
    np.testing.assert_allclose(O.sum(axis=1), R.sum(axis=0))
    np.testing.assert_allclose(E.sum(axis=1), R.sum(axis=0))


@pytest.mark.parametrize(("seed", "d", "tol"), [(0, 20, 5e-3), (0, 10, 5e-3), (3, 20, 2e-4)])
def test_harmony_apply_on_its_fit_rows_reproduces_harmonypy(seed: int, d: int, tol: float) -> None:
    """apply() recomputes each row's soft assignment from the data (not harmonypy's R): on the fit
    rows it lands on harmonypy's Z_corr up to Harmony's own iteration-to-iteration movement.
    Measured relative errors: 9.8e-4, 9.9e-4, 3.4e-5 (without the diversity factor in the soft
    assignment: 1.8e-3, 5.6e-2, 6.5e-4)."""
    X, b, g = _screen(seed, d=d)
    recipe = Recipe.parse("harmony").fit(X, b, g == 0)
    step = recipe.steps[0]
    assert step.n_iter_ > 1 and step.centroids_.shape == (d, 17)  # 500 rows: 17 clusters, not 300
    out = step.apply(X, np.unique(b, return_inverse=True)[1], step.stored_tables())
    Zc = np.asarray(_harmonypy(X, b, step).Z_corr)
    assert _rel_error(out, Zc) < tol
    assert np.corrcoef(out.ravel(), Zc.ravel())[0, 1] > 0.9999
    assert min(np.corrcoef(out[:, j], Zc[:, j])[0, 1] for j in range(d)) > 0.999
    assert np.abs(recipe.transform(X, b) - out).max() < 1e-5  # the recipe's float32 output


def test_harmony_mixes_batches_and_keeps_biology_like_harmonypy() -> None:
    X, b, g = _screen(0)
    out = Recipe.parse("harmony").fit_transform(X, b, g == 0)
    Zc = np.asarray(_harmonypy(X, b, Harmony()).Z_corr)
    raw, ours, ref = (batch_effect_scores(Z, b) for Z in (X, out, Zc))
    assert raw["batch_knn_accuracy"] == 1.0 and raw["batch_silhouette"] > 0.5
    assert ours["batch_knn_accuracy"] < 0.8 and ours["batch_silhouette"] < 0.15 and ours["batch_knn_entropy"] > 0.25
    for key in ("batch_knn_accuracy", "batch_silhouette", "batch_knn_entropy"):
        assert abs(ours[key] - ref[key]) < 0.02, key
    bio_raw, bio = batch_effect_scores(X, g.astype(str)), batch_effect_scores(out, g.astype(str))
    assert bio["batch_knn_accuracy"] == 1.0  # biological groups stay retrievable ...
    assert bio["batch_silhouette"] > bio_raw["batch_silhouette"] + 0.1  # ... and separate better once batches mix


def test_harmony_corrects_new_wells_of_fitted_batches() -> None:
    """Rows harmonypy never saw (new wells of the same batches) get the fitted batch corrections: their
    batch silhouette drops as the fit rows' does, and they mix with the corrected fit rows."""
    X, b, g = _screen(0)
    recipe = Recipe.parse("harmony").fit(X, b, g == 0)
    fit_out = recipe.transform(X, b)
    Xn, bn, gn = _screen(0, noise_seed=11)
    new_out = recipe.transform(Xn, bn)
    raw, new = batch_effect_scores(Xn, bn), batch_effect_scores(new_out, bn)
    assert raw["batch_silhouette"] > 0.5 and new["batch_silhouette"] < 0.15 and new["batch_knn_accuracy"] < 0.9
    assert batch_effect_scores(new_out, gn.astype(str))["batch_knn_accuracy"] == 1.0
    both = np.vstack([fit_out, new_out])
    source = np.repeat(["fit", "new"], len(X))
    assert batch_effect_scores(both, source)["batch_knn_accuracy"] < 0.6  # chance 0.5: indistinguishable


def test_harmony_save_load_round_trip_is_identical(tmp_path) -> None:
    X, b, g = _screen(0)
    recipe = Recipe.parse("harmony(n_clusters=8,theta=1.5,lamb=1)").fit(X, b, g == 0)
    assert recipe.steps[0].centroids_.shape[1] == 8
    recipe.save(tmp_path / "r")
    loaded = Recipe.load(tmp_path / "r")
    assert loaded.spec == "harmony(on=all,by=batch,n_clusters=8,max_iter=20,theta=1.5,sigma=0.1,lamb=1.0,seed=0)"
    Xn, bn, _ = _screen(0, noise_seed=5)
    for rows, labels in ((X, b), (Xn, bn)):
        assert np.array_equal(loaded.transform(rows, labels), recipe.transform(rows, labels))


def test_harmony_refuses_batches_it_has_no_corrections_for() -> None:
    X, b, g = _screen(0)
    recipe = Recipe.parse("harmony").fit(X, b, g == 0)
    other = np.where(b == "W2", "W9", b)
    with pytest.raises(ValueError, match=r"harmony: batch 'W9' was not seen in fit; Harmony corrections exist only"):
        recipe.transform(X, other, g == 0)
    with pytest.raises(ValueError, match=r"harmony: batch 'W9' was not seen in fit"):
        recipe.transform(X, other)
    ctrl = (g == 0) & (b != "W3")  # fitted on controls, and batch W3 has none
    recipe = Recipe.parse("harmony(on=controls)").fit(X, b, ctrl)
    assert recipe.transform(X[b != "W3"], b[b != "W3"]).shape == (375, 20)
    with pytest.raises(ValueError, match=r"harmony: batch 'W3' had no fit rows \(on=controls\)"):
        recipe.transform(X, b)


def test_harmony_seed_makes_it_deterministic() -> None:
    X, b, g = _screen(0)
    runs = [Recipe.parse(f"harmony(seed={s})").fit_transform(X, b, g == 0) for s in (0, 0, 1)]
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    Zc1 = np.asarray(_harmonypy(X, b, Harmony(seed=1)).Z_corr)  # the seed is harmonypy's random_state
    assert _rel_error(runs[2], Zc1) < _rel_error(runs[2], np.asarray(_harmonypy(X, b, Harmony(seed=0)).Z_corr))


def test_harmony_keeps_tables_per_batch_or_per_plate() -> None:
    X, weeks, g = _screen(0)
    plates = np.char.add(weeks, np.where(np.arange(len(X)) % 2 == 0, "_a", "_b"))
    by_batch = Recipe.parse("harmony").fit(X, plates, g == 0, batches=weeks)
    by_plate = Recipe.parse("harmony(by=plate)").fit(X, plates, g == 0, batches=weeks)
    assert by_batch.steps[0].batches_ == ["W1", "W2", "W3", "W4"] and len(by_plate.steps[0].batches_) == 8
    assert np.array_equal(by_batch.transform(X, plates, batches=weeks), Recipe.parse("harmony").fit_transform(X, weeks, g == 0))


# --------------------------------------------------------------------------------------------- the preset


JUMP_HARMONY = ("feature_select(nan,variant,on=all,na_cutoff=0.0,coef_var_cut=0.001)"
                "|mad_robustize(on=controls,by=plate,epsilon=1e-18,zero_mad=error)"
                "|inverse_normal(on=all,c=0.375,max_points=2000)"
                "|feature_select(correlation,blocklist,on=all,corr_threshold=0.9,blocklist=[@default])"
                "|harmony(on=all,by=batch,n_clusters=300,max_iter=20,theta=2.0,sigma=0.1,lamb=auto,seed=0)")


def test_jump_harmony_preset_is_the_jump_compound_order() -> None:
    recipe = Recipe.parse("jump_harmony")
    assert "jump_harmony" in PRESETS and recipe.spec == JUMP_HARMONY
    assert [type(s) for s in recipe.steps] == [FeatureSelect, type(recipe.steps[1]), InverseNormal, FeatureSelect, Harmony]
    assert recipe.steps[1].name == "mad_robustize" and recipe.steps[1].grouping == "plate"
    assert recipe.steps[4].grouping == "batch"
    assert Recipe.parse(JUMP_HARMONY).spec == JUMP_HARMONY


def test_jump_harmony_preset_runs_end_to_end(tmp_path) -> None:
    X, plates, g = _screen(1, d=12, per=20)
    rng = np.random.default_rng(4)
    X = np.column_stack([X, X[:, 0] + rng.normal(0, 1e-3, len(X)), rng.normal(size=len(X))])  # a near-copy of f0
    names = [f"f{j}" for j in range(12)] + ["f0_copy", default_blocklist()[0]]
    ctrl = g == 0
    recipe = Recipe.parse("jump_harmony")
    Y = recipe.fit_transform(X, plates, ctrl, feature_names=names)
    assert Y.shape == (400, 12) and Y.dtype == np.float32 and np.isfinite(Y).all()
    assert default_blocklist()[0] not in recipe.output_features and len({"f0", "f0_copy"} & set(recipe.output_features)) == 1
    assert recipe.steps[4].batches_ == ["W1", "W2", "W3", "W4"]
    # the harmony stage is harmonypy on the rows the first four steps produce
    head = Recipe(recipe.steps[:4])
    head.in_features_ = recipe.in_features_
    Z = head.transform(X, plates).astype(np.float64)
    Zc = np.asarray(_harmonypy(Z, plates, recipe.steps[4]).Z_corr)
    assert np.corrcoef(Y.ravel(), Zc.ravel())[0, 1] > 0.99
    recipe.save(tmp_path / "r")
    assert np.array_equal(Recipe.load(tmp_path / "r").transform(X, plates), Y)


def test_variant_features_are_the_jump_recipes_rule() -> None:
    """`feature_select(variant)` keeps exactly the features JUMP's `select_variant_features` keeps:
    per plate on the negative controls, scipy's unscaled MAD != 0 and |MAD / median| > 1e-3
    (a zero median counts as 0), intersected over plates."""
    import pandas as pd
    from scipy.stats import median_abs_deviation

    rng = np.random.default_rng(5)
    plates = np.repeat(["P1", "P2", "P3"], 40)
    ctrl = np.tile(np.arange(40) < 6, 3)
    X = rng.lognormal(size=(120, 8))
    X[(plates == "P2") & ctrl, 1] = 3.0  # constant on one plate's 6 controls: MAD 0
    X[:, 2] = 1000.0 + 1e-4 * rng.normal(size=120)  # |MAD/median| ~ 1e-7
    X[:, 3] = rng.normal(size=120)
    X[(plates == "P1") & ctrl, 3] = [-1.0, -0.5, 0.0, 0.0, 0.5, 1.0]  # median exactly 0 on P1's controls
    names = [f"f{j}" for j in range(8)]
    frame = pd.DataFrame(X[ctrl], columns=names).assign(plate=plates[ctrl])
    keep = set(names)
    for _, block in frame.groupby("plate"):
        values = block[names].to_numpy()
        mad = median_abs_deviation(values, axis=0, nan_policy="omit")
        with np.errstate(divide="ignore", invalid="ignore"):
            coef = pd.Series(mad / np.median(values, axis=0)).fillna(0).abs().replace(np.inf, 0).to_numpy()
        keep &= {n for n, m, c in zip(names, mad, coef) if m != 0 and c > 1e-3}
    recipe = Recipe.parse("feature_select(variant)").fit(X, plates, ctrl, feature_names=names)
    assert recipe.output_features == [n for n in names if n in keep] == ["f0", "f4", "f5", "f6", "f7"]
    # so the per-plate MAD of `jump` no longer meets a zero MAD on these 6-control plates
    with pytest.raises(ValueError, match="zero MAD"):
        Recipe.parse("mad").fit(X, plates, ctrl, feature_names=names)
    out = Recipe.parse("feature_select(nan,variant)|mad_robustize").fit_transform(X, plates, ctrl, feature_names=names)
    assert np.isfinite(out).all() and out.shape[1] == 5
