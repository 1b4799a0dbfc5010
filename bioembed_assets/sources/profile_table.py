"""External well-level profile tables (pycytominer / JUMP / CellProfiler style) as bioembed feature sets.

A profile table has metadata columns (by default those starting with `Metadata_`; more prefixes,
e.g. CellProfiler's `Image_Metadata_`, or listed columns) plus numeric feature columns (e.g.
CellProfiler features), one row per well, in CSV, CSV.GZ, TSV or Parquet, one or many files. A
separate metadata table (a platemap, an image table) can be joined on key columns. Importing maps
the metadata onto bioembed's well columns (plate, well, perturbation, control_type, moa, and
optionally batch and compound), keeps every other metadata column as a string (numeric metadata such
as a concentration is never a feature), and writes the feature matrix into the `well_profiles` lake
table under `encoder = <feature set name>`, so normalization and evaluation run on it exactly as on
bioembed's own embeddings.

Feature-set names are unique across encoders and imports: an import refuses a built-in encoder's
name and any name whose lake partitions were not written by an import of that name
(`check_feature_set_name`), so it never replaces another feature set's rows.
"""

from __future__ import annotations

import csv
import fnmatch
import gzip
import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, Field, model_validator

from bioembed_assets import schema as s
from bioembed_assets.store.atomic import atomic_file
from bioembed_assets.store.lake import LAKE_TABLES, Lake, with_features

METADATA_PREFIX = "Metadata_"
DEFAULT_PERTURBATION = "Metadata_broad_sample"
_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".parquet")
_GLOB_CHARS = frozenset("*?[")


class ProfileImportSpec(BaseModel):
    """How the columns of an external profile table map onto bioembed's.

    `negative` / `positive` map a metadata column to the values that mark negative / positive
    control wells, e.g. {"Metadata_broad_sample": ["DMSO"]}; every other well is a treatment.

    Metadata columns are those starting with one of `metadata_prefixes`, those in `metadata_cols`,
    the columns the mapping names (plate, well, perturbation, controls, moa, batch, compound), the
    join keys, and every column of the joined `metadata_files`. They are kept as strings (CSV cells
    as written: "0.370370370369230769" stays so) and are never features, numeric or not.
    """

    name: str
    """Feature-set name (stored in the `encoder` column), e.g. "lincs_cellprofiler"."""
    plate_col: str = "Metadata_Plate"
    well_col: str = "Metadata_Well"
    perturbation_cols: list[str] = Field(default_factory=lambda: [DEFAULT_PERTURBATION])
    """One or more columns; several are joined with " @ " (e.g. cell line @ seeding density), empty
    ones left out (a control without a dose is just "DMSO"). Not given (or empty): `compound_col`
    when that is given, else "Metadata_broad_sample"."""
    canonical_perturbation: bool = False
    """Compare perturbation names case- and punctuation-insensitively (U2-OS == U-2OS == u2os)."""
    negative: dict[str, list[str]] = Field(default_factory=dict)
    positive: dict[str, list[str]] = Field(default_factory=dict)
    moa_col: str | None = None
    batch_col: str | None = None
    """Column stored as `batch` (e.g. the week or run of a plate; null: the plate, see `design.py`)."""
    compound_col: str | None = None
    """Column stored as `compound` (one compound at several doses; null: the perturbation)."""
    features: list[str] | None = None
    """Feature columns: names and/or glob patterns (`Cells_*`, `Nuclei_AreaShape_*`, `*_Intensity_?`),
    in the order given (a pattern's matches in file order). A pattern matches non-metadata columns
    only and skips text columns without numbers; a name is taken even with a metadata prefix (e.g.
    `Metadata_Count_Cells`), unless the mapping or `metadata_cols` uses it. Default: every numeric
    non-metadata column."""
    feature_join: str = "intersect"
    """Files with different feature columns: keep the common ones ("intersect") or fail ("exact")."""
    non_numeric: Literal["error", "drop"] = "error"
    """A feature column holding a value that is not a number (e.g. one "abc" cell in a CSV column
    of floats): fail naming the file, row and column ("error"), or drop that column from every
    file and report it in `dropped_non_numeric` ("drop"). See `classify_columns` for the rule."""
    metadata_prefixes: list[str] = Field(default_factory=lambda: [METADATA_PREFIX])
    """Columns starting with any of these are metadata, e.g. ["Metadata_", "Image_Metadata_"]."""
    metadata_cols: list[str] = Field(default_factory=list)
    """More metadata columns, named (e.g. "ImageNumber", "Concentration")."""
    metadata_files: list[str] = Field(default_factory=list)
    """Metadata tables (CSV/TSV/Parquet; several are stacked, e.g. one platemap per layout) joined
    to every profile row on `metadata_on`: each profile row must match exactly one metadata row."""
    metadata_on: list[str] = Field(default_factory=list)
    """Join keys: "COL" (the same name in both tables) or "PROFILE_COL=METADATA_COL", e.g.
    ["Metadata_Plate_Map_Name=plate_map_name", "Metadata_Well=well_position"]; compared as text."""

    @model_validator(mode="before")
    @classmethod
    def _default_perturbation(cls, data: object) -> object:
        """No perturbation columns given: the compound column, else "Metadata_broad_sample"."""
        if isinstance(data, dict) and not data.get("perturbation_cols"):
            compound = data.get("compound_col")
            data = {**data, "perturbation_cols": [compound] if compound else [DEFAULT_PERTURBATION]}
        return data

    @model_validator(mode="after")
    def _join_given_whole(self) -> ProfileImportSpec:
        if bool(self.metadata_files) != bool(self.metadata_on):
            raise ValueError("metadata_files and metadata_on go together: name the metadata table(s) and the key "
                             "columns to join on (CLI: --metadata FILE --on COL[,COL])")
        join_keys(self)  # fails on malformed keys
        return self


