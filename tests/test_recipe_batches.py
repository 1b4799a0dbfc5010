"""Recipe steps grouped by plate or by batch (e.g. the week): `by=plate` and `by=batch` use different labels."""

from __future__ import annotations

import numpy as np
import pytest

from bioembed_assets.profiles.recipe import Recipe


def _screen(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """4 plates in 2 batches, 6 controls per plate, batch-level shifts and scales."""
    rng = np.random.default_rng(seed)
    plates = np.repeat([f"P{i}" for i in range(4)], 50)
    batches = np.where(np.isin(plates, ["P0", "P1"]), "W1", "W2")
    ctrl = np.tile(np.arange(50) < 6, 4)
    X = rng.normal(size=(200, 5)) * np.where(batches == "W1", 1.0, 3.0)[:, None] + np.where(batches == "W1", 0, 5)[:, None]
    return X, plates, batches, ctrl


def _mad(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    med = np.median(block, axis=0)
    return med, 1.4826 * np.median(np.abs(block - med), axis=0)


def test_mad_by_batch_pools_the_controls_of_the_batch_plates() -> None:
    X, plates, batches, ctrl = _screen()
    out = Recipe.parse("mad_robustize(by=batch)").fit_transform(X, plates, ctrl, batches=batches)
    for b in ("W1", "W2"):
        med, mad = _mad(X[ctrl & (batches == b)])  # 12 controls of two plates
        np.testing.assert_allclose(out[batches == b], (X[batches == b] - med) / (mad + 1e-18), rtol=1e-5, atol=1e-5)
    per_plate = Recipe.parse("mad_robustize(by=plate)").fit_transform(X, plates, ctrl, batches=batches)
    for p in ("P0", "P3"):
        med, mad = _mad(X[ctrl & (plates == p)])
        np.testing.assert_allclose(per_plate[plates == p], (X[plates == p] - med) / (mad + 1e-18), rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, per_plate)
    # without a batch column every plate is its own batch
    np.testing.assert_array_equal(Recipe.parse("mad_robustize(by=batch)").fit_transform(X, plates, ctrl), per_plate)


def test_sphere_by_batch_whitens_each_batch_on_its_own_controls() -> None:
    X, plates, batches, ctrl = _screen(1)
    recipe = Recipe.parse("standardize(by=plate)|sphere(method=pca,by=batch,reg=0.1)")
    out = recipe.fit_transform(X, plates, ctrl, batches=batches)
    assert recipe.spec.endswith("sphere(method=pca,on=controls,by=batch,reg=0.1)")
    Z = Recipe.parse("standardize(by=plate)").fit_transform(X, plates, ctrl)
    for b in ("W1", "W2"):
        C = Z[ctrl & (batches == b)]
        cov = np.cov(C, rowvar=False)
        vals, vecs = np.linalg.eigh(cov)
        vals, vecs = vals[::-1], vecs[:, ::-1]
        ref = (Z[batches == b] - C.mean(axis=0)) @ vecs / np.sqrt(vals + 0.1 * vals.mean())
        got = out[batches == b]
        signs = np.sign((ref * got).sum(axis=0))  # eigenvector signs are arbitrary
        np.testing.assert_allclose(got * signs, ref, rtol=1e-4, atol=1e-4)
        assert np.allclose(np.cov(got[ctrl[batches == b]], rowvar=False), np.diag(vals / (vals + 0.1 * vals.mean())),
                           atol=1e-4)


def test_unseen_batches_are_fitted_on_their_own_controls_and_round_trip(tmp_path) -> None:
    X, plates, batches, ctrl = _screen(2)
    fit = batches == "W1"
    recipe = Recipe.parse("mad_robustize(by=batch)|sphere(by=batch,reg=0.5)").fit(
        X[fit], plates[fit], ctrl[fit], batches=batches[fit])
    with pytest.raises(ValueError, match="mad_robustize: batch 'W2' was not seen in fit"):
        recipe.transform(X, plates, batches=batches)
    out = recipe.transform(X, plates, ctrl, batches=batches)
    alone = Recipe.parse("mad_robustize(by=batch)|sphere(by=batch,reg=0.5)").fit_transform(
        X[~fit], plates[~fit], ctrl[~fit], batches=batches[~fit])
    np.testing.assert_allclose(out[~fit], alone, rtol=1e-5, atol=1e-5)
    recipe.save(tmp_path / "r")
    np.testing.assert_array_equal(Recipe.load(tmp_path / "r").transform(X, plates, ctrl, batches=batches), out)
