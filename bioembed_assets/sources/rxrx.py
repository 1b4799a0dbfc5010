"""Reader for the Recursion RxRx layout: one PNG per (well, site, channel), ``<well>_s<site>_w<channel>.png``.

E.g. RxRx1's ``images/HEPG2-01/Plate1/B02_s1_w3.png``: the plate folder is ``.../Plate1``. Channel
tokens are the ``w`` numbers (map ``"w1"`` or ``"1"``). RxRx1 uses w1 Hoechst (nuclei), w2 ConA (ER),
w3 phalloidin (actin), w4 SYTO14 (nucleoli/RNA), w5 MitoTracker (mitochondria), w6 WGA (Golgi and
membranes); check the dataset's own metadata. PNGs are 8-bit (RxRx1) or 16-bit; both are read with Pillow.
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
    canonical_well,
    display_path,
    require_folder,
    scan_image_files,
)

RXRX_NAME = re.compile(r"^(?P<well>[A-Za-z]{1,2}\d{1,3})_s(?P<site>\d+)_w(?P<channel>\d+)\.png\Z", re.IGNORECASE)
"""Groups: well, site, channel."""


def list_rxrx_fields(plate_dir: Path, plate: str, channel_map: dict[Any, str]) -> list[FieldFiles]:
    """All fields of an RxRx plate folder (PNGs directly in it), sorted by (well, site)."""
    cmap = ChannelMap(channel_map, plate, prefixes=("w",))
    folder = require_folder(plate_dir, plate)
    collector = FieldCollector(plate, cmap)
    for path in scan_image_files(folder, plate):
        m = RXRX_NAME.match(path.name)
        if not m:
            continue
        where = display_path(path)
        collector.add(canonical_well(m["well"], plate=plate, path=where), int(m["site"]), m["channel"], path, where)
    if not collector:
        raise BioembedInputError("no RxRx images (<well>_s<site>_w<channel>.png) found", plate=plate,
                                 path=display_path(folder))

    def expected(well: str, site: int, key: str, stain: str, example: Path) -> str:
        return display_path(example.with_name(f"{example.name.split('_s')[0]}_s{site}_w{cmap.normalize(key)}.png"))

    return collector.file_fields(expected)
