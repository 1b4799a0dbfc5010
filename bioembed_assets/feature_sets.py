"""Normalization and evaluation of a feature set: an encoder version or an imported profile table.

A feature set is a (name, version) pair whose well profiles sit in the `well_profiles` lake
table under `encoder = name`, `version = version`. Recipes (`profiles.recipe`) are fitted on
all of its plates and applied plate by plate; evaluation scores the raw profiles and every
recipe with the same metrics, so feature sets and recipes are compared like for like.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl

from bioembed_assets import design
from bioembed_assets import schema as s
from bioembed_assets.config import Home
from bioembed_assets.evaluate.batch import batch_asw, batch_effect_scores
from bioembed_assets.evaluate.crossfit import CrossFit, cross_fitted_replicate_map, plan_crossfit
from bioembed_assets.evaluate.knn import NscAggregate, nsc, nscb
from bioembed_assets.evaluate.pairs import UnpairedError, nonreplicate_average_precision
from bioembed_assets.evaluate.plots import embedding_map_png, map_vs_pvalue_png
from bioembed_assets.evaluate.relationships import known_relationship_recall
from bioembed_assets.evaluate.retrieval import fraction_retrieved, mean_average_precision_by, moa_map, replicate_map
from bioembed_assets.evaluate.separation import control_z_prime
from bioembed_assets.profiles.recipe import Recipe
from bioembed_assets.sources.profile_table import feature_set_dir, load_manifest
from bioembed_assets.store.atomic import atomic_file, remove_atomic
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
    """Column names of an imported set (its manifest), else the names the encoder gave its embedding
    (lake table `feature_names`, e.g. CellProfiler's for the classical encoder), else `<name>_<i>`."""
    if (feature_set_dir(home.root, fs.name) / f"v{fs.version}.json").exists():
        return list(load_manifest(home.root, fs.name, fs.version)["features"])
    named = (Lake(home.lake).read("feature_names", encoder=fs.name, version=fs.version)
             .filter(pl.col("output") == "features").sort("feature_index"))
    if named.height == n_features:
        return named["feature"].to_list()
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
    batches = design.batches(meta)
    fitted = Recipe.parse(spec or recipe).fit(X, meta[s.PLATE].to_numpy(), negative,
                                              feature_names=feature_names(home, fs, X.shape[1]),
                                              perturbations=meta[s.PERTURBATION].to_numpy(), batches=batches)
    fitted.save(normalizer_path(home, fs, recipe))
    _fit_error_path(home, fs, recipe).unlink(missing_ok=True)
    return {"recipe": recipe, "steps": fitted.spec, "plates": meta[s.PLATE].n_unique(),
            "batches": int(np.unique(batches).size), "control_wells": int(negative.sum()), "wells": meta.height,
            "features_in": int(X.shape[1]), "features_out": len(fitted.output_features)}


def normalize_plate(home: Home, plate: str, fs: FeatureSet, recipe: str = CARD_RECIPE) -> dict:
    """One plate's well profiles through the stored recipe -> `normalized_profiles` (each row
    records the recipe name and its full step list)."""
    meta, X = load_profiles(home, "well_profiles", fs, plate=plate)
    path = normalizer_path(home, fs, recipe)
    if not path.exists():
        raise LookupError(f"recipe {recipe!r} of feature set {fs.name} v{fs.version} is not fitted (no {path}); "
                          "materialize the normalizer first (its fit may have failed: see the recipe_status table)")
    fitted = Recipe.load(path)
    Y = fitted.transform(X, meta[s.PLATE].to_numpy(), is_negative(meta), batches=design.batches(meta))
    out = with_features(meta.with_columns(pl.lit(recipe).alias(s.RECIPE), pl.lit(fitted.spec).alias("recipe_steps")), Y)
    Lake(home.lake).write("normalized_profiles", out, encoder=fs.name, version=fs.version, recipe=recipe, plate=plate)
    return {"wells": out.height, "dim": int(Y.shape[1])}


def _fit_error_path(home: Home, fs: FeatureSet, recipe: str) -> Path:
    path = normalizer_path(home, fs, recipe)
    return path.with_name(f"{path.name}.error")


def discard_recipe(home: Home, fs: FeatureSet, recipe: str, error: str) -> None:
    """Remove a recipe's fitted parameters and normalized rows, so a failed refit leaves no stale
    or half-normalized profiles under its name, and keep `error` for the evaluation's status."""
    remove_atomic(normalizer_path(home, fs, recipe))
    Lake(home.lake).drop("normalized_profiles", encoder=fs.name, version=fs.version, recipe=recipe)
    path = _fit_error_path(home, fs, recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(error)


def fit_error(home: Home, fs: FeatureSet, recipe: str) -> str | None:
    """Why the last fit of `recipe` failed (None if it did not)."""
    path = _fit_error_path(home, fs, recipe)
    return path.read_text() if path.exists() else None


def failure(exc: BaseException) -> str:
    """One line saying what went wrong (the exception type and message)."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__


def fit_or_discard(home: Home, fs: FeatureSet, recipe: str, spec: str | None = None) -> dict:
    """`fit_normalizer`, or, when the fit fails, `discard_recipe` and `{"error": ...}` (one bad recipe,
    e.g. too few controls for its steps, must not stop the others)."""
    try:
        return fit_normalizer(home, fs, recipe, spec)
    except Exception as exc:
        discard_recipe(home, fs, recipe, failure(exc))
        return {"recipe": recipe, "steps": spec or recipe, "error": failure(exc)}


def normalize_feature_set(home: Home, fs: FeatureSet, recipes: Mapping[str, str] = DEFAULT_RECIPES) -> dict[str, dict]:
    """Fit every recipe and normalize every plate of the feature set. A recipe that fails is
    discarded and reported (`{"error": ...}`) without stopping the others."""
    plates = sorted({p[s.PLATE] for p in Lake(home.lake).partitions("well_profiles", encoder=fs.name,
                                                                    version=fs.version)})
    out: dict[str, dict] = {}
    for name, spec in recipes.items():
        out[name] = fit_or_discard(home, fs, name, spec)
        if "error" in out[name]:
            continue
        try:
            for plate in plates:
                normalize_plate(home, plate, fs, name)
        except Exception as exc:  # e.g. a plate the fitted recipe cannot transform: the recipe fails alone
            discard_recipe(home, fs, name, failure(exc))
            out[name] = {"recipe": name, "steps": spec, "error": failure(exc)}
    return out


class RecipeFitError(RuntimeError):
    """The recipe could not be fitted (the message is the fit's error)."""


@dataclass
class Evaluation:
    """Scalar metrics per recipe, per-group mAP tables, PNG plots and per-recipe status of one
    feature set (`failed`: recipe -> error, for recipes that could not be evaluated; `mlflow_runs`:
    recipe -> the MLflow run its metrics were logged to, once logged)."""

    metrics: pl.DataFrame
    groups: pl.DataFrame
    plots: dict[str, bytes]
    failed: dict[str, str] = field(default_factory=dict)
    mlflow_runs: dict[str, str] = field(default_factory=dict)

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


def batch_effect_metrics(meta: pl.DataFrame, X: np.ndarray) -> dict[str, float]:
    """Plate and batch effect of treated wells: `plate_*` (kNN accuracy / entropy, silhouette of the
    plates) and `batch_*` (the same of the batch labels; equal to the plate ones without a batch
    column), plus `batch_asw` (scib's batch ASW over all wells, label = perturbation)."""
    treated, pert = ~is_negative(meta), meta[s.PERTURBATION].to_numpy()
    batches = design.batches(meta)
    plate = batch_effect_scores(X, meta[s.PLATE].to_numpy(), mask=treated, groups=pert)
    out = {("n_plates" if k == "n_batches" else k.replace("batch_", "plate_")): v for k, v in plate.items() if k != "n_rows"}
    out |= batch_effect_scores(X, batches, mask=treated, groups=pert)
    out["batch_asw"] = batch_asw(X, batches, pert) if np.unique(batches).size > 1 else float("nan")
    return out


def _retrieval_tables(meta: pl.DataFrame, X: np.ndarray, rep: pl.DataFrame, null_size: int, seed: int,
                      relationships: pl.DataFrame | None,
                      nsc_aggregate: NscAggregate = "mean") -> tuple[dict[str, float], dict[str, pl.DataFrame]]:
    """Every metric but the (possibly cross-fitted) activity mAP: non-replicate mAP, MoA mAP, NSC/NSCB,
    known-relationship recall, plate and batch effect and Z' (NaN where the design does not allow one)."""
    negative = is_negative(meta)
    treated = ~negative
    treated_meta = meta.filter(pl.Series(treated))
    tables = {"replicate": rep}
    scalars = {"n_features": float(X.shape[1]), "replicate_map": rep["mean_average_precision"].mean(),
               "replicate_perturbations": float(rep["mean_average_precision"].drop_nulls().drop_nans().len()),
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
        scalars |= {"moa_map": moa["mean_average_precision"].mean(), "moa_fraction_retrieved": fraction_retrieved(moa)}
        scalars |= _nearest_neighbour_metrics(meta, X, nsc_aggregate)
    pairs = relationships if relationships is not None else (moa_relationships(meta) if has_moa else None)
    n_perts = treated_meta[s.PERTURBATION].n_unique()
    if pairs is not None and pairs.height and n_perts >= 20:
        recall = known_relationship_recall(treated_meta, X[treated], pairs)
        scalars |= {"relationship_recall_5": recall.metrics["recall_0.05_0.95"],
                    "relationship_recall_10": recall.metrics["recall_0.1_0.9"]}
    scalars |= batch_effect_metrics(meta, X)
    positive = (meta[s.CONTROL_TYPE] == s.ControlType.POSITIVE).to_numpy()
    scalars["control_z_prime"] = control_z_prime(X, positive, negative, seed=seed)
    return scalars, tables


def _nearest_neighbour_metrics(meta: pl.DataFrame, X: np.ndarray, aggregate: NscAggregate) -> dict[str, float]:
    """NSC and NSCB accuracy (mean over treatments) and how many treatments each counts."""
    out = {}
    for key, fn in (("nsc", nsc), ("nscb", nscb)):
        if key == "nscb" and np.unique(design.batches(meta)).size < 2:
            out |= {"nscb_accuracy": float("nan"), "nscb_treatments": 0.0}
            continue
        res = fn(meta, X, aggregate=aggregate)
        out |= {f"{key}_accuracy": res.accuracy, f"{key}_treatments": float(res.n_counted)}
    return out


def _per_plate_steps(recipe: Recipe) -> bool:
    return any(step.per_batch and step.grouping == "plate" for step in recipe.steps)


def evaluate_feature_set(home: Home, fs: FeatureSet, recipes: Mapping[str, str] = DEFAULT_RECIPES,
                         null_size: int = 10000, seed: int = 0, relationships: pl.DataFrame | None = None,
                         crossfit: CrossFit = "auto", nsc_aggregate: NscAggregate = "mean") -> Evaluation:
    """Score the raw profiles and each recipe's normalized profiles with the same metrics; stored in
    the `metrics` (scalars), `replicate_map` (per group: kind replicate / nonrep / moa) and
    `recipe_status` (ok / failed with the error, per recipe) tables.

    - replicate mAP vs negative controls, p-values, BH-FDR, fraction retrieved; for a fitted recipe
      it is cross-fitted (`evaluate.crossfit`, `crossfit`: auto | off | folds; `crossfit_folds` records
      the folds used, 0 = in-sample): negatives are never controls the recipe was fitted on;
    - replicate mAP vs non-replicates (other treated perturbations);
    - MoA mAP, NSC and NSCB nearest-neighbour MoA accuracy (when MoAs are annotated; `evaluate.knn`;
      treatment profiles are the `nsc_aggregate` (mean or median) of their wells);
    - known-relationship recall (EFAAR) of `relationships` (default: perturbation pairs sharing a MoA);
    - plate and batch effect (`batch_effect_metrics`) and control Z'.
    Raw metrics leave out feature columns with NaN/inf (counted as `features_skipped_non_finite`).
    A recipe that fails (not normalized, or its metrics cannot be computed) is recorded as failed
    and the others are scored.
    """
    raw_meta, raw_X = load_profiles(home, "well_profiles", fs)
    names = feature_names(home, fs, raw_X.shape[1])
    finite = np.isfinite(raw_X).all(axis=0)  # imported tables may have NaN columns: raw metrics skip them
    rows, groups, plots, status, failed = [], [], {}, [], {}
    for recipe in [RAW_RECIPE, *recipes]:
        spec = "" if recipe == RAW_RECIPE else recipes[recipe]
        stage, how = "load", ""
        try:
            if recipe == RAW_RECIPE:
                meta, X = raw_meta, raw_X if finite.all() else raw_X[:, finite]
                n_folds = 0
            else:
                why = fit_error(home, fs, recipe)
                if why is not None:
                    stage = "fit"
                    raise RecipeFitError(why)
                meta, X = load_profiles(home, "normalized_profiles", fs, recipe=recipe)
                stage = "crossfit"
                parsed = Recipe.parse(spec)
                plan = plan_crossfit(crossfit, _per_plate_steps(parsed), raw_meta[s.PLATE].to_numpy(),
                                     design.batches(raw_meta), is_negative(raw_meta))
                n_folds, how = plan.n_folds, plan.reason
            stage = "evaluate"
            if n_folds == 0:  # raw: nothing fitted, every control can be a negative; else in-sample by choice
                rep = replicate_map(meta, X, null_size=null_size, seed=seed)
            else:
                rep = cross_fitted_replicate_map(
                    design.with_design(raw_meta), raw_X,
                    lambda spec=spec: _CrossFitRecipe(spec, names, raw_meta), fold_col=plan.deal_by,
                    n_folds=n_folds, null_size=null_size, seed=seed)
            scalars, tables = _retrieval_tables(meta, X, rep, null_size, seed, relationships, nsc_aggregate)
            scalars["crossfit_folds"] = float(n_folds)
            if recipe == RAW_RECIPE:
                scalars["features_skipped_non_finite"] = float((~finite).sum())
            treated = ~is_negative(meta)
            colour = meta[s.MOA].fill_null(meta[s.PERTURBATION]).to_numpy()
            recipe_plots = {
                f"{recipe}_map": embedding_map_png(
                    X, {"perturbation / MoA": np.where(treated, colour, "negative control"),
                        "plate": meta[s.PLATE].to_numpy()}, title=f"{fs.name} v{fs.version} ({recipe})"),
                f"{recipe}_map_vs_p": map_vs_pvalue_png(rep)}
        except Exception as exc:  # one failing recipe must not discard the other recipes' metrics
            failed[recipe] = str(exc) if isinstance(exc, RecipeFitError) else failure(exc)
            status.append((recipe, spec, "failed", stage, failed[recipe], how))
            continue
        status.append((recipe, spec, "ok", "evaluate", None, how or ("in-sample (raw: nothing fitted)")))
        plots |= recipe_plots
        rows += [(recipe, k, float(v) if v is not None else float("nan")) for k, v in scalars.items()]
        for kind, df in tables.items():
            groups.append(df.select(
                pl.lit(recipe).alias(s.RECIPE), pl.lit(kind).alias("kind"), pl.col(df.columns[0]).cast(pl.Utf8).alias("group"),
                "mean_average_precision", "p_value", "corrected_p_value", "below_corrected_p"))
    ident = [pl.lit(fs.name).alias(s.ENCODER), pl.lit(fs.version).alias(s.ENCODER_VERSION)]
    metrics = pl.DataFrame(rows, schema=[s.RECIPE, "metric", "value"], orient="row").with_columns(ident)
    group_df = (pl.concat(groups) if groups else pl.DataFrame(schema={
        s.RECIPE: pl.Utf8, "kind": pl.Utf8, "group": pl.Utf8, "mean_average_precision": pl.Float64,
        "p_value": pl.Float64, "corrected_p_value": pl.Float64, "below_corrected_p": pl.Boolean})).with_columns(ident)
    settings = json.dumps({"crossfit": crossfit, "nsc_aggregate": nsc_aggregate, "null_size": null_size, "seed": seed})
    status_df = pl.DataFrame(status, schema=[s.RECIPE, "recipe_steps", "status", "stage", "error", "crossfit"],
                             orient="row").with_columns(*ident, pl.lit(settings).alias("settings"))
    lake = Lake(home.lake)
    lake.write("metrics", metrics, encoder=fs.name, version=fs.version)
    lake.write("replicate_map", group_df, encoder=fs.name, version=fs.version)
    lake.write("recipe_status", status_df, encoder=fs.name, version=fs.version)
    return Evaluation(metrics, group_df, plots, failed)


def _evaluation_stamp(home: Home, fs: FeatureSet) -> Path:
    return home.normalizers / f"encoder={s.validate_plate_name(fs.name)}" / f"version={fs.version}" / "evaluated.json"


def _evaluation_inputs(home: Home, fs: FeatureSet, recipes: Mapping[str, str], **settings: object) -> str:
    """What an evaluation of the feature set depends on: the content of its well-profile files (a
    re-import of unchanged tables rewrites them byte for byte), the recipes and the settings, as one
    digest. Hashing costs a read of the profiles, small next to normalizing and scoring them."""
    files = [(str(f.relative_to(home.lake)), hashlib.sha256(f.read_bytes()).hexdigest())
             for f in Lake(home.lake).files("well_profiles") if f"/encoder={fs.name}/version={fs.version}/" in f.as_posix()]
    blob = json.dumps([files, sorted(recipes.items()), sorted((k, str(v)) for k, v in settings.items())])
    return hashlib.sha256(blob.encode()).hexdigest()


def normalize_and_evaluate(home: Home, fs: FeatureSet, recipes: Mapping[str, str] = DEFAULT_RECIPES,
                           null_size: int = 10000, crossfit: CrossFit = "auto",
                           nsc_aggregate: NscAggregate = "mean") -> Evaluation | None:
    """`normalize_feature_set` then `evaluate_feature_set`, skipped (None) when neither the feature
    set's profiles, nor the recipes, nor the settings changed since its last evaluation, so adding
    one import to a home does not recompute every earlier one."""
    digest = _evaluation_inputs(home, fs, recipes, null_size=null_size, crossfit=crossfit, nsc_aggregate=nsc_aggregate)
    stamp = _evaluation_stamp(home, fs)
    if stamp.exists() and json.loads(stamp.read_text()) == {"inputs": digest, "failed": {}}:
        return None  # a failed recipe is retried on every run
    normalize_feature_set(home, fs, recipes)
    result = evaluate_feature_set(home, fs, recipes, null_size=null_size, crossfit=crossfit, nsc_aggregate=nsc_aggregate)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(stamp) as tmp:
        tmp.write_text(json.dumps({"inputs": digest, "failed": result.failed}))
    return result


class _CrossFitRecipe:
    """A fresh recipe in the (fit(X, labels, is_control), transform(X, labels)) shape crossfit uses;
    the plate and batch labels of the rows are bound here (the labels passed in are ignored)."""

    def __init__(self, spec: str, names: list[str], meta: pl.DataFrame) -> None:
        self.recipe, self.names = Recipe.parse(spec), names
        self.plates, self.batches = meta[s.PLATE].to_numpy(), design.batches(meta)
        self.perturbations = meta[s.PERTURBATION].to_numpy()

    def fit(self, X: np.ndarray, labels: np.ndarray, is_control: np.ndarray) -> _CrossFitRecipe:
        self.recipe.fit(X, self.plates, is_control, feature_names=self.names, perturbations=self.perturbations,
                        batches=self.batches)
        return self

    def transform(self, X: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self.recipe.transform(X, self.plates, batches=self.batches)
