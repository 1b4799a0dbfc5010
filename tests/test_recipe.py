"""Normalization recipes: parsing and canonical specs, presets, fit/transform, save/load, errors."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from bioembed_assets.evaluate.crossfit import cross_fitted_replicate_map
from bioembed_assets.profiles.normalize import PCACenterScale
from bioembed_assets.profiles.recipe import PRESETS, STEPS, Recipe, parse_steps
from bioembed_assets.profiles.selection import default_blocklist
from bioembed_assets.profiles.sphering import REG_GRID, tuning_split
from bioembed_assets.sources.synthetic_profiles import SyntheticProfilesConfig, generate_profiles
from tests.conftest import entries
from tests.test_batch_correction import JUMP_HARMONY

CANONICAL = {
    "card": "pca_centerscale(n_components=all)",
    "tvn": "tvn(by=global,n_components=all,coral=true,lam=0.5)",
    "standardize": "standardize(on=controls,by=plate)",
    "mad": "mad_robustize(on=controls,by=plate,epsilon=1e-18,zero_mad=error)",
    "jump": "feature_select(nan,variant,variance,correlation,blocklist,on=all,na_cutoff=0.0,coef_var_cut=0.001,"
            "freq_cut=0.05,unique_cut=0.01,corr_threshold=0.9,blocklist=[@default])|mad_robustize(on=controls,by=plate,epsilon=1e-18,zero_mad=error)"
            "|sphere(method=zca-cor,on=controls,reg=auto,seed=0)",
    "jump_harmony": JUMP_HARMONY,
}


def _plates(seed: int = 0, d: int = 12, n_plates: int = 3, n_ctrl: int = 40, n_trt: int = 60,
            n_perts: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Plates of correlated features with plate shift/scale; treated wells replicate `n_perts` perturbations."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d))
    effects = rng.normal(0, 1.5, (n_perts, d)) * (rng.random(n_perts) < 0.5)[:, None]
    Xs, plates, ctrl, pert = [], [], [], []
    for p in range(n_plates):
        shift, scale = rng.normal(0, 2, d), 1 + rng.normal(0, 0.2, d)
        which = rng.integers(0, n_perts, n_trt)
        Z = rng.normal(size=(n_ctrl + n_trt, d)) @ mix
        Z[n_ctrl:] += effects[which]
        Xs.append(Z * scale + shift)
        plates += [f"P{p + 1}"] * (n_ctrl + n_trt)
        ctrl += [True] * n_ctrl + [False] * n_trt
        pert += ["DMSO"] * n_ctrl + [f"c{w}" for w in which]
    return np.concatenate(Xs).astype(np.float32), np.array(plates), np.array(ctrl), np.array(pert)


# ------------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_have_canonical_specs_that_round_trip(preset: str) -> None:
    r = Recipe.parse(preset)
    assert (r.name, r.spec) == (preset, CANONICAL[preset])
    again = Recipe.parse(r.spec)
    assert again.spec == r.spec and again.name == r.spec  # a step string is named by its spec
    assert Recipe.parse(f"  {preset.upper()} ").name == preset


def test_spec_is_canonical_whatever_the_spelling() -> None:
    variants = [
        "mad_robustize(by=plate, on=controls)|sphere(reg=auto, method=zca-cor)",
        " MAD_ROBUSTIZE ( on = controls , by = plate ) | sphere ( method = ZCA-COR , reg = AUTO , seed = 0 ) ",
        "mad|sphere(method=zca_cor,reg=auto)",  # a preset inside a step string, an alias of a value
    ]
    specs = {Recipe.parse(v).spec for v in variants}
    assert specs == {"mad_robustize(on=controls,by=plate,epsilon=1e-18,zero_mad=error)"
                     "|sphere(method=zca-cor,on=controls,reg=auto,seed=0)"}
    fs = Recipe.parse("feature_select(correlation, blocklist, blocklist=[@default, 'Cells_X'], corr_threshold=0.8)")
    assert fs.spec == "feature_select(correlation,blocklist,on=all,corr_threshold=0.8,blocklist=[@default,Cells_X])"
    assert Recipe.parse("sphere(reg=1e-3)").spec == "sphere(method=zca-cor,on=controls,reg=0.001)"
    assert Recipe.parse("tvn(coral=false)").spec == "tvn(by=global,n_components=all,coral=false)"
    assert Recipe.parse("pca_centerscale(n_components=5)").spec == "pca_centerscale(n_components=5)"
    assert len(parse_steps("feature_select(nan)|standardize|pca_centerscale")) == 3


@pytest.mark.parametrize("text,match", [
    ("spherize", r"unknown step 'spherize'; known steps: \['feature_select', 'harmony', 'inverse_normal', "
                 r"'mad_robustize', 'pca_centerscale', 'sphere', 'standardize', 'tvn'\]; presets: \['card', 'jump', "
                 r"'jump_harmony', 'mad', 'standardize', 'tvn'\]"),
    ("sphere(rg=1)", r"step 'sphere' has no option 'rg'; known options: \['by', 'method', 'on', 'reg', 'seed'\]"),
    ("sphere(method=zca-corr)", r"method='zca-corr' must be one of \['pca', 'zca', 'pca-cor', 'zca-cor'\]"),
    ("sphere(reg=-1)", r"sphere: option reg='-1' must be in \[0.0, inf\]"),
    ("sphere(reg=lots)", r"reg='lots' must be a number or one of \['auto'\]"),
    ("sphere(seed=3)", r"seed only applies with reg=auto"),
    ("tvn(coral=false,lam=1)", r"lam only applies with coral=true"),
    ("tvn(lam=0)", r"tvn: option lam='0' must be in \(0.0, inf\]"),
    ("tvn(coral=maybe)", r"coral='maybe' must be true or false"),
    ("pca_centerscale(n_components=0)", r"n_components=.*must be >= 1"),
    ("standardize(on=treated)", r"on='treated' must be one of \['controls', 'all'\]"),
    ("standardize(zca)", r"step 'standardize' takes only name=value options, got bare \['zca'\]"),
    ("feature_select(varience)", r"unknown operation\(s\) \['varience'\]; known operations: "
                                 r"\['nan', 'variance', 'min_variance', 'variant', 'correlation', 'blocklist'\]"),
    ("feature_select(nan,freq_cut=0.1)", r"\['freq_cut'\] do not apply.*freq_cut needs operation 'variance'"),
    ("feature_select(nan,nan)", r"listed twice"),
    ("feature_select(blocklist,blocklist=[@jump])", None),  # checked at fit time (below)
    ("card(n_components=3)", r"preset 'card' takes no options"),
    ("standardize(on=all,on=controls)", r"option 'on' given twice"),
    ("standardize(on=all", r"syntax error at character 18: expected '\)', got the end"),
    ("standardize|", r"expected 'a name'|expected a name|got the end"),
    ("standardize;mad", r"unexpected character ';'"),
    ("", r"empty recipe"),
])
def test_parse_errors_name_what_is_known(text: str, match: str | None) -> None:
    if match is None:
        X, plates, ctrl, _ = _plates()
        with pytest.raises(ValueError, match=r"unknown named blocklist '@jump'; known: \['@default'\]"):
            Recipe.parse(text).fit(X, plates, ctrl)
        return
    with pytest.raises(ValueError, match=match):
        Recipe.parse(text)


def test_every_step_documents_itself() -> None:
    for name, cls in STEPS.items():
        assert cls.summary and all(o.help for o in cls.all_options()), name
    assert len(default_blocklist()) == 55 and default_blocklist()[0] == "Nuclei_Correlation_Manders_AGP_DNA"


# ------------------------------------------------------------------------------------------------ fit / transform


def test_card_preset_is_pca_centerscale_bit_for_bit_including_unseen_batches() -> None:
    X, plates, ctrl, _ = _plates(1)
    fit = plates != "P3"
    recipe = Recipe.parse("card").fit(X[fit], plates[fit], ctrl[fit])
    model = PCACenterScale().fit(X[fit], plates[fit], ctrl[fit])
    assert np.array_equal(recipe.transform(X, plates, ctrl), model.transform(X, plates, ctrl))
    assert recipe.output_features == [f"PC{i}" for i in range(1, 13)]
    with pytest.raises(ValueError, match=r"pca_centerscale: plate 'P3' was not seen in fit; pass is_control"):
        recipe.transform(X, plates)


@pytest.mark.parametrize("spec", ["card", "tvn", "tvn(by=plate)", "tvn(coral=false)", "standardize", "mad",
                                  "standardize(on=all,by=global)", "sphere(method=pca-cor,on=all)",
                                  "feature_select(variance,correlation)|mad_robustize|sphere(method=zca,reg=0.01)",
                                  "jump"])
def test_save_load_round_trip_gives_identical_output(spec: str, tmp_path) -> None:
    X, plates, ctrl, pert = _plates(2)
    names = [f"f{j}" for j in range(X.shape[1])]
    fit = plates != "P3"
    recipe = Recipe.parse(spec).fit(X[fit], plates[fit], ctrl[fit], feature_names=names, perturbations=pert[fit])
    out = recipe.transform(X, plates, ctrl)  # P3 is new: per-batch steps fit it on its own controls
    assert out.dtype == np.float32 and out.shape == (X.shape[0], len(recipe.output_features))
    assert np.isfinite(out).all()
    recipe.save(tmp_path / "norm")
    assert entries(tmp_path / "norm") == ["arrays.npz", "recipe.json"]
    loaded = Recipe.load(tmp_path / "norm")
    assert (loaded.name, loaded.spec, loaded.output_features) == (recipe.name, recipe.spec, recipe.output_features)
    assert np.array_equal(loaded.transform(X, plates, ctrl), out)
    np.load(tmp_path / "norm" / "arrays.npz", allow_pickle=False)  # plain arrays, no pickles
    info = json.loads((tmp_path / "norm" / "recipe.json").read_text())
    assert info["spec"] == recipe.spec and info["fit"] == {"n_rows": int(fit.sum()), "n_controls": int((ctrl & fit).sum()),
                                                          "n_plates": 2, "n_batches": 2}


def test_transform_float32_from_float64_input_and_refit_is_fresh() -> None:
    X, plates, ctrl, _ = _plates(3)
    recipe = Recipe.parse("standardize")
    a = recipe.fit(X.astype(np.float64), plates, ctrl).transform(X.astype(np.float64), plates)
    b = recipe.fit(X[::-1], plates[::-1], ctrl[::-1]).transform(X, plates)  # refit from scratch, other row order
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(RuntimeError, match="not fitted"):
        Recipe.parse("tvn").transform(X, plates)


def test_per_batch_statistics_do_not_depend_on_row_order() -> None:
    """Rows grouped by plate (runs, broadcast) and shuffled (gathered) give the same numbers."""
    X, plates, ctrl, _ = _plates(4)
    perm = np.random.default_rng(0).permutation(X.shape[0])
    for spec in ("standardize", "mad", "tvn(by=plate)", "card", "tvn"):
        a = Recipe.parse(spec).fit(X, plates, ctrl).transform(X, plates)
        b = Recipe.parse(spec).fit(X[perm], plates[perm], ctrl[perm]).transform(X[perm], plates[perm])
        np.testing.assert_allclose(a[perm], b, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def screen() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic screen profiles (heteroscedastic features, rank-16 signal, plate shift and scale):
    16 plates of 384 wells with 100 controls each (fewer per plate than features: CORAL from the
    Gram matrix), 128 float32 features, 1600 controls (>= 10 d: PCA from the scatter matrix)."""
    meta, X = generate_profiles(SyntheticProfilesConfig(n_rows=6000, n_features=128, wells_per_plate=384,
                                                        controls_per_plate=100, seed=3))
    return X, meta["plate"].to_numpy(), (meta["control_type"] == "negative").to_numpy()


