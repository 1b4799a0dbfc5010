"""Plate ingest and profile-import assets (encoder-independent). Each is a thin call into the library."""


import time
from typing import Literal

import dagster as dg
import polars as pl

from bioembed_assets.config import RunConfig
from bioembed_assets.evaluate.crossfit import parse_crossfit
from bioembed_assets.sources.profile_table import (
    ImportedFeatureSet,
    ProfileImportSpec,
    SavedImport,
    import_profiles,
    save_import,
    saved_imports,
)
from bioembed_assets.store.catalog import build_catalog
from dagster_project.metadata import evaluation_metadata, lake_table_metadata, png_markdown, table_value
from dagster_project.partitions import plates
from dagster_project.resources import BioembedHome
from dagster_project.versions import owned

INGEST, EMBED, PROFILE, EVALUATE, IMPORT, LEARN = "ingest", "embed", "profile", "evaluate", "import", "learn"


def check_result(name: str, asset: str, passed: bool, **metadata) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(check_name=name, asset_key=asset, passed=bool(passed), metadata=metadata)


def log_throughput(log, what: str, done: int, unit: str, start: float) -> None:
    """INFO "<what>: <done> <unit> in <s> s (<rate> <unit>/s)": a step's whole throughput in the run log,
    after its per-field `info_progress` lines."""
    seconds = time.perf_counter() - start
    log.info(f"{what}: {done} {unit} in {seconds:.1f} s ({done / max(seconds, 1e-9):.1f} {unit}/s)")


def per_plate_check(name: str, asset: str, description: str) -> dg.AssetCheckSpec:
    """A blocking check evaluated per plate: a failing plate's downstream assets are not materialized
    (in the run, and by automation: see `refresh_when_upstream_updates`), other plates go on."""
    return dg.AssetCheckSpec(name, asset=asset, blocking=True, partitions_def=plates, description=description)


def crop_checks(summary: dict, config: RunConfig) -> list[dg.AssetCheckResult]:
    """`cells_per_well` (every well keeps `min_cells_per_well` crops) and `border_loss` (at most
    `max_border_loss_fraction` of the segmented cells dropped at the image border) of one plate."""
    segmented, dropped = summary.get("cells", 0), summary.get("dropped_border", 0)
    fraction = dropped / segmented if segmented else 0.0
    return [check_result("cells_per_well", "crops", summary["min_cells_per_well"] >= config.min_cells_per_well,
                         min_cells_per_well=summary["min_cells_per_well"], required=config.min_cells_per_well,
                         wells_with_cells=summary["wells_with_cells"]),
            check_result("border_loss", "crops", fraction <= config.max_border_loss_fraction,
                         dropped_border=dropped, segmented_cells=segmented,
                         border_loss_fraction=dg.MetadataValue.float(round(fraction, 4)),
                         max_border_loss_fraction=dg.MetadataValue.float(config.max_border_loss_fraction))]


