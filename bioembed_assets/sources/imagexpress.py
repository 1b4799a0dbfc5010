"""Reader for Molecular Devices ImageXpress / MetaXpress plate folders.

Two naming styles, one TIFF per (well, site, channel):

- MetaXpress: ``<anything>_<well>_s<site>_w<channel>[<uuid>].tif``, e.g. ``Plate1_A01_s1_w1A1B2C3.tif``,
  ``Plate1_B02_s3_w2F0F83A3B-0B54-4F65-8A04-5B4E6B1B5C2B.tif``; without a site (one field per well)
  ``Plate1_A01_w1.tif`` (site 1). Channel tokens are the wavelength numbers: map ``"w1"`` or ``"1"``.
  The optional suffix after the channel number is a GUID, or starts with a letter.
- ImageXpress Micro / CellProfiler ExampleHuman: ``<anything>_<well>f<field>d<channel>.tif``, e.g.
  ``AS_09125_050116030001_D03f00d0.tif`` (well D03, field 00, channel index 0): map ``"d0"`` or ``"0"``.
  Fields count from 0 here; bioembed sites from 1 (f00 -> site 1).

Files are found recursively (MetaXpress writes ``<plate>/<date>/<id>/TimePoint_1/``). Thumbnails
(``_thumb`` in the name) and z-planes under ``ZStep_*`` folders are skipped (the projection/single
plane in ``TimePoint_N`` is read), as are ``TimePoint_N`` folders other than option `timepoint`
(default 1).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bioembed_assets.schema import BioembedInputError
from bioembed_assets.sources.layouts import (
    ChannelMap,
    FieldCollector,
    FieldFiles,
    as_bool,
    as_int,
    canonical_well,
    display_path,
    require_folder,
    scan_image_files,
)

_GUID = r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
METAXPRESS_NAME = re.compile(
    rf"^(?:(?P<prefix>.*?)_)?(?P<well>[A-Za-z]{{1,2}}\d{{1,3}})(?:_s(?P<site>\d+))?_w(?P<channel>\d+?)"
    rf"(?P<suffix>{_GUID}|[A-Za-z][0-9A-Za-z-]*)?\.tiff?\Z",
    re.IGNORECASE,
)
"""Groups: prefix, well, site (optional), channel, suffix (optional GUID)."""
EXAMPLEHUMAN_NAME = re.compile(
    r"^(?:(?P<prefix>.*?)_)?(?P<well>[A-Za-z]{1,2}\d{1,3})f(?P<site>\d+)d(?P<channel>\d+)\.tiff?\Z", re.IGNORECASE
)
"""Groups: prefix, well, site (0-based field), channel (0-based index)."""
_TIMEPOINT = re.compile(r"^TimePoint_(\d+)\Z", re.IGNORECASE)


def parse_imagexpress_name(name: str) -> tuple[str, int, str, str] | None:
    """(well text, 1-based site, channel token with its prefix letter, style) of a file name, or None."""
    if "_thumb" in name.lower():
        return None
    m = METAXPRESS_NAME.match(name)
    if m:
        return m["well"], int(m["site"] or 1), f"w{m['channel']}", "metaxpress"
    m = EXAMPLEHUMAN_NAME.match(name)
    if m:
        return m["well"], int(m["site"]) + 1, f"d{m['channel']}", "f_d"
    return None


def list_imagexpress_fields(
    plate_dir: Path, plate: str, channel_map: dict[Any, str], *, recursive: bool | str = True, timepoint: int | str = 1
) -> list[FieldFiles]:
    """All fields of an ImageXpress plate folder, sorted by (well, site). See the module docstring."""
    cmap = ChannelMap(channel_map, plate, prefixes=("w", "d"))
    folder = require_folder(plate_dir, plate)
    timepoint = as_int(timepoint, "timepoint")
    collector = FieldCollector(plate, cmap)
    styles: dict[str, str] = {}
    for path in scan_image_files(folder, plate, recursive=as_bool(recursive, "recursive")):
        parts = path.relative_to(folder).parts[:-1]
        if any(p.lower().startswith("zstep_") for p in parts):
            continue
        if any((m := _TIMEPOINT.match(p)) and int(m.group(1)) != timepoint for p in parts):
            continue
        parsed = parse_imagexpress_name(path.name)
        if parsed is None:
            continue
        well_text, site, token, style = parsed
        where = display_path(path)
        well = canonical_well(well_text, plate=plate, path=where)
        styles.setdefault(style, where)
        collector.add(well, site, token, path, where)
    if not collector:
        raise BioembedInputError(
            "no ImageXpress images (<name>_<well>_s<site>_w<channel>.tif or <name>_<well>f<field>d<channel>.tif) found",
            plate=plate,
            path=display_path(folder),
        )
    if len(styles) > 1:
        raise BioembedInputError(
            f"mixed ImageXpress naming styles in one plate folder: {sorted(styles.values())}", plate=plate,
            path=display_path(folder),
        )
    return collector.file_fields()
