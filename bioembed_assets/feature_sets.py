"""Normalization and evaluation of a feature set: an encoder version or an imported profile table.

A feature set is a (name, version) pair whose well profiles sit in the `well_profiles` lake
table under `encoder = name`, `version = version`. Recipes (`profiles.recipe`) are fitted on
all of its plates and applied plate by plate; evaluation scores the raw profiles and every
recipe with the same metrics, so feature sets and recipes are compared like for like.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl

from bioembed_assets import schema as s
from bioembed_assets.config import Home
from bioembed_assets.evaluate.batch import batch_effect_scores
from bioembed_assets.evaluate.crossfit import cross_fitted_replicate_map
from bioembed_assets.evaluate.knn import nsc, nscb
from bioembed_assets.evaluate.pairs import UnpairedError, nonreplicate_average_precision
from bioembed_assets.evaluate.plots import embedding_map_png, map_vs_pvalue_png
from bioembed_assets.evaluate.relationships import known_relationship_recall
from bioembed_assets.evaluate.retrieval import fraction_retrieved, mean_average_precision_by, moa_map, replicate_map
from bioembed_assets.evaluate.separation import control_z_prime
from bioembed_assets.profiles.recipe import Recipe
from bioembed_assets.sources.profile_table import feature_set_dir, load_manifest
from bioembed_assets.store.lake import Lake, features_to_numpy, with_features

RAW_RECIPE = "raw"
CARD_RECIPE = "card"  # the OpenPhenom model-card recipe (PCA on controls + per-plate scaling)
DEFAULT_RECIPES: dict[str, str] = {CARD_RECIPE: CARD_RECIPE}


class FeatureSet(Protocol):
    """Anything with a feature-set name and version (an `EncoderVersion`, an imported set)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...


@dataclass(frozen=True)
class FeatureSetRef:
    name: str
    version: str


def load_profiles(home: Home, table: str, fs: FeatureSet, **keys: str) -> tuple[pl.DataFrame, np.ndarray]:
    """(metadata, float32 features) of a feature set's rows in `table`, sorted by plate and well."""
    df = Lake(home.lake).read(table, encoder=fs.name, version=fs.version, **keys)
    if df.height == 0:
        raise LookupError(f"no {table} for feature set {fs.name} v{fs.version}{keys or ''}")
    df = df.sort(s.PLATE, s.WELL)
    widths = df.group_by(s.PLATE).agg(pl.col(s.FEATURES).list.len().max().alias("n")).sort(s.PLATE)
    if widths["n"].n_unique() > 1:  # e.g. plates normalized by two different fits of the recipe
        shown = ", ".join(f"{p}: {n}" for p, n in widths.iter_rows())
        raise s.BioembedInputError(f"{table} of feature set {fs.name} v{fs.version}{keys or ''} have different "
                                   f"widths per plate ({shown}); re-materialize them together")
    return df.drop(s.FEATURES), features_to_numpy(df)


def feature_names(home: Home, fs: FeatureSet, n_features: int) -> list[str]:
    """Column names of an imported set (its manifest), else `<name>_<i>` for embedding dimensions."""
    if (feature_set_dir(home.root, fs.name) / f"v{fs.version}.json").exists():
        return list(load_manifest(home.root, fs.name, fs.version)["features"])
    return [f"{fs.name}_{i}" for i in range(n_features)]


def normalizer_path(home: Home, fs: FeatureSet, recipe: str = CARD_RECIPE) -> Path:
    s.validate_plate_name(recipe)
    return home.normalizers / f"encoder={fs.name}" / f"version={fs.version}" / f"recipe={recipe}"


def is_negative(meta: pl.DataFrame) -> np.ndarray:
    return (meta[s.CONTROL_TYPE] == s.ControlType.NEGATIVE).fill_null(False).to_numpy()


def fit_normalizer(home: Home, fs: FeatureSet, recipe: str = CARD_RECIPE, spec: str | None = None) -> dict:
    """Fit recipe `spec` (default: the preset called `recipe`) on every plate of the feature set
    and store its parameters under the home (named `recipe`)."""
    meta, X = load_profiles(home, "well_profiles", fs)
    negative = is_negative(meta)
    fitted = Recipe.parse(spec or recipe).fit(X, meta[s.PLATE].to_numpy(), negative,
                                              feature_names=feature_names(home, fs, X.shape[1]),
                                              perturbations=meta[s.PERTURBATION].to_numpy())
    fitted.save(normalizer_path(home, fs, recipe))
    return {"recipe": recipe, "steps": fitted.spec, "plates": meta[s.PLATE].n_unique(),
            "control_wells": int(negative.sum()), "wells": meta.height,
            "features_in": int(X.shape[1]), "features_out": len(fitted.output_features)}