_ADDED_FIELDS = ("batch_col", "compound_col", "metadata_prefixes", "metadata_cols", "metadata_files", "metadata_on")
"""Spec fields added after the first imports: left out of the content digest while at their
defaults, so that re-importing an unchanged older import keeps its version."""


def join_keys(spec: ProfileImportSpec) -> list[tuple[str, str]]:
    """`spec.metadata_on` as (profile column, metadata column) pairs."""
    pairs = []
    for item in spec.metadata_on:
        left, sep, right = (part.strip() for part in item.partition("="))
        right = right if sep else left
        if not left or not right:
            raise ValueError(f"metadata_on entry {item!r}: expected COL or PROFILE_COL=METADATA_COL")
        pairs.append((left, right))
    return pairs


def _mapped_columns(spec: ProfileImportSpec) -> list[str]:
    """The table columns the mapping reads (always metadata)."""
    cols = [spec.plate_col, spec.well_col, *spec.perturbation_cols, *spec.negative, *spec.positive]
    return cols + [c for c in (spec.moa_col, spec.batch_col, spec.compound_col) if c]


def _is_glob(pattern: str) -> bool:
    return not _GLOB_CHARS.isdisjoint(pattern)


def metadata_columns(columns: Sequence[str], spec: ProfileImportSpec) -> list[str]:
    """The metadata columns among a profile table's `columns` (in order): listed, mapped, join keys,
    or with a metadata prefix unless `spec.features` names them."""
    explicit = {*spec.metadata_cols, *_mapped_columns(spec), *(left for left, _ in join_keys(spec))}
    named = {f for f in spec.features or () if not _is_glob(f)}
    prefixes = tuple(spec.metadata_prefixes)
    return [c for c in columns if c in explicit or (c not in named and bool(prefixes) and c.startswith(prefixes))]


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
    """Non-metadata text columns with no numeric value: not features, left out."""


def feature_set_dir(home_root: Path, name: str) -> Path:
    return home_root / "feature_sets" / s.validate_plate_name(name)


def _csv_header(path: Path, sep: str) -> list[str]:
    """The column names of a CSV/TSV file (plain or gzipped), read from its first line only."""
    try:
        raw = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
        with raw, io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="") as f:
            return next(csv.reader(f, delimiter=sep), [])
    except (OSError, EOFError, csv.Error):
        return []  # polars reports the unreadable file


