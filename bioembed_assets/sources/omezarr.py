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

Bad stores raise BioembedInputError naming plate, well and zarr path: malformed metadata (a well, image
or dataset entry without a `path`, a `rowIndex`/`columnIndex` that is not an index into `rows`/
`columns`), a well/field/dataset path that leaves the store (absolute, with `..`, or resolving outside
it through a link), and chunks missing from the store (zarr would read them as the fill value): each
chunk (or shard) a field's planes are read from must be stored. Inner chunks absent from a stored shard
are not detected.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from bioembed_assets.schema import BioembedInputError
from bioembed_assets.sources.layouts import (
    LENGTH_UNITS_UM,
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
    pixel_size_um: float | None = None
    """The level-0 x scale in micrometres when the multiscales metadata gives a space unit."""

    @property
    def stains(self) -> tuple[str, ...]:
        return tuple(self.channels)

    def _array(self) -> zarr.Array:
        node = zarr.open(store=str(self.store / self.array_path), mode="r")
        assert isinstance(node, zarr.Array)
        return node

    def _index(self, arr: zarr.Array, axis: str, value: int, stain: str) -> int:
        n = arr.shape[self.axes.index(axis)]
        if not 0 <= value < n:
            what = {"t": "option t", "z": "option z", "c": "channel index"}[axis]
            raise BioembedInputError(f"{what} {value} is out of range: the array has {n} along axis {axis!r}",
                                     plate=self.plate, well=self.well, path=self.location(stain))
        return value

    def _selection(self, arr: zarr.Array, stain: str) -> tuple[int | slice, ...]:
        """The index of `stain`'s plane(s) in the level-0 array (t, c and z checked to be in range)."""
        sel: list[int | slice] = []
        for name in self.axes:
            if name == "t":
                sel.append(self._index(arr, "t", self.t, stain))
            elif name == "c":
                sel.append(self._index(arr, "c", self.channels[stain], stain))
            elif name == "z" and self.z != "max":
                sel.append(self._index(arr, "z", int(self.z), stain))
            else:
                sel.append(slice(None))
        return tuple(sel)

    def _check_chunks(self, arr: zarr.Array, stain: str) -> tuple[int | slice, ...]:
        """The selection of `stain`; raises if a chunk (a shard, when sharded) it touches is not stored.

        zarr reads a missing chunk as the fill value without a word; a deleted chunk file would be
        ingested as zeros. The keys come from zarr (`encode_chunk_key`: v2 `0.0.0` or `0/0/0`, v3
        `c/0/0/0`), checked as files of the (local) array folder.
        """
        sel = self._selection(arr, stain)
        grid = arr.shards or arr.chunks
        ranges = [range(s // g, s // g + 1) if isinstance(s, int) else range(-(-n // g))
                  for s, n, g in zip(sel, arr.shape, grid)]
        folder = self.store / self.array_path
        for coords in itertools.product(*ranges):
            key = arr.metadata.encode_chunk_key(coords)
            if not (folder / key).is_file():
                raise BioembedInputError(
                    f"missing chunk {key!r} of site {self.site} channel {stain} (c={self.channels[stain]}): the store "
                    "lacks these pixels (zarr would read them as the fill value); re-export the plate or remove "
                    "the field", plate=self.plate, well=self.well, path=self.location(stain))
        return sel

    def read(self, stain: str) -> np.ndarray:
        arr = self._array()
        data = np.asarray(arr[self._check_chunks(arr, stain)])
        if self.z == "max" and "z" in self.axes:
            data = data.max(axis=0)
        return data

    def header(self, stain: str) -> tuple[tuple[int, ...], np.dtype]:
        arr = self._array()
        self._selection(arr, stain)
        keep = [s for name, s in zip(self.axes, arr.shape) if name not in "tcz"]
        return tuple(int(s) for s in keep), np.dtype(arr.dtype)

    def check_stored(self, stain: str) -> None:
        """Raise unless every chunk `read(stain)` needs is stored (a stat per chunk, no decoding).

        Kept out of `header` so that callers bound the image size first (a huge array has as many keys)."""
        self._check_chunks(self._array(), stain)

    def location(self, stain: str) -> str:
        z = "max" if self.z == "max" else self.z
        return f"{display_path(self.store)}/{self.array_path} [c={self.channels[stain]}, t={self.t}, z={z}]"


def _ome(attrs: dict[str, Any]) -> dict[str, Any]:
    """NGFF 0.5 keeps its metadata under 'ome'; 0.4 at the top level."""
    return attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs


@dataclass(frozen=True)
class _Where:
    """Plate, well and path for the errors of one metadata node."""

    plate: str
    path: str
    well: str | None = None

    def error(self, message: str) -> BioembedInputError:
        return BioembedInputError(message, plate=self.plate, well=self.well, path=self.path)


def _entries(value: Any, what: str, where: _Where) -> list[dict[str, Any]]:
    """`value` (metadata such as plate.wells or well.images) as a list of objects; raises otherwise."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise where.error(f"malformed OME-Zarr metadata: {what} must be a list of objects, got {value!r:.200}")
    return value


def _child(root: Path, parent: str, entry: dict[str, Any], what: str, where: _Where) -> str:
    """`parent/<entry's path>`, a store-relative path confined to the store `root`.

    The entry's `path` must be a relative path of plain names (no '', '.' or '..' parts, no
    backslashes) that resolves inside the store (links leaving it are refused).
    """
    rel = entry.get("path")
    if not isinstance(rel, str) or not rel.strip("/"):
        raise where.error(f"malformed OME-Zarr metadata: {what} entry without a 'path' ({entry!r:.200})")
    rel = rel.rstrip("/") if not rel.startswith("/") else rel
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise where.error(f"{what} path {rel!r} leaves the store or is not a plain relative path: expected names "
                          "inside the store such as 'A/1' (no absolute paths, '.', '..' or empty parts)")
    full = f"{parent}/{rel}" if parent else rel
    try:
        inside = (root / full).resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError) as e:  # a link loop
        raise where.error(f"{what} path {rel!r} cannot be resolved: {e}") from e
    if not inside:
        raise where.error(f"{what} path {rel!r} resolves outside the store {display_path(root)} (a symbolic link?)")
    return full


def _index(entry: dict[str, Any], key: str, names: list[str], where: _Where) -> str:
    """The name `names[entry[key]]` for a plate well's rowIndex/columnIndex; raises for a bad index."""
    i = entry[key]
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(names):
        raise where.error(f"malformed OME-Zarr metadata: well {key} {i!r} is not an index into the plate's "
                          f"{len(names)} {'rows' if key == 'rowIndex' else 'columns'} (expected 0..{len(names) - 1})")
    return names[i]


def _names(value: Any, what: str, where: _Where) -> list[str]:
    """The `name`s of plate.rows / plate.columns."""
    entries = _entries(value if value is not None else [], f"plate.{what}", where)
    names = [e.get("name") for e in entries]
    if not all(isinstance(n, str | int) and not isinstance(n, bool) and str(n).strip() for n in names):
        raise where.error(f"malformed OME-Zarr metadata: every plate.{what} entry needs a 'name', got {names!r:.200}")
    return [str(n) for n in names]


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


def _open_group(path: Path, plate: str, well: str | None = None) -> zarr.Group:
    try:
        node = zarr.open_group(store=str(path), mode="r")
    except Exception as e:  # noqa: BLE001 - missing/corrupt metadata
        raise BioembedInputError(f"cannot open zarr group: {type(e).__name__}: {e}", plate=plate, well=well,
                                 path=display_path(path)) from e
    return node


def _meta(path: Path, key: str, where: _Where) -> Any:
    """The NGFF `key` metadata of the group at `path` (None when absent)."""
    return _ome(dict(_open_group(path, where.plate, where.well).attrs)).get(key)


def _axes(ms: dict[str, Any], where: _Where) -> str:
    axes = ms.get("axes")
    if axes is not None and not isinstance(axes, list):
        raise where.error(f"malformed OME-Zarr metadata: multiscales axes must be a list, got {axes!r:.200}")
    names = [a.get("name") if isinstance(a, dict) else a for a in axes] if axes else ["t", "c", "z", "y", "x"]
    if not all(isinstance(n, str) for n in names):
        raise where.error(f"malformed OME-Zarr metadata: every multiscales axis needs a 'name', got {axes!r:.200}")
    names = [n.lower() for n in names]
    if names[-2:] != ["y", "x"] or any(n not in "tczyx" for n in names) or len(set(names)) != len(names):
        raise where.error(f"unsupported multiscales axes {names}: expected (t?, c?, z?, y, x)")
    return "".join(names)


def _pixel_size_um(ms: dict[str, Any], dataset: dict[str, Any]) -> float | None:
    """x pixel size (µm) of a multiscales level: its (and the multiscale's) `scale` along x, when x has a
    known space unit; None otherwise (no unit means no physical size)."""
    axes = [a for a in ms.get("axes") or [] if isinstance(a, dict)]
    names = [str(a.get("name", "")).lower() for a in axes]
    if "x" not in names or axes[names.index("x")].get("unit") not in LENGTH_UNITS_UM:
        return None
    size = LENGTH_UNITS_UM[axes[names.index("x")]["unit"]]
    for transforms in (dataset.get("coordinateTransformations"), ms.get("coordinateTransformations")):
        for tr in transforms or []:
            scale = tr.get("scale") if isinstance(tr, dict) and tr.get("type") == "scale" else None
            if isinstance(scale, list) and len(scale) == len(names) and isinstance(scale[names.index("x")], (int, float)):
                size *= float(scale[names.index("x")])
    return size if size > 0 else None


def _well_id(entry: dict[str, Any], well_path: str, rows: list[str], columns: list[str], where: _Where) -> str:
    """The well id of a plate.wells entry: from rowIndex/columnIndex when given, else from its path."""
    if "rowIndex" in entry and "columnIndex" in entry and rows and columns:
        return well_from_row_col(_index(entry, "rowIndex", rows, where), _index(entry, "columnIndex", columns, where),
                                 plate=where.plate, path=where.path)
    parts = well_path.split("/")
    return (well_from_row_col(parts[0], parts[1], plate=where.plate, path=where.path) if len(parts) == 2
            else canonical_well(well_path, plate=where.plate, path=where.path))


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
    at_root = _Where(plate, where_root)
    plate_meta = _meta(root, "plate", at_root)
    if not isinstance(plate_meta, dict):
        raise at_root.error("not an OME-Zarr HCS plate: no 'plate' metadata in the root group")
    rows = _names(plate_meta.get("rows"), "rows", at_root)
    columns = _names(plate_meta.get("columns"), "columns", at_root)
    wells = _entries(plate_meta.get("wells", []), "plate.wells", at_root)
    if not wells:
        raise at_root.error("OME-Zarr plate lists no wells")
    collector = FieldCollector(plate, cmap)
    for entry in wells:
        well_path = _child(root, "", entry, "plate.wells", at_root)
        at_well = _Where(plate, f"{where_root}/{well_path}")
        well = _well_id(entry, well_path, rows, columns, at_well)
        at_well = _Where(plate, at_well.path, well)
        well_meta = _meta(root / well_path, "well", at_well)
        if well_meta is not None and not isinstance(well_meta, dict):
            raise at_well.error(f"malformed OME-Zarr metadata: 'well' must be an object, got {well_meta!r:.200}")
        images = _entries((well_meta or {}).get("images", []), "well.images", at_well)
        if not images:
            raise at_well.error("well lists no fields (well.images is empty)")
        for k, image in enumerate(images):
            field_path = _child(root, well_path, image, "well.images", at_well)
            at_field = _Where(plate, f"{where_root}/{field_path}", well)
            field_meta = _ome(dict(_open_group(root / field_path, plate, well).attrs))
            multiscales = _entries(field_meta.get("multiscales") or [], "multiscales", at_field)
            if not multiscales:
                raise at_field.error("field has no multiscales datasets")
            ms = multiscales[0]
            datasets = _entries(ms.get("datasets") or [], "multiscales[0].datasets", at_field)
            if not datasets:
                raise at_field.error("field has no multiscales datasets")
            axes = _axes(ms, at_field)
            array_path = _child(root, field_path, datasets[0], "multiscales[0].datasets", at_field)
            where_array = f"{where_root}/{array_path}"
            try:
                arr = zarr.open_array(store=str(root / array_path), mode="r")
            except Exception as e:  # noqa: BLE001
                raise BioembedInputError(f"cannot open level-0 array: {type(e).__name__}: {e}", plate=plate,
                                         well=well, path=where_array) from e
            if len(arr.shape) != len(axes):
                raise BioembedInputError(f"array has {len(arr.shape)} dimensions but axes {axes!r}", plate=plate,
                                         well=well, path=where_array)
            n_channels = arr.shape[axes.index("c")] if "c" in axes else 1
            omero = field_meta.get("omero")
            channels = _entries((omero if isinstance(omero, dict) else {}).get("channels") or [], "omero.channels",
                                at_field)
            labels = [ch.get("label") for ch in channels]
            site = k + 1
            base = ZarrField(plate, well, site, root, array_path, axes, {}, z, t, _pixel_size_um(ms, datasets[0]))
            for c in range(n_channels):
                label = labels[c] if c < len(labels) else None
                token = str(label) if label is not None and cmap.lookup(str(label)) is not None else str(c)
                where = f"{where_array} [c={c}]"
                if cmap.lookup(token) is None:
                    shown = f"{c}" + (f" (label {label!r})" if label is not None else "")
                    raise cmap.unknown(shown, well=well, path=where, what="channel index")
                collector.add(well, site, token, (base, c), where)
    fields = []
    for (well, site), items in collector.complete(expected_is_path=False):
        base = next(iter(items.values()))[0]
        fields.append(ZarrField(plate, well, site, root, base.array_path, base.axes,
                                {stain: c for stain, (_, c) in items.items()}, z, t, base.pixel_size_um))
    return fields
