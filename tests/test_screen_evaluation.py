"""A screen of the standard kind end to end: compound x dose, weekly batches, 6 controls per plate, raw
CellProfiler-like scales. NSC/NSCB as defined in the literature, batch metrics per plate and per batch,
cross-fitting that suits few controls, one failing recipe that does not take down the others."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from bioembed_assets import feature_sets
from bioembed_assets.config import Home
from bioembed_assets.evaluate.batch import batch_asw
from bioembed_assets.evaluate.crossfit import plan_crossfit
from bioembed_assets.sources.profile_table import ProfileImportSpec, import_profiles
from bioembed_assets.sources.synthetic_profiles import SyntheticScreenConfig, write_screen_csv
from tests.test_knn import _brute_force

SCREEN = SyntheticScreenConfig(n_compounds=30, n_features=60, seed=4)
SPEC = dict(name="screen", perturbation_cols=["Metadata_broad_sample", "Metadata_dose"],
            compound_col="Metadata_broad_sample", batch_col="Metadata_Batch", moa_col="Metadata_moa",
            negative={"Metadata_broad_sample": ["DMSO"]})
RECIPES = {"mad": "mad", "mad_batch": "mad_robustize(by=batch)", "card": "card",
           "singular": "sphere(method=zca,reg=0)"}  # 48 controls for 60 features: cannot whiten without reg


@pytest.fixture(scope="module")
def screen_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Home, feature_sets.FeatureSetRef]:
    root = tmp_path_factory.mktemp("screen")
    csv = write_screen_csv(root / "screen.csv", SCREEN)
    home = Home(root=root / "home").ensure()
    imported = import_profiles(home.root, [csv], ProfileImportSpec(**SPEC))
    return home, feature_sets.FeatureSetRef(imported.name, imported.version)


def test_one_failing_recipe_is_recorded_and_the_others_are_scored(screen_home) -> None:
    home, fs = screen_home
    result = feature_sets.normalize_and_evaluate(home, fs, RECIPES, null_size=200)
    assert set(result.failed) == {"singular"} and "covariance is singular" in result.failed["singular"]
    assert set(result.metrics["recipe"].unique()) == {"raw", "mad", "mad_batch", "card"}
    status = feature_sets.Lake(home.lake).read("recipe_status", encoder=fs.name, version=fs.version)
    row = status.filter(pl.col("recipe") == "singular").row(0, named=True)
    assert (row["status"], row["stage"]) == ("failed", "fit") and "reg > 0" in row["error"]
    assert not feature_sets.normalizer_path(home, fs, "singular").exists()
    assert feature_sets.Lake(home.lake).partitions("normalized_profiles", encoder=fs.name, recipe="singular") == []
    # 6 controls per plate: auto scores per-plate recipes in-sample and says so
    card = status.filter(pl.col("recipe") == "card").row(0, named=True)
    assert card["status"] == "ok" and card["crossfit"].startswith("in-sample: a plate has only 6 negative controls")
    assert result.value("card", "crossfit_folds") == 0
    # unchanged inputs with a failure are retried; drop the bad recipe and the next run is skipped
    good = {k: v for k, v in RECIPES.items() if k != "singular"}
    assert feature_sets.normalize_and_evaluate(home, fs, good, null_size=200) is not None
    assert feature_sets.normalize_and_evaluate(home, fs, good, null_size=200) is None
    assert feature_sets.normalize_and_evaluate(home, fs, good, null_size=300) is not None  # settings changed


def test_nsc_nscb_and_batch_metrics_follow_the_design_columns(screen_home) -> None:
    home, fs = screen_home
    result = feature_sets.evaluate_feature_set(home, fs, {"mad_batch": "mad_robustize(by=batch)"}, null_size=200)
    meta, X = feature_sets.load_profiles(home, "normalized_profiles", fs, recipe="mad_batch")
    assert meta["batch"].n_unique() == 2 and meta["plate"].n_unique() == 8 and meta["compound"].n_unique() == 31
    for key, batch in (("nsc", False), ("nscb", True)):
        _, hits, match = _brute_force(meta.with_columns(pl.col("batch")), X, batch, "mean")
        assert result.value("mad_batch", f"{key}_accuracy") == pytest.approx(hits[match].mean())
        assert result.value("mad_batch", f"{key}_treatments") == match.sum()
    assert result.value("mad_batch", "n_plates") == 8 and result.value("mad_batch", "n_batches") == 2
    assert result.value("mad_batch", "plate_chance") == pytest.approx(1 / 8)
    assert result.value("mad_batch", "batch_chance") == pytest.approx(0.5)
    # raw features carry the weekly batch effect; per-batch MAD removes most of it
    assert result.value("raw", "batch_knn_accuracy") > result.value("mad_batch", "batch_knn_accuracy")
    assert result.value("raw", "batch_asw") < result.value("mad_batch", "batch_asw")


def test_crossfit_plan_fits_the_design() -> None:
    plates = np.repeat([f"P{i}" for i in range(4)], 20)
    batches = np.where(np.isin(plates, ["P0", "P1"]), "W1", "W2")
    few = np.tile(np.arange(20) < 6, 4)  # 6 controls per plate, 12 per batch
    many = np.tile(np.arange(20) < 8, 4)
    assert plan_crossfit("auto", True, plates, batches, few).n_folds == 0
    assert plan_crossfit("auto", True, plates, batches, many).n_folds == 2
    pooled = plan_crossfit("auto", False, plates, batches, few)  # by=batch steps: folds pool a batch's plates
    assert (pooled.n_folds, pooled.deal_by) == (2, "batch")
    assert plan_crossfit("off", True, plates, batches, many).n_folds == 0
    assert plan_crossfit(3, True, plates, batches, few).n_folds == 3
    with pytest.raises(ValueError, match=r"crossfit=4: plate 'P0' has 6 negative-control wells.*by=batch"):
        plan_crossfit(4, True, plates, batches, few)
    with pytest.raises(ValueError, match="crossfit must be"):
        plan_crossfit(1, True, plates, batches, few)


def test_batch_asw_is_scibs_silhouette_batch() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4))
    batches = np.tile(["a", "b", "c"], 20)
    labels = np.repeat(["x", "y", "z", "solo"], [25, 25, 9, 1])
    X[batches == "a"] += 2.0
    per_label = []
    for lab in ("x", "y", "z"):  # "solo": one row, one batch -> skipped
        rows = np.flatnonzero(labels == lab)
        D = np.linalg.norm(X[rows, None] - X[None, rows], axis=2)
        b_of = batches[rows]
        s = []
        for i in range(rows.size):
            same = (b_of == b_of[i]) & (np.arange(rows.size) != i)
            a = D[i, same].mean()
            b = min(D[i, b_of == o].mean() for o in set(b_of) - {b_of[i]})
            s.append((b - a) / max(a, b))
        per_label.append(np.mean(1 - np.abs(s)))
    assert batch_asw(X, batches, labels) == pytest.approx(np.mean(per_label), rel=1e-9)
    assert np.isnan(batch_asw(X, np.full(60, "a"), labels))


@pytest.mark.integration
@pytest.mark.usefixtures("cli_env")
def test_import_cli_reports_a_failed_recipe_with_exit_status_1(tmp_path, capsys) -> None:
    from dagster_project.cli import main

    csv = write_screen_csv(tmp_path / "screen.csv", SCREEN)
    home = tmp_path / "home"
    args = ["import-profiles", str(csv), "--home", str(home), "--name", "screen", "--compound", "Metadata_broad_sample",
            "--perturbation", "Metadata_broad_sample,Metadata_dose", "--batch", "Metadata_Batch",
            "--moa", "Metadata_moa", "--negative", "Metadata_broad_sample=DMSO", "--null-size", "200",
            "--recipe", "mad_batch=mad_robustize(by=batch)", "--recipe", "singular=sphere(method=zca,reg=0)"]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "mad_batch" in out and "1 recipe(s) failed" in err and "singular" in err and "Traceback" not in err
    assert main(["sql", "--home", str(home), "--csv",
                 "SELECT recipe, status, stage FROM recipe_status ORDER BY recipe"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["mad_batch,ok,evaluate", "raw,ok,evaluate", "singular,failed,fit"]
    assert main(["sql", "--home", str(home), "--csv", "SELECT recipe, batch_asw > 0, nsc >= 0 FROM batch_vs_biology"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["mad_batch,true,true", "raw,true,true"]
    assert main(args[:-4] + ["--recipe", "mad_batch=mad_robustize(by=batch)", "--crossfit", "1"]) == 2
    assert "crossfit must be" in capsys.readouterr().err


def test_the_fixes_the_errors_suggest_work_with_six_controls_per_plate(screen_home) -> None:
    """`jump` runs (in-sample, said so); a batch-level recipe with tuned sphering cross-fits; a zero MAD on
    one plate's controls is refused with a suggestion (by=batch) that then works."""
    home, fs = screen_home
    recipes = {"jump": "jump", "week": "mad_robustize(by=batch)|sphere(by=batch,reg=auto)"}
    result = feature_sets.normalize_and_evaluate(home, fs, recipes, null_size=200)
    assert result.failed == {}
    assert result.value("jump", "crossfit_folds") == 0 and result.value("week", "crossfit_folds") == 2
    from bioembed_assets.profiles.recipe import Recipe

    meta, X = feature_sets.load_profiles(home, "well_profiles", fs)
    plates, batches, ctrl = meta["plate"].to_numpy(), meta["batch"].to_numpy(), feature_sets.is_negative(meta)
    X = X.copy()
    X[ctrl & (plates == plates[0]), 0] = 1.0  # feature 0 constant on one plate's 6 controls
    with pytest.raises(ValueError, match=r"zero MAD on the 6 control rows of plate .*use by=batch"):
        Recipe.parse("mad").fit(X, plates, ctrl, batches=batches)
    out = Recipe.parse("mad_robustize(by=batch)").fit_transform(X, plates, ctrl, batches=batches)
    assert np.isfinite(out).all()