@pytest.mark.parametrize("spec", ["card", "tvn", "tvn(by=plate)", "tvn(coral=false)"])
def test_float32_rows_are_computed_in_float32_and_agree_with_float64(spec: str, screen) -> None:
    """float32 rows: float32 products, float64 statistics. The fitted statistics match the float64
    fit of the same numbers to float64 rounding; transformed rows to 1e-4 of each component's scale."""
    X, plates, ctrl = screen
    r32 = Recipe.parse(spec).fit(X, plates, ctrl)
    r64 = Recipe.parse(spec).fit(X.astype(np.float64), plates, ctrl)
    (_, a32), (_, a64) = r32.steps[0].state(), r64.steps[0].state()
    np.testing.assert_allclose(a32["components"], a64["components"], atol=1e-8)  # the same PCA (float64 scatter)
    for key in ("mean", "mu1", "sd1"):
        if key in a64:
            np.testing.assert_allclose(a32[key], a64[key], rtol=1e-12, atol=1e-12)
    y32, y64 = r32.transform(X, plates), r64.transform(X.astype(np.float64), plates)
    assert y32.dtype == y64.dtype == np.float32
    err = np.abs(y32.astype(np.float64) - y64).max(axis=0) / y64.std(axis=0)
    assert err.max() < 1e-4, (spec, err.max())
    if spec == "card":  # each plate's controls standardized, in float32 too
        for p in np.unique(plates)[:3]:
            c = y32[(plates == p) & ctrl].astype(np.float64)
            np.testing.assert_allclose(c.mean(0), 0, atol=1e-5)
            np.testing.assert_allclose(c.std(0), 1, atol=1e-5)