def _read_one(path: Path, text: Callable[[list[str]], Collection[str]] | bool = False,
              what: str = "profile table") -> pl.DataFrame:
    """One table; the columns `text(names)` picks (all with `text=True`) are read from a CSV as text."""
    name = path.name.lower()
    if not name.endswith(_SUFFIXES):
        raise s.BioembedInputError(f"unsupported file type for a {what}; expected one of {_SUFFIXES}", path=path)
    if not path.is_file():
        raise s.BioembedInputError(f"{what} not found", path=path)
    try:
        if name.endswith(".parquet"):
            df = pl.read_parquet(path)
            return df.with_columns(pl.all().cast(pl.Utf8)) if text is True else df
        sep = "\t" if name.endswith((".tsv", ".tsv.gz", ".txt")) else ","
        if text is True:
            return pl.read_csv(path, separator=sep, infer_schema=False)
        overrides = {c: pl.Utf8 for c in text(_csv_header(path, sep))} if text else None
        # one chunk per column: the parallel CSV reader leaves dozens, and every later select pays for them
        return pl.read_csv(path, separator=sep, infer_schema_length=None, schema_overrides=overrides).rechunk()
    except Exception as exc:  # polars raises several error types for unreadable files
        raise s.BioembedInputError(f"cannot read {what} ({type(exc).__name__}: {exc})", path=path) from exc


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
    """Non-metadata text columns in which no value is a number (not features)."""


def _feature_candidates(columns: Sequence[str], metadata: Collection[str], spec: ProfileImportSpec,
                        path: Path) -> tuple[list[str], set[str]]:
    """Candidate feature columns (see `ProfileImportSpec.features`) and those named explicitly."""
    meta = set(metadata)
    if spec.features is None:
        return [c for c in columns if c not in meta], set()
    present = set(columns)
    names = [f for f in spec.features if not _is_glob(f)]
    missing = [c for c in names if c not in present]
    if missing:
        raise s.BioembedInputError(f"feature columns not in the table: {missing[:5]}", path=path)
    taken = [c for c in names if c in meta]
    if taken:
        raise s.BioembedInputError(f"feature column(s) {taken[:5]} are metadata (used by the column mapping, "
                                   "metadata_cols or the join keys); metadata are never features", path=path)
    free = [c for c in columns if c not in meta]
    candidates: dict[str, None] = {}
    for f in spec.features:
        if not _is_glob(f):
            candidates[f] = None
            continue
        matched = [c for c in free if fnmatch.fnmatchcase(c, f)]
        if not matched:
            raise s.BioembedInputError(f"feature pattern {f!r} matches no non-metadata column", path=path)
        candidates.update(dict.fromkeys(matched))
    return list(candidates), set(names)


def classify_columns(df: pl.DataFrame, spec: ProfileImportSpec, path: Path,
                     metadata: Collection[str] | None = None) -> TableColumns:
    """Sort the columns of one table into features, features with non-numbers, and ignored text.

    Candidates are the columns `spec.features` names or matches when given, else every column that
    is not metadata (`metadata`, by default `metadata_columns(df.columns, spec)`): numeric metadata
    (a dose, a replicate number) is never a candidate. A numeric column is a feature. A text
    (String) column is judged by its non-null values, a value being a number when
    `cast(pl.Float64, strict=False)` reads it ("1.5", "-2e-3", "NaN", "inf"; not "abc", "NA" or
    " 1.5"; missing values are empty cells):

    - at least one value is a number and all are: a feature stored as text (cast to float);
    - at least one value is a number, some are not: a feature column with bad values (one stray
      "abc" makes a CSV reader type the whole column as text), refused or dropped per
      `spec.non_numeric`;
    - no value is a number: a genuinely textual column (file names, URLs): ignored and reported;
      named in `spec.features`, it is an error.

    Other dtypes (Boolean, dates, all-null Parquet columns) are never features. Cost is linear in
    the number of columns (one schema lookup, one vectorized pass over the text columns).
    """
    schema = df.schema
    names = list(schema)
    if metadata is None:
        metadata = metadata_columns(names, spec)
    candidates, named = _feature_candidates(names, metadata, spec, path)
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
        elif c in named:
            raise s.BioembedInputError(f"feature column {c!r} is {dt}, expected numbers", path=path)
        elif c in verdict:
            ignored.append(c)
    if not features and not non_numeric:
        text = f" (text columns ignored: {ignored[:5]})" if ignored else ""
        raise s.BioembedInputError(
            f"no numeric non-metadata columns to use as features{text} (metadata: prefixes "
            f"{spec.metadata_prefixes}, the mapped and listed columns); select them with `features` "
            "(CLI: --features)", path=path)
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


