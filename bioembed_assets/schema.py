"""Data contracts shared by every room: channel vocabulary, control types, column names, ids."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

ProgressCallback = Callable[[int, int], None]
"""`progress(done, total)`: what long library steps call as they go (fields of a plate, crops of a store)."""

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
BATCH, COMPOUND = "batch", "compound"
"""Optional design columns of well profiles: the batch a plate belongs to (e.g. its week; absent or
null: the plate itself) and the compound of a treatment (absent or null: the perturbation, e.g. one
compound at several doses is several perturbations of one compound). See `design.py`."""
ENCODER, ENCODER_VERSION, RECIPE = "encoder", "encoder_version", "recipe"
FEATURES = "features"
"""List-of-float32 column holding an embedding or a profile vector."""

PLATEMAP_COLUMNS: tuple[str, ...] = (PLATE, WELL, PERTURBATION, CONTROL_TYPE, MOA)

# Used with `fullmatch`: `re.match` with `$` would accept a trailing newline ("IP0\n").
_PLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_WELL_NAME = re.compile(r"([A-Z]{1,2})(\d{1,2})")


def printable(value: object) -> str:
    """`value` as text that always encodes as UTF-8: undecodable file-name bytes (surrogates) escaped."""
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _shown(value: object) -> str:
    """`printable(value)`, with control characters (a trailing newline) escaped as in a repr."""
    text = printable(value)
    return text if text.isprintable() else repr(text)[1:-1]


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
            f"{k}={_shown(v)}" for k, v in (("plate", plate), ("well", well), ("file", path)) if v is not None
        )
        message = printable(message)
        super().__init__(f"[{where}] {message}" if where else message)
        self.plate, self.well, self.path = plate, well, path


def validate_plate_name(name: str) -> str:
    """Return `name` if it is a safe plate id (no path separators, no `..`), else raise."""
    if not isinstance(name, str) or not _PLATE_NAME.fullmatch(name) or ".." in name:
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
    m = _WELL_NAME.fullmatch(well) if isinstance(well, str) else None
    if not m:
        raise BioembedInputError(f"invalid well id {well!r}: expected e.g. 'A01'", well=well)
    row = 0
    for ch in m.group(1):
        row = row * 26 + (ord(ch) - ord("A") + 1)
    return row, int(m.group(2))
