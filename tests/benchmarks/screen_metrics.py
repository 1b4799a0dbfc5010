"""The README's table of NSC / NSCB / replicate mAP / batch mixing per recipe, on the real LINCS plate
(compounds over 6 doses, ../shared/data) and on the synthetic screen of the standard kind.

    uv run --frozen python tests/benchmarks/screen_metrics.py [--null-size 2000]

Each set is imported as a lab would (treatment = compound @ dose, compound column, batch column),
every recipe is fitted and evaluated with the default `crossfit=auto`, and one markdown table is
printed per set (NaN where the design has none, e.g. NSCB on a single plate).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import polars as pl

from bioembed_assets import feature_sets
from bioembed_assets.config import Home
from bioembed_assets.sources.profile_table import ProfileImportSpec, import_profiles
from bioembed_assets.sources.synthetic_profiles import SyntheticScreenConfig, write_screen_csv

ROOT = Path(__file__).resolve().parents[2]
LINCS = ROOT.parent / "shared/data/lincs-cp-SQ00015054/cytominer_eval/example_data/compound/" \
    "SQ00015054_normalized_feature_select.csv.gz"
COLUMNS = {"replicate_map": "rep mAP", "replicate_perturbations": "rep n", "crossfit_folds": "folds",
           "moa_map": "MoA mAP", "nsc_accuracy": "NSC",
           "nsc_treatments": "NSC n", "nscb_accuracy": "NSCB", "nscb_treatments": "NSCB n",
           "batch_asw": "batch ASW", "batch_knn_accuracy": "batch kNN", "n_features": "features"}
SCREEN = SyntheticScreenConfig(n_compounds=60, n_features=200)
SCREEN_RECIPES = {"mad": "mad", "mad_batch": "mad_robustize(by=batch)", "card": "card", "tvn": "tvn",
                  "jump": "feature_select(variance,correlation)|mad_robustize(by=batch)|sphere(by=batch,reg=auto)",
                  "jump_harmony": "jump_harmony"}
LINCS_RECIPES = {"card": "card", "tvn": "tvn", "sphere": "sphere(method=zca-cor,reg=auto)"}


def evaluate(home: Home, spec: ProfileImportSpec, files: list[Path], recipes: dict[str, str],
             null_size: int) -> pl.DataFrame:
    imported = import_profiles(home.root, files, spec)
    fs = feature_sets.FeatureSetRef(imported.name, imported.version)
    result = feature_sets.normalize_and_evaluate(home, fs, recipes, null_size=null_size)
    assert result is not None
    for recipe, error in result.failed.items():
        print(f"  {spec.name}/{recipe} failed: {error}", file=sys.stderr)
    wide = result.metrics.filter(pl.col("metric").is_in(list(COLUMNS))).pivot(on="metric", index="recipe",
                                                                               values="value")
    counts = {"replicate_perturbations", "crossfit_folds", "nsc_treatments", "nscb_treatments", "n_features"}
    return wide.select("recipe", *[(pl.col(c).cast(pl.Int64) if c in counts else pl.col(c)).alias(v)
                                   for c, v in COLUMNS.items() if c in wide.columns])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--null-size", type=int, default=2000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, pl.Config(tbl_formatting="MARKDOWN", tbl_hide_column_data_types=True,
                                                         tbl_hide_dataframe_shape=True, float_precision=3,
                                                         tbl_rows=-1, tbl_cols=-1, tbl_width_chars=400):
        home = Home(root=Path(tmp) / "home").ensure()
        csv = write_screen_csv(Path(tmp) / "screen.csv", SCREEN)
        spec = ProfileImportSpec(name="screen", perturbation_cols=["Metadata_broad_sample", "Metadata_dose"],
                                 compound_col="Metadata_broad_sample", batch_col="Metadata_Batch",
                                 moa_col="Metadata_moa", negative={"Metadata_broad_sample": ["DMSO"]})
        print(f"Synthetic screen ({SCREEN.n_plates} plates in {SCREEN.n_plates // SCREEN.plates_per_batch} weekly "
              f"batches, {SCREEN.controls_per_plate} DMSO wells per plate, {SCREEN.n_compounds} compounds x "
              f"{SCREEN.n_doses} doses, {SCREEN.n_features} raw CellProfiler-like features):\n")
        print(evaluate(home, spec, [csv], SCREEN_RECIPES, args.null_size))
        if LINCS.exists():
            common = dict(compound_col="Metadata_pert_id", moa_col="Metadata_moa",
                          negative={"Metadata_broad_sample": ["DMSO"]})
            spec = ProfileImportSpec(name="lincs", perturbation_cols=["Metadata_broad_sample", "Metadata_mmoles_per_liter"],
                                     **common)
            print("\nLINCS SQ00015054 (one plate, normalized + feature-selected upstream), treatment-level: treatment = "
                  "broad_sample @ concentration (one well each here), compound = pert_id:\n")
            print(evaluate(home, spec, [LINCS], LINCS_RECIPES, args.null_size))
            spec = ProfileImportSpec(name="lincs_compounds", perturbation_cols=["Metadata_broad_sample"], **common)
            print("\nThe same plate, compound-level (a compound's 6 doses are its replicates, for replicate mAP):\n")
            print(evaluate(home, spec, [LINCS], LINCS_RECIPES, args.null_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
