"""Reader for an OME-Zarr (OME-NGFF) high-content-screening plate.

Both NGFF 0.4 (zarr v2: metadata in ``.zattrs``) and NGFF 0.5 (zarr v3: metadata under the ``ome`` key
of ``zarr.json`` attributes) are read, through zarr-python. The layout::

    <plate>.zarr/            plate metadata: rows, columns, wells [{path "A/1", rowIndex, columnIndex}]
        A/1/                 well metadata: images [{path "0"}, {path "1"}, ...]   (one per field)
            0/               multiscales[0]: axes (t?, c?, z?, y, x), datasets[0] = full resolution
                0            the level-0 array

Each field's level-0 array is read at t = option `t` (default 0) and z = option `z`: a plane index
(default 0) or ``"max"`` for a maximum-intensity projection over z. Channel tokens are the channel
indices as strings (``"0"``, ``"1"``, ...) or the ``omero`` channel labels; a channel matches a map key
by its label first, then by its index. Sites are the 1-based positions in the well's ``images`` list.

The plate folder may be the ``.zarr`` itself, a folder holding ``<plate>.zarr``, or a folder holding a
single ``*.zarr``; option `store` names the store explicitly (relative to the plate folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from bioembed_assets.schema import BioembedInputError
from bioembed_assets.sources.layouts import (
    ChannelMap,
    FieldCollector,
    as_int,
    canonical_well,
    display_path,
    require_folder,
    well_from_row_col,
)


@dataclass(frozen=True)
class ZarrField:
    """One field of an OME-Zarr plate: channels of its level-0 array, a `FieldSource`."""

    plate: str
    well: str
    site: int
    store: Path
    array_path: str
    """Path of the level-0 array inside `store`, e.g. 'A/1/0/0'."""
    axes: str
    """Axis names of the array, e.g. 'tczyx'."""
    channels: dict[str, int]
    """stain -> channel index."""
    z: int | str = 0
    t: int = 0

    @property
    def stains(self) -> tuple[str, ...]:
        return tuple(self.channels)

    def _array(self) -> zarr.Array:
        node = zarr.open(store=str(self.store / self.array_path), mode="r")
        assert isinstance(node, zarr.Array)
        return node

    def _selection(self, stain: str) -> tuple[Any, ...]:
        sel: list[Any] = []
        for name in self.axes:
            if name == "t":
                sel.append(self.t)
            elif name == "c":
                sel.append(self.channels[stain])
            elif name == "z":
                sel.append(slice(None) if self.z == "max" else self.z)
            else:
                sel.append(slice(None))
        return tuple(sel)

    def read(self, stain: str) -> np.ndarray:
        arr = self._array()
        data = np.asarray(arr[self._selection(stain)])
        if self.z == "max" and "z" in self.axes:
            data = data.max(axis=0)
        return data

    def header(self, stain: str) -> tuple[tuple[int, ...], np.dtype]:
        arr = self._array()
        keep = [s for name, s in zip(self.axes, arr.shape) if name not in "tcz"]
        return tuple(int(s) for s in keep), np.dtype(arr.dtype)

    def location(self, stain: str) -> str:
        z = "max" if self.z == "max" else self.z
        return f"{display_path(self.store)}/{self.array_path} [c={self.channels[stain]}, t={self.t}, z={z}]"


def _ome(attrs: dict[str, Any]) -> dict[str, Any]:
    """NGFF 0.5 keeps its metadata under 'ome'; 0.4 at the top level."""
    return attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs


def _find_store(folder: Path, plate: str, store: str | None) -> Path:
    if store:
        path = Path(store) if Path(store).is_absolute() else folder / store
        if not path.is_dir():
            raise BioembedInputError("OME-Zarr store does not exist", plate=plate, path=display_path(path))
        return path
    if folder.suffix.lower() == ".zarr":
        return folder
    named = folder / f"{plate}.zarr"
    if named.is_dir():
        return named
    stores = sorted(p for p in folder.iterdir() if p.is_dir() and p.suffix.lower() == ".zarr")
    if len(stores) == 1:
        return stores[0]
    raise BioembedInputError(
        f"expected an OME-Zarr plate {plate}.zarr (or a single *.zarr) in the plate folder, found "
        f"{[p.name for p in stores] or 'none'}",
        plate=plate,
        path=display_path(folder),
    )


def _open_group(path: Path, plate: str) -> zarr.Group:
    try:
        node = zarr.open_group(store=str(path), mode="r")
    except Exception as e:  # noqa: BLE001 - missing/corrupt metadata
        raise BioembedInputError(f"cannot open zarr group: {type(e).__name__}: {e}", plate=plate,
                                 path=display_path(path)) from e
    return node


def _axes(ms: dict[str, Any], where: str, plate: str, well: str) -> str:
    axes = ms.get("axes")
    names = [a["name"] if isinstance(a, dict) else str(a) for a in axes] if axes else ["t", "c", "z", "y", "x"]
    names = [n.lower() for n in names]
    if names[-2:] != ["y", "x"] or any(n not in "tczyx" for n in names) or len(set(names)) != len(names):
        raise BioembedInputError(f"unsupported multiscales axes {names}: expected (t?, c?, z?, y, x)", plate=plate,
                                 well=well, path=where)
    return "".join(names)


def list_omezarr_fields(
    plate_dir: Path, plate: str, channel_map: dict[Any, str], *, store: str | None = None, z: int | str = 0,
    t: int | str = 0,
) -> list[ZarrField]:
    """All fields of an OME-Zarr HCS plate, sorted by (well, site). See the module docstring."""
    cmap = ChannelMap(channel_map, plate)
    folder = require_folder(plate_dir, plate)
    z = "max" if str(z).strip().lower() == "max" else as_int(z, "z")
    t = as_int(t, "t")
    root = _find_store(folder, plate, store)
    where_root = display_path(root)
    meta = _ome(dict(_open_group(root, plate).attrs))
    plate_meta = meta.get("plate")
    if not isinstance(plate_meta, dict):
        raise BioembedInputError("not an OME-Zarr HCS plate: no 'plate' metadata in the root group", plate=plate,
                                 path=where_root)
    rows = [r.get("name", "") for r in plate_meta.get("rows", [])]
    columns = [c.get("name", "") for c in plate_meta.get("columns", [])]
    wells = plate_meta.get("wells", [])
    if not wells:
        raise BioembedInputError("OME-Zarr plate lists no wells", plate=plate, path=where_root)
    collector = FieldCollector(plate, cmap)
    for entry in wells:
        well_path = str(entry.get("path", ""))
        where_well = f"{where_root}/{well_path}"
        if "rowIndex" in entry and "columnIndex" in entry and rows and columns:
            well = well_from_row_col(str(rows[entry["rowIndex"]]), str(columns[entry["columnIndex"]]), plate=plate,
                                     path=where_well)
        else:
            parts = well_path.split("/")
            well = (well_from_row_col(parts[0], parts[1], plate=plate, path=where_well) if len(parts) == 2
                    else canonical_well(well_path, plate=plate, path=where_well))
        well_meta = _ome(dict(_open_group(root / well_path, plate).attrs)).get("well", {})
        images = well_meta.get("images", [])
        if not images:
            raise BioembedInputError("well lists no fields (well.images is empty)", plate=plate, well=well,
                                     path=where_well)
        for k, image in enumerate(images):
            field_path = f"{well_path}/{image['path']}"
            where_field = f"{where_root}/{field_path}"
            field_meta = _ome(dict(_open_group(root / field_path, plate).attrs))
            multiscales = field_meta.get("multiscales") or []
            if not multiscales or not multiscales[0].get("datasets"):
                raise BioembedInputError("field has no multiscales datasets", plate=plate, well=well, path=where_field)
            ms = multiscales[0]
            axes = _axes(ms, where_field, plate, well)
            array_path = f"{field_path}/{ms['datasets'][0]['path']}"
            try:
                arr = zarr.open_array(store=str(root / array_path), mode="r")
            except Exception as e:  # noqa: BLE001
                raise BioembedInputError(f"cannot open level-0 array: {type(e).__name__}: {e}", plate=plate,
                                         well=well, path=f"{where_root}/{array_path}") from e
            if len(arr.shape) != len(axes):
                raise BioembedInputError(f"array has {len(arr.shape)} dimensions but axes {axes!r}", plate=plate,
                                         well=well, path=f"{where_root}/{array_path}")
            n_channels = arr.shape[axes.index("c")] if "c" in axes else 1
            labels = [ch.get("label") for ch in (field_meta.get("omero") or {}).get("channels", [])]
            site = k + 1
            base = ZarrField(plate, well, site, root, array_path, axes, {}, z, t)
            for c in range(n_channels):
                label = labels[c] if c < len(labels) else None
                token = str(label) if label is not None and cmap.lookup(str(label)) is not None else str(c)
                where = f"{where_root}/{array_path} [c={c}]"
                if cmap.lookup(token) is None:
                    shown = f"{c}" + (f" (label {label!r})" if label is not None else "")
                    raise cmap.unknown(shown, well=well, path=where, what="channel index")
                collector.add(well, site, token, (base, c), where)
    fields = []
    for (well, site), items in collector.complete(expected_is_path=False):
        base = next(iter(items.values()))[0]
        fields.append(ZarrField(plate, well, site, root, base.array_path, base.axes,
                                {stain: c for stain, (_, c) in items.items()}, z, t))
    return fields
