"""External well-level profile tables (pycytominer / JUMP style) as bioembed feature sets.

A profile table has `Metadata_*` columns plus numeric feature columns (e.g. CellProfiler
features), one row per well, in CSV, CSV.GZ, TSV or Parquet, one or many files. Importing maps
its metadata onto bioembed's well columns (plate, well, perturbation, control_type, moa), keeps
every other `Metadata_*` column as a string, and writes the feature matrix into the
`well_profiles` lake table under `encoder = <feature set name>`, so normalization and
evaluation run on it exactly as on bioembed's own embeddings.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
from pydantic import BaseModel, Field

from bioembed_assets import schema as s
from bioembed_assets.store.atomic import atomic_file
from bioembed_assets.store.lake import Lake, with_features

METADATA_PREFIX = "Metadata_"
_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".parquet")


class ProfileImportSpec(BaseModel):
    """How the columns of an external profile table map onto bioembed's.

    `negative` / `positive` map a metadata column to the values that mark negative / positive
    control wells, e.g. {"Metadata_broad_sample": ["DMSO"]}; every other well is a treatment.
    """

    name: str
    """Feature-set name (stored in the `encoder` column), e.g. "lincs_cellprofiler"."""
    plate_col: str = "Metadata_Plate"
    well_col: str = "Metadata_Well"
    perturbation_cols: list[str] = Field(default_factory=lambda: ["Metadata_broad_sample"])
    """One or more columns; several are joined with " @ " (e.g. cell line @ seeding density)."""
    canonical_perturbation: bool = False
    """Compare perturbation names case- and punctuation-insensitively (U2-OS == U-2OS == u2os)."""
    negative: dict[str, list[str]] = Field(default_factory=dict)
    positive: dict[str, list[str]] = Field(default_factory=dict)
    moa_col: str | None = None
    features: list[str] | None = None
    """Feature columns; default: every numeric column not starting with `Metadata_`."""
    feature_join: str = "intersect"
    """Files with different feature columns: keep the common ones ("intersect") or fail ("exact")."""


@dataclass(frozen=True)
class ImportedFeatureSet:
    """The name and version an import was stored under, and what it holds."""

    name: str
    version: str
    rows: int
    plates: list[str]
    features: list[str]
    dropped_features: int
    manifest: dict


def feature_set_dir(home_root: Path, name: str) -> Path:
    return home_root / "feature_sets" / s.validate_plate_name(name)


def _read_one(path: Path) -> pl.DataFrame:
    name = path.name.lower()
    if not path.is_file():
        raise s.BioembedInputError("profile table not found", path=path)
    try:
        if name.endswith(".parquet"):
            return pl.read_parquet(path)
        sep = "\t" if name.endswith((".tsv", ".tsv.gz", ".txt")) else ","
        return pl.read_csv(path, separator=sep, infer_schema_length=None)
    except Exception as exc:  # polars raises several error types for unreadable files
        raise s.BioembedInputError(f"cannot read profile table ({type(exc).__name__}: {exc})", path=path) from exc


def _feature_columns(df: pl.DataFrame, spec: ProfileImportSpec, path: Path) -> list[str]:
    if spec.features is not None:
        missing = [c for c in spec.features if c not in df.columns]
        if missing:
            raise s.BioembedInputError(f"feature columns not in the table: {missing[:5]}", path=path)
        return list(spec.features)
    cols = [c for c, dt in df.schema.items() if not c.startswith(METADATA_PREFIX) and dt.is_numeric()]
    if not cols:
        raise s.BioembedInputError(
            f"no numeric non-{METADATA_PREFIX} columns to use as features; list them with `features`", path=path)
    return cols


def _canonical(col: pl.Expr) -> pl.Expr:
    return col.str.to_uppercase().str.replace_all(r"[^A-Z0-9]", "")


def canonical_name(name: str) -> str:
    """Case- and punctuation-insensitive form of a perturbation name: 'U-2 OS' -> 'U2OS'."""
    return re.sub(r"[^A-Z0-9]", "", name.upper())


def _annotate(df: pl.DataFrame, spec: ProfileImportSpec, path: Path) -> pl.DataFrame:
    """bioembed's well columns from the table's metadata (errors name the file and column)."""
    needed = [spec.plate_col, spec.well_col, *spec.perturbation_cols, *spec.negative, *spec.positive]
    if spec.moa_col:
        needed.append(spec.moa_col)
    missing = sorted({c for c in needed if c not in df.columns})
    if missing:
        meta = [c for c in df.columns if c.startswith(METADATA_PREFIX)]
        raise s.BioembedInputError(f"missing metadata column(s) {missing}; the table has {meta}", path=path)
    pert = pl.concat_str([pl.col(c).cast(pl.Utf8) for c in spec.perturbation_cols], separator=" @ ")
    if spec.canonical_perturbation:
        pert = _canonical(pert)

    def marks(rules: dict[str, list[str]]) -> pl.Expr:
        expr = pl.lit(False)
        for col, values in rules.items():
            vals = [str(v) for v in values]
            c = pl.col(col).cast(pl.Utf8)
            expr = expr | (_canonical(c).is_in([canonical_name(v) for v in vals])
                           if spec.canonical_perturbation else c.is_in(vals)).fill_null(False)
        return expr

    control = (pl.when(marks(spec.negative)).then(pl.lit(s.ControlType.NEGATIVE))
               .when(marks(spec.positive)).then(pl.lit(s.ControlType.POSITIVE))
               .otherwise(pl.lit(s.ControlType.TREATMENT)))
    keep = [c for c in df.columns if c.startswith(METADATA_PREFIX)]
    out = df.select(
        pl.col(spec.plate_col).cast(pl.Utf8).alias(s.PLATE),
        pl.col(spec.well_col).cast(pl.Utf8).alias(s.WELL),
        pert.alias(s.PERTURBATION),
        control.alias(s.CONTROL_TYPE),
        (pl.col(spec.moa_col).cast(pl.Utf8) if spec.moa_col else pl.lit(None, pl.Utf8)).alias(s.MOA),
        *[pl.col(c).cast(pl.Utf8) for c in keep],
    )
    for col, what in ((s.PLATE, spec.plate_col), (s.WELL, spec.well_col), (s.PERTURBATION, "perturbation")):
        nulls = out[col].null_count()
        if nulls:
            raise s.BioembedInputError(f"{nulls} row(s) have no {what} value", path=path)
    for plate in out[s.PLATE].unique().to_list():
        s.validate_plate_name(plate)
    dup = out.group_by(s.PLATE, s.WELL).len().filter(pl.col("len") > 1)
    if dup.height:
        raise s.BioembedInputError(f"duplicate rows for well {dup[s.WELL][0]} ({dup.height} duplicated wells)",
                                   plate=dup[s.PLATE][0], well=dup[s.WELL][0], path=path)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_profile_tables(paths: Sequence[str | Path], spec: ProfileImportSpec) -> tuple[pl.DataFrame, np.ndarray, list[str], int]:
    """(meta, X float32, feature names, number of features dropped by the intersection)."""
    if not paths:
        raise ValueError("no profile files given")
    metas, tables, feature_sets = [], [], []
    for p in map(Path, paths):
        if not p.name.lower().endswith(_SUFFIXES):
            raise s.BioembedInputError(f"unsupported file type; expected one of {_SUFFIXES}", path=p)
        df = _read_one(p)
        feats = _feature_columns(df, spec, p)
        metas.append(_annotate(df, spec, p))
        tables.append((p, df))
        feature_sets.append(feats)
    common = [c for c in feature_sets[0] if all(c in set(f) for f in feature_sets[1:])]
    union = {c for f in feature_sets for c in f}
    if spec.feature_join == "exact" and len(common) != len(union):
        odd = next(p for (p, _), f in zip(tables, feature_sets) if set(f) != set(common))
        raise s.BioembedInputError(f"files have different feature columns ({len(common)} common of {len(union)})",
                                   path=odd)
    if not common:
        raise ValueError(f"the {len(paths)} files share no feature column")
    blocks = []
    for p, df in tables:
        bad = [c for c in common if not df.schema[c].is_numeric()]
        if bad:
            raise s.BioembedInputError(f"feature column {bad[0]!r} is {df.schema[bad[0]]}, expected numbers", path=p)
        blocks.append(df.select(common).to_numpy().astype(np.float32))
    meta = pl.concat(metas, how="diagonal_relaxed")
    dup = meta.group_by(s.PLATE, s.WELL).len().filter(pl.col("len") > 1)
    if dup.height:
        raise s.BioembedInputError("the same well appears in several files", plate=dup[s.PLATE][0], well=dup[s.WELL][0])
    return meta, np.concatenate(blocks), common, len(union) - len(common)


def _version_for(folder: Path, digest: str) -> str:
    """The version already holding content `digest`, else the next free number."""
    versions = []
    for f in folder.glob("v*.json"):
        info = json.loads(f.read_text())
        if info.get("digest") == digest:
            return str(info["version"])
        versions.append(int(info["version"]))
    return str(max(versions, default=0) + 1)


def import_profiles(home_root: str | Path, paths: Sequence[str | Path], spec: ProfileImportSpec) -> ImportedFeatureSet:
    """Import profile tables into the lake as feature set `spec.name`.

    The version is "1", "2", ... by content: re-importing the same files with the same mapping
    returns the existing version (rewritten identically). Every plate's partition is staged and
    the version swapped in at once; the manifest (`feature_sets/<name>/v<version>.json`: files,
    sha256, mapping, feature names) is written last.
    """
    root = Path(home_root)
    s.validate_plate_name(spec.name)
    meta, X, features, dropped = read_profile_tables(paths, spec)
    sources = [{"path": str(Path(p).resolve()), "sha256": _sha256(Path(p))} for p in paths]
    digest = hashlib.sha256(json.dumps([sources, spec.model_dump(), features], sort_keys=True).encode()).hexdigest()
    folder = feature_set_dir(root, spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    version = _version_for(folder, digest)
    meta = meta.with_columns(pl.lit(spec.name).alias(s.ENCODER), pl.lit(version).alias(s.ENCODER_VERSION),
                             pl.lit(None, pl.Int64).alias("n_cells"))
    frame = with_features(meta, X)
    plates = sorted(meta[s.PLATE].unique().to_list())
    Lake(root / "lake").replace_partitions(
        "well_profiles", {p: frame.filter(pl.col(s.PLATE) == p).sort(s.WELL) for p in plates},
        encoder=spec.name, version=version)
    manifest = {"name": spec.name, "version": version, "digest": digest, "sources": sources,
                "spec": spec.model_dump(), "rows": int(X.shape[0]), "plates": plates, "features": features,
                "dropped_features": dropped, "nan_values": int(np.isnan(X).sum()),
                "imported_at": datetime.now(UTC).isoformat(timespec="seconds")}
    with atomic_file(folder / f"v{version}.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return ImportedFeatureSet(spec.name, version, int(X.shape[0]), plates, features, dropped, manifest)


def load_manifest(home_root: str | Path, name: str, version: str) -> dict:
    path = feature_set_dir(Path(home_root), name) / f"v{version}.json"
    if not path.exists():
        raise LookupError(f"no imported feature set {name!r} version {version!r} ({path} missing)")
    return json.loads(path.read_text())


def latest_version(home_root: str | Path, name: str) -> str:
    """The highest imported version of feature set `name`."""
    found = [int(re.fullmatch(r"v(\d+)\.json", f.name).group(1))
             for f in feature_set_dir(Path(home_root), name).glob("v*.json") if re.fullmatch(r"v(\d+)\.json", f.name)]
    if not found:
        raise LookupError(f"no imported feature set named {name!r}; run `bioembed import-profiles` first")
    return str(max(found))


class SavedImport(BaseModel):
    """An import registered in the home (`feature_sets/<name>/import.json`), re-run by the Dagster asset."""

    spec: ProfileImportSpec
    files: list[str]
    recipes: dict[str, str] = Field(default_factory=lambda: {"card": "card"})


def save_import(home_root: str | Path, saved: SavedImport) -> Path:
    """Register `saved` so that materializing `imported_profiles` (re)imports it."""
    path = feature_set_dir(Path(home_root), saved.spec.name) / "import.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(saved.model_dump_json(indent=1))
    return path


def saved_imports(home_root: str | Path) -> list[SavedImport]:
    """Every import registered in the home, by feature-set name."""
    files = sorted((Path(home_root) / "feature_sets").glob("*/import.json"))
    return [SavedImport.model_validate_json(f.read_text()) for f in files]
