"""Platemap reader: a CSV/TSV of wells -> perturbation, control type and MoA, validated."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from bioembed_assets.schema import (
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


def _control_type(value: str) -> str | None:
    v = value.strip().lower()
    if v in ControlType.ALL:
        return v
    if v in _ALIASES:
        return _ALIASES[v]
    if v.startswith("poscon"):
        return ControlType.POSITIVE
    return None


def read_platemap(path: Path, plate: str) -> pl.DataFrame:
    """Read and validate the platemap of `plate`; columns exactly PLATEMAP_COLUMNS, sorted by well.

    Accepts `well, perturbation, control_type[, moa][, plate]` with or without a `Metadata_` prefix
    (case-insensitive); `.tsv`/`.txt` files are tab-separated. If a `plate` column is present, only
    that plate's rows are kept. Well ids are normalized ('A1' -> 'A01'); empty moa becomes null.
    Raises BioembedInputError (naming plate, file and well) for missing columns, bad well ids,
    unknown control types, duplicate wells or no negative-control wells.
    """
    path = Path(path)
    if not path.is_file():
        raise BioembedInputError("platemap file does not exist", plate=plate, path=path)
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    try:
        raw = pl.read_csv(path, separator=sep, infer_schema=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is an input error
        raise BioembedInputError(f"cannot parse platemap: {e}", plate=plate, path=path) from e

    renamed: dict[str, str] = {}
    for col in raw.columns:
        key = col.strip()
        key = key[len("metadata_") :] if key.lower().startswith("metadata_") else key
        key = key.lower()
        if key in PLATEMAP_COLUMNS:
            if key in renamed.values():
                raise BioembedInputError(f"column {key!r} appears twice (with and without prefix)", plate=plate, path=path)
            renamed[col] = key
    df = raw.select(list(renamed)).rename(renamed)
    missing = [c for c in (WELL, PERTURBATION, CONTROL_TYPE) if c not in df.columns]
    if missing:
        raise BioembedInputError(
            f"platemap lacks column(s) {missing} (found {raw.columns}); expected well, perturbation, "
            "control_type[, moa], optionally prefixed with Metadata_",
            plate=plate,
            path=path,
        )
    if PLATE in df.columns:
        df = df.filter(pl.col(PLATE).str.strip_chars() == plate)
        if df.is_empty():
            raise BioembedInputError("platemap has a plate column but no rows for this plate", plate=plate, path=path)
    if MOA not in df.columns:
        df = df.with_columns(pl.lit(None, pl.Utf8).alias(MOA))

    wells, ctypes = [], []
    for well, pert, ctype in df.select(WELL, PERTURBATION, CONTROL_TYPE).iter_rows():
        try:
            w = well_name(*parse_well((well or "").strip().upper()))
        except BioembedInputError:
            raise BioembedInputError(
                f"invalid well id {well!r}: expected e.g. 'A01'", plate=plate, well=well, path=path
            ) from None
        if not (pert or "").strip():
            raise BioembedInputError("empty perturbation", plate=plate, well=w, path=path)
        ct = _control_type(ctype or "")
        if ct is None:
            raise BioembedInputError(
                f"unknown control_type {ctype!r}: expected one of {list(ControlType.ALL)}", plate=plate, well=w, path=path
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
        raise BioembedInputError(f"duplicate wells {dups}", plate=plate, well=dups[0], path=path)
    if out.filter(pl.col(CONTROL_TYPE) == ControlType.NEGATIVE).is_empty():
        raise BioembedInputError(
            "no negative control wells (control_type 'negative'); normalization needs them", plate=plate, path=path
        )
    rows, cols = zip(*(parse_well(w) for w in out[WELL]))
    return out.with_columns(_r=pl.Series(rows), _c=pl.Series(cols)).sort("_r", "_c").select(list(PLATEMAP_COLUMNS))
