"""External well-level profile tables (pycytominer / JUMP style) as bioembed feature sets.

A profile table has `Metadata_*` columns plus numeric feature columns (e.g. CellProfiler
features), one row per well, in CSV, CSV.GZ, TSV or Parquet, one or many files. Importing maps
its metadata onto bioembed's well columns (plate, well, perturbation, control_type, moa), keeps
every other `Metadata_*` column as a string, and writes the feature matrix into the
`well_profiles` lake table under `encoder = <feature set name>`, so normalization and
evaluation run on it exactly as on bioembed's own embeddings.

Feature-set names are unique across encoders and imports: an import refuses a built-in encoder's
name and any name whose lake partitions were not written by an import of that name
(`check_feature_set_name`), so it never replaces another feature set's rows.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, Field

from bioembed_assets import schema as s
from bioembed_assets.store.atomic import atomic_file
from bioembed_assets.store.lake import LAKE_TABLES, Lake, with_features

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
    non_numeric: Literal["error", "drop"] = "error"
    """A feature column holding a value that is not a number (e.g. one "abc" cell in a CSV column
    of floats): fail naming the file, row and column ("error"), or drop that column from every
    file and report it in `dropped_non_numeric` ("drop"). See `classify_columns` for the rule."""


@dataclass(frozen=True)
class ImportedFeatureSet:
    """The name and version an import was stored under, and what it holds."""

    name: str
    version: str
    rows: int
    plates: list[str]
    features: list[str]
    dropped_features: int
    """Features left out because not every file has them (`feature_join = "intersect"`)."""
    manifest: dict
    dropped_non_numeric: list[str] = field(default_factory=list)
    """Feature columns dropped because they hold non-numbers (`non_numeric = "drop"`)."""
    ignored_columns: list[str] = field(default_factory=list)
    """Non-`Metadata_` text columns with no numeric value: not features, left out."""


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
        # one chunk per column: the parallel CSV reader leaves dozens, and every later select pays for them
        return pl.read_csv(path, separator=sep, infer_schema_length=None).rechunk()
    except Exception as exc:  # polars raises several error types for unreadable files
        raise s.BioembedInputError(f"cannot read profile table ({type(exc).__name__}: {exc})", path=path) from exc


@dataclass(frozen=True)
class TableColumns:
    """How `classify_columns` sorted one table's columns."""

    features: list[str]
    """Usable feature columns (numeric, or text whose every value is a number), in file order."""
    as_text: list[str]
    """The features among them stored as text (e.g. a Parquet string column): cast to float."""
    non_numeric: dict[str, tuple[int, str]]
    """Feature columns holding non-numbers -> (0-based row, value) of the first one."""
    ignored: list[str]
    """Non-`Metadata_` text columns in which no value is a number (not features)."""


def classify_columns(df: pl.DataFrame, spec: ProfileImportSpec, path: Path) -> TableColumns:
    """Sort the columns of one table into features, features with non-numbers, and ignored text.

    Candidates are `spec.features` when given, else every column not starting with `Metadata_`.
    A numeric column is a feature. A text (String) column is judged by its non-null values, a
    value being a number when `cast(pl.Float64, strict=False)` reads it ("1.5", "-2e-3", "NaN",
    "inf"; not "abc", "NA" or " 1.5"; missing values are empty cells):

    - at least one value is a number and all are: a feature stored as text (cast to float);
    - at least one value is a number, some are not: a feature column with bad values (one stray
      "abc" makes a CSV reader type the whole column as text), refused or dropped per
      `spec.non_numeric`;
    - no value is a number: a genuinely textual column (file names, URLs): ignored and reported;
      listed in `spec.features`, it is an error.

    Other dtypes (Boolean, dates, all-null Parquet columns) are never features. Cost is linear in
    the number of columns (one schema lookup, one vectorized pass over the text columns).
    """
    schema = df.schema
    if spec.features is not None:
        missing = [c for c in spec.features if c not in schema]
        if missing:
            raise s.BioembedInputError(f"feature columns not in the table: {missing[:5]}", path=path)
        candidates = list(spec.features)
    else:
        candidates = [c for c in schema if not c.startswith(METADATA_PREFIX)]
    texts = [c for c in candidates if schema[c] == pl.String]
    verdict: dict[str, tuple[bool, int | None, str | None]] = {}
    if texts:
        exprs = []
        for i, c in enumerate(texts):
            number = pl.col(c).cast(pl.Float64, strict=False)
            bad = pl.col(c).is_not_null() & number.is_null()
            exprs += [number.is_not_null().any().alias(f"{i}:any"), bad.arg_true().first().alias(f"{i}:row"),
                      pl.col(c).filter(bad).first().alias(f"{i}:value")]
        row = df.select(exprs).row(0)
        verdict = {c: row[3 * i:3 * i + 3] for i, c in enumerate(texts)}
    features, as_text, non_numeric, ignored = [], [], {}, []
    for c in candidates:
        dt = schema[c]
        if dt.is_numeric():
            features.append(c)
        elif c in verdict and verdict[c][0]:
            _, bad_row, bad_value = verdict[c]
            if bad_row is None:
                features.append(c)
                as_text.append(c)
            else:
                non_numeric[c] = (int(bad_row), str(bad_value))
        elif spec.features is not None:
            raise s.BioembedInputError(f"feature column {c!r} is {dt}, expected numbers", path=path)
        elif c in verdict:
            ignored.append(c)
    if not features and not non_numeric:
        text = f" (text columns ignored: {ignored[:5]})" if ignored else ""
        raise s.BioembedInputError(
            f"no numeric non-{METADATA_PREFIX} columns to use as features{text}; list them with `features`", path=path)
    return TableColumns(features, as_text, non_numeric, ignored)