def normalize_plate(home: Home, plate: str, fs: FeatureSet, recipe: str = CARD_RECIPE) -> dict:
    """One plate's well profiles through the stored recipe -> `normalized_profiles` (each row
    records the recipe name and its full step list)."""
    meta, X = load_profiles(home, "well_profiles", fs, plate=plate)
    fitted = Recipe.load(normalizer_path(home, fs, recipe))
    Y = fitted.transform(X, meta[s.PLATE].to_numpy(), is_negative(meta))
    out = with_features(meta.with_columns(pl.lit(recipe).alias(s.RECIPE), pl.lit(fitted.spec).alias("recipe_steps")), Y)
    Lake(home.lake).write("normalized_profiles", out, encoder=fs.name, version=fs.version, recipe=recipe, plate=plate)
    return {"wells": out.height, "dim": int(Y.shape[1])}


def normalize_feature_set(home: Home, fs: FeatureSet, recipes: Mapping[str, str] = DEFAULT_RECIPES) -> dict:
    """Fit every recipe and normalize every plate of the feature set."""
    plates = sorted({p[s.PLATE] for p in Lake(home.lake).partitions("well_profiles", encoder=fs.name,
                                                                    version=fs.version)})
    out = {}
    for name, spec in recipes.items():
        out[name] = fit_normalizer(home, fs, name, spec)
        for plate in plates:
            normalize_plate(home, plate, fs, name)
    return out


@dataclass
class Evaluation:
    """Scalar metrics per recipe, per-group mAP tables, and PNG plots of one feature set."""

    metrics: pl.DataFrame
    groups: pl.DataFrame
    plots: dict[str, bytes]

    def value(self, recipe: str, metric: str) -> float:
        row = self.metrics.filter((pl.col(s.RECIPE) == recipe) & (pl.col("metric") == metric))
        return float(row["value"][0]) if row.height else float("nan")


def moa_relationships(meta: pl.DataFrame, sep: str = "|") -> pl.DataFrame:
    """Known relationships from the annotation: every pair of perturbations sharing a MoA label."""
    ann = (meta.filter(pl.col(s.MOA).is_not_null() & (pl.col(s.CONTROL_TYPE) != s.ControlType.NEGATIVE))
           .select(pl.col(s.PERTURBATION).cast(pl.Utf8), pl.col(s.MOA).str.split(sep).alias("label"))
           .explode("label").unique())
    pairs = ann.join(ann, on="label", suffix="_b").filter(pl.col(s.PERTURBATION) < pl.col(f"{s.PERTURBATION}_b"))
    return pairs.select(pl.col(s.PERTURBATION).alias("entity1"), pl.col(f"{s.PERTURBATION}_b").alias("entity2")).unique()


def _retrieval_tables(meta: pl.DataFrame, X: np.ndarray, rep: pl.DataFrame, null_size: int, seed: int,
                      relationships: pl.DataFrame | None) -> tuple[dict[str, float], dict[str, pl.DataFrame]]:
    """Every metric but the (possibly cross-fitted) activity mAP: non-replicate mAP, MoA mAP, NSC/NSCB,
    known-relationship recall, plate effect and Z' (NaN where the design does not allow one)."""
    nan = float("nan")
    negative = is_negative(meta)
    treated = ~negative
    treated_meta = meta.filter(pl.Series(treated))
    tables = {"replicate": rep}
    scalars = {"n_features": float(X.shape[1]), "replicate_map": rep["mean_average_precision"].mean(),
               "fraction_retrieved": fraction_retrieved(rep)}
    try:
        nonrep_ap = nonreplicate_average_precision(treated_meta, X[treated])
        tables["nonrep"] = mean_average_precision_by(nonrep_ap, [s.PERTURBATION], null_size=null_size, seed=seed)
        scalars |= {"nonrep_map": tables["nonrep"]["mean_average_precision"].mean(),
                    "nonrep_fraction_retrieved": fraction_retrieved(tables["nonrep"])}
    except UnpairedError:  # no treated perturbation has two wells: nothing to retrieve
        pass
    has_moa = treated_meta[s.MOA].drop_nulls().n_unique() >= 2
    if has_moa:
        moa = moa_map(meta, X, null_size=null_size, seed=seed)
        tables["moa"] = moa
        scalars |= {"moa_map": moa["mean_average_precision"].mean(), "moa_fraction_retrieved": fraction_retrieved(moa),
                    "nsc_accuracy": nsc(meta, X).accuracy,
                    "nscb_accuracy": nscb(meta, X).accuracy if meta[s.PLATE].n_unique() > 1 else nan}
    pairs = relationships if relationships is not None else (moa_relationships(meta) if has_moa else None)
    n_perts = treated_meta[s.PERTURBATION].n_unique()
    if pairs is not None and pairs.height and n_perts >= 20:
        recall = known_relationship_recall(treated_meta, X[treated], pairs)
        scalars |= {"relationship_recall_5": recall.metrics["recall_0.05_0.95"],
                    "relationship_recall_10": recall.metrics["recall_0.1_0.9"]}
    scalars |= batch_effect_scores(X, meta[s.PLATE].to_numpy(), mask=treated, groups=meta[s.PERTURBATION].to_numpy())
    positive = (meta[s.CONTROL_TYPE] == s.ControlType.POSITIVE).to_numpy()
    scalars["control_z_prime"] = control_z_prime(X, positive, negative, seed=seed)
    return scalars, tables