def test_chunked_transform_agrees_and_names_the_first_bad_row(screen, monkeypatch) -> None:
    """Many small chunks (rows of a plate split across chunks, composed CORAL matrices reused): the
    same numbers as one chunk; a NaN/inf in a late chunk is reported with its global row and feature."""
    import bioembed_assets.profiles.steps as steps_mod

    X, plates, ctrl = screen
    recipes = {spec: Recipe.parse(spec).fit(X, plates, ctrl) for spec in ("card", "tvn")}
    whole = {spec: r.transform(X, plates) for spec, r in recipes.items()}
    model = PCACenterScale().fit(X, plates, ctrl)
    assert np.array_equal(whole["card"], model.transform(X, plates))
    monkeypatch.setattr(steps_mod, "CHUNK_ELEMS", 128 * 250)  # 250-row chunks, plates of ~370 rows
    # float32 rounding only (the BLAS kernel rounds the last rows of a block differently; tvn: runs of <= d
    # rows take two thin products instead of the composed map), relative to each component's scale
    chunked = {spec: r.transform(X, plates) for spec, r in recipes.items()} | {"model": model.transform(X, plates)}
    for spec, y in chunked.items():
        ref = whole["card" if spec == "model" else spec]
        assert (np.abs(y - ref).max(axis=0) / ref.std(axis=0)).max() < 2e-5, spec
    bad = X.copy()
    bad[4321, 77] = np.inf
    bad[5000, 3] = np.nan
    for r in recipes.values():
        with pytest.raises(ValueError, match=r"non-finite values \(NaN/inf\) in \d+ row\(s\).*first at row 4321, feature "
                                             r"'feature_77' \(value inf\)"):
            r.transform(bad, plates)
    with pytest.raises(ValueError, match=r"non-finite values \(NaN/inf\), first at row 4321"):
        model.transform(bad, plates)
    with pytest.raises(ValueError, match=r"non-finite.*row 4321, feature 'feature_77'"):
        Recipe.parse("tvn").fit(bad, plates, np.ones_like(ctrl))


