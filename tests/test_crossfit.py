"""Cross-fitted replicate mAP: negatives are never the controls the normalizer was fitted on."""

import numpy as np
import polars as pl
import pytest

from bioembed_assets.evaluate.crossfit import control_folds, cross_fitted_replicate_map
from bioembed_assets.evaluate.retrieval import replicate_map
from bioembed_assets.profiles.normalize import PCACenterScale


def _screen(active_shift: float, seed: int = 0) -> tuple[pl.DataFrame, np.ndarray]:
    """3 plates x (24 controls + 12 perturbations x 2 replicates); perturbation P00 shifted."""
    rng = np.random.default_rng(seed)
    rows, X = [], []
    for p in range(3):
        offset, gain = rng.normal(0, 2, 40), rng.uniform(0.5, 2, 40)
        for i in range(24):
            rows.append((f"P{p}", f"C{i:02d}", "DMSO", "negative"))
        for j in range(12):
            for r in range(2):
                rows.append((f"P{p}", f"T{j:02d}{r}", f"P{j:02d}", "treatment"))
        for pert in [r[2] for r in rows[-48:]]:
            x = rng.normal(0, 1, 40) + (active_shift if pert == "P00" else 0.0)
            X.append(x * gain + offset)
    meta = pl.DataFrame(rows, schema=["plate", "well", "perturbation", "control_type"], orient="row")
    return meta, np.asarray(X)


def test_null_perturbations_are_not_called_active() -> None:
    meta, X = _screen(active_shift=0.0)
    out = cross_fitted_replicate_map(meta, X, PCACenterScale, null_size=2000)
    assert out.height == 12
    assert out["below_corrected_p"].sum() == 0
    assert out["p_value"].mean() > 0.25  # roughly uniform p-values under the null


def test_in_sample_fitting_is_optimistic_where_cross_fitting_is_not() -> None:
    meta, X = _screen(active_shift=0.0, seed=1)
    is_ctrl = (meta["control_type"] == "negative").to_numpy()
    plates = meta["plate"].to_numpy()
    in_sample = replicate_map(meta, PCACenterScale().fit(X, plates, is_ctrl).transform(X, plates), null_size=2000)
    crossed = cross_fitted_replicate_map(meta, X, PCACenterScale, null_size=2000)
    assert in_sample["p_value"].mean() < crossed["p_value"].mean()


def test_an_active_perturbation_is_retrieved() -> None:
    meta, X = _screen(active_shift=3.0)
    out = cross_fitted_replicate_map(meta, X, PCACenterScale, null_size=2000)
    row = out.filter(pl.col("perturbation") == "P00")
    assert row["below_corrected_p"][0] and row["mean_average_precision"][0] > 0.9


def test_control_folds_are_balanced_per_plate_and_need_enough_controls() -> None:
    batches = np.array(["A"] * 10 + ["B"] * 6)
    is_ctrl = np.array([True] * 7 + [False] * 3 + [True] * 4 + [False] * 2)
    folds = control_folds(batches, is_ctrl, n_folds=2, seed=3)
    assert (folds[~is_ctrl] == -1).all()
    for b in ("A", "B"):
        counts = np.bincount(folds[(batches == b) & is_ctrl])
        assert counts.max() - counts.min() <= 1
    with pytest.raises(ValueError, match="'B' has 4 negative-control wells"):
        control_folds(batches, is_ctrl, n_folds=3)
