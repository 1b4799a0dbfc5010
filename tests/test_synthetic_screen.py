"""The synthetic compound screen (`generate_screen`, `write_screen_csv`): design, dose response,
CellProfiler-like scales, determinism, CSV round trip; and the default `generate_profiles` unchanged."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from bioembed_assets import design
from bioembed_assets import schema as s
from bioembed_assets.sources.profile_table import ProfileImportSpec, read_profile_tables
from bioembed_assets.sources.synthetic_profiles import (
    SyntheticProfilesConfig,
    SyntheticScreenConfig,
    generate_profiles,
    generate_screen,
    plate_wells,
    screen_features,
    write_screen_csv,
)

CONFIG = SyntheticScreenConfig()


@pytest.fixture(scope="module")
def screen() -> tuple[pl.DataFrame, np.ndarray]:
    return generate_screen(CONFIG)


# Computed with generate_profiles before the screen generator was added: the existing output must not move.
# The meta hash is exact (text); X values carry a tolerance (the rank-16 matmul may round differently per BLAS).
BASELINES = [
    (SyntheticProfilesConfig(n_rows=3000), (5998, 384), 2341,
     "7aea5737eee4b502d68f61e4870cf2fa731f58c17413065f3a0fde1be5a7d261",
     [0.9516236782073975, -2.6444215774536133, -0.24055078625679016], [0.8809534907341003, 0.6110042333602905],
     11403.810310384142),
    (SyntheticProfilesConfig(n_rows=3000, n_features=32, n_moas=5), (6021, 32), 2479,
     "4c00f0255329aeadfd9179d0fdd9842cd73f1472a3690edbbb88fa0452bfbec7",
     [0.3176473081111908, 1.4292982816696167, -2.082291841506958], [0.6115102767944336, -0.8171386122703552],
     21610.029038812034),
]


@pytest.mark.parametrize("config, shape, n_active, meta_sha, first, last, total", BASELINES, ids=["default", "moas"])
def test_generate_profiles_output_unchanged(config, shape, n_active, meta_sha, first, last, total) -> None:
    meta, X = generate_profiles(config)
    assert X.shape == shape and X.dtype == np.float32 and int(meta["active"].sum()) == n_active
    assert hashlib.sha256(meta.write_csv().encode()).hexdigest() == meta_sha
    np.testing.assert_allclose(X[0, :3], first, rtol=1e-5)
    np.testing.assert_allclose(X[-1, -2:], last, rtol=1e-5)
    assert float(X.astype(np.float64).sum()) == pytest.approx(total, rel=1e-6)


def test_plate_layout_batches_and_controls(screen) -> None:
    meta, X = screen
    n_treated = CONFIG.n_compounds * CONFIG.n_doses * CONFIG.replicates
    assert X.shape == (n_treated + CONFIG.n_plates * 6, CONFIG.n_features) and meta.height == X.shape[0]
    ctrl = meta.filter(pl.col(s.CONTROL_TYPE) == s.ControlType.NEGATIVE)
    assert set(ctrl[s.PERTURBATION]) == {"DMSO"} and ctrl[s.MOA].null_count() == ctrl.height
    per_plate = ctrl.group_by(s.PLATE).len()
    assert per_plate.height == 8 and set(per_plate["len"]) == {6}
    assert ctrl.group_by(s.PLATE).agg(pl.col(s.WELL).sort()).n_unique(s.WELL) == 1  # same control wells everywhere
    assert set(meta[s.WELL]) <= set(plate_wells(384)) and meta.n_unique([s.PLATE, s.WELL]) == meta.height
    plates_per_batch = meta.group_by(s.BATCH).agg(pl.col(s.PLATE).n_unique())
    assert plates_per_batch.height == 2 and set(plates_per_batch[s.PLATE]) == {4}
    assert meta.n_unique([s.PLATE, s.BATCH]) == 8  # every plate in one batch
    assert design.has_batches(meta)


def test_compounds_doses_replicates_and_moas(screen) -> None:
    meta, _ = screen
    treated = meta.filter(pl.col(s.CONTROL_TYPE) == s.ControlType.TREATMENT)
    per_compound = treated.group_by(s.COMPOUND).agg(pl.col("dose").n_unique(), pl.col(s.MOA).n_unique().alias("moas"))
    assert per_compound.height == 24 and set(per_compound["dose"]) == {4} and set(per_compound["moas"]) == {1}
    doses = sorted(float(d) for d in treated["dose"].unique())
    np.testing.assert_allclose(doses, [10 / 27, 10 / 9, 10 / 3, 10], rtol=1e-3)
    assert (treated[s.PERTURBATION] == treated[s.COMPOUND] + "@" + treated["dose"]).all()
    reps = treated.group_by(s.PERTURBATION).agg(pl.len(), pl.col(s.PLATE).n_unique().alias("plates"))
    assert reps.height == 96 and set(reps["len"]) == {3} and set(reps["plates"]) == {3}  # on different plates
    # every dose of one replicate of a compound shares a plate
    assert set(treated.group_by(s.COMPOUND, s.PLATE).len()["len"]) == {4}
    compounds_per_moa = treated.group_by(s.MOA).agg(pl.col(s.COMPOUND).n_unique())
    assert compounds_per_moa.height == 6 and compounds_per_moa[s.COMPOUND].min() >= 2


def test_dose_response_truth_and_signal(screen) -> None:
    meta, X = screen
    treated = meta.filter(pl.col(s.CONTROL_TYPE) == s.ControlType.TREATMENT).with_columns(pl.col("dose").cast(pl.Float64))
    assert (treated.filter(~pl.col("active"))["efficacy"] == 0).all()
    active_treated = treated.filter(pl.col("active"))
    curves = active_treated.group_by(s.COMPOUND).agg(pl.col("efficacy").sort_by("dose").unique(maintain_order=True))
    assert all(np.all(np.diff(c) > 0) for c in curves["efficacy"])  # increasing in dose
    by_dose = active_treated.group_by("dose").agg(pl.col("efficacy").mean()).sort("dose")["efficacy"]
    assert by_dose[0] < 0.1 < 0.4 < by_dose[-1]  # the lowest dose nearly inactive
    assert active_treated.n_unique(s.COMPOUND) == 17  # of 24 (active_fraction 0.75)
    # in the data: per-batch control-centred, control-scaled latent features move away from controls with dose
    f = screen_features(CONFIG)
    kinds = f["kind"].to_numpy()
    Z = X[:, np.isin(kinds, ["positive", "signed"])].astype(np.float64)
    positive = kinds[np.isin(kinds, ["positive", "signed"])] == "positive"
    Z[:, positive] = np.log(Z[:, positive])
    ctrl = (meta[s.CONTROL_TYPE] == s.ControlType.NEGATIVE).to_numpy()
    batch = meta[s.BATCH].to_numpy()
    for b in np.unique(batch):
        Z[batch == b] -= Z[(batch == b) & ctrl].mean(0)
    Z /= Z[ctrl].std(0)
    dist = np.sqrt((Z ** 2).mean(1))
    active, dose = meta["active"].to_numpy(), meta["dose"].cast(pl.Float64).to_numpy()
    assert dist[active & (dose == 10)].mean() > dist[active & (dose < 0.5)].mean() + 0.2
    assert dist[active & (dose == 10)].mean() > dist[~active & ~ctrl].mean() + 0.2


def test_batch_effect_exceeds_plate_effect(screen) -> None:
    meta, X = screen
    kinds = screen_features(CONFIG)["kind"].to_numpy()
    Z = np.log(X[:, kinds == "positive"].astype(np.float64))  # additive in the latent space
    Z = (Z - Z.mean(0)) / Z.std(0)
    plate, batch = meta[s.PLATE].to_numpy(), meta[s.BATCH].to_numpy()
    batch_mean = {b: Z[batch == b].mean(0) for b in np.unique(batch)}
    between_batches = np.mean([(m ** 2).mean() for m in batch_mean.values()])
    plates_within = np.mean([((Z[plate == p].mean(0) - batch_mean[batch[plate == p][0]]) ** 2).mean() for p in np.unique(plate)])
    assert between_batches > 2 * plates_within > 0


def test_cellprofiler_like_scales() -> None:
    config = SyntheticScreenConfig(n_plates=32, n_compounds=96)  # 192 controls > 96 features: full-rank covariance
    meta, X = generate_screen(config)
    f = screen_features(config)
    kinds = f["kind"].to_numpy()
    assert f["feature"].n_unique() == X.shape[1] == 96
    assert all(re.fullmatch(r"(Cells|Cytoplasm|Nuclei)_[A-Za-z]+_\w+", n) for n in f["feature"])
    assert {k: int((kinds == k).sum()) for k in np.unique(kinds)} == {"constant": 5, "positive": 46, "ratio": 7,
                                                                        "signed": 31, "sum": 7}
    assert np.isfinite(X).all() and (X[:, np.isin(kinds, ["positive", "ratio"])] > 0).all()
    C = X[(meta[s.CONTROL_TYPE] == s.ControlType.NEGATIVE).to_numpy()].astype(np.float64)
    var = C.var(0)
    assert var.min() > 0 and var.max() / var.min() > 1e12 and var.max() > 1e6
    lam = np.linalg.eigvalsh(np.cov(C, rowvar=False))
    assert lam[-1] > 1e6 and lam[0] < 1e-12 * lam[-1]  # eigenvalue spread > 1e12
    cv = C.std(0) / np.abs(C.mean(0))
    assert (cv[kinds == "constant"] < 1e-3).all() and (cv[kinds == "positive"] > 1e-2).all()
    # derived features: sums are linear in the base features, ratios log-linear in the positive ones
    W = X.astype(np.float64)

    def r2(y: np.ndarray, A: np.ndarray) -> float:
        A = np.column_stack([np.ones(len(A)), (A - A.mean(0)) / A.std(0)])
        resid = y - A @ np.linalg.lstsq(A, y, rcond=None)[0]
        return 1 - resid.var() / y.var()

    base = W[:, np.isin(kinds, ["positive", "signed"])]
    assert min(r2(W[:, j], base) for j in np.flatnonzero(kinds == "sum")) > 1 - 1e-6
    logpos = np.log(W[:, kinds == "positive"])
    assert min(r2(np.log(W[:, j]), logpos) for j in np.flatnonzero(kinds == "ratio")) > 1 - 1e-6
    assert max(r2(base[:, i], np.delete(base, i, axis=1)) for i in range(base.shape[1])) < 0.999  # base: not collinear


def test_deterministic_by_seed(screen) -> None:
    meta, X = screen
    meta2, X2 = generate_screen(SyntheticScreenConfig())
    assert meta.equals(meta2) and np.array_equal(X, X2)
    meta3, X3 = generate_screen(SyntheticScreenConfig(seed=1))
    assert not np.allclose(X, X3) and not meta[s.WELL].equals(meta3[s.WELL])
    assert screen_features(SyntheticScreenConfig()).equals(screen_features(CONFIG))


def test_no_moa_and_bad_designs() -> None:
    meta, _ = generate_screen(SyntheticScreenConfig(n_moas=0, n_plates=4, plates_per_batch=2, n_compounds=8))
    assert meta[s.MOA].null_count() == meta.height and meta.n_unique(s.BATCH) == 2
    with pytest.raises(ValueError, match="do not fit"):
        generate_screen(SyntheticScreenConfig(n_compounds=400))
    with pytest.raises(ValueError, match="replicates"):
        generate_screen(SyntheticScreenConfig(replicates=9))


@pytest.mark.parametrize("name", ["screen.csv", "screen.csv.gz"])
def test_csv_round_trip(tmp_path: Path, screen, name: str) -> None:
    meta, X = screen
    path = write_screen_csv(tmp_path / name, CONFIG)
    table = pl.read_csv(path, infer_schema_length=None)
    names = screen_features(CONFIG)["feature"].to_list()
    metadata = ["Metadata_Plate", "Metadata_Well", "Metadata_Batch", "Metadata_broad_sample", "Metadata_dose",
                "Metadata_moa", "Metadata_pert_type"]
    assert table.columns == metadata + names and table.height == meta.height
    assert (table["Metadata_Plate"] == meta[s.PLATE]).all() and (table["Metadata_Well"] == meta[s.WELL]).all()
    assert (table["Metadata_Batch"] == meta[s.BATCH]).all() and (table["Metadata_broad_sample"] == meta[s.COMPOUND]).all()
    np.testing.assert_allclose(table["Metadata_dose"].cast(pl.Float64), meta["dose"].cast(pl.Float64))
    assert table["Metadata_moa"].equals(meta[s.MOA], check_names=False)
    assert int((table["Metadata_pert_type"] == "control").sum()) == 48
    assert np.array_equal(table.select(names).to_numpy().astype(np.float32), X)  # float32 values survive exactly
    # and bioembed's profile importer reads it
    spec = ProfileImportSpec(name="synthetic_screen", perturbation_cols=["Metadata_broad_sample", "Metadata_dose"],
                             negative={"Metadata_pert_type": ["control"]}, moa_col="Metadata_moa")
    tables = read_profile_tables([path], spec)
    assert tables.features == names and np.array_equal(tables.X, X)
    assert (tables.meta[s.CONTROL_TYPE] == meta[s.CONTROL_TYPE]).all() and tables.meta[s.MOA].equals(meta[s.MOA])
    pairs = pl.DataFrame({"ours": meta[s.PERTURBATION], "imported": tables.meta[s.PERTURBATION]})
    assert pairs.n_unique("ours") == pairs.n_unique("imported") == pairs.n_unique() == 97  # the same perturbations