_SOURCE = "__bioembed_metadata_file"


@dataclass(frozen=True)
class MetadataTable:
    """The joined metadata tables, stacked, every column text; keys renamed `__bioembed_key<i>`."""

    frame: pl.DataFrame
    columns: list[str]
    """Its columns other than the keys (all metadata), in order."""
    keys: list[tuple[str, str]]
    files: list[Path]
    duplicated: pl.DataFrame
    """Key values held by several rows, with their count `n`."""

    @property
    def key_cols(self) -> list[str]:
        return [f"__bioembed_key{i}" for i in range(len(self.keys))]

    def describe(self, values: Iterable[object]) -> str:
        """Key values as "PROFILE_COL=value, ..." for error messages."""
        return ", ".join(f"{left}={v!r}" for (left, _), v in zip(self.keys, values))


def read_metadata_tables(spec: ProfileImportSpec) -> MetadataTable | None:
    """The tables of `spec.metadata_files`, read as text and stacked (None without any)."""
    if not spec.metadata_files:
        return None
    keys = join_keys(spec)
    key_cols = [f"__bioembed_key{i}" for i in range(len(keys))]
    frames, files = [], [Path(f) for f in spec.metadata_files]
    for f in files:
        df = _read_one(f, text=True, what="metadata table")
        missing = [right for _, right in keys if right not in df.columns]
        if missing:
            raise s.BioembedInputError(f"metadata table has no key column(s) {missing} (from metadata_on / --on); "
                                       f"its columns: {df.columns[:20]}", path=f)
        frames.append(df.rename({right: k for (_, right), k in zip(keys, key_cols)})
                      .with_columns(pl.lit(str(f)).alias(_SOURCE)))
    frame = pl.concat(frames, how="diagonal_relaxed").drop_nulls(key_cols)
    columns = [c for c in frame.columns if c not in key_cols and c != _SOURCE]
    duplicated = frame.group_by(key_cols).agg(pl.len().alias("n"), pl.col(_SOURCE).unique().sort().alias("files"))
    return MetadataTable(frame, columns, keys, files, duplicated.filter(pl.col("n") > 1))


def _join_metadata(df: pl.DataFrame, table: MetadataTable, path: Path) -> pl.DataFrame:
    """`df` with the metadata table's columns, every row matched to exactly one metadata row."""
    lefts = [left for left, _ in table.keys]
    missing = [c for c in lefts if c not in df.columns]
    if missing:
        raise s.BioembedInputError(f"profile table has no join key column(s) {missing} (from metadata_on / --on)",
                                   path=path)
    shared = [c for c in table.columns if c in set(df.columns)]
    if shared:
        raise s.BioembedInputError(
            f"column(s) {shared[:5]} are in both the profile table and the metadata table(s) "
            f"{[str(f) for f in table.files]}: join on them (--on) or drop them from one table", path=path)
    keys = df.select(pl.col(c).cast(pl.Utf8).alias(k) for c, k in zip(lefts, table.key_cols))
    many = keys.join(table.duplicated, on=table.key_cols, how="inner", maintain_order="left")
    if many.height:
        first = many.row(0, named=True)
        raise s.BioembedInputError(
            f"{many.height} profile row(s) match several metadata rows: {table.describe(first[k] for k in table.key_cols)}"
            f" is in {first['n']} rows of {first['files']}", path=path)
    joined = keys.join(table.frame, on=table.key_cols, how="left", maintain_order="left")
    unmatched = joined.filter(pl.col(_SOURCE).is_null())
    if unmatched.height:
        first = unmatched.row(0, named=True)
        raise s.BioembedInputError(
            f"{unmatched.height} of {df.height} profile row(s) match no row of the metadata table(s) "
            f"{[str(f) for f in table.files]} on {[f'{a}={b}' for a, b in table.keys]}; first: "
            f"{table.describe(first[k] for k in table.key_cols)}", path=path)
    return pl.concat([df, joined.select(table.columns)], how="horizontal")


