"""One table to compare every registered encoder version on the user's plates.

Per (encoder, version, recipe): its aliases, family, whether its weights are trained, the embedding
width, the embedding throughput measured when it embedded the plates (lake `embedding_stats`), the
plates it was evaluated on and the headline metrics (lake `metrics`). Versions never embedded or
evaluated are listed with empty cells, so a user sees what is still to run.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from bioembed_assets import schema as s
from bioembed_assets.config import Home
from bioembed_assets.registry import EncoderRegistry, EncoderVersion
from bioembed_assets.store.lake import Lake

HEADLINE_METRICS = ("replicate_map", "fraction_retrieved", "moa_map", "nsc_accuracy", "nscb_accuracy",
                    "batch_knn_accuracy")
COLUMNS = ("encoder", "version", "aliases", "family", "weights", "dim", "crops_per_s", "plates", "recipe")


def registered_versions(registry: EncoderRegistry) -> list[tuple[EncoderVersion, list[str]]]:
    """Every version of every registered encoder, with the aliases pointing at it."""
    out = []
    for model in sorted(registry.client.search_registered_models(), key=lambda m: m.name):
        by_version: dict[str, list[str]] = {}
        for alias, version in registry.aliases(model.name).items():
            by_version.setdefault(version, []).append(alias)
        for mv in sorted(registry.client.search_model_versions(f"name = '{model.name}'"), key=lambda v: int(v.version)):
            out.append((registry.version(model.name, mv.version), sorted(by_version.get(str(mv.version), []))))
    return out


def _weights(version: EncoderVersion) -> str:
    if version.tags.get("has_weights") == "false":
        return "none"
    return "trained" if version.trained else "untrained"


def _throughput(lake: Lake, version: EncoderVersion) -> float | None:
    stats = lake.read("embedding_stats", encoder=version.name, version=version.version)
    seconds = float(stats["seconds"].sum()) if stats.height else 0.0
    return round(float(stats["cells"].sum()) / seconds, 1) if seconds > 0 else None


def _width(lake: Lake, version: EncoderVersion) -> int | None:
    for table in ("well_profiles", "embeddings"):
        parts = lake.partitions(table, encoder=version.name, version=version.version)
        if parts:
            df = lake.read(table, **parts[0]).head(1)
            return int(df[s.FEATURES].list.len()[0]) if df.height else None
    return None


def compare_encoders(home: Home, registry: EncoderRegistry, metrics: Sequence[str] = HEADLINE_METRICS) -> pl.DataFrame:
    """One row per registered (encoder, version, recipe): see the module docstring."""
    lake, rows = Lake(home.lake), []
    for version, aliases in registered_versions(registry):
        base = {"encoder": version.name, "version": int(version.version), "aliases": ",".join(aliases),
                "family": version.tags.get("family", ""), "weights": _weights(version), "dim": _width(lake, version),
                "crops_per_s": _throughput(lake, version),
                "plates": len(lake.partitions("well_profiles", encoder=version.name, version=version.version))}
        found = lake.read("metrics", encoder=version.name, version=version.version)
        found = found.filter(pl.col("metric").is_in(list(metrics)))
        if found.height == 0:
            rows.append({**base, "recipe": None})
            continue
        for (recipe,), group in found.group_by(s.RECIPE, maintain_order=True):
            values = dict(zip(group["metric"].to_list(), group["value"].to_list()))
            rows.append({**base, "recipe": recipe, **{m: values.get(m) for m in metrics}})
    schema = {"encoder": pl.Utf8, "version": pl.Int64, "aliases": pl.Utf8, "family": pl.Utf8, "weights": pl.Utf8,
              "dim": pl.Int64, "crops_per_s": pl.Float64, "plates": pl.Int64, "recipe": pl.Utf8,
              **{m: pl.Float64 for m in metrics}}
    return pl.DataFrame(rows, schema=schema).sort("encoder", "version", "recipe", nulls_last=True)
