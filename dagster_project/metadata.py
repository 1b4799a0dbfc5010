"""Materialization metadata the Dagster UI renders natively: tables with a schema, numbers it plots
across materializations, the row count and column schema of the lake partitions an asset wrote,
plots as images and links to the MLflow runs and model versions an asset logged."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import dagster as dg
import polars as pl

from bioembed_assets.config import Home
from bioembed_assets.registry import EncoderRegistry, EncoderVersion
from bioembed_assets.store.lake import Lake

if TYPE_CHECKING:  # sklearn: imported by the assets that evaluate
    from bioembed_assets import feature_sets

HEADLINE_METRICS = ("replicate_map", "fraction_retrieved", "moa_map")
"""Metrics recorded as numbers per recipe (the asset's Plots tab draws them over materializations)."""
DAGSTER_RUN_TAG = "dagster_run_id"
"""The MLflow run tag that names the Dagster run which logged the MLflow run."""


def png_markdown(png: bytes, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def _cell(value: object) -> object:
    """A table cell as shown: floats to 4 decimals (the full value is in the lake), non-finite ones
    empty (undefined, e.g. Z' without positive controls) rather than `nan`."""
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    return value


def table_value(df: pl.DataFrame) -> dg.TableMetadataValue:
    """`df` as a Dagster table with its column schema (rendered as a table, no "Show Markdown")."""
    schema = dg.TableSchema(columns=[dg.TableColumn(name, str(dtype).lower()) for name, dtype in df.schema.items()])
    records = [dg.TableRecord({k: _cell(v) for k, v in row.items()}) for row in df.iter_rows(named=True)]
    return dg.MetadataValue.table(records=records, schema=schema)


def lake_table_metadata(home: Home, table: str, partitions: Sequence[dict[str, str]],
                        row_count: bool = True) -> dict[str, object]:
    """`dagster/column_schema` of lake `table` and, with `row_count`, `dagster/row_count` summed over
    `partitions` (from the parquet footers)."""
    if not partitions:
        return {}
    lake = Lake(home.lake)
    footers = [lake.footer(table, **keys) for keys in partitions]
    meta: dict[str, object] = {"dagster/column_schema": dg.TableSchema(
        columns=[dg.TableColumn(name, dtype) for name, dtype in footers[0][1]])}
    if row_count:
        meta["dagster/row_count"] = dg.MetadataValue.int(sum(rows for rows, _ in footers))
    return meta


def evaluation_metadata(result: feature_sets.Evaluation, prefix: str) -> dict[str, dg.MetadataValue]:
    """The metrics table, the headline metrics as numbers, failed recipes and the plots."""
    metrics = result.metrics.select("recipe", "metric", "value")
    meta: dict[str, dg.MetadataValue] = {f"{prefix}metrics": table_value(metrics)}
    for recipe, metric, value in metrics.filter(pl.col("metric").is_in(HEADLINE_METRICS)).iter_rows():
        if value is not None and math.isfinite(value):
            meta[f"{prefix}{recipe}/{metric}"] = dg.MetadataValue.float(float(value))
    if result.failed:
        meta[f"{prefix}failed_recipes"] = table_value(pl.DataFrame(
            {"recipe": list(result.failed), "error": list(result.failed.values())}))
    return meta | {f"{prefix}{plot}": png_markdown(png, plot) for plot, png in result.plots.items()}


def headline_changes(previous: Mapping[str, object], current: Mapping[str, object],
                     metric: str = "replicate_map") -> pl.DataFrame:
    """The numbers `<prefix><recipe>/<metric>` (as `evaluation_metadata` records them) that both
    materializations' metadata hold: key, previous, current and the drop (previous - current)."""
    suffix = f"/{metric}"
    rows = [(key, float(previous[key].value), float(value.value)) for key, value in current.items()
            if key.endswith(suffix) and isinstance(value, dg.FloatMetadataValue)
            and isinstance(previous.get(key), dg.FloatMetadataValue)]
    return (pl.DataFrame(rows, schema={"metric": pl.String, "previous": pl.Float64, "current": pl.Float64}, orient="row")
            .with_columns((pl.col("previous") - pl.col("current")).alias("drop")))


def mlflow_run_url(ui_url: str, registry: EncoderRegistry, run_id: str) -> dg.UrlMetadataValue:
    """The MLflow UI page of a run."""
    experiment = registry.client.get_run(run_id).info.experiment_id
    return dg.MetadataValue.url(f"{ui_url.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}")


def mlflow_version_url(ui_url: str, version: EncoderVersion) -> dg.UrlMetadataValue:
    """The MLflow UI page of a registered model version."""
    return dg.MetadataValue.url(f"{ui_url.rstrip('/')}/#/models/{version.name}/versions/{version.version}")


def evaluation_run_links(ui_url: str, registry: EncoderRegistry, result: feature_sets.Evaluation,
                         prefix: str) -> dict[str, dg.UrlMetadataValue]:
    """One link per recipe to the MLflow run its metrics were logged to."""
    return {f"{prefix}{recipe}/mlflow_run": mlflow_run_url(ui_url, registry, run_id)
            for recipe, run_id in sorted(result.mlflow_runs.items())}
