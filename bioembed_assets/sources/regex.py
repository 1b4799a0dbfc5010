"""A generic layout: image files named by a regular expression with named groups.

Option `pattern` (required) names the groups:

- ``well`` (e.g. ``B07``, ``b7``) **or** ``row`` + ``col`` (row a letter ``B`` or a 1-based number
  ``2``; col a 1-based number);
- ``channel`` (required): the token the channel map maps to a stain;
- ``site`` (optional, default 1): the 1-based field number;
- ``plate`` (optional): files whose plate group differs from the plate being read are skipped.

Every image file under the plate folder (recursively unless `recursive` is false) is tried: the
pattern must match the whole file name, or the whole path relative to the plate folder (with ``/``
separators, for patterns that name folders). Files that do not match are ignored.

Example, BBBC013 / CellProfiler ExampleSBS (``Channel2-31-C-07.tif``)::

    pattern = 'Channel(?P<channel>\\d)-\\d+-(?P<row>[A-H])-(?P<col>\\d+)\\.tif'
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
    canonical_well,
    display_path,
    require_folder,
    scan_image_files,
    well_from_row_col,
)


def compile_pattern(pattern: str, plate: str | None = None) -> re.Pattern[str]:
    """Compile and check a regex-layout pattern (groups `channel` and `well` or `row`+`col`)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise BioembedInputError(f"layout 'regex': invalid pattern {pattern!r}: {e}", plate=plate) from None
    groups = set(rx.groupindex)
    if "channel" not in groups or not ("well" in groups or {"row", "col"} <= groups):
        raise BioembedInputError(
            f"layout 'regex': pattern {pattern!r} needs named groups (?P<channel>...) and (?P<well>...) or "
            f"(?P<row>...) + (?P<col>...); it has {sorted(groups)}",
            plate=plate,
        )
    return rx


def list_regex_fields(
    plate_dir: Path, plate: str, channel_map: dict[Any, str], *, pattern: str, recursive: bool | str = True
) -> list[FieldFiles]:
    """All fields of a plate folder whose image file names match `pattern`, sorted by (well, site)."""
    rx = compile_pattern(pattern, plate)
    cmap = ChannelMap(channel_map, plate)
    folder = require_folder(plate_dir, plate)
    collector = FieldCollector(plate, cmap)
    for path in scan_image_files(folder, plate, recursive=as_bool(recursive, "recursive")):
        m = rx.fullmatch(path.name) or rx.fullmatch(path.relative_to(folder).as_posix())
        if not m:
            continue
        groups = m.groupdict()
        if groups.get("plate") is not None and groups["plate"] != plate:
            continue
        where = display_path(path)
        if groups.get("well") is not None:
            well = canonical_well(groups["well"], plate=plate, path=where)
        else:
            well = well_from_row_col(groups["row"] or "", groups["col"] or "", plate=plate, path=where)
        site_text = groups.get("site")
        if site_text is not None and not site_text.isdigit():
            raise BioembedInputError(f"site {site_text!r} is not a number", plate=plate, well=well, path=where)
        collector.add(well, int(site_text) if site_text else 1, groups["channel"], path, where)
    if not collector:
        raise BioembedInputError(f"no image files match the pattern {pattern!r}", plate=plate, path=display_path(folder))
    return collector.file_fields()