def _non_numeric_error(path: Path, bad: dict[str, tuple[int, str]]) -> s.BioembedInputError:
    """The error for feature columns with non-numbers: the first bad cell top-down, then the rest."""
    column, (row, value) = min(bad.items(), key=lambda kv: kv[1][0])  # earliest row; file order on ties
    where = (f"row {row + 1}" if path.name.lower().endswith(".parquet")
             else f"data row {row + 1} (line {row + 2} of the file, counting the header line)")
    others = [c for c in bad if c != column]
    more = f"; {len(others)} more column(s) hold non-numbers too: {others[:5]}" if others else ""
    return s.BioembedInputError(
        f"feature column {column!r} holds a value that is not a number: {value!r} in {where}{more}. "
        "Fix the table, or drop such columns with non_numeric='drop' (CLI: --non-numeric drop)", path=path)


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
    present = set(df.columns)
    missing = sorted({c for c in needed if c not in present})
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


@dataclass(frozen=True)
class ProfileTables:
    """Profile tables read and checked: well metadata, float32 features and what was left out."""

    meta: pl.DataFrame
    X: np.ndarray
    features: list[str]
    dropped_features: int
    """Features not in every file (left out by `feature_join = "intersect"`)."""
    dropped_non_numeric: list[str]
    """Feature columns dropped because they hold non-numbers (`non_numeric = "drop"`)."""
    ignored_columns: list[str]
    """Non-`Metadata_` text columns without a numeric value (see `classify_columns`)."""


def read_profile_tables(paths: Sequence[str | Path], spec: ProfileImportSpec) -> ProfileTables:
    """Read, map and check `paths`; the features are those of every file (linear in columns)."""
    if not paths:
        raise ValueError("no profile files given")
    metas, tables, columns = [], [], []
    for p in map(Path, paths):
        if not p.name.lower().endswith(_SUFFIXES):
            raise s.BioembedInputError(f"unsupported file type; expected one of {_SUFFIXES}", path=p)
        df = _read_one(p)
        cols = classify_columns(df, spec, p)
        if cols.non_numeric and spec.non_numeric == "error":
            raise _non_numeric_error(p, cols.non_numeric)
        metas.append(_annotate(df, spec, p))
        tables.append((p, df))
        columns.append(cols)
    dropped_non_numeric = list(dict.fromkeys(c for cols in columns for c in cols.non_numeric))
    bad = set(dropped_non_numeric)
    feature_sets = [[c for c in cols.features if c not in bad] for cols in columns]
    others = [set(f) for f in feature_sets[1:]]
    common = [c for c in feature_sets[0] if all(c in o for o in others)]
    union = {c for f in feature_sets for c in f}
    if spec.feature_join == "exact" and len(common) != len(union):
        common_set = set(common)
        odd = next(p for (p, _), f in zip(tables, feature_sets) if set(f) != common_set)
        raise s.BioembedInputError(f"files have different feature columns ({len(common)} common of {len(union)})",
                                   path=odd)
    if not common:
        why = f" ({len(dropped_non_numeric)} dropped for holding non-numbers)" if dropped_non_numeric else ""
        raise ValueError(f"the {len(paths)} file(s) share no feature column{why}")
    common_set = set(common)
    blocks = []
    for (_, df), cols in zip(tables, columns):
        casts = [pl.col(c).cast(pl.Float64) for c in cols.as_text if c in common_set]
        blocks.append((df.with_columns(casts) if casts else df).select(common).to_numpy().astype(np.float32))
    meta = pl.concat(metas, how="diagonal_relaxed")
    dup = meta.group_by(s.PLATE, s.WELL).len().filter(pl.col("len") > 1)
    if dup.height:
        raise s.BioembedInputError("the same well appears in several files", plate=dup[s.PLATE][0], well=dup[s.WELL][0])
    ignored = list(dict.fromkeys(c for cols in columns for c in cols.ignored))
    return ProfileTables(meta, np.concatenate(blocks), common, len(union) - len(common), dropped_non_numeric, ignored)


def _version_for(folder: Path, digest: str) -> str:
    """The version already holding content `digest`, else the next free number."""
    versions = []
    for f in folder.glob("v*.json"):
        info = json.loads(f.read_text())
        if info.get("digest") == digest:
            return str(info["version"])
        versions.append(int(info["version"]))
    return str(max(versions, default=0) + 1)


def _builtin_encoder_names() -> set[str]:
    """Names bioembed's own encoders write their well profiles under (presets and families)."""
    from bioembed_assets.encoders.base import list_families
    from bioembed_assets.pipeline import DEFAULT_ENCODERS

    return {e.name for e in DEFAULT_ENCODERS} | set(list_families())