def evaluate_feature_set(home: Home, fs: FeatureSet, recipes: Mapping[str, str] = DEFAULT_RECIPES,
                         null_size: int = 10000, seed: int = 0,
                         relationships: pl.DataFrame | None = None) -> Evaluation:
    """Score the raw profiles and each recipe's normalized profiles with the same metrics; stored in
    the `metrics` (scalars) and `replicate_map` (per group: kind replicate / nonrep / moa) tables.

    - replicate mAP vs negative controls, p-values, BH-FDR, fraction retrieved; for a fitted recipe
      it is cross-fitted (`evaluate.crossfit`): negatives are never controls the recipe was fitted on;
    - replicate mAP vs non-replicates (other treated perturbations);
    - MoA mAP, NSC and NSCB nearest-neighbour MoA accuracy (when MoAs are annotated);
    - known-relationship recall (EFAAR) of `relationships` (default: perturbation pairs sharing a MoA);
    - plate effect on treated wells (silhouette; kNN plate accuracy and entropy among wells of other
      perturbations) and control Z'.
    Raw metrics leave out feature columns with NaN/inf (counted as `features_skipped_non_finite`);
    recipes must deal with them (e.g. `feature_select(nan)` first) or fail with a clear error.
    """
    raw_meta, raw_X = load_profiles(home, "well_profiles", fs)
    names = feature_names(home, fs, raw_X.shape[1])
    finite = np.isfinite(raw_X).all(axis=0)  # imported tables may have NaN columns: raw metrics skip them
    sets = {RAW_RECIPE: (raw_meta, raw_X if finite.all() else raw_X[:, finite])}
    sets |= {name: load_profiles(home, "normalized_profiles", fs, recipe=name) for name in recipes}
    rows, groups, plots = [], [], {}
    for recipe, (meta, X) in sets.items():
        if recipe == RAW_RECIPE:  # nothing fitted: every control can be a negative
            rep = replicate_map(meta, X, null_size=null_size, seed=seed)
        else:
            spec = recipes[recipe]
            rep = cross_fitted_replicate_map(
                raw_meta, raw_X, lambda spec=spec: _CrossFitRecipe(spec, names, raw_meta[s.PERTURBATION].to_numpy()),
                null_size=null_size, seed=seed)
        scalars, tables = _retrieval_tables(meta, X, rep, null_size, seed, relationships)
        if recipe == RAW_RECIPE:
            scalars["features_skipped_non_finite"] = float((~finite).sum())
        rows += [(recipe, k, float(v) if v is not None else float("nan")) for k, v in scalars.items()]
        for kind, df in tables.items():
            groups.append(df.select(
                pl.lit(recipe).alias(s.RECIPE), pl.lit(kind).alias("kind"), pl.col(df.columns[0]).cast(pl.Utf8).alias("group"),
                "mean_average_precision", "p_value", "corrected_p_value", "below_corrected_p"))
        treated = ~is_negative(meta)
        colour = meta[s.MOA].fill_null(meta[s.PERTURBATION]).to_numpy()
        plots[f"{recipe}_map"] = embedding_map_png(
            X, {"perturbation / MoA": np.where(treated, colour, "negative control"), "plate": meta[s.PLATE].to_numpy()},
            title=f"{fs.name} v{fs.version} ({recipe})")
        plots[f"{recipe}_map_vs_p"] = map_vs_pvalue_png(rep)
    ident = [pl.lit(fs.name).alias(s.ENCODER), pl.lit(fs.version).alias(s.ENCODER_VERSION)]
    metrics = pl.DataFrame(rows, schema=[s.RECIPE, "metric", "value"], orient="row").with_columns(ident)
    group_df = pl.concat(groups).with_columns(ident)
    lake = Lake(home.lake)
    lake.write("metrics", metrics, encoder=fs.name, version=fs.version)
    lake.write("replicate_map", group_df, encoder=fs.name, version=fs.version)
    return Evaluation(metrics, group_df, plots)


class _CrossFitRecipe:
    """A fresh recipe in the (fit(X, batches, is_control), transform(X, batches)) shape crossfit uses."""

    def __init__(self, spec: str, names: list[str], perturbations: np.ndarray) -> None:
        self.recipe, self.names, self.perturbations = Recipe.parse(spec), names, perturbations

    def fit(self, X: np.ndarray, batches: np.ndarray, is_control: np.ndarray) -> _CrossFitRecipe:
        self.recipe.fit(X, batches, is_control, feature_names=self.names, perturbations=self.perturbations)
        return self

    def transform(self, X: np.ndarray, batches: np.ndarray) -> np.ndarray:
        return self.recipe.transform(X, batches)
