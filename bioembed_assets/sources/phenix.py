"""Reader for the Opera Phenix / Cell Painting Gallery layout: `r{RR}c{CC}f{FF}p{PP}-ch{K}sk1fk1fl1.tiff`.

One TIFF per (well, field, plane, channel), in `<plate>/Images/` or the plate folder itself. Only one
plane is read (option `plane`, default 1). Phenix channel numbers are mapped to stain names by a
channel map, e.g. ``{1: "DNA", 2: "ER", 3: "RNA", 4: "AGP", 5: "Mito"}`` (keys `1`, `"1"` or `"ch1"`;
the mapping differs between screens: check the acquisition metadata or CellProfiler's
`Image_FileName_Orig*` columns).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bioembed_assets.schema import BioembedInputError, well_name
from bioembed_assets.sources.layouts import (
    LENGTH_UNITS_UM,
    ChannelMap,
    FieldCollector,
    FieldFiles,
    as_int,
    display_path,
    require_folder,
    scan_image_files,
)

__all__ = ["PHENIX_NAME", "FieldFiles", "list_phenix_fields"]

PHENIX_NAME = re.compile(r"^r(\d+)c(\d+)f(\d+)p(\d+)-ch(\d+)(?:sk\d+fk\d+fl\d+)?\.tiff?\Z", re.IGNORECASE)
"""Groups: row, column, field, plane, channel."""


def _image_dir(plate_dir: Path) -> Path:
    images = plate_dir / "Images"
    return images if images.is_dir() else plate_dir


def list_phenix_fields(
    plate_dir: Path, plate: str, channel_map: dict[int, str] | dict[str, str] | dict[Any, str], *, plane: int | str = 1
) -> list[FieldFiles]:
    """All fields (of one plane) of a Phenix plate folder (`plate_dir/Images` or `plate_dir`), sorted by
    well then site.

    Raises BioembedInputError for a missing/empty folder, a channel number not in `channel_map`,
    duplicate files for one (well, site, channel), or a site lacking one of the mapped channels.
    """
    cmap = ChannelMap(channel_map, plate, prefixes=("ch",))
    plane = as_int(plane, "plane")
    folder = _image_dir(require_folder(plate_dir, plate))
    collector = FieldCollector(plate, cmap)
    for path in scan_image_files(folder, plate):
        m = PHENIX_NAME.match(path.name)
        if not m:
            continue
        row, col, site, p, channel = (int(g) for g in m.groups())
        if p != plane:
            continue
        collector.add(well_name(row, col), site, str(channel), path, display_path(path))
    if not collector:
        raise BioembedInputError(
            f"no Phenix images (rRRcCCfFFpPP-chKsk1fk1fl1.tiff, plane {plane}) found", plate=plate,
            path=display_path(folder),
        )

    def expected(well: str, site: int, key: str, stain: str, example: Path) -> str:
        m = PHENIX_NAME.match(example.name)
        assert m is not None
        token = cmap.normalize(key)
        return display_path(example.with_name(example.name[: m.start(5)] + token + example.name[m.end(5) :]))

    return collector.file_fields(expected, pixel_size_um=phenix_pixel_size_um(folder))


def phenix_pixel_size_um(folder: Path) -> float | None:
    """The image pixel size (µm) from the Harmony/Phenix `Index.xml` (or `Index.idx.xml`) beside the images:
    the first `ImageResolutionX` (in metres in Harmony exports); None when there is no such file or value."""
    import xml.etree.ElementTree as ET

    for name in ("Index.xml", "Index.idx.xml", "Index.ref.xml"):
        for path in (folder / name, folder.parent / name):
            if not path.is_file():
                continue
            try:
                for _, element in ET.iterparse(path):
                    if element.tag.rsplit("}", 1)[-1] == "ImageResolutionX" and (element.text or "").strip():
                        factor = LENGTH_UNITS_UM.get(str(element.get("Unit", "m")).strip(), None)
                        value = float(element.text) * factor if factor else None
                        return value if value and value > 0 else None
            except (ET.ParseError, ValueError):
                return None
            return None
    return None