@pytest.mark.realdata
def test_nsc_on_the_real_lincs_dose_series_matches_brute_force(tmp_path) -> None:
    from tests.test_profile_import import LINCS

    if not LINCS.exists():
        pytest.skip("shared LINCS profiles absent")
    home = Home(root=tmp_path / "home").ensure()
    spec = ProfileImportSpec(name="lincs", perturbation_cols=["Metadata_broad_sample", "Metadata_mmoles_per_liter"],
                             compound_col="Metadata_pert_id", moa_col="Metadata_moa",
                             negative={"Metadata_broad_sample": ["DMSO"]})
    imported = import_profiles(home.root, [LINCS], spec)
    fs = feature_sets.FeatureSetRef(imported.name, imported.version)
    meta, X = feature_sets.load_profiles(home, "well_profiles", fs)
    assert meta.filter(pl.col("control_type") == "treatment")["compound"].n_unique() < meta["perturbation"].n_unique()
    from bioembed_assets.evaluate.knn import nsc

    res = nsc(meta, X)
    _, hits, match = _brute_force(meta.with_columns(pl.lit("B1").alias("batch")), X, False, "mean")
    assert res.accuracy == pytest.approx(hits[match].mean()) and res.n_counted == match.sum() > 50
    # the old definition (another perturbation, i.e. another dose of the same compound, allowed) reads higher
    loose = nsc(meta.drop("compound"), X)
    assert loose.accuracy > res.accuracy