def info_progress(log, what: str, every: float = 0.1):
    """A `progress(done, total)` callback that logs INFO "<what>: done of total (pct), rate/s" each time
    another `every` of the total is done, and at the end (the step's progress in the Dagster run log)."""
    start, last = time.perf_counter(), [-1.0]

    def progress(done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        if fraction - last[0] >= every or done >= total:
            last[0] = fraction
            rate = done / max(time.perf_counter() - start, 1e-9)
            log.info(f"{what}: {done} of {total} ({fraction:.0%}), {rate:.0f}/s")
    return progress


def raise_if_recipes_failed(failed: dict[str, str], metadata: dict) -> None:
    """Fail the step after every other recipe's results were written (the run's status says some
    failed; the `recipe_status` table keeps each error)."""
    if failed:
        lines = "; ".join(f"{k}: {v}" for k, v in failed.items())
        raise dg.Failure(description=f"{len(failed)} recipe(s) failed, the others were stored: {lines}",
                         metadata=metadata)


@dg.asset(partitions_def=plates, group_name=INGEST, kinds={"zarr", "parquet"}, **owned("raw_plate"))
def raw_plate(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
    """Plate images ingested from their acquisition layout into a zarr plate store, plus the image
    table with per-site QC (focus, saturation, intensity; failing sites are excluded downstream)."""
    from bioembed_assets import pipeline

    home, plate, start = bioembed.home(), context.partition_key, time.perf_counter()
    summary = pipeline.ingest_raw_plate(home, plate, bioembed.run_config(),
                                        progress=info_progress(context.log, f"raw_plate {plate}: fields ingested"))
    log_throughput(context.log, f"raw_plate {plate}: ingested", summary["fields"], "fields", start)
    return dg.MaterializeResult(metadata={**summary, **lake_table_metadata(home, "images", [{"plate": plate}])})


@dg.asset(partitions_def=plates, group_name=INGEST, kinds={"parquet"}, **owned("platemap"),
          check_specs=[dg.AssetCheckSpec("negative_controls_present", asset="platemap",
                                       description="The plate has negative-control wells (mAP and recipes need them).")])
def platemap(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
    """Wells -> perturbation, control type and MoA, validated (every plate needs negative controls)."""
    from bioembed_assets import pipeline

    home, plate = bioembed.home(), context.partition_key
    summary = pipeline.load_platemap(home, plate, bioembed.run_config())
    if "warning" in summary:
        context.log.warning(summary["warning"])
    n_neg = summary.get("negative_wells", 0)
    return dg.MaterializeResult(
        metadata={**summary, **lake_table_metadata(home, "platemap", [{"plate": plate}])},
        check_results=[check_result("negative_controls_present", "platemap", n_neg > 0, negative_wells=n_neg)])


@dg.asset(partitions_def=plates, group_name=INGEST, deps=[raw_plate], kinds={"numpy", "zarr"},
          **owned("illumination"))
def illumination(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
    """Per-channel illumination function estimated from all sites of the plate (CellProfiler-style,
    stored) and the corrected image store read by segmentation and crops; switchable in the config."""
    from bioembed_assets import pipeline

    plate, start = context.partition_key, time.perf_counter()
    context.log.info(f"illumination {plate}: estimating and correcting")
    summary = pipeline.correct_illumination(bioembed.home(), plate, bioembed.run_config(),
                                            progress=info_progress(context.log, f"illumination {plate}: fields corrected"))
    context.log.info(f"illumination {plate}: done in {time.perf_counter() - start:.1f} s")
    return dg.MaterializeResult(metadata=summary)


@dg.asset(partitions_def=plates, group_name=INGEST, deps=[illumination], kinds={"zarr", "parquet"},
          **owned("segmentation"))
def segmentation(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
    """Nuclei masks (threshold + watershed on DNA; whole cells when configured) and the nucleus table."""
    from bioembed_assets import pipeline

    home, plate, start = bioembed.home(), context.partition_key, time.perf_counter()
    context.log.info(f"segmentation {plate}: segmenting")
    summary = pipeline.segment_raw_plate(home, plate, bioembed.run_config(),
                                         progress=info_progress(context.log, f"segmentation {plate}: fields segmented"))
    log_throughput(context.log, f"segmentation {plate}: {summary['nuclei']} nuclei", summary["fields"], "fields", start)
    return dg.MaterializeResult(metadata={**summary, **lake_table_metadata(home, "nuclei", [{"plate": plate}])})


@dg.asset(partitions_def=plates, group_name=INGEST, deps=[segmentation], kinds={"zarr", "parquet"},
          **owned("crops"), check_specs=[
              per_plate_check("cells_per_well", "crops", "Every well of the plate kept at least `min_cells_per_well` "
                              "cell crops (run config; default 1). Blocking: a failing plate is not embedded."),
              per_plate_check("border_loss", "crops", "At most `max_border_loss_fraction` of the plate's segmented "
                              "cells were dropped at the image border (run config; default 0.3). Blocking.")])
def crops(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
    """Single-cell crops centred on each nucleus (border cells dropped and counted) and the cell
    table; plate heatmaps of cells per well and QC-failed sites."""
    from bioembed_assets import pipeline

    home, plate, config, start = bioembed.home(), context.partition_key, bioembed.run_config(), time.perf_counter()
    context.log.info(f"crops {plate}: cropping")
    summary = pipeline.crop_cells(home, plate, config,
                                  progress=info_progress(context.log, f"crops {plate}: fields cropped"))
    log_throughput(context.log, f"crops {plate}: cropped", summary.get("kept", summary.get("tiles", 0)), "crops", start)
    heatmaps = {name: png_markdown(png, name) for name, png in pipeline.plate_heatmaps(home, plate).items()}
    return dg.MaterializeResult(
        metadata={**summary, **lake_table_metadata(home, "cells", [{"plate": plate}]), **heatmaps},
        check_results=crop_checks(summary, config))


class ProfileImportConfig(dg.Config):
    """An external well-level profile table to import as a feature set (see README: Bring your own
    profiles). With `name` and `files` that import alone is run and, once it succeeded, registered in
    the home (`feature_sets/<name>/import.json`; a failed one is not registered). Without config
    every registered import is (re)imported, so "Materialize all" needs no config and re-imports
    unchanged tables as no-ops."""

    name: str = ""
    files: list[str] = []
    plate_col: str = "Metadata_Plate"
    well_col: str = "Metadata_Well"
    perturbation_cols: list[str] = []
    """Empty: `compound_col` when given, else Metadata_broad_sample."""
    canonical_perturbation: bool = False
    negative: dict[str, list[str]] = {}
    positive: dict[str, list[str]] = {}
    moa_col: str | None = None
    batch_col: str | None = None
    """Stored as `batch` (e.g. Metadata_Batch_Number); unset or null: the plate."""
    compound_col: str | None = None
    """Stored as `compound` (a compound over its doses); unset or null: the perturbation."""
    features: list[str] | None = None
    """Feature columns: names and/or globs (e.g. ["Cells_*", "Nuclei_*"]); default every numeric non-metadata column."""
    metadata_prefixes: list[str] = ["Metadata_"]
    """Columns with these prefixes are metadata (kept as text, never features), e.g. add "Image_Metadata_"."""
    metadata_cols: list[str] = []
    """More metadata columns, named."""
    metadata_files: list[str] = []
    """Metadata tables (platemap, image table) joined to the profiles on `metadata_on`."""
    metadata_on: list[str] = []
    """Join keys: COL or PROFILE_COL=METADATA_COL."""
    non_numeric: Literal["error", "drop"] = "error"
    """Feature columns holding non-numbers: fail naming file, row and column, or drop them (counted)."""
    recipes: dict[str, str] = {"card": "card"}
    crossfit: str = "auto"
    """How each recipe's replicate mAP is cross-fitted: auto, off or a number of folds (README: Evaluation metrics)."""
    nsc_aggregate: Literal["mean", "median"] = "mean"
    """How NSC / NSCB build a treatment's profile from its replicate wells."""


def _import_row(result: ImportedFeatureSet) -> tuple:
    """One row of the imports table shown on the materialization."""
    return (result.name, result.version, result.rows, len(result.plates), len(result.features),
            result.dropped_features, len(result.dropped_non_numeric), "")


@dg.asset(group_name=IMPORT, kinds={"parquet"}, **owned("imported_profiles"))
def imported_profiles(context: dg.AssetExecutionContext, config: ProfileImportConfig,
                      bioembed: BioembedHome) -> list[dict]:
    """Well-level profiles from pycytominer/JUMP/CellProfiler-style tables, stored as named, versioned
    feature sets. A configured import is validated and imported before it is registered; without
    config each registered import is re-run on its own, and the step fails at the end naming those
    that failed (the others are imported)."""
    from bioembed_assets import feature_sets

    root = bioembed.home().root
    done, rows, failed = [], [], {}
    if config.name or config.files:
        if not (config.name and config.files):
            raise ValueError("an import needs both `name` and `files`")
        spec = ProfileImportSpec(**config.model_dump(exclude={"files", "recipes", "crossfit", "nsc_aggregate"}))
        new = SavedImport(spec=spec, files=config.files, recipes=config.recipes, crossfit=parse_crossfit(config.crossfit),
                          nsc_aggregate=config.nsc_aggregate)
        result = import_profiles(root, new.files, new.spec)  # every check runs before anything is written
        save_import(root, new)  # registered only once it imported
        done.append({"name": result.name, "version": result.version, "recipes": new.recipes, "crossfit": new.crossfit,
                     "nsc_aggregate": new.nsc_aggregate})
        rows.append(_import_row(result))
    else:
        for saved in saved_imports(root, errors=failed):
            try:
                result = import_profiles(root, saved.files, saved.spec)
            except Exception as exc:  # one broken import (a file changed or gone) must not stop the others
                failed[saved.spec.name] = feature_sets.failure(exc)
                context.log.error(f"import {saved.spec.name!r} failed: {failed[saved.spec.name]}")
                continue
            done.append({"name": result.name, "version": result.version, "recipes": saved.recipes,
                         "crossfit": saved.crossfit, "nsc_aggregate": saved.nsc_aggregate})
            rows.append(_import_row(result))
    rows += [(name, None, None, None, None, None, None, error) for name, error in sorted(failed.items())]
    table = pl.DataFrame(rows, schema=["feature_set", "version", "wells", "plates", "features",
                                       "dropped_not_shared", "dropped_non_numeric", "error"], orient="row")
    metadata = {"imports": table_value(table)}
    if failed:
        raise dg.Failure(description=f"{len(failed)} registered import(s) failed (the others were imported): "
                         + "; ".join(f"{name}: {error}" for name, error in sorted(failed.items())), metadata=metadata)
    context.add_output_metadata(metadata)
    return done


@dg.asset(group_name=IMPORT, kinds={"duckdb"}, **owned("imported_evaluation"))
def imported_evaluation(context: dg.AssetExecutionContext, imported_profiles: list[dict],
                        bioembed: BioembedHome) -> dg.MaterializeResult:
    """Each imported feature set normalized with its recipes and evaluated like any embedding."""
    from bioembed_assets import feature_sets

    home = bioembed.home()
    meta: dict[str, dg.MetadataValue] = {}
    failed: dict[str, str] = {}
    unchanged = []
    for imported in imported_profiles:
        fs = feature_sets.FeatureSetRef(imported["name"], imported["version"])
        result = feature_sets.normalize_and_evaluate(home, fs, imported["recipes"], null_size=bioembed.null_size,
                                                     crossfit=imported.get("crossfit", "auto"),
                                                     nsc_aggregate=imported.get("nsc_aggregate", "mean"))
        if result is None:  # profiles, recipes and settings as at its last evaluation: nothing to recompute
            unchanged.append(f"{fs.name} v{fs.version}")
            continue
        meta |= evaluation_metadata(result, f"{fs.name}_")
        failed |= {f"{fs.name} v{fs.version} {recipe}": error for recipe, error in result.failed.items()}
    meta["unchanged"] = dg.MetadataValue.text(", ".join(unchanged) or "none")
    build_catalog(home.catalog_path, home.lake)
    raise_if_recipes_failed(failed, meta)
    return dg.MaterializeResult(metadata=meta)


INGEST_ASSETS = [raw_plate, platemap, illumination, segmentation, crops]
IMPORT_ASSETS = [imported_profiles, imported_evaluation]
