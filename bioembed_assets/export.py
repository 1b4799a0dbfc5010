"""Exports of a feature set's profiles for other tools: AnnData (.h5ad) or a pycytominer-style wide table.

`export_profiles(home, name, version, recipe, fmt, out)` reads one feature set (an imported profile
table or an encoder's embeddings: both are rows of the `well_profiles` lake table) either raw
(`recipe="raw"`, the well profiles) or normalized by a fitted recipe (`normalized_profiles`), and
writes it atomically as

- `h5ad` (anndata / scanpy): `obs` = well metadata under bioembed's names (`plate`, `well`,
  `perturbation`, `control_type`, `moa`, plus `batch` / `compound` when the rows have them,
  `n_cells` for embeddings, and every metadata column an import kept) as categorical strings
  (`n_cells` an integer), indexed by row number ("0", "1", ...: what pycytominer's h5ad reader
  expects); `var` index = feature names; `X` float32; `uns` = feature set, version, recipe and its
  steps, lineage (import sources + sha256, or the encoder version), export time and bioembed version;
- `parquet` / `csv`: one row per well, the metadata as `Metadata_*` columns (strings;
  `Metadata_n_cells` an integer) followed by one float32 column per named feature, so pycytominer
  and copairs read it as any profile table (the parquet file carries the same lineage as JSON
  key-value metadata `bioembed`).

Wide-table names (`WIDE_NAMES`): `plate` -> `Metadata_Plate`, `well` -> `Metadata_Well`, `batch` ->
`Metadata_Batch` (the JUMP / CellProfiler capitalization), the others `Metadata_<bioembed name>`
(`Metadata_perturbation`, `Metadata_control_type`, `Metadata_moa`, `Metadata_compound`,
`Metadata_n_cells`). Kept import columns keep their names, prefixed `Metadata_` when they lack it
(`Image_Metadata_Site` -> `Metadata_Image_Metadata_Site`), so every non-feature column starts with
`Metadata_`. A kept column whose wide name is already taken is left out when it holds the same
values (e.g. the `Metadata_Plate` the plates were read from), else named `Metadata_source_<rest>`
(then `_2`, `_3`, ...), so no two columns share a name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import polars as pl

from bioembed_assets import schema as s
from bioembed_assets.config import Home
from bioembed_assets.feature_sets import RAW_RECIPE, FeatureSetRef, feature_names, load_profiles, normalizer_path
from bioembed_assets.profiles.recipe import Recipe
from bioembed_assets.sources.profile_table import METADATA_PREFIX, feature_set_dir, load_manifest
from bioembed_assets.store.atomic import atomic_file
from bioembed_assets.store.lake import Lake

ExportFormat = Literal["h5ad", "parquet", "csv"]
FORMATS: tuple[str, ...] = get_args(ExportFormat)
N_CELLS = "n_cells"
WIDE_NAMES: dict[str, str] = {
    s.PLATE: "Metadata_Plate", s.WELL: "Metadata_Well", s.BATCH: "Metadata_Batch",
    s.PERTURBATION: "Metadata_perturbation", s.CONTROL_TYPE: "Metadata_control_type", s.MOA: "Metadata_moa",
    s.COMPOUND: "Metadata_compound", N_CELLS: "Metadata_n_cells",
}
"""bioembed metadata column -> its name in a wide (parquet / csv) export, in column order."""
_REQUIRED = (s.PLATE, s.WELL, s.PERTURBATION, s.CONTROL_TYPE, s.MOA)
_NOT_METADATA = frozenset({s.ENCODER, s.ENCODER_VERSION, s.RECIPE, "recipe_steps", s.FEATURES})
"""Lake columns that describe the feature set, not the well (they are in `uns` / the lineage)."""
_SOURCE_PREFIX = "Metadata_source_"


@dataclass
class ExportData:
    """One feature set's wells ready to write: metadata (bioembed names), float32 X, feature names, lineage."""

    name: str
    version: str
    recipe: str
    meta: pl.DataFrame
    X: np.ndarray
    features: list[str]
    info: dict = field(default_factory=dict)
    """What `uns` holds (feature_set, version, recipe, recipe_steps, lineage, exported_at, bioembed_version)."""


