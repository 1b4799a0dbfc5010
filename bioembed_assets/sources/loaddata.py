"""Reader for a CellProfiler LoadData CSV: one row per image set (field), one column pair per channel.

Columns: ``FileName_<Token>`` and ``PathName_<Token>`` for each channel, ``Metadata_Plate``,
``Metadata_Well`` (or ``Metadata_Row`` + ``Metadata_Col``/``Metadata_Column``) and optionally
``Metadata_Site`` (or ``Metadata_Field``; default 1). The channel map maps the ``<Token>`` suffix to a
bioembed stain, e.g. ``{"OrigDNA": "DNA", "OrigER": "ER"}``; every ``FileName_`` token must be mapped
(map ``"IllumDNA"`` and the like to ``""`` to skip them). ``PathName_`` values that are relative (or a
missing ``PathName_`` column) are resolved against the CSV's folder. Rows whose ``Metadata_Plate``
differs from the plate being read are skipped; without a plate column every row belongs to it.

Option `csv`: the CSV path (default ``<plate_dir>/load_data.csv``; relative paths are resolved against
the plate folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from bioembed_assets.schema import BioembedInputError
from bioembed_assets.sources.layouts import (
    ChannelMap,
    FieldCollector,
    FieldFiles,
    canonical_well,
    display_path,
    require_folder,
    well_from_row_col,
)

DEFAULT_CSV = "load_data.csv"


def _column(columns: list[str], *names: str) -> str | None:
    lower = {c.lower(): c for c in columns}
    for n in names:
        if n.lower() in lower:
            return lower[n.lower()]
    return None


def list_loaddata_fields(
    plate_dir: Path, plate: str, channel_map: dict[Any, str], *, csv: str | Path = DEFAULT_CSV
) -> list[FieldFiles]:
    """All fields listed for `plate` in a LoadData CSV, sorted by (well, site)."""
    cmap = ChannelMap(channel_map, plate)
    folder = require_folder(plate_dir, plate)
    csv_path = Path(csv)
    if not csv_path.is_absolute():
        csv_path = folder / csv_path
    where_csv = display_path(csv_path)
    if not csv_path.is_file():
        raise BioembedInputError("LoadData CSV does not exist", plate=plate, path=where_csv)
    try:
        table = pl.read_csv(csv_path, infer_schema=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is an input error
        raise BioembedInputError(f"cannot parse LoadData CSV: {e}", plate=plate, path=where_csv) from e
    cols = table.columns
    tokens = [c[len("FileName_") :] for c in cols if c.startswith("FileName_")]
    if not tokens:
        raise BioembedInputError(f"LoadData CSV has no FileName_<channel> columns (has {cols})", plate=plate,
                                 path=where_csv)
    well_col = _column(cols, "Metadata_Well")
    row_col, col_col = _column(cols, "Metadata_Row"), _column(cols, "Metadata_Col", "Metadata_Column")
    if well_col is None and (row_col is None or col_col is None):
        raise BioembedInputError(
            "LoadData CSV lacks Metadata_Well (or Metadata_Row + Metadata_Col)", plate=plate, path=where_csv
        )
    site_col = _column(cols, "Metadata_Site", "Metadata_Field")
    plate_col = _column(cols, "Metadata_Plate")
    for token in tokens:  # unknown tokens fail before any file is touched
        if cmap.lookup(token) is None:
            raise cmap.unknown(f"FileName_{token}", well=None, path=where_csv, what="column")
    base = csv_path.parent
    collector = FieldCollector(plate, cmap)
    for i, row in enumerate(table.iter_rows(named=True)):
        line = f"{csv_path.name} line {i + 2}"
        if plate_col is not None and (row[plate_col] or "").strip() != plate:
            continue
        if well_col is not None:
            well = canonical_well(row[well_col] or "", plate=plate, path=f"{where_csv} line {i + 2}")
        else:
            well = well_from_row_col(row[row_col] or "", row[col_col] or "", plate=plate, path=f"{where_csv} line {i + 2}")
        site_text = (row[site_col] or "").strip() if site_col else ""
        if site_text and not site_text.isdigit():
            raise BioembedInputError(f"{site_col} {site_text!r} is not a number", plate=plate, well=well,
                                     path=f"{where_csv} line {i + 2}")
        site = int(site_text) if site_text else 1
        for token in tokens:
            name = (row[f"FileName_{token}"] or "").strip()
            if not name:
                continue  # reported as a missing channel for this site
            folder_text = (row.get(f"PathName_{token}") or "").strip()
            path = Path(folder_text) / name if folder_text else Path(name)
            if not path.is_absolute():
                path = base / path
            if not path.is_file():
                raise BioembedInputError(
                    f"image listed for site {site} channel {token} ({where_csv}, line {i + 2}) does not exist",
                    plate=plate,
                    well=well,
                    path=display_path(path),
                )
            collector.add(well, site, token, path, f"{display_path(path)} ({line})")
    if not collector:
        raise BioembedInputError(f"LoadData CSV has no rows for plate {plate!r}", plate=plate, path=where_csv)
    return collector.file_fields(lambda well, site, key, stain, example: f"a FileName_{key} for this site in the CSV",
                                 expected_is_path=False)
