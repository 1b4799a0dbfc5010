"""The bioembed asset graph. Each asset is a thin call into `bioembed_assets.pipeline` / `.feature_sets`."""


import base64

import dagster as dg
import polars as pl

from bioembed_assets import feature_sets, pipeline
from bioembed_assets.inference import resolve_device
from bioembed_assets.sources.profile_table import ProfileImportSpec, SavedImport, import_profiles, save_import, saved_imports
from bioembed_assets.store.catalog import build_catalog
from dagster_project.partitions import plates
from dagster_project.resources import BioembedHome

INGEST, EMBED, PROFILE, EVALUATE, IMPORT = "ingest", "embed", "profile", "evaluate", "import"


def _check(name: str, asset: str, passed: bool, **metadata) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(check_name=name, asset_key=asset, passed=bool(passed), metadata=metadata)


def markdown_table(df: pl.DataFrame) -> str:
    with pl.Config(tbl_formatting="MARKDOWN", tbl_hide_column_data_types=True,
                   tbl_hide_dataframe_shape=True, tbl_rows=-1, float_precision=3):
        return str(df)


def _png_markdown(png: bytes, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


@dg.asset(partitions_def=plates, group_name=INGEST, kinds={"zarr", "parquet"})
def raw_plate(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
    """Plate images ingested from their acquisition layout into a zarr plate store, plus the image
    table with per-site QC (focus, saturation, intensity; failing sites are excluded downstream)."""
    summary = pipeline.ingest_raw_plate(bioembed.home(), context.partition_key, bioembed.run_config())
    return dg.MaterializeResult(metadata=summary)


@dg.asset(partitions_def=plates, group_name=INGEST, kinds={"parquet"},
          check_specs=[dg.AssetCheckSpec("negative_controls_present", asset="platemap")])
def platemap(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
    """Wells -> perturbation, control type and MoA, validated (every plate needs negative controls)."""
    summary = pipeline.load_platemap(bioembed.home(), context.partition_key, bioembed.run_config())
    if "warning" in summary:
        context.log.warning(summary["warning"])
    n_neg = summary.get("negative_wells", 0)
    return dg.MaterializeResult(
        metadata=summary,
        check_results=[_check("negative_controls_present", "platemap", n_neg > 0, negative_wells=n_neg)])


@dg.asset(partitions_def=plates, group_name=INGEST, deps=[raw_plate], kinds={"numpy", "zarr"})
def illumination(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
    """Per-channel illumination function estimated from all sites of the plate (CellProfiler-style,
    stored) and the corrected image store read by segmentation and crops; switchable in the config."""
    summary = pipeline.correct_illumination(bioembed.home(), context.partition_key, bioembed.run_config())
    return dg.MaterializeResult(metadata=summary)


@dg.asset(partitions_def=plates, group_name=INGEST, deps=[illumination], kinds={"zarr", "parquet"})
def segmentation(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
    """Nuclei masks (threshold + watershed on DNA; whole cells when configured) and the nucleus table."""
    summary = pipeline.segment_raw_plate(bioembed.home(), context.partition_key, bioembed.run_config())
    context.log.info(f"plate {context.partition_key}: {summary['nuclei']} nuclei")
    return dg.MaterializeResult(metadata=summary)


@dg.asset(partitions_def=plates, group_name=INGEST, deps=[segmentation], kinds={"zarr", "parquet"},
          check_specs=[dg.AssetCheckSpec("cells_per_well", asset="crops")])
def crops(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
    """Single-cell crops centred on each nucleus (border cells dropped and counted) and the cell
    table; plate heatmaps of cells per well and QC-failed sites."""
    home, plate = bioembed.home(), context.partition_key
    summary = pipeline.crop_cells(home, plate, bioembed.run_config())
    heatmaps = {name: _png_markdown(png, name) for name, png in pipeline.plate_heatmaps(home, plate).items()}
    ok = summary["min_cells_per_well"] >= 1
    return dg.MaterializeResult(
        metadata={**summary, **heatmaps},
        check_results=[_check("cells_per_well", "crops", ok, min_cells_per_well=summary["min_cells_per_well"])])


@dg.asset(group_name=EMBED, kinds={"mlflow"})
def encoder(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
    """The registered encoders (MLflow model registry, alias `champion`); registers an untrained
    version 1 of each configured encoder if it has none."""
    registry, channels = bioembed.registry(), bioembed.run_config().channels
    meta = {}
    for setup in bioembed.encoder_setups():
        version = registry.ensure(setup.name, lambda s=setup: s.build(channels), description=setup.description)
        meta[setup.name] = version.describe()
    return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(str(sorted(meta.items()))))


@dg.asset(partitions_def=plates, group_name=EMBED, deps=[crops, encoder], pool="gpu",
          kinds={"pytorch", "parquet"}, backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=8),
          check_specs=[dg.AssetCheckSpec("embeddings_finite", asset="embeddings")])
def embeddings(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
    """Per-cell embeddings from each configured encoder's champion version (loaded once per run,
    batched on GPU when present)."""
    home, registry, device = bioembed.home(), bioembed.registry(), resolve_device(bioembed.device)
    nan_rows, meta = 0, {"device": str(device)}
    for setup in bioembed.encoder_setups():
        model, version = registry.load(setup.name)
        model.to(device)
        for plate in context.partition_keys:
            summary = pipeline.embed_plate(
                home, plate, model, version, batch_size=bioembed.batch_size,
                progress=lambda done, total, p=plate, n=setup.name: context.log.debug(f"{n} {p}: {done}/{total}"))
            nan_rows += summary["nan_rows"]
            meta[f"{setup.name}"] = f"v{version.version}, dim {summary['dim']}"
            context.log.info(f"{setup.name} v{version.version} plate {plate}: {summary['cells']} cells embedded")
    return dg.MaterializeResult(
        metadata=meta, check_results=[_check("embeddings_finite", "embeddings", nan_rows == 0, nan_rows=nan_rows)])


@dg.asset(partitions_def=plates, group_name=PROFILE, deps=[embeddings, platemap], kinds={"parquet"})
def well_profiles(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
    """Cell -> well aggregation (median) of each encoder's embeddings, joined to the platemap."""
    home = bioembed.home()
    meta = {}
    for setup in bioembed.encoder_setups():
        summary = pipeline.profile_plate(home, context.partition_key, bioembed.champion(setup.name))
        meta[setup.name] = f"{summary['wells']} wells"
        meta["cells_excluded_by_qc"] = summary["cells_excluded_by_qc"]
    return dg.MaterializeResult(metadata=meta)


@dg.asset(group_name=PROFILE, deps=[well_profiles], kinds={"numpy"})
def normalizer(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
    """Each configured normalization recipe (default: the OpenPhenom card recipe, PCA on negative
    controls + per-plate scaling) fitted on all plates; parameters stored under the home."""
    home, recipes = bioembed.home(), bioembed.run_config().recipes
    meta = {}
    for setup in bioembed.encoder_setups():
        for name, spec in recipes.items():
            summary = feature_sets.fit_normalizer(home, bioembed.champion(setup.name), name, spec)
            meta[f"{setup.name}/{name}"] = (f"{summary['steps']}: {summary['control_wells']} control wells on "
                                            f"{summary['plates']} plates, {summary['features_out']} features out")
    return dg.MaterializeResult(metadata=meta)


@dg.asset(partitions_def=plates, group_name=PROFILE, deps=[normalizer, well_profiles], kinds={"parquet"})
def normalized_profiles(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
    """Each plate's well profiles through every fitted recipe (rows record recipe name and steps)."""
    home, recipes = bioembed.home(), bioembed.run_config().recipes
    for setup in bioembed.encoder_setups():
        for name in recipes:
            feature_sets.normalize_plate(home, context.partition_key, bioembed.champion(setup.name), name)
    build_catalog(home.catalog_path, home.lake)
    return dg.MaterializeResult(metadata={"recipes": ", ".join(recipes)})


def _evaluation_metadata(result: feature_sets.Evaluation, prefix: str) -> dict[str, dg.MetadataValue]:
    meta = {f"{prefix}metrics": dg.MetadataValue.md(markdown_table(result.metrics.select("recipe", "metric", "value")))}
    return meta | {f"{prefix}{plot}": _png_markdown(png, plot) for plot, png in result.plots.items()}


@dg.asset(group_name=EVALUATE, deps=[normalized_profiles], kinds={"duckdb", "mlflow"})
def evaluation(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
    """Replicate mAP vs negative controls (p-values, BH-FDR, fraction retrieved), MoA retrieval and
    plate effect, before and after each recipe; logged to each encoder version's MLflow run."""
    home, registry, recipes = bioembed.home(), bioembed.registry(), bioembed.run_config().recipes
    meta: dict[str, dg.MetadataValue | str | float] = {}
    for setup in bioembed.encoder_setups():
        version = bioembed.champion(setup.name)
        result = feature_sets.evaluate_feature_set(home, version, recipes, null_size=bioembed.null_size)
        registry.log_metrics(version, {f"{r['recipe']}/{r['metric']}": r["value"]
                                       for r in result.metrics.iter_rows(named=True)})
        meta |= _evaluation_metadata(result, f"{setup.name}_")
    build_catalog(home.catalog_path, home.lake)
    meta["catalog"] = dg.MetadataValue.path(str(home.catalog_path))
    return dg.MaterializeResult(metadata=meta)


class ProfileImportConfig(dg.Config):
    """An external well-level profile table to import as a feature set (see README: Bring your own
    profiles). With `name` and `files` it is registered in the home; every registered import is
    then (re)imported, so "Materialize all" needs no config and re-imports unchanged tables as no-ops."""

    name: str = ""
    files: list[str] = []
    plate_col: str = "Metadata_Plate"
    well_col: str = "Metadata_Well"
    perturbation_cols: list[str] = ["Metadata_broad_sample"]
    canonical_perturbation: bool = False
    negative: dict[str, list[str]] = {}
    positive: dict[str, list[str]] = {}
    moa_col: str | None = None
    recipes: dict[str, str] = {"card": "card"}


@dg.asset(group_name=IMPORT, kinds={"parquet"})
def imported_profiles(context: dg.AssetExecutionContext, config: ProfileImportConfig,
                      bioembed: BioembedHome) -> list[dict]:
    """Well-level profiles from pycytominer/JUMP-style tables, stored as named, versioned feature sets."""
    root = bioembed.home().root
    if config.name or config.files:
        spec = ProfileImportSpec(**config.model_dump(exclude={"files", "recipes"}))
        save_import(root, SavedImport(spec=spec, files=config.files, recipes=config.recipes))
    done, rows = [], []
    for saved in saved_imports(root):
        result = import_profiles(root, saved.files, saved.spec)
        done.append({"name": result.name, "version": result.version, "recipes": saved.recipes})
        rows.append((result.name, result.version, result.rows, len(result.plates), len(result.features)))
    table = pl.DataFrame(rows, schema=["feature_set", "version", "wells", "plates", "features"], orient="row")
    context.add_output_metadata({"imports": dg.MetadataValue.md(markdown_table(table))})
    return done


@dg.asset(group_name=IMPORT, kinds={"duckdb"})
def imported_evaluation(context: dg.AssetExecutionContext, imported_profiles: list[dict],
                        bioembed: BioembedHome) -> dg.MaterializeResult:
    """Each imported feature set normalized with its recipes and evaluated like any embedding."""
    home = bioembed.home()
    meta: dict[str, dg.MetadataValue] = {}
    for imported in imported_profiles:
        fs = feature_sets.FeatureSetRef(imported["name"], imported["version"])
        feature_sets.normalize_feature_set(home, fs, imported["recipes"])
        result = feature_sets.evaluate_feature_set(home, fs, imported["recipes"], null_size=bioembed.null_size)
        meta |= _evaluation_metadata(result, f"{fs.name}_")
    build_catalog(home.catalog_path, home.lake)
    return dg.MaterializeResult(metadata=meta)


PER_PLATE_ASSETS = [raw_plate, platemap, illumination, segmentation, crops, embeddings, well_profiles]
ALL_ASSETS = [raw_plate, platemap, illumination, segmentation, crops, encoder, embeddings, well_profiles,
              normalizer, normalized_profiles, evaluation, imported_profiles, imported_evaluation]