_OUTPUT_COLUMNS = frozenset({s.PLATE, s.WELL, s.PERTURBATION, s.CONTROL_TYPE, s.MOA, s.BATCH, s.COMPOUND, s.ENCODER,
                             s.ENCODER_VERSION, s.FEATURES, "n_cells"})


def _kept_name(column: str, spec: ProfileImportSpec) -> str | None:
    """The name a metadata column is kept under: its own, `Metadata_<name>` where it would clash
    with one of bioembed's columns, or None where it is the very source of that column."""
    if column not in _OUTPUT_COLUMNS:
        return column
    source = {s.PLATE: spec.plate_col, s.WELL: spec.well_col, s.MOA: spec.moa_col, s.BATCH: spec.batch_col,
              s.COMPOUND: spec.compound_col,
              s.PERTURBATION: spec.perturbation_cols[0] if len(spec.perturbation_cols) == 1
              and not spec.canonical_perturbation else None}
    return None if source.get(column) == column else f"{METADATA_PREFIX}{column}"


def _annotate(df: pl.DataFrame, spec: ProfileImportSpec, path: Path, metadata: Sequence[str]) -> pl.DataFrame:
    """bioembed's well columns from the table's metadata, plus every metadata column as text
    (errors name the file and column)."""
    needed = _mapped_columns(spec)
    present = set(df.columns)
    missing = sorted({c for c in needed if c not in present})
    if missing:
        hint = (f" (the perturbation column defaults to {DEFAULT_PERTURBATION}; name yours with perturbation_cols, "
                "CLI --perturbation)" if DEFAULT_PERTURBATION in missing else "")
        raise s.BioembedInputError(f"missing metadata column(s) {missing}{hint}; the table's metadata columns are "
                                   f"{list(metadata)[:30]}", path=path)
    # an empty part is left out (a control without a dose is "DMSO"); a row with every part empty has none
    parts = [pl.col(c).cast(pl.Utf8) for c in spec.perturbation_cols]
    pert = pl.when(pl.any_horizontal(p.is_not_null() for p in parts)).then(
        pl.concat_str(parts, separator=" @ ", ignore_nulls=True))
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
    design = [pl.col(c).cast(pl.Utf8).alias(out) for out, c in ((s.BATCH, spec.batch_col), (s.COMPOUND, spec.compound_col))
              if c]
    keep = {c: name for c in metadata if (name := _kept_name(c, spec)) is not None}
    clash = sorted(name for name, n in Counter(keep.values()).items() if n > 1)
    if clash:
        raise s.BioembedInputError(f"metadata column(s) {clash} would be kept twice (bioembed renames columns named "
                                   f"like its own, e.g. batch -> {METADATA_PREFIX}batch); rename one", path=path)
    out = df.select(
        pl.col(spec.plate_col).cast(pl.Utf8).alias(s.PLATE),
        pl.col(spec.well_col).cast(pl.Utf8).alias(s.WELL),
        pert.alias(s.PERTURBATION),
        control.alias(s.CONTROL_TYPE),
        (pl.col(spec.moa_col).cast(pl.Utf8) if spec.moa_col else pl.lit(None, pl.Utf8)).alias(s.MOA),
        *design,
        *[pl.col(c).cast(pl.Utf8).alias(name) for c, name in keep.items()],
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
    """Non-metadata text columns without a numeric value (see `classify_columns`)."""


def read_profile_tables(paths: Sequence[str | Path], spec: ProfileImportSpec) -> ProfileTables:
    """Read, join, map and check `paths` (and `spec.metadata_files`) without writing anything; the
    features are those of every file (linear in columns)."""
    if not paths:
        raise ValueError("no profile files given")
    joined = read_metadata_tables(spec)
    metas, tables, columns = [], [], []
    for p in map(Path, paths):
        df = _read_one(p, text=lambda names: metadata_columns(names, spec))
        metadata = metadata_columns(df.columns, spec)
        cols = classify_columns(df, spec, p, metadata)
        if cols.non_numeric and spec.non_numeric == "error":
            raise _non_numeric_error(p, cols.non_numeric)
        if joined is not None:
            metas.append(_annotate(_join_metadata(df, joined, p), spec, p, [*metadata, *joined.columns]))
        else:
            metas.append(_annotate(df, spec, p, metadata))
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


def _content_digest(spec: ProfileImportSpec, sources: list[dict], metadata_sources: list[dict],
                    features: list[str]) -> str:
    """What fixes an import's content: files, mapping and features. `non_numeric` only decides whether
    an import fails; fields added later count only when set, so older imports keep their digest."""
    mapping = spec.model_dump(exclude={"non_numeric"})
    fields = ProfileImportSpec.model_fields
    for name in _ADDED_FIELDS:
        if mapping[name] == fields[name].get_default(call_default_factory=True):
            del mapping[name]
    content: list = [sources, mapping, features] + ([metadata_sources] if metadata_sources else [])
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def import_profiles(home_root: str | Path, paths: Sequence[str | Path], spec: ProfileImportSpec) -> ImportedFeatureSet:
    """Import profile tables into the lake as feature set `spec.name`.

    The name must be free or already this import's (`check_feature_set_name`); only
    `well_profiles/encoder=<name>/version=<version>` is written. The version is "1", "2", ... by
    content: re-importing the same files with the same mapping returns the existing version
    (rewritten identically). Every plate's partition is staged and the version swapped in at once;
    the manifest (`feature_sets/<name>/v<version>.json`: files and metadata files with their sha256,
    mapping, feature names, kept metadata columns, dropped and ignored columns) is written last. A
    bad table fails before anything is written.
    """
    root = Path(home_root)
    check_feature_set_name(root, spec.name)
    tables = read_profile_tables(paths, spec)
    meta, X, features = tables.meta, tables.X, tables.features
    sources = [{"path": str(Path(p).resolve()), "sha256": _sha256(Path(p))} for p in paths]
    metadata_sources = [{"path": str(Path(p).resolve()), "sha256": _sha256(Path(p))} for p in spec.metadata_files]
    digest = _content_digest(spec, sources, metadata_sources, features)
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
                "metadata_sources": metadata_sources, "spec": spec.model_dump(),
                "metadata_columns": [c for c in tables.meta.columns if c not in _OUTPUT_COLUMNS],
                "rows": int(X.shape[0]), "plates": plates, "features": features,
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
    crossfit: Literal["auto", "off"] | int = "auto"
    """How each recipe's replicate mAP is cross-fitted (`evaluate.crossfit.plan_crossfit`)."""
    nsc_aggregate: Literal["mean", "median"] = "mean"
    """How NSC / NSCB build a treatment's profile from its wells."""


def save_import(home_root: str | Path, saved: SavedImport) -> Path:
    """Register `saved` so that materializing `imported_profiles` (re)imports it. Register only an
    import that succeeded (`import_profiles` first): a registered import is re-run by every later
    materialization."""
    path = feature_set_dir(Path(home_root), saved.spec.name) / "import.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(saved.model_dump_json(indent=1))
    return path


def saved_imports(home_root: str | Path, errors: dict[str, str] | None = None) -> list[SavedImport]:
    """Every import registered in the home, by feature-set name. With `errors`, an unreadable
    `import.json` is recorded there (feature-set name -> why) instead of raising."""
    out = []
    for f in sorted((Path(home_root) / "feature_sets").glob("*/import.json")):
        try:
            out.append(SavedImport.model_validate_json(f.read_text()))
        except (OSError, ValueError) as exc:
            if errors is None:
                raise
            errors[f.parent.name] = f"unreadable {f} ({type(exc).__name__}: {exc})"
    return out
