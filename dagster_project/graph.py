"""The whole asset graph for a list of encoders: ingest, one lineage per encoder, profiles, evaluation.

Profiles and evaluation cover every configured encoder's champion. They refresh by declarative
automation when their inputs change (an encoder's re-embedding after a promotion, a new plate),
tick by tick down the graph: well profiles with the embeddings, then the normalizer, the
normalized profiles and the evaluation.
"""


import time
from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg

from bioembed_assets.encoder_comparison import compare_encoders
from bioembed_assets.encoder_setups import INTERPRETABLE_FAMILIES, EncoderSetup, encoder_setups
from bioembed_assets.store.catalog import build_catalog
from dagster_project.assets import (
    EVALUATE,
    IMPORT_ASSETS,
    INGEST_ASSETS,
    PROFILE,
    info_progress,
    log_throughput,
    platemap,
    raise_if_recipes_failed,
)
from dagster_project.encoder_assets import build_encoder_assets, embeddings_key
from dagster_project.metadata import (
    DAGSTER_RUN_TAG,
    evaluation_metadata,
    evaluation_run_links,
    headline_changes,
    lake_table_metadata,
    png_markdown,
    table_value,
)
from dagster_project.partitions import plates
from dagster_project.resources import BioembedHome
from dagster_project.versions import owned

REGRESSION_CHECK = "replicate_map_regression"


def refresh_when_upstream_updates(partitioned: bool, only: dg.AssetsDefinition | None = None) -> dg.AutomationCondition:
    """Eager without `newly_missing`: requested once a dependency (or just `only`) is updated, or
    will be in the same run, when none is in progress, every dependency's blocking checks passed (a
    plate that failed one goes no further) and, per plate, none is missing. Missing partitions are left
    to the plate sensor and backfills."""
    updated = dg.AutomationCondition.any_deps_updated()
    if only is not None:
        updated = updated.allow(dg.AssetSelection.assets(only))
    cond = (updated.since_last_handled() & dg.AutomationCondition.all_deps_blocking_checks_passed()
            & ~dg.AutomationCondition.any_deps_in_progress() & ~dg.AutomationCondition.in_progress())
    if partitioned:
        cond = cond & ~dg.AutomationCondition.any_deps_missing()
    return cond.with_label("refresh when upstream updates")


def regression_check(previous: dict | None, current: dict, max_drop: float) -> dg.AssetCheckResult:
    """`replicate_map_regression`: fails (WARN) when a replicate mAP recorded by the previous evaluation
    dropped by more than `max_drop`; passes on the first evaluation."""
    if previous is None:
        return dg.AssetCheckResult(check_name=REGRESSION_CHECK, passed=True, severity=dg.AssetCheckSeverity.WARN,
                                   metadata={"previous": "none: first evaluation"})
    changes = headline_changes(previous, current)
    worse = changes.filter(changes["drop"] > max_drop)
    return dg.AssetCheckResult(
        check_name=REGRESSION_CHECK, passed=worse.is_empty(), severity=dg.AssetCheckSeverity.WARN,
        description=None if worse.is_empty() else f"replicate mAP dropped by more than {max_drop}: "
                    + ", ".join(f"{k} {p:.3f} -> {c:.3f}" for k, p, c, _ in worse.iter_rows()),
        metadata={"changes": table_value(changes), "max_replicate_map_drop": dg.MetadataValue.float(max_drop),
                  "regressed": len(worse)})