def _pending_marker(folder: Path, version: str) -> Path:
    """Written before an import touches the lake, removed after its manifest: claims the version
    for this feature set even if the import dies in between."""
    return folder / f"v{version}.pending"


def _imported_here(folder: Path, name: str, version: str) -> bool:
    """Whether version `version` of `name` was written by an import (a manifest or a pending marker)."""
    if _pending_marker(folder, version).exists():
        return True
    manifest = folder / f"v{version}.json"
    if not manifest.exists():
        return False
    info = json.loads(manifest.read_text())
    return info.get("name") == name and str(info.get("version")) == version


def check_feature_set_name(home_root: str | Path, name: str) -> None:
    """Refuse `name` unless importing under it cannot replace another feature set's rows.

    Feature-set names are unique across encoders and imports: a built-in encoder name (compared
    case-insensitively) is refused, and so is a name under which any versioned lake table
    (`well_profiles`, `embeddings`, `normalized_profiles`, ...) holds a version that no import of
    `name` wrote (no `feature_sets/<name>/v<version>.json`), e.g. a trained encoder's.
    """
    s.validate_plate_name(name)
    builtin = _builtin_encoder_names()
    if name.casefold() in {b.casefold() for b in builtin}:
        raise s.BioembedInputError(
            f"feature-set name {name!r} is a built-in encoder's name (built-in: {sorted(builtin)}); importing under "
            f"it would replace that encoder's profiles. Choose another name, e.g. {name}_imported")
    root = Path(home_root)
    lake, folder = Lake(root / "lake"), feature_set_dir(root, name)
    foreign: dict[str, set[str]] = {}
    for table, t in LAKE_TABLES.items():
        if "encoder" not in t.partition_keys:
            continue
        for keys in lake.partitions(table, encoder=name):
            version = keys.get("version", "")
            if not _imported_here(folder, name, version):
                foreign.setdefault(table, set()).add(version)
    if foreign:
        held = "; ".join(f"{table} version(s) {sorted(v)}" for table, v in sorted(foreign.items()))
        raise s.BioembedInputError(
            f"feature-set name {name!r} is taken: the lake holds {held} under encoder={name} that no import of "
            f"{name!r} wrote (no {folder}/v<version>.json). Choose another name; feature-set names are unique "
            "across encoders and imports")


def import_profiles(home_root: str | Path, paths: Sequence[str | Path], spec: ProfileImportSpec) -> ImportedFeatureSet:
    """Import profile tables into the lake as feature set `spec.name`.

    The name must be free or already this import's (`check_feature_set_name`); only
    `well_profiles/encoder=<name>/version=<version>` is written. The version is "1", "2", ... by
    content: re-importing the same files with the same mapping returns the existing version
    (rewritten identically). Every plate's partition is staged and the version swapped in at once;
    the manifest (`feature_sets/<name>/v<version>.json`: files, sha256, mapping, feature names,
    dropped and ignored columns) is written last.
    """
    root = Path(home_root)
    check_feature_set_name(root, spec.name)
    tables = read_profile_tables(paths, spec)
    meta, X, features = tables.meta, tables.X, tables.features
    sources = [{"path": str(Path(p).resolve()), "sha256": _sha256(Path(p))} for p in paths]
    # `non_numeric` only decides whether an import fails; the content is fixed by files, mapping and features
    mapping = spec.model_dump(exclude={"non_numeric"})
    digest = hashlib.sha256(json.dumps([sources, mapping, features], sort_keys=True).encode()).hexdigest()
    folder = feature_set_dir(root, spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    version = _version_for(folder, digest)
    meta = meta.with_columns(pl.lit(spec.name).alias(s.ENCODER), pl.lit(version).alias(s.ENCODER_VERSION),
                             pl.lit(None, pl.Int64).alias("n_cells"))
    frame = with_features(meta, X)
    plates = sorted(meta[s.PLATE].unique().to_list())
    pending = _pending_marker(folder, version)
    pending.write_text(json.dumps({"name": spec.name, "version": version, "digest": digest}))  # its existence is the claim
    Lake(root / "lake").replace_partitions(
        "well_profiles", {p: frame.filter(pl.col(s.PLATE) == p).sort(s.WELL) for p in plates},
        encoder=spec.name, version=version)
    manifest = {"name": spec.name, "version": version, "digest": digest, "sources": sources,
                "spec": spec.model_dump(), "rows": int(X.shape[0]), "plates": plates, "features": features,
                "dropped_features": tables.dropped_features, "dropped_non_numeric": tables.dropped_non_numeric,
                "ignored_columns": tables.ignored_columns, "nan_values": int(np.isnan(X).sum()),
                "imported_at": datetime.now(UTC).isoformat(timespec="seconds")}
    with atomic_file(folder / f"v{version}.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    pending.unlink()
    return ImportedFeatureSet(spec.name, version, int(X.shape[0]), plates, features, tables.dropped_features,
                              manifest, tables.dropped_non_numeric, tables.ignored_columns)


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
