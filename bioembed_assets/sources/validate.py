"""Cheap validation of a raw plate folder before it is registered as a partition."""

from __future__ import annotations

from pathlib import Path

import tifffile

from bioembed_assets.schema import BioembedInputError, validate_plate_name
from bioembed_assets.sources.phenix import list_phenix_fields
from bioembed_assets.sources.platemap import read_platemap
from bioembed_assets.sources.synthetic import SYNTHETIC_CHANNEL_MAP

PLATEMAP_FILE = "platemap.csv"


def check_plate_folder(folder: Path, channel_map: dict[int, str] = SYNTHETIC_CHANNEL_MAP) -> str | None:
    """None if `folder` is a complete, readable plate; otherwise the reason it is not.

    Checks the name, that every site has every expected channel, that every TIFF header
    reads with one shape, and that the platemap parses (with negative controls).
    """
    plate = folder.name
    try:
        validate_plate_name(plate)
        fields = list_phenix_fields(folder, plate, channel_map)
        shapes = set()
        for f in fields:
            for path in f.paths.values():
                try:
                    with tifffile.TiffFile(path) as tif:
                        shapes.add(tif.pages[0].shape)
                except Exception as err:  # any unreadable TIFF header
                    raise BioembedInputError(f"unreadable TIFF ({err})", plate=plate, well=f.well,
                                             path=path) from err
        if len(shapes) > 1:
            raise BioembedInputError(f"images of different shapes {sorted(shapes)}", plate=plate)
        platemap = folder / PLATEMAP_FILE
        if not platemap.exists():
            raise BioembedInputError(f"no {PLATEMAP_FILE} in the plate folder", plate=plate, path=platemap)
        read_platemap(platemap, plate)
    except BioembedInputError as err:
        return str(err)
    return None
