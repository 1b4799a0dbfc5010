"""Reader for the Opera Phenix / Cell Painting Gallery layout: `r{RR}c{CC}f{FF}p{PP}-ch{K}sk1fk1fl1.tiff`.

One TIFF per (well, field, plane, channel). Only plane 1 is read. Phenix channel numbers are mapped to
stain names by a channel map, e.g. ``{1: "DNA", 2: "ER", 3: "RNA", 4: "AGP", 5: "Mito"}`` (the
mapping differs between screens: check the acquisition metadata).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bioembed_assets.schema import BioembedInputError, well_name

PHENIX_NAME = re.compile(r"^r(\d+)c(\d+)f(\d+)p(\d+)-ch(\d+)(?:sk\d+fk\d+fl\d+)?\.tiff?$", re.IGNORECASE)
"""Groups: row, column, field, plane, channel."""


@dataclass(frozen=True)
class FieldFiles:
    """The image files of one field of view (site), keyed by stain name."""

    plate: str
    well: str
    site: int
    paths: dict[str, Path]


def _image_dir(plate_dir: Path) -> Path:
    images = plate_dir / "Images"
    return images if images.is_dir() else plate_dir


def list_phenix_fields(plate_dir: Path, plate: str, channel_map: dict[int, str]) -> list[FieldFiles]:
    """All plane-1 fields of a Phenix plate folder (`plate_dir/Images` or `plate_dir`), sorted by well then site.

    Raises BioembedInputError for a missing/empty folder, a channel number not in `channel_map`,
    duplicate files for one (well, site, channel), or a site lacking one of the mapped channels.
    """
    plate_dir = Path(plate_dir)
    if len(set(channel_map.values())) != len(channel_map):
        raise BioembedInputError(f"channel map has repeated stain names: {channel_map}", plate=plate)
    if not plate_dir.is_dir():
        raise BioembedInputError("plate folder does not exist", plate=plate, path=plate_dir)
    folder = _image_dir(plate_dir)
    found: dict[tuple[int, int, int], dict[int, Path]] = {}
    template: dict[tuple[int, int, int], Path] = {}  # one file of each site, to spell missing names
    for path in sorted(folder.iterdir()):
        m = PHENIX_NAME.match(path.name)
        if not m or not path.is_file():
            continue
        row, col, site, plane, channel = (int(g) for g in m.groups())
        if plane != 1:
            continue
        well = well_name(row, col)
        if channel not in channel_map:
            raise BioembedInputError(
                f"channel {channel} is not in the channel map {channel_map}; add it (or map it) to read this plate",
                plate=plate,
                well=well,
                path=path,
            )
        channels = found.setdefault((row, col, site), {})
        if channel in channels:
            raise BioembedInputError(
                f"duplicate image for site {site} channel {channel}: {channels[channel].name} and {path.name}",
                plate=plate,
                well=well,
                path=path,
            )
        channels[channel] = path
        template.setdefault((row, col, site), path)
    if not found:
        raise BioembedInputError(
            "no Phenix images (rRRcCCfFFpPP-chKsk1fk1fl1.tiff) found", plate=plate, path=folder
        )
    fields = []
    for (row, col, site), channels in sorted(found.items()):
        well = well_name(row, col)
        missing = sorted(set(channel_map) - set(channels))
        if missing:
            name = template[(row, col, site)].name
            m = PHENIX_NAME.match(name)
            assert m is not None
            expected = [name[: m.start(5)] + str(ch) + name[m.end(5) :] for ch in missing]
            raise BioembedInputError(
                f"site {site} is missing channel(s) {missing}: expected file(s) {', '.join(expected)}",
                plate=plate,
                well=well,
                path=folder / expected[0],
            )
        paths = {channel_map[ch]: channels[ch] for ch in sorted(channels)}
        fields.append(FieldFiles(plate=plate, well=well, site=site, paths=paths))
    return fields