def _version_key(v: str) -> tuple[int, int | str]:
    return (0, int(v)) if v.isdigit() else (1, v)


def feature_set_versions(home: Home, name: str) -> list[str]:
    """Versions of feature set `name` with well profiles in the lake, oldest first."""
    found = {k["version"] for k in Lake(home.lake).partitions("well_profiles", encoder=name)}
    return sorted(found, key=_version_key)


def _known_sets(home: Home) -> str:
    by_name: dict[str, set[str]] = {}
    for k in Lake(home.lake).partitions("well_profiles"):
        by_name.setdefault(k["encoder"], set()).add(k["version"])
    if not by_name:
        return "the lake holds no well profiles yet (import a profile table or run the pipeline first)"
    return "feature sets: " + "; ".join(f"{n} (versions {', '.join(sorted(v, key=_version_key))})"
                                       for n, v in sorted(by_name.items()))


def resolve_version(home: Home, name: str, version: str | None = None) -> str:
    """`version` if the lake holds it ("v2" is read as "2"), the latest when None; else a LookupError."""
    s.validate_plate_name(name)
    versions = feature_set_versions(home, name)
    if not versions:
        raise LookupError(f"no feature set named {name!r} in {home.lake}; {_known_sets(home)}")
    if version is None:
        return versions[-1]
    if version not in versions and version[:1] in "vV" and version[1:] in versions:
        return version[1:]
    if version not in versions:
        raise LookupError(f"feature set {name!r} has no version {version!r}; versions: {', '.join(versions)}")
    return version


def recipes_of(home: Home, name: str, version: str) -> list[str]:
    """`raw` and every recipe with normalized profiles of the feature set version."""
    found = {k[s.RECIPE] for k in Lake(home.lake).partitions("normalized_profiles", encoder=name, version=version)}
    return [RAW_RECIPE, *sorted(found)]


def _single(meta: pl.DataFrame, column: str) -> str:
    values = meta[column].unique().to_list()
    if len(values) != 1:
        raise s.BioembedInputError(f"rows hold {len(values)} different {column} values ({values[:3]}); "
                                   "re-materialize the feature set's plates together")
    return "" if values[0] is None else str(values[0])


def _metadata(meta: pl.DataFrame) -> pl.DataFrame:
    """bioembed's well columns (optional ones when the rows have them), then every other metadata
    column the rows carry (an import's kept columns), in their order."""
    cols = [c for c in WIDE_NAMES if c in _REQUIRED or c in meta.columns]
    if N_CELLS in cols and meta[N_CELLS].null_count():  # imports have no cell counts
        cols.remove(N_CELLS)
    kept = [c for c in meta.columns if c not in WIDE_NAMES and c not in _NOT_METADATA]
    return meta.select([pl.col(c).cast(pl.Int64 if c == N_CELLS else pl.Utf8) for c in cols + kept])


