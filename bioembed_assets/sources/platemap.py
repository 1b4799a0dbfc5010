"""Platemap reader: a CSV/TSV of wells -> perturbation, control type and MoA, validated; and the check
that a plate's images and its platemap cover the same wells.

Column mapping (`columns`, bioembed column -> file column) and control-label mapping (`controls`, file
value -> negative/positive/treatment) come from `config.PlatemapConfig`. Without a mapping, columns
are found by name (`well`, `perturbation`, `control_type`, `moa`, `plate`, with or without a
`Metadata_` prefix, case-insensitive) and control labels by bioembed's vocabulary plus the common
spellings (JUMP's `negcon`/`poscon_*`, LINCS's `trt`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from bioembed_assets.schema import (
    BATCH,
    COMPOUND,
    CONTROL_TYPE,
    MOA,
    PERTURBATION,
    PLATE,
    PLATEMAP_COLUMNS,
    WELL,
    BioembedInputError,
    ControlType,
    parse_well,
    well_name,
)

_ALIASES = {
    "negcon": ControlType.NEGATIVE,
    "poscon": ControlType.POSITIVE,
    "trt": ControlType.TREATMENT,
}
"""Common spellings of control types (JUMP's `negcon`/`poscon_*`, LINCS's `trt`)."""

ROW, COLUMN = "row", "column"
OPTIONAL_COLUMNS: tuple[str, ...] = (BATCH, COMPOUND)
"""Design columns kept when the platemap has (or maps) them: the plate's batch, a treatment's compound."""
MAPPABLE_COLUMNS: tuple[str, ...] = (*PLATEMAP_COLUMNS, *OPTIONAL_COLUMNS, ROW, COLUMN)
"""bioembed columns a `columns` mapping may name; `row` + `column` stand in for `well`
(row a letter or 1-based number, column a number), as in BBBC013's `1049_Metadata.csv`."""
_ROW = "_platemap_row"
_NUMBER = re.compile(r"[+-]?\d+(\.\d*)?")  # fullmatch: `$` would allow a trailing newline


def _control_type(value: str) -> str | None:
    v = value.strip().lower()
    if v in ControlType.ALL:
        return v
    if v in _ALIASES:
        return _ALIASES[v]
    if v.startswith("poscon"):
        return ControlType.POSITIVE
    return None


def _norm_label(value: str | None) -> str:
    """A control label for matching: stripped, lower case, numbers canonical ('+1', '1.0' -> '1')."""
    v = (value or "").strip().lower()
    if _NUMBER.fullmatch(v):
        f = float(v)
        return str(int(f)) if f.is_integer() else repr(f)
    return v


_WELL_CELL = re.compile(r"\s*([A-Za-z]{1,2})0*(\d{1,2})\s*")
"""A platemap well id: row letters A-ZZ, column 1-99 with optional leading zeros ('a1', 'A01', 'A001')."""


def _well_of(text: str | None, plate: str, path: str, row: int) -> str:
    """Canonical well id of platemap row `row` (1-based, after the header): 'A1' -> 'A01'."""
    m = _WELL_CELL.fullmatch(text or "")
    if m and int(m.group(2)) > 0:
        return well_name(*parse_well(f"{m.group(1).upper()}{int(m.group(2)):02d}"))
    raise BioembedInputError(
        f"platemap row {row}: invalid well id {text or ''!r}: expected a row letter (A-ZZ) and a column number "
        "(1-99), e.g. 'A01'",
        plate=plate, well=text or None, path=path,
    )


def _well_of_row_col(row: str, col: str, plate: str, path: str, line: int) -> str:
    row, col = (row or "").strip(), (col or "").strip()
    try:
        r = int(row) if row.isdigit() else parse_well(f"{row.upper()}01")[0]
        well = well_name(r, int(col))
        parse_well(well)  # representable: rows A-ZZ, columns 1-99
        return well
    except (ValueError, BioembedInputError):
        raise BioembedInputError(
            f"platemap row {line}: invalid well row {row!r} / column {col!r}: expected e.g. 'C' (or 3) and 7 "
            "(rows A-ZZ, columns 1-99)",
            plate=plate, path=path,
        ) from None