def test_feature_selection_names_and_nan_handling() -> None:
    X, plates, ctrl, _ = _plates(5)
    X = np.concatenate([X, X[:, :1] * 2 + 1, np.full((X.shape[0], 1), 3.0, np.float32)], axis=1)
    X[7, 2] = np.nan  # a NaN in a feature that the nan operation drops
    names = [f"f{j}" for j in range(12)] + ["dup", "const"]
    recipe = Recipe.parse("feature_select(nan,variance,correlation)|standardize").fit(X, plates, ctrl, feature_names=names)
    kept = recipe.output_features
    assert "f2" not in kept and "const" not in kept and ("dup" in kept) != ("f0" in kept)
    params = recipe.steps[0].state()[0]["excluded"]
    assert params == {"nan": ["f2"], "variance": ["const"], "correlation": [next(f for f in ("f0", "dup") if f not in kept)]}
    assert np.isfinite(recipe.transform(X, plates)).all()
    # a NaN in a kept column reaches standardize: the error names row and feature
    Y = X.copy()
    Y[11, 5] = np.nan
    with pytest.raises(ValueError, match=r"non-finite values \(NaN/inf\) in 1 row\(s\).*row 11, feature 'f5'"):
        recipe.transform(Y, plates)
    with pytest.raises(ValueError, match=r"non-finite.*row 7, feature 'f2'"):
        Recipe.parse("standardize").fit(X, plates, ctrl, feature_names=names)


def test_errors_name_the_batch_feature_or_shape() -> None:
    X, plates, ctrl, pert = _plates(6)
    lonely = ctrl & ~((plates == "P2") & (np.cumsum(ctrl & (plates == "P2")) > 1))  # P2 keeps one control
    for spec in ("standardize", "mad", "card", "tvn"):
        with pytest.raises(ValueError, match=r"batch 'P2' has 1 control rows"):
            Recipe.parse(spec).fit(X, plates, lonely)
    const = X.copy()
    const[:, 4] = 1.5
    names = [f"f{j}" for j in range(12)]
    with pytest.raises(ValueError, match=r"sphere: 1 feature\(s\) are constant on the 120 fit rows: \['f4'\]"):
        Recipe.parse("sphere").fit(const, plates, ctrl, feature_names=names)
    const[plates == "P1", 4] = 0.0
    with pytest.raises(ValueError, match=r"mad_robustize: 1 feature\(s\) have zero MAD on the 40 control rows of plate 'P1': "
                                         r"\['f4'\]"):
        Recipe.parse("mad").fit(const, plates, ctrl, feature_names=names)
    kept = Recipe.parse("mad_robustize(zero_mad=keep)").fit(const, plates, ctrl).transform(X, plates)
    assert np.abs(kept[:, 4]).max() > 1e17  # pycytominer's behaviour: deviations divided by epsilon
    with pytest.raises(ValueError, match=r"X has 11 features, the recipe was fitted on 12"):
        Recipe.parse("standardize").fit(X, plates, ctrl).transform(X[:, 1:], plates)
    with pytest.raises(ValueError, match=r"plates must have one entry per row \(300\), got shape \(5,\)"):
        Recipe.parse("standardize").fit(X, plates[:5], ctrl)
    with pytest.raises(ValueError, match=r"feature_names must be unique; repeated: \['a'\]"):
        Recipe.parse("standardize").fit(X, plates, ctrl, feature_names=["a"] * 12)
    with pytest.raises(ValueError, match=r"reg=auto\) scores candidates by replicate mAP: pass perturbations="):
        Recipe.parse("sphere(reg=auto)").fit(X, plates, ctrl)
    with pytest.raises(ValueError, match=r"removed all 12 features"):
        Recipe.parse("feature_select(min_variance,min_variance=1e9)").fit(X, plates, ctrl)
    with pytest.raises(ValueError, match=r"infinite value at row 3, feature 'feature_0'"):
        Recipe.parse("feature_select(nan)").fit(np.where(np.arange(300)[:, None] == 3, np.inf, X), plates, ctrl)