def _lineage(home: Home, fs: FeatureSetRef, meta: pl.DataFrame, table: str) -> dict:
    plates = sorted(meta[s.PLATE].unique().to_list())
    out: dict = {"lake_table": f"{table}/encoder={fs.name}/version={fs.version}", "plates": plates,
                 "wells": meta.height}
    if (feature_set_dir(home.root, fs.name) / f"v{fs.version}.json").exists():
        manifest = load_manifest(home.root, fs.name, fs.version)

        def files(key: str) -> dict[str, list[str]]:
            listed = manifest.get(key) or []
            return {"path": [x["path"] for x in listed], "sha256": [x["sha256"] for x in listed]}

        out |= {"kind": "profile_import", "sources": files("sources"),
                "digest": manifest.get("digest", ""), "imported_at": manifest.get("imported_at", ""),
                "mapping": json.dumps(manifest.get("spec", {}), sort_keys=True)}
        if manifest.get("metadata_sources"):  # joined metadata tables (platemaps ...)
            out["metadata_sources"] = files("metadata_sources")
    else:
        out |= {"kind": "encoder", "encoder": fs.name, "encoder_version": _single(meta, s.ENCODER_VERSION),
                "model_uri": f"models:/{fs.name}/{fs.version}"}
        if N_CELLS in meta.columns and not meta[N_CELLS].null_count():
            out["cells"] = int(meta[N_CELLS].sum())
    return out


