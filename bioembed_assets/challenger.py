"""Evaluate an encoder version like the champion: same plates, same recipes, same metric code.

`evaluate_version` embeds the plates with one registered version into its own rows (other
versions' rows stay), aggregates, normalizes and evaluates them, and logs one MLflow run per
(version, recipe), linked to the version's logged model, so MLflow's compare view shows champion
and challenger side by side. `compare_table` prints the same numbers from the lake.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import polars as pl

from bioembed_assets import feature_sets, pipeline
from bioembed_assets import schema as s
from bioembed_assets.config import Home
from bioembed_assets.evaluate.crossfit import CrossFit
from bioembed_assets.inference import resolve_device
from bioembed_assets.promotion import evaluated_plates, version_metrics
from bioembed_assets.registry import EVALUATION_EXPERIMENT, EncoderRegistry, EncoderVersion
from bioembed_assets.store.lake import Lake


def plates_with_crops(home: Home) -> list[str]:
    """Every plate whose cell table (crops) is in the lake."""
    return sorted({p[s.PLATE] for p in Lake(home.lake).partitions("cells")})


def evaluation_plates(home: Home, champion: EncoderVersion | None) -> list[str]:
    """The plates to compare on: those the champion has well profiles for, else every plate with crops."""
    plates = evaluated_plates(home, champion) if champion is not None else set()
    return sorted(plates) if plates else plates_with_crops(home)


def needs_evaluation(home: Home, version: EncoderVersion, plates: Sequence[str]) -> bool:
    """Whether `version` lacks metrics, or its metrics were computed on other plates than `plates`."""
    return version_metrics(home, version).height == 0 or evaluated_plates(home, version) != set(plates)


def evaluate_version(home: Home, registry: EncoderRegistry, version: EncoderVersion, plates: Sequence[str],
                     recipes: Mapping[str, str], *, device: str = "auto", batch_size: int | None = None,
                     null_size: int = 10000, crossfit: CrossFit = "auto", tags: Mapping[str, str] | None = None,
                     log: Callable[[str], None] = print) -> feature_sets.Evaluation:
    """Embed, profile, normalize and evaluate `version` on `plates`; log the runs to MLflow (with `tags`)."""
    if not plates:
        raise LookupError(f"no plates to evaluate {version.name} v{version.version} on; materialize crops first")
    encoder = registry.load_version(version).to(resolve_device(device))
    for plate in plates:
        summary = pipeline.embed_plate(home, plate, encoder, version, batch_size=batch_size)
        pipeline.profile_plate(home, plate, version)
        log(f"{version.name} v{version.version} plate {plate}: {summary['cells']} cells "
            f"{'(rows reused)' if summary['reused'] else 'embedded'}")
    _drop_other_plates(home, version, plates)
    feature_sets.normalize_feature_set(home, version, recipes)
    result = feature_sets.evaluate_feature_set(home, version, recipes, null_size=null_size, crossfit=crossfit)
    result.mlflow_runs = log_evaluation_runs(home, registry, version, result, recipes, plates, tags=tags)
    return result


def evaluate_against_champion(home: Home, registry: EncoderRegistry, champion: EncoderVersion,
                              challenger: EncoderVersion, recipes: Mapping[str, str], *, device: str = "auto",
                              batch_size: int | None = None, null_size: int = 10000, crossfit: CrossFit = "auto",
                              tags: Mapping[str, str] | None = None,
                              log: Callable[[str], None] = print) -> feature_sets.Evaluation:
    """Evaluate `challenger` on the champion's plates, and the champion too unless its metrics
    already come from exactly those plates; returns the challenger's evaluation."""
    plates = evaluation_plates(home, champion)
    kwargs = dict(device=device, batch_size=batch_size, null_size=null_size, crossfit=crossfit, tags=tags, log=log)
    if needs_evaluation(home, champion, plates):
        evaluate_version(home, registry, champion, plates, recipes, **kwargs)
    return evaluate_version(home, registry, challenger, plates, recipes, **kwargs)


def _drop_other_plates(home: Home, version: EncoderVersion, plates: Sequence[str]) -> None:
    """Keep the version's well profiles to exactly `plates` (what makes two versions comparable)."""
    lake = Lake(home.lake)
    for keys in lake.partitions("well_profiles", encoder=version.name, version=version.version):
        if keys[s.PLATE] not in plates:
            lake.partition_path("well_profiles", **keys).unlink()


def log_evaluation_runs(home: Home, registry: EncoderRegistry, version: EncoderVersion,
                        result: feature_sets.Evaluation, recipes: Mapping[str, str],
                        plates: Sequence[str], tags: Mapping[str, str] | None = None) -> dict[str, str]:
    """One MLflow run per recipe (found again by its tags and updated when re-evaluated): metrics
    linked to the version's logged model and the evaluation dataset, plots as artifacts; `tags`
    (e.g. the orchestrator's run id) are set on it too. Returns recipe -> run id."""
    import mlflow

    experiment = registry.experiment_id(EVALUATION_EXPERIMENT)
    runs: dict[str, str] = {}
    scalars = result.metrics  # (recipe, metric, value) rows
    dataset = mlflow.data.from_polars(
        pl.DataFrame({s.PLATE: sorted(plates)}), name=f"{version.name}-v{version.version}-wells",
        source=str(home.lake / "well_profiles" / f"encoder={version.name}" / f"version={version.version}"))
    for recipe in sorted(scalars[s.RECIPE].unique().to_list()):
        keys = {"encoder": version.name, "encoder_version": version.version, "recipe": recipe}
        query = " and ".join(f"tags.{k} = '{v}'" for k, v in keys.items())
        found = registry.client.search_runs([experiment], filter_string=query, max_results=1)
        run_id = found[0].info.run_id if found else None
        run_tags = {**keys, "model_id": version.model_id or "", **(tags or {})}
        with mlflow.start_run(run_id=run_id, experiment_id=experiment,
                              run_name=f"{version.name} v{version.version} {recipe}", tags=run_tags) as run:
            if run_id is None:
                mlflow.log_params({"recipe_steps": recipes.get(recipe, "raw (well medians)"), "plates": len(plates)})
                mlflow.log_input(dataset, context="evaluation")
            metrics = {r["metric"]: r["value"] for r in scalars.filter(pl.col(s.RECIPE) == recipe).iter_rows(named=True)
                       if not math.isnan(r["value"])}
            mlflow.log_metrics(metrics, model_id=version.model_id, dataset=dataset)
            with tempfile.TemporaryDirectory() as tmp:
                for plot, png in result.plots.items():
                    if plot.startswith(f"{recipe}_"):
                        (Path(tmp) / f"{plot}.png").write_bytes(png)
                mlflow.log_artifacts(tmp, "plots")
            runs[recipe] = run.info.run_id
    return runs


def compare_table(home: Home, versions: Sequence[tuple[str, EncoderVersion]]) -> pl.DataFrame:
    """(recipe, metric) x one column per (label, version), from the metrics lake table."""
    frames = []
    for label, version in versions:
        m = version_metrics(home, version)
        if m.height == 0:
            raise LookupError(f"{version.name} v{version.version} ({label}) has not been evaluated yet")
        frames.append(m.select(s.RECIPE, "metric", pl.col("value").alias(f"{label} v{version.version}")))
    out = frames[0]
    for f in frames[1:]:
        out = out.join(f, on=[s.RECIPE, "metric"], how="full", coalesce=True)
    return out.sort(s.RECIPE, "metric")