def test_sphere_reg_auto_records_choice_and_scores_on_held_out_controls() -> None:
    X, plates, ctrl, pert = _plates(7, n_ctrl=60, n_trt=120)
    recipe = Recipe.parse("standardize|sphere(method=zca-cor,reg=auto,seed=3)")
    out = recipe.fit(X, plates, ctrl, perturbations=pert).transform(X, plates)
    sphere = recipe.steps[-1]
    scores = sphere.reg_scores_
    assert [s["reg"] for s in scores] == list(REG_GRID) and len(scores) == 25
    assert sphere.reg_ == max(scores, key=lambda s: (s["mean_map"], s["reg"]))["reg"]
    assert all(0 < s["mean_map"] <= 1 and s["n_perturbations"] > 0 for s in scores)
    assert sphere.tuning_["n_fit_rows"] == 90 and sphere.tuning_["n_eval_controls"] == 90  # half of each plate's 60
    assert np.isfinite(out).all()
    # the split behind it: per plate, disjoint halves of the controls; treated replicates to score
    codes = np.unique(plates, return_inverse=True)[1]
    fit_ctrl, eval_rows = tuning_split(codes, 3, ["P1", "P2", "P3"], ctrl, pert, seed=3)
    held = eval_rows[ctrl[eval_rows]]
    assert not fit_ctrl[held].any() and not (fit_ctrl & ~ctrl).any()
    for p in ("P1", "P2", "P3"):
        assert (fit_ctrl & (plates == p)).sum() == 30 and (plates[held] == p).sum() == 30
    treated = eval_rows[~ctrl[eval_rows]]
    assert treated.size and all((pert[treated] == q).sum() >= 2 for q in np.unique(pert[treated]))
    with pytest.raises(ValueError, match=r"batch 'P1' has 3 control rows; tuning splits"):
        few = ctrl & ~((plates == "P1") & (np.cumsum(ctrl & (plates == "P1")) > 3))
        Recipe.parse("sphere(reg=auto)").fit(X, plates, few, perturbations=pert)


def test_sphere_regularization_bounds_the_gain() -> None:
    X, plates, ctrl, _ = _plates(8)
    plain = Recipe.parse("sphere(method=pca)").fit(X, plates, ctrl)
    reg = Recipe.parse("sphere(method=pca,reg=10)").fit(X, plates, ctrl)
    lam = plain.steps[0].eigenvalues_
    gains = np.linalg.norm(reg.steps[0].W_, axis=0)  # column j scales eigen-direction j by (l_j + 10 mean(l))^-1/2
    np.testing.assert_allclose(gains, 1 / np.sqrt(lam + 10 * lam.mean()), rtol=1e-10)


def test_recipe_plugs_into_cross_fitting() -> None:
    meta, X = generate_profiles(SyntheticProfilesConfig(n_rows=3000, n_features=32, seed=1))
    out = cross_fitted_replicate_map(meta, X, lambda: Recipe.parse("tvn"), null_size=100)
    assert out.height > 0 and out["mean_average_precision"].is_between(0, 1).all()
    truth = meta.group_by("perturbation").agg(pl.col("active").first())
    active = out.join(truth, on="perturbation")
    assert active.filter(pl.col("active"))["mean_average_precision"].mean() > active.filter(~pl.col("active"))[
        "mean_average_precision"].mean()