def test_a_reimport_of_unchanged_tables_is_not_evaluated_again(tmp_path) -> None:
    csv = write_screen_csv(tmp_path / "screen.csv", SCREEN)
    home = Home(root=tmp_path / "home").ensure()
    imported = import_profiles(home.root, [csv], ProfileImportSpec(**SPEC))
    fs = feature_sets.FeatureSetRef(imported.name, imported.version)
    assert feature_sets.normalize_and_evaluate(home, fs, {"mad": "mad"}, null_size=100) is not None
    assert import_profiles(home.root, [csv], ProfileImportSpec(**SPEC)).version == fs.version  # rewritten
    assert feature_sets.normalize_and_evaluate(home, fs, {"mad": "mad"}, null_size=100) is None


def test_nsc_aggregate_is_chosen_and_recorded(screen_home) -> None:
    home, fs = screen_home
    result = feature_sets.evaluate_feature_set(home, fs, {}, null_size=100, nsc_aggregate="median")
    meta, X = feature_sets.load_profiles(home, "well_profiles", fs)
    _, hits, match = _brute_force(meta, X, False, "median")
    assert result.value("raw", "nsc_accuracy") == pytest.approx(hits[match].mean())
    status = feature_sets.Lake(home.lake).read("recipe_status", encoder=fs.name, version=fs.version)
    import json

    assert json.loads(status["settings"][0]) == {"crossfit": "auto", "nsc_aggregate": "median", "null_size": 100,
                                                 "seed": 0}
