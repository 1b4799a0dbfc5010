"""Data contracts shared by every room: channel vocabulary, control types, column names, ids."""

from __future__ import annotations

import re
from pathlib import Path

CELL_PAINTING_CHANNELS: tuple[str, ...] = ("DNA", "ER", "RNA", "AGP", "Mito")
"""The five Cell Painting stains, in bioembed's canonical order."""


class ControlType:
    """Values of the `control_type` column."""

    NEGATIVE = "negative"
    POSITIVE = "positive"
    TREATMENT = "treatment"
    ALL = (NEGATIVE, POSITIVE, TREATMENT)


# Column names used in tables, the lake and SQL (snake_case everywhere).
PLATE, WELL, SITE, FIELD, CELL_ID = "plate", "well", "site", "field", "cell_id"
PERTURBATION, CONTROL_TYPE, MOA = "perturbation", "control_type", "moa"
ENCODER, ENCODER_VERSION, RECIPE = "encoder", "encoder_version", "recipe"
FEATURES = "features"
"""List-of-float32 column holding an embedding or a profile vector."""

PLATEMAP_COLUMNS: tuple[str, ...] = (PLATE, WELL, PERTURBATION, CONTROL_TYPE, MOA)

_PLATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_WELL_NAME = re.compile(r"^([A-Z]{1,2})(\d{1,2})$")


class BioembedInputError(ValueError):
    """Bad input data; the message names the plate, well and/or file and what was expected."""

    def __init__(
        self,
        message: str,
        *,
        plate: str | None = None,
        well: str | None = None,
        path: str | Path | None = None,
    ) -> None:
        where = ", ".join(
            f"{k}={v}" for k, v in (("plate", plate), ("well", well), ("file", path)) if v is not None
        )
        super().__init__(f"[{where}] {message}" if where else message)
        self.plate, self.well, self.path = plate, well, path


def validate_plate_name(name: str) -> str:
    """Return `name` if it is a safe plate id (no path separators, no `..`), else raise."""
    if not _PLATE_NAME.match(name) or ".." in name:
        raise BioembedInputError(
            f"invalid plate name {name!r}: expected letters, digits, '_', '-', '.' "
            "(no path separators, no '..', at most 128 characters)",
            plate=name,
        )
    return name


def well_name(row: int, column: int) -> str:
    """Well id from 1-based row/column: (1, 1) -> 'A01', (16, 24) -> 'P24'."""
    if row < 1 or column < 1:
        raise ValueError(f"row and column are 1-based, got ({row}, {column})")
    letters = ""
    r = row
    while r:
        r, rem = divmod(r - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return f"{letters}{column:02d}"


def parse_well(well: str) -> tuple[int, int]:
    """1-based (row, column) of a well id such as 'B07'."""
    m = _WELL_NAME.match(well)
    if not m:
        raise BioembedInputError(f"invalid well id {well!r}: expected e.g. 'A01'", well=well)
    row = 0
    for ch in m.group(1):
        row = row * 26 + (ord(ch) - ord("A") + 1)
    return row, int(m.group(2))