def build_profile_assets(setups: Sequence[EncoderSetup]) -> list[dg.AssetsDefinition]:
    """well_profiles, normalizer, normalized_profiles and evaluation over `setups`' champions."""
    names = [s.name for s in setups]

    @dg.asset(partitions_def=plates, group_name=PROFILE, deps=[*(embeddings_key(n) for n in names), platemap],
              kinds={"parquet"}, automation_condition=refresh_when_upstream_updates(True), **owned("well_profiles"))
    def well_profiles(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
        """Cell -> well aggregation (median) of each encoder's champion embeddings, joined to the platemap."""
        from bioembed_assets import pipeline

        home, plate, meta, written = bioembed.home(), context.partition_key, {}, []
        for name in names:
            version = bioembed.champion(name)
            summary = pipeline.profile_plate(home, plate, version)
            meta[name] = f"v{version.version}: {summary['wells']} wells"
            meta["cells_excluded_by_qc"] = summary["cells_excluded_by_qc"]
            written.append(dict(encoder=version.name, version=version.version, plate=plate))
        return dg.MaterializeResult(metadata={**meta, **lake_table_metadata(home, "well_profiles", written)})

    @dg.asset(group_name=PROFILE, deps=[well_profiles], kinds={"numpy"},
              automation_condition=refresh_when_upstream_updates(False), **owned("normalizer"))
    def normalizer(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
        """Each configured normalization recipe (default: the OpenPhenom card recipe, PCA on negative
        controls + per-plate scaling) fitted on all plates; parameters stored under the home."""
        from bioembed_assets import feature_sets

        home, recipes, meta = bioembed.home(), bioembed.run_config().recipes, {}
        total, start = len(names) * len(recipes), time.perf_counter()
        for name in names:
            version = bioembed.champion(name)
            for recipe, spec in recipes.items():
                context.log.info(f"normalizer: fitting {name} v{version.version} {recipe} "
                                 f"({len(meta) + 1} of {total})")
                summary = feature_sets.fit_or_discard(home, version, recipe, spec)
                if "error" in summary:  # recorded; the evaluation reports it and fails the run at the end
                    meta[f"{name}/{recipe}"] = f"v{version.version} FAILED: {summary['error']}"
                    context.log.error(f"{name} v{version.version} recipe {recipe!r} failed: {summary['error']}")
                    continue
                meta[f"{name}/{recipe}"] = (f"v{version.version} {summary['steps']}: {summary['control_wells']} control "
                                            f"wells on {summary['plates']} plates, {summary['features_out']} features out")
        log_throughput(context.log, "normalizer: fitted", total, "recipes", start)
        return dg.MaterializeResult(metadata=meta)

    @dg.asset(partitions_def=plates, group_name=PROFILE, deps=[normalizer, well_profiles], kinds={"parquet"},
              automation_condition=refresh_when_upstream_updates(True, only=normalizer),  # after the refit
              **owned("normalized_profiles"))
    def normalized_profiles(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
        """Each plate's well profiles through every fitted recipe (rows record recipe name and steps)."""
        from bioembed_assets import feature_sets

        home, recipes, plate = bioembed.home(), bioembed.run_config().recipes, context.partition_key
        skipped, written = [], []
        for name in names:
            version = bioembed.champion(name)
            for recipe in recipes:
                if feature_sets.fit_error(home, version, recipe) is not None:
                    skipped.append(f"{name}/{recipe}")  # its fit failed: nothing to apply (see recipe_status)
                    continue
                feature_sets.normalize_plate(home, plate, version, recipe)
                written.append(dict(encoder=version.name, version=version.version, recipe=recipe, plate=plate))
        build_catalog(home.catalog_path, home.lake)
        return dg.MaterializeResult(metadata={"recipes": ", ".join(recipes),
                                              "skipped_failed_fits": ", ".join(skipped) or "none",
                                              **lake_table_metadata(home, "normalized_profiles", written)})

    @dg.asset(group_name=EVALUATE, deps=[normalized_profiles], kinds={"duckdb", "mlflow"},
              automation_condition=refresh_when_upstream_updates(False), **owned("evaluation"),
              check_specs=[dg.AssetCheckSpec(
                  REGRESSION_CHECK, asset="evaluation",
                  description="No encoder/recipe's replicate mAP dropped by more than `max_replicate_map_drop` (run "
                              "config; default 0.05) since the previous evaluation. Warns: the metrics are stored "
                              "either way and new plates can move mAP; promotions have their own rule.")])
    def evaluation(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
        """Replicate mAP vs negative controls (p-values, BH-FDR, fraction retrieved), MoA retrieval and
        plate effect, before and after each recipe, for each encoder's champion; one MLflow run per
        (version, recipe), linked to the version's logged model."""
        from bioembed_assets import challenger as challenger_lib
        from bioembed_assets import feature_sets

        home, registry, run_config = bioembed.home(), bioembed.registry(), bioembed.run_config()
        recipes = run_config.recipes
        previous = context.instance.get_latest_materialization_event(context.asset_key)
        meta: dict[str, dg.MetadataValue | str | float] = {}
        failed: dict[str, str] = {}
        start = time.perf_counter()
        for i, name in enumerate(names, 1):
            version = bioembed.champion(name)
            context.log.info(f"evaluation: {name} v{version.version} ({i} of {len(names)} encoders, "
                             f"{len(recipes)} recipes)")
            result = feature_sets.evaluate_feature_set(home, version, recipes, null_size=bioembed.null_size,
                                                       crossfit=bioembed.run_config().crossfit,
                                                       nsc_aggregate=bioembed.run_config().nsc_aggregate)
            registry.log_metrics(version, {f"{r['recipe']}/{r['metric']}": r["value"]
                                           for r in result.metrics.iter_rows(named=True)})
            plates_ = challenger_lib.evaluation_plates(home, version)
            result.mlflow_runs = challenger_lib.log_evaluation_runs(home, registry, version, result, recipes, plates_,
                                                                    tags={DAGSTER_RUN_TAG: context.run_id})
            meta |= evaluation_metadata(result, f"{name}_")
            meta |= evaluation_run_links(bioembed.mlflow_ui_url, registry, result, f"{name}_")
            failed |= {f"{name} v{version.version} {recipe}": error for recipe, error in result.failed.items()}
        build_catalog(home.catalog_path, home.lake)
        meta["catalog"] = dg.MetadataValue.path(str(home.catalog_path))
        log_throughput(context.log, "evaluation: evaluated", len(names), "encoders", start)
        raise_if_recipes_failed(failed, meta)
        return dg.MaterializeResult(metadata=meta, check_results=[regression_check(
            previous.asset_materialization.metadata if previous and previous.asset_materialization else None,
            meta, run_config.max_replicate_map_drop)])

    @dg.asset(group_name=EVALUATE, deps=[evaluation], kinds={"duckdb", "mlflow"},
              automation_condition=refresh_when_upstream_updates(False), **owned("encoder_comparison"))
    def encoder_comparison(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
        """Every registered encoder version side by side: weights, width, embedding throughput and the
        headline metrics per recipe (what `bioembed compare --home H` prints)."""
        table = compare_encoders(bioembed.home(), bioembed.registry())
        return dg.MaterializeResult(metadata={"comparison": table_value(table),
                                              "versions": table.select("encoder", "version").n_unique()})

    return [well_profiles, normalizer, normalized_profiles, evaluation, encoder_comparison]


def gradcamo_key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["gradcamo", name])


def build_gradcamo_asset(setup: EncoderSetup) -> dg.AssetsDefinition:
    """`gradcamo/<name>`: Grad-CAMO of each cell of a plate under the encoder's champion."""
    name = setup.name

    @dg.asset(key=gradcamo_key(name), partitions_def=plates, group_name=EVALUATE, deps=[embeddings_key(name)],
              pool="gpu", kinds={"pytorch", "parquet", "mlflow"},
              automation_condition=refresh_when_upstream_updates(True), **owned("gradcamo"))
    def gradcamo(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
        """Grad-CAM of each cell's own treatment (the champion's head, or a treatment probe on its embeddings)
        and the Grad-CAMO score: attention on the cell's mask / all attention, with chance, enrichment and the
        neighbour fraction (lake `gradcamo_cells`, `gradcamo_summary`; SQL views of the same names); a gallery
        of crops with their maps here and on the version's MLflow run."""
        from bioembed_assets.inference import resolve_device
        from bioembed_assets.interpretation import interpret_plate

        registry = bioembed.registry()
        model, version = registry.load(name)
        model.to(resolve_device(bioembed.device))
        plate = context.partition_key
        done = interpret_plate(bioembed.home(), plate, model, version,
                               progress=info_progress(context.log, f"gradcamo/{name} {plate}: cells explained"))
        if version.run_id:
            done.result.log_to_mlflow(registry.client, version.run_id)
        return dg.MaterializeResult(metadata={
            **done.result.metrics(), "encoder_version": version.version, "classifier": done.classifier,
            "layer": done.result.layer, "gallery": png_markdown(done.result.gallery_png, f"gradcamo {plate}")})

    return gradcamo


@dataclass(frozen=True)
class AssetGraph:
    """Every asset of a deployment and the named subsets the demo, sensors and tests run."""

    encoders: tuple[str, ...]
    """The encoders as the run config names them (e.g. `timm:resnet18`)."""
    registered: tuple[str, ...]
    """Their registered-model names, which key their assets (e.g. `timm_resnet18`)."""
    all: list[dg.AssetsDefinition]
    per_plate: list[dg.AssetsDefinition]
    """Ingest, each encoder's embeddings and well profiles: what one plate's run materializes."""
    encoder_assets: list[dg.AssetsDefinition]
    challengers: dict[str, dg.AssetsDefinition]
    well_profiles: dg.AssetsDefinition
    normalizer: dg.AssetsDefinition
    normalized_profiles: dg.AssetsDefinition
    evaluation: dg.AssetsDefinition


def build_graph(encoder_names: Sequence[str]) -> AssetGraph:
    """The asset graph for the named encoders (see `pipeline.DEFAULT_ENCODERS`)."""
    setups = encoder_setups(encoder_names)
    per_encoder = {s.name: build_encoder_assets(s) for s in setups}
    gradcamo = [build_gradcamo_asset(s) for s in setups if s.family in INTERPRETABLE_FAMILIES]
    profile = build_profile_assets(setups)
    well_profiles = profile[0]
    return AssetGraph(
        encoders=tuple(encoder_names),
        registered=tuple(s.name for s in setups),
        all=[*INGEST_ASSETS, *(a for assets in per_encoder.values() for a in assets), *gradcamo, *profile,
             *IMPORT_ASSETS],
        per_plate=[*INGEST_ASSETS, *(assets[1] for assets in per_encoder.values()), *gradcamo, well_profiles],
        encoder_assets=[assets[0] for assets in per_encoder.values()],
        challengers={n: assets[2] for n, assets in per_encoder.items() if len(assets) > 2},
        well_profiles=well_profiles, normalizer=profile[1], normalized_profiles=profile[2], evaluation=profile[3])