def read_platemap(
    path: Path,
    plate: str,
    columns: Mapping[str, str] | None = None,
    controls: Mapping[str, str] | None = None,
) -> pl.DataFrame:
    """Read and validate the platemap of `plate`; columns PLATEMAP_COLUMNS (plus `batch` / `compound`
    when present), sorted by well.

    `columns` maps bioembed columns (`well` or `row` + `column`, `perturbation`, `control_type`, `moa`,
    `plate`) to the file's column names; unmapped ones are looked up by name, with or without a
    `Metadata_` prefix (case-insensitive). `controls` maps the file's control labels to
    negative/positive/treatment (numbers match numerically: "+1" == "1"); labels it lacks fall back to
    the built-in vocabulary. `.tsv`/`.txt` files are tab-separated. If a plate column is present, only
    that plate's rows are kept (without one, every row belongs to `plate`). Well ids are normalized
    ('A1' -> 'A01'); an empty moa becomes null.

    Raises BioembedInputError (naming plate, file and well, and the platemap row: 1 = the first row after
    the header) for missing columns, bad well ids, unknown control labels, empty perturbations,
    duplicate wells or no negative-control wells.
    """
    path = Path(path)
    if not path.is_file():
        raise BioembedInputError("platemap file does not exist", plate=plate, path=path)
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    try:
        raw = pl.read_csv(path, separator=sep, infer_schema=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is an input error
        raise BioembedInputError(f"cannot parse platemap: {e}", plate=plate, path=path) from e
    return platemap_from_frame(raw, plate, columns=columns, controls=controls, source=str(path))


def platemap_from_frame(
    raw: pl.DataFrame,
    plate: str,
    *,
    columns: Mapping[str, str] | None = None,
    controls: Mapping[str, str] | None = None,
    source: str = "<platemap table>",
) -> pl.DataFrame:
    """`read_platemap` on a table already in memory (every column read as text); `source` names it in errors."""
    raw = raw.select(pl.all().cast(pl.Utf8))
    rows = pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias(_ROW)  # platemap row numbers, for errors
    columns = dict(columns or {})
    bad_keys = sorted(set(columns) - set(MAPPABLE_COLUMNS))
    if bad_keys:
        raise BioembedInputError(
            f"platemap column mapping names unknown bioembed column(s) {bad_keys}: expected some of {list(MAPPABLE_COLUMNS)}",
            plate=plate,
            path=source,
        )
    renamed: dict[str, str] = {}  # file column -> bioembed column
    for key, col in columns.items():
        if col not in raw.columns:
            raise BioembedInputError(
                f"platemap column mapping {key} -> {col!r}: no such column (found {raw.columns})", plate=plate, path=source
            )
    for col in raw.columns:
        key = col.strip()
        key = key[len("metadata_") :] if key.lower().startswith("metadata_") else key
        key = key.lower()
        if key in MAPPABLE_COLUMNS and key not in columns:
            if key in renamed.values():
                raise BioembedInputError(f"column {key!r} appears twice (with and without prefix)", plate=plate,
                                         path=source)
            renamed[col] = key
    picked = {key: pl.col(col) for col, key in renamed.items()} | {key: pl.col(col) for key, col in columns.items()}
    df = raw.select(rows, *[expr.alias(key) for key, expr in picked.items()])
    has_well = WELL in df.columns or {ROW, COLUMN} <= set(df.columns)
    missing = [c for c in (PERTURBATION, CONTROL_TYPE) if c not in df.columns]
    if not has_well:
        missing.insert(0, WELL)
    if missing:
        raise BioembedInputError(
            f"platemap lacks column(s) {missing} (found {raw.columns}); expected well (or row + column), perturbation, "
            "control_type[, moa], optionally prefixed with Metadata_, or a column mapping (PlatemapConfig.columns)",
            plate=plate,
            path=source,
        )
    if PLATE in df.columns:
        df = df.filter(pl.col(PLATE).str.strip_chars() == plate)
        if df.is_empty():
            raise BioembedInputError("platemap has a plate column but no rows for this plate", plate=plate, path=source)
    if MOA not in df.columns:
        df = df.with_columns(pl.lit(None, pl.Utf8).alias(MOA))
    mapping: dict[str, str] = {}
    for label, ctype in (controls or {}).items():
        if ctype not in ControlType.ALL:
            raise BioembedInputError(
                f"control mapping {label!r} -> {ctype!r}: expected one of {list(ControlType.ALL)}", plate=plate, path=source
            )
        mapping[_norm_label(label)] = ctype

    wells, ctypes = [], []
    well_cols = [WELL] if WELL in df.columns else [ROW, COLUMN]
    for line, *w_parts, pert, ctype in df.select(_ROW, *well_cols, PERTURBATION, CONTROL_TYPE).iter_rows():
        w = (_well_of(w_parts[0], plate, source, line) if len(w_parts) == 1
             else _well_of_row_col(*w_parts, plate, source, line))
        if not (pert or "").strip():
            raise BioembedInputError(f"platemap row {line}: empty perturbation", plate=plate, well=w, path=source)
        ct = mapping.get(_norm_label(ctype)) or _control_type(ctype or "")
        if ct is None:
            hint = f" or a label of the control mapping {dict(controls)}" if controls else " (or map it: PlatemapConfig.controls)"
            raise BioembedInputError(
                f"platemap row {line}: unknown control_type {ctype!r}: expected one of {list(ControlType.ALL)}{hint}",
                plate=plate, well=w, path=source,
            )
        wells.append(w)
        ctypes.append(ct)
    out = df.with_columns(
        pl.Series(WELL, wells, pl.Utf8),
        pl.Series(CONTROL_TYPE, ctypes, pl.Utf8),
        pl.col(PERTURBATION).str.strip_chars(),
        pl.col(MOA).str.strip_chars().replace("", None),
        pl.lit(plate, pl.Utf8).alias(PLATE),
    )
    dups = out.filter(pl.col(WELL).is_duplicated())[WELL].unique().sort().to_list()
    if dups:
        lines = out.filter(pl.col(WELL) == dups[0])[_ROW].to_list()
        raise BioembedInputError(f"duplicate wells {dups} ({dups[0]} on platemap rows {lines})", plate=plate,
                                 well=dups[0], path=source)
    if out.filter(pl.col(CONTROL_TYPE) == ControlType.NEGATIVE).is_empty():
        raise BioembedInputError(
            "no negative control wells (control_type 'negative'); normalization needs them", plate=plate, path=source
        )
    optional = [pl.col(c).str.strip_chars().replace("", None) for c in OPTIONAL_COLUMNS if c in out.columns]
    rows, cols = zip(*(parse_well(w) for w in out[WELL]))
    return out.with_columns(_r=pl.Series(rows), _c=pl.Series(cols)).sort("_r", "_c").select(*PLATEMAP_COLUMNS, *optional)


def resolve_platemap_path(plate_dir: Path, path: str | Path, plate: str, base: Path | None = None) -> Path:
    """Where a configured platemap is: `{plate}` in `path` is replaced by the plate name; an absolute path
    is used as is; a relative one is looked up in the plate folder, then under `base` (the config file's
    folder) when given. Returns the plate-folder candidate when neither exists (for the error message)."""
    p = Path(str(path).replace("{plate}", plate))
    if p.is_absolute():
        return p
    first = Path(plate_dir) / p
    if not first.exists() and base is not None and (Path(base) / p).exists():
        return Path(base) / p
    return first


@dataclass(frozen=True)
class PlatemapJoin:
    """How a plate's wells with images and its platemap's wells line up (sorted well ids)."""

    plate: str
    images_without_platemap: list[str] = field(default_factory=list)
    """Wells with images but no platemap row: an error (their perturbation is unknown)."""
    platemap_without_images: list[str] = field(default_factory=list)
    """Wells in the platemap without any image: reported, not raised (empty wells, failed acquisition)."""

    @property
    def warning(self) -> str | None:
        """A message for the wells of the platemap without images, or None."""
        if not self.platemap_without_images:
            return None
        wells = self.platemap_without_images
        shown = ", ".join(wells[:20]) + (f" (+{len(wells) - 20} more)" if len(wells) > 20 else "")
        return f"plate {self.plate}: {len(wells)} platemap well(s) have no images: {shown}"


def validate_platemap_join(platemap: pl.DataFrame, image_table: pl.DataFrame, plate: str) -> PlatemapJoin:
    """Check that every well with images has a platemap row; report platemap wells without images.

    Raises BioembedInputError listing the wells with images but not in the platemap. Returns a
    `PlatemapJoin` with both lists (`images_without_platemap` is then empty) for the caller to log
    `platemap_without_images` as a warning.
    """
    def wells(df: pl.DataFrame, name: str) -> set[str]:
        if WELL not in df.columns:
            raise BioembedInputError(f"{name} has no {WELL!r} column (has {df.columns})", plate=plate)
        if PLATE in df.columns:
            df = df.filter(pl.col(PLATE) == plate)
        return set(df[WELL].drop_nulls().to_list())

    with_images, mapped = wells(image_table, "image table"), wells(platemap, "platemap")
    key = parse_well
    orphans = sorted(with_images - mapped, key=key)
    empty = sorted(mapped - with_images, key=key)
    if orphans:
        shown = ", ".join(orphans[:20]) + (f" (+{len(orphans) - 20} more)" if len(orphans) > 20 else "")
        raise BioembedInputError(
            f"{len(orphans)} well(s) have images but are not in the platemap: {shown}; add them to the platemap "
            "(or remove their images)",
            plate=plate,
            well=orphans[0],
        )
    return PlatemapJoin(plate, [], empty)