def load_export(home: Home | str | Path, name: str, version: str | None = None, recipe: str = RAW_RECIPE) -> ExportData:
    """Read feature set `name` (latest version when None), raw or normalized by `recipe`, for export."""
    home = home if isinstance(home, Home) else Home(root=Path(home).expanduser().resolve())
    fs = FeatureSetRef(name, resolve_version(home, name, version))
    known = recipes_of(home, fs.name, fs.version)
    if recipe not in known:
        raise LookupError(f"feature set {fs.name!r} v{fs.version} has no profiles for recipe {recipe!r}; "
                          f"recipes: {', '.join(known)}")
    if recipe == RAW_RECIPE:
        table = "well_profiles"
        meta, X = load_profiles(home, table, fs)
        features, steps, recipe_info = feature_names(home, fs, X.shape[1]), "", None
    else:
        table = "normalized_profiles"
        meta, X = load_profiles(home, table, fs, recipe=recipe)
        path = normalizer_path(home, fs, recipe)
        if not (path / "recipe.json").exists():
            raise LookupError(f"normalized profiles of {fs.name} v{fs.version} recipe {recipe!r} have no fitted "
                              f"recipe at {path} (feature names unknown); re-run the normalization")
        fitted = Recipe.load(path)
        features, steps = fitted.output_features, _single(meta, "recipe_steps")
        if steps != fitted.spec:
            raise s.BioembedInputError(f"the normalized rows were made with steps {steps!r} but the stored fit of "
                                       f"recipe {recipe!r} is {fitted.spec!r}; re-normalize the feature set")
        recipe_info = {"name": recipe, "steps": steps, "fitted_on": dict(fitted.fit_info_),
                       "features_in": len(fitted.in_features_), "features_out": len(features),
                       "normalizer": str(path.relative_to(home.root))}
    if len(features) != X.shape[1]:
        raise s.BioembedInputError(f"{len(features)} feature names for {X.shape[1]} feature columns of "
                                   f"{fs.name} v{fs.version} ({recipe}); re-materialize the feature set")
    lineage = _lineage(home, fs, meta, table)
    if recipe_info is not None:
        lineage["recipe"] = recipe_info
    info = {"feature_set": fs.name, "version": fs.version, "recipe": recipe, "recipe_steps": steps,
            "lineage": lineage, "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "bioembed_version": _bioembed_version()}
    return ExportData(fs.name, fs.version, recipe, _metadata(meta), np.ascontiguousarray(X, dtype=np.float32),
                      list(features), info)


def _bioembed_version() -> str:
    try:
        return package_version("bioembed")
    except PackageNotFoundError:
        return "unknown"


def wide_table(data: ExportData) -> pl.DataFrame:
    """`Metadata_*` columns (see `WIDE_NAMES`; kept columns prefixed `Metadata_` when they are not)
    then one float32 column per feature."""
    columns: dict[str, pl.Series] = {}
    # bioembed's columns, then kept `Metadata_*` ones, then the others (they yield the names they would take)
    order = sorted(data.meta.columns, key=lambda c: 0 if c in WIDE_NAMES else 1 if c.startswith(METADATA_PREFIX) else 2)
    for c in order:
        col = data.meta[c]
        if c in WIDE_NAMES:
            columns[WIDE_NAMES[c]] = col
            continue
        name = c if c.startswith(METADATA_PREFIX) else METADATA_PREFIX + c
        if name in columns:
            if col.cast(pl.Utf8).equals(columns[name].cast(pl.Utf8)):  # e.g. the column `plate` was read from
                continue
            base = _SOURCE_PREFIX + name[len(METADATA_PREFIX):]
            name, i = base, 2
            while name in columns or name in data.meta.columns:
                name, i = f"{base}_{i}", i + 1
        columns[name] = col
    clash = sorted(set(columns).intersection(data.features))
    if clash or len(set(data.features)) != len(data.features):
        what = f"feature names that are metadata column names: {clash[:5]}" if clash else "duplicate feature names"
        raise s.BioembedInputError(f"cannot write a wide table of {data.name} v{data.version}: {what}")
    features = pl.from_numpy(data.X, schema=data.features, orient="row")
    return pl.DataFrame([col.alias(name) for name, col in columns.items()]).hstack(features)


def _anndata(data: ExportData):
    import anndata as ad
    import pandas as pd

    obs = pd.DataFrame({c: (data.meta[c].to_numpy() if data.meta[c].dtype == pl.Int64
                            else pd.Categorical(data.meta[c].to_list())) for c in data.meta.columns},
                       index=pd.Index([str(i) for i in range(data.meta.height)]))  # row numbers, as pycytominer reads
    var = pd.DataFrame(index=pd.Index(data.features))
    return ad.AnnData(X=data.X, obs=obs, var=var, uns=_h5_safe(data.info))


def _h5_safe(value):
    """`value` without None (HDF5 attributes cannot hold it): None -> "" inside dicts and lists."""
    if isinstance(value, dict):
        return {k: _h5_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_h5_safe(v) for v in value]
    return "" if value is None else value


def format_for(out: str | Path | None, fmt: str | None) -> str:
    """`fmt`, else the one `out`'s suffix names, else parquet."""
    if fmt is None:
        suffix = Path(out).suffix.lstrip(".").lower() if out is not None else ""
        fmt = suffix if suffix in FORMATS else "parquet"
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    return fmt


def default_export_name(data: ExportData, fmt: str) -> str:
    """`<name>_v<version>_<recipe>.<fmt>`."""
    return f"{data.name}_v{data.version}_{data.recipe}.{fmt}"


def write_export(data: ExportData, fmt: str | None = None, out: str | Path | None = None) -> Path:
    """Write `data` atomically to `out` (default: `default_export_name` in the current folder; a folder:
    that name inside it) as h5ad, parquet or csv."""
    fmt = format_for(out, fmt)
    target = Path.cwd() if out is None else Path(out).expanduser()
    if target.is_dir():
        target = target / default_export_name(data, fmt)
    if fmt == "h5ad":
        adata = _anndata(data)
        with atomic_file(target) as tmp:
            adata.write_h5ad(tmp)
        return target
    table = wide_table(data)
    with atomic_file(target) as tmp:
        if fmt == "parquet":
            meta = data.info | {"columns": {c: WIDE_NAMES[c] for c in data.meta.columns if c in WIDE_NAMES}}
            table.write_parquet(tmp, compression="zstd", metadata={"bioembed": json.dumps(meta)})
        else:
            table.write_csv(tmp)
    return target


def export_profiles(home: Home | str | Path, name: str, version: str | None = None, recipe: str = RAW_RECIPE,
                    fmt: str | None = None, out: str | Path | None = None) -> Path:
    """Export feature set `name` (latest version when None), raw or normalized by `recipe`, as `fmt`
    (h5ad, parquet or csv; default from `out`'s suffix, else parquet) to `out`; returns the file written."""
    return write_export(load_export(home, name, version, recipe), fmt, out)
