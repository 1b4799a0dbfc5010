"""OME-Zarr (NGFF 0.5, zarr v3) HCS plate stores: the layout bioembed writes its image, corrected-image
and mask stores in, a fast writer for it, and the reader the rest of bioembed uses.

Layout of a plate store (what napari's OME-Zarr plugin, `ome_zarr info` and `ome-zarr-models` read)::

    <plate>.zarr/            ome.plate: rows, columns, wells [{path "A/1", rowIndex, columnIndex}], field_count
                             bioembed: {kind, plate, channels, dtype, wells, sites, fields, ...}
        A/                   row group
        A/1/                 ome.well.images [{path "0"}, {path "1"}, ...]: the well's sites in order
        A/1/0/               ome.multiscales (axes c, y, x; a scale per level; micrometer when known)
                             + ome.omero (channel labels, colours, display windows)
            0, 1, 2          pyramid levels (C, H, W), (C, H/2, W/2), (C, H/4, W/4): one shard file each

A mask store has the same plate → well → field tree; each field holds NGFF `labels` (`labels/nuclei`,
`labels/cells`, image-label multiscales of (y, x) int32 arrays) and its own multiscales image is the
nuclei label image (NGFF hangs labels on an image; pointing the image at the nuclei levels stores them
once). The `bioembed` attribute is bioembed's own, beside (never inside) `ome`: field i of the image table
is `bioembed.fields[i]`, the field group path.

Pyramid levels are every second pixel of the level above (`downsample`), as ome-zarr-py's default
("nearest") scaler makes them; labels must be made that way, and for images a 2×2 mean costs ~5× more
(7.7 vs 1.6 ms per 5 × 1080² uint16 field, measured) for a display-only level.

Why a hand-written writer: zarr-python 3 spends ~10 ms per metadata or array write in its event loop,
several times the cost of reading the TIFFs, and a field here is 4 groups/arrays. Every array of a
store shares one metadata document per level, which zarr itself writes once (`LevelTemplate`); the
field writer copies those bytes and writes each level's one shard file the way zarr's sharding codec
lays it out (inner chunks back to back, then the offsets/sizes table with its crc32c). `write_check`
reads field 0 back through zarr.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec

from bioembed_assets.schema import BioembedInputError, parse_well, well_name
from bioembed_assets.store.atomic import atomic_dir

NGFF_VERSION = "0.5"
LEVELS = 3
"""Pyramid levels written per field: full resolution, 1/2 and 1/4."""
BIOEMBED_KEY = "bioembed"
"""The attribute bioembed keeps its own metadata under, beside NGFF's `ome`."""
Kind = Literal["images", "corrected", "masks"]
NUCLEI, CELLS = "nuclei", "cells"
"""Label names in a mask store."""

_COLOURS = {"DNA": "0000FF", "ER": "00FF00", "RNA": "FFFF00", "AGP": "FF0000", "Mito": "FF00FF",
            "BF": "FFFFFF", "Brightfield": "FFFFFF"}
"""Display colours of the Cell Painting stains (omero `color`); others cycle through `_PALETTE`."""
_PALETTE = ("00FFFF", "FF8000", "8000FF", "80FF00", "FF0080", "0080FF")
_BLOSC: dict[str, tuple[str, int, str]] = {"lz4": ("lz4", 5, "shuffle"), "zstd": ("zstd", 1, "bitshuffle")}


def split_well(well: str) -> tuple[str, int]:
    """(row letters, column number) of a well id: 'B07' -> ('B', 7)."""
    _, col = parse_well(well)  # validates
    return well.rstrip("0123456789"), col


def well_path(well: str) -> str:
    """NGFF path of a well id: 'B07' -> 'B/7'."""
    row, col = split_well(well)
    return f"{row}/{col}"


def downsample(level: np.ndarray) -> np.ndarray:
    """The next pyramid level: every second pixel of the last two axes (nearest)."""
    return np.ascontiguousarray(level[..., ::2, ::2])


def level_shapes(shape: Sequence[int], levels: int = LEVELS) -> list[tuple[int, ...]]:
    """Shapes of the pyramid levels of an array of `shape` (last two axes halved, rounded up)."""
    shapes = [tuple(shape)]
    for _ in range(levels - 1):
        *lead, h, w = shapes[-1]
        shapes.append((*lead, (h + 1) // 2, (w + 1) // 2))
    return shapes


@dataclass(frozen=True)
class PlateLayout:
    """Where each field of a plate lives in its HCS store: field i = (wells[i], sites[i])."""

    plate: str
    wells: tuple[str, ...]
    sites: tuple[int, ...]

    def __post_init__(self) -> None:
        for well in self.wells:
            try:
                parse_well(well)
            except BioembedInputError:
                raise BioembedInputError(f"well id {well!r} cannot be an OME-Zarr well path: expected e.g. 'A01'",
                                         plate=self.plate, well=well) from None

    @property
    def field_paths(self) -> list[str]:
        """Group path of every field, e.g. 'A/1/0' (the well's sites numbered in order of appearance)."""
        seen: dict[str, int] = {}
        paths = []
        for well in self.wells:
            k = seen.get(well, 0)
            seen[well] = k + 1
            paths.append(f"{well_path(well)}/{k}")
        return paths

    def plate_attrs(self) -> dict[str, Any]:
        """NGFF `plate` metadata: rows and columns the plate's wells span, every well with its indices."""
        coords = {w: parse_well(w) for w in dict.fromkeys(self.wells)}
        rows = sorted({r for r, _ in coords.values()})
        cols = sorted({c for _, c in coords.values()})
        wells = [{"path": well_path(w), "rowIndex": rows.index(r), "columnIndex": cols.index(c)}
                 for w, (r, c) in sorted(coords.items(), key=lambda item: item[1])]
        counts = {w: self.wells.count(w) for w in coords}
        row_names = {r: split_well(w)[0] for w, (r, _) in coords.items()}
        return {"version": NGFF_VERSION, "name": self.plate, "rows": [{"name": row_names[r]} for r in rows],
                "columns": [{"name": str(c)} for c in cols], "wells": wells, "field_count": max(counts.values())}

    def well_images(self) -> dict[str, list[str]]:
        """Well path -> its field group names in order."""
        out: dict[str, list[str]] = {}
        for path in self.field_paths:
            well, field = path.rsplit("/", 1)
            out.setdefault(well, []).append(field)
        return out


def _ome(**body: Any) -> dict[str, Any]:
    return {"ome": {"version": NGFF_VERSION, **body}}


def _axes(channel_axis: bool, pixel_size_um: float | None) -> list[dict[str, str]]:
    space = {"type": "space", **({"unit": "micrometer"} if pixel_size_um else {})}
    return ([{"name": "c", "type": "channel"}] if channel_axis else []) + [{"name": "y", **space}, {"name": "x", **space}]


def multiscales(name: str, paths: Sequence[str], *, channel_axis: bool, pixel_size_um: float | None) -> dict[str, Any]:
    """One NGFF `multiscales` entry over `paths` (level l has 2**l times the level-0 pixel size)."""
    step = pixel_size_um or 1.0
    return {"name": name, "axes": _axes(channel_axis, pixel_size_um), "datasets": [
        {"path": p, "coordinateTransformations": [
            {"type": "scale", "scale": [*([1.0] if channel_axis else []), step * 2**lv, step * 2**lv]}]}
        for lv, p in enumerate(paths)]}


def omero(channels: Sequence[str], dtype: np.dtype, ends: Sequence[float]) -> dict[str, Any]:
    """NGFF `omero` rendering metadata: a label, colour and display window per channel."""
    top = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0
    out = []
    for i, name in enumerate(channels):
        colour = _COLOURS.get(name, _PALETTE[i % len(_PALETTE)])
        out.append({"label": name, "color": colour, "active": True, "coefficient": 1.0, "family": "linear",
                    "inverted": False,
                    "window": {"min": 0.0, "max": top, "start": 0.0, "end": float(max(ends[i], 1.0))}})
    return {"channels": out, "rdefs": {"model": "color", "defaultT": 0, "defaultZ": 0}}


def display_ends(stack: np.ndarray) -> list[float]:
    """Per channel, the 99.9th percentile of one (C, H, W) field: the default display window's end."""
    return [float(np.percentile(plane[::4, ::4], 99.9)) for plane in stack]


def blosc_settings(compressor: str) -> tuple[str, int, str] | None:
    """blosc (cname, clevel, shuffle) of a store compressor name; None for "none"; ValueError otherwise.

    Measured on 1080² uint16 Cell Painting planes, one core: lz4-5 byte-shuffle ~1.1 GB/s encode, 1.58x
    smaller; zstd-1 bit-shuffle ~0.28 GB/s, 1.76x. Both cost more CPU than writing the raw bytes (~2 GB/s
    into the page cache), hence the default "none"."""
    if compressor != "none" and compressor not in _BLOSC:
        raise ValueError(f"compressor must be one of 'none', {', '.join(map(repr, _BLOSC))}; got {compressor!r}")
    return _BLOSC.get(compressor)


class LevelTemplate:
    """The zarr.json of one pyramid level, as zarr writes it, shared by every field of a store: (C, h, w)
    or (h, w) arrays, one shard file of (1, h, w) (resp. (h, w)) chunks, `.`-separated chunk keys (a
    single file per level: no folders to make)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, compressor: str, dims: tuple[str, ...]) -> None:
        blosc = blosc_settings(compressor)
        chunks = (1, *shape[1:]) if len(shape) == 3 else shape
        with tempfile.TemporaryDirectory() as scratch:
            array = zarr.create_array(
                Path(scratch) / "a", shape=shape, chunks=chunks, shards=shape, dtype=dtype, fill_value=0,
                compressors=None if blosc is None else [BloscCodec(cname=blosc[0], clevel=blosc[1], shuffle=blosc[2])],
                dimension_names=dims, chunk_key_encoding={"name": "default", "separator": "."}, zarr_format=3,
            )
            self.metadata = (Path(scratch) / "a" / "zarr.json").read_bytes()
            self.shard_name = array.metadata.chunk_key_encoding.encode_chunk_key((0,) * len(shape))
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.codec = None
        if blosc is not None:
            cname, clevel, shuffle = blosc
            self.codec = numcodecs.Blosc.from_config({
                "cname": cname, "clevel": clevel, "blocksize": 0, "typesize": self.dtype.itemsize,
                "shuffle": numcodecs.Blosc.BITSHUFFLE if shuffle == "bitshuffle" else numcodecs.Blosc.SHUFFLE,
            })

    def write(self, array_dir: Path, data: np.ndarray) -> None:
        """Write `data` (this level's shape and dtype) as a new array at `array_dir`."""
        import google_crc32c  # zarr's own dependency (its crc32c codec)

        if data.shape != self.shape or data.dtype != self.dtype:
            raise ValueError(f"level data is {data.shape} {data.dtype}, the store's level is {self.shape} {self.dtype}")
        planes = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).reshape(-1, *self.shape[-2:])
        parts: list[np.ndarray | bytes]
        if self.codec is None:
            parts, sizes = [planes], [planes[0].nbytes] * len(planes)
        else:
            parts = [self.codec.encode(plane) for plane in planes]
            sizes = [len(part) for part in parts]
        table = np.zeros((len(planes), 2), "<u8")
        table[:, 1] = sizes
        table[1:, 0] = np.cumsum(sizes[:-1])
        parts.append(table.tobytes() + google_crc32c.value(table.tobytes()).to_bytes(4, "little"))
        array_dir.mkdir()
        _write_new_file(array_dir / "zarr.json", [self.metadata])
        _write_new_file(array_dir / self.shard_name, parts)


def _write_new_file(path: Path, parts: Sequence[np.ndarray | bytes]) -> None:
    """Create `path` (it must not exist) holding the bytes of `parts`, written from them (no copy)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        for part in parts:
            view = memoryview(part).cast("B")
            while view:
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def write_group(path: Path, attributes: Mapping[str, Any]) -> None:
    """A zarr v3 group with `attributes` at `path` (made, with its parents)."""
    path.mkdir(parents=True, exist_ok=True)
    document = {"zarr_format": 3, "node_type": "group", "attributes": dict(attributes)}
    _write_new_file(path / "zarr.json", [json.dumps(document).encode()])


class PlateWriter:
    """Writes one HCS plate store into the (new, empty) folder `root`: `begin` writes the plate, row and
    well groups; `write_field` / `write_labels` one field (from any thread, each field once)."""

    def __init__(self, root: Path, layout: PlateLayout, kind: Kind, field_shape: tuple[int, ...], dtype: np.dtype,
                 *, compressor: str = "none", channels: Sequence[str] = (), pixel_size_um: float | None = None,
                 attrs: Mapping[str, Any] | None = None) -> None:
        self.root, self.layout, self.kind, self.compressor = Path(root), layout, kind, compressor
        self.channels, self.pixel_size_um = list(channels), pixel_size_um
        self.paths = layout.field_paths
        self.attrs = dict(attrs or {})
        dims = ("c", "y", "x") if len(field_shape) == 3 else ("y", "x")
        self.levels = [LevelTemplate(s, dtype, compressor, dims) for s in level_shapes(field_shape)]
        self.omero: dict[str, Any] | None = None

    def begin(self, display_end: Sequence[float] | None = None) -> None:
        """Write the plate, row and well groups (the fields come after)."""
        if self.kind != "masks":
            self.omero = omero(self.channels, self.levels[0].dtype, display_end or [0.0] * len(self.channels))
        write_group(self.root, self._root_attrs())
        for row in {p.split("/")[0] for p in self.paths}:
            write_group(self.root / row, {})
        for well, fields in self.layout.well_images().items():
            write_group(self.root / well, _ome(well={"images": [{"path": f} for f in fields]}))

    def _root_attrs(self) -> dict[str, Any]:
        own = {"kind": self.kind, "plate": self.layout.plate, "channels": self.channels,
               "dtype": str(self.levels[0].dtype), "wells": list(self.layout.wells),
               "sites": [int(s) for s in self.layout.sites], "fields": self.paths,
               "pixel_size_um": self.pixel_size_um, "compressor": self.compressor, **self.attrs}
        return {**_ome(plate=self.layout.plate_attrs()), BIOEMBED_KEY: own}

    def finish(self, attrs: Mapping[str, Any]) -> None:
        """Add `attrs` (known only once every field is written) to the plate's `bioembed` attribute."""
        self.attrs.update(attrs)
        (self.root / "zarr.json").unlink()
        write_group(self.root, self._root_attrs())

    def _name(self, i: int) -> str:
        return f"{self.layout.plate} {self.layout.wells[i]} site {self.layout.sites[i]}"

    def write_field(self, i: int, stack: np.ndarray) -> None:
        """Field i's (C, H, W) image with its pyramid."""
        field_dir = self.root / self.paths[i]
        names = [str(lv) for lv in range(len(self.levels))]
        write_group(field_dir, _ome(multiscales=[multiscales(self._name(i), names, channel_axis=True,
                                                             pixel_size_um=self.pixel_size_um)], omero=self.omero))
        self._write_levels(field_dir, names, stack)

    def write_labels(self, i: int, labels: Mapping[str, np.ndarray]) -> None:
        """Field i's (H, W) label images (first: nuclei) as NGFF labels with their pyramids."""
        field_dir = self.root / self.paths[i]
        first = next(iter(labels))
        names = [str(lv) for lv in range(len(self.levels))]
        image = multiscales(self._name(i), [f"labels/{first}/{n}" for n in names], channel_axis=False,
                            pixel_size_um=self.pixel_size_um)
        write_group(field_dir, _ome(multiscales=[image]))
        write_group(field_dir / "labels", _ome(labels=list(labels)))
        for name, lab in labels.items():
            label_dir = field_dir / "labels" / name
            write_group(label_dir, _ome(multiscales=[multiscales(f"{self._name(i)} {name}", names, channel_axis=False,
                                                                 pixel_size_um=self.pixel_size_um)],
                                        **{"image-label": {"colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}]}}))
            self._write_levels(label_dir, names, lab)

    def _write_levels(self, parent: Path, names: Sequence[str], data: np.ndarray) -> None:
        for template, name in zip(self.levels, names):
            template.write(parent / name, data)
            data = downsample(data)


@dataclass(frozen=True)
class PlateStore:
    """An open HCS plate store: its bioembed metadata and the level-0 arrays of its fields."""

    root: Path
    attrs: dict[str, Any]

    @property
    def plate(self) -> str:
        return str(self.attrs["plate"])

    @property
    def channels(self) -> list[str]:
        return [str(c) for c in self.attrs.get("channels", [])]

    @property
    def layout(self) -> PlateLayout:
        return PlateLayout(self.plate, tuple(self.attrs["wells"]), tuple(int(s) for s in self.attrs["sites"]))

    def fields(self, label: str | None = None) -> FieldStack:
        """Level 0 of every field as one (n_fields, C, H, W) array-like; of label `label` for a mask store."""
        suffix = "0" if label is None else f"labels/{label}/0"
        return FieldStack(self.root, [f"{p}/{suffix}" for p in self.attrs["fields"]])

    def has_label(self, label: str) -> bool:
        return label in self.attrs.get("labels", [])


def open_plate_store(root: Path, kind: Kind | None = None) -> PlateStore:
    """Open a bioembed HCS plate store, checking it is one (and of `kind`)."""
    root = Path(root)
    if not (root / "zarr.json").is_file():
        hint = {"images": "no plate image store here (ingest the plate first)",
                "corrected": "no corrected image store here (materialize `corrected_images` first)",
                "masks": "no mask store here (materialize `segmentation` first)"}
        raise BioembedInputError(hint.get(kind or "", "no plate store here"), path=root)
    attrs = zarr.open_group(root, mode="r").attrs.asdict()
    own = attrs.get(BIOEMBED_KEY)
    if "ome" not in attrs or not isinstance(own, dict) or "fields" not in own:
        raise BioembedInputError(
            "not a bioembed OME-Zarr plate store (no ome/bioembed attributes: written by an older bioembed? "
            "re-materialize the plate)", path=root)
    if kind is not None and own.get("kind") != kind and not (kind == "images" and own.get("kind") == "corrected"):
        raise BioembedInputError(f"expected a {kind} store, this is a {own.get('kind')} store", path=root)
    return PlateStore(root, own)


class FieldStack:
    """The level-0 arrays of a plate's fields, indexed like one (n_fields, ...) array: `stack[i]`,
    `stack[i, c]`, `stack[a:b]`, `stack[:]` (fields are opened on first use)."""

    def __init__(self, root: Path, paths: Sequence[str]) -> None:
        self.root, self.paths = Path(root), list(paths)
        self._open: dict[int, zarr.Array] = {}
        first = self.field(0) if self.paths else None
        self.field_shape: tuple[int, ...] = tuple(first.shape) if first is not None else ()
        self.dtype = np.dtype(first.dtype) if first is not None else np.dtype("uint16")

    def field(self, i: int) -> zarr.Array:
        if i not in self._open:
            array = zarr.open_array(self.root / self.paths[i], mode="r")
            if self._open and tuple(array.shape) != self.field_shape:
                raise BioembedInputError(f"field array {self.paths[i]} is {array.shape}, field 0 is {self.field_shape}",
                                         path=self.root)
            self._open[i] = array
        return self._open[i]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.paths), *self.field_shape)

    @property
    def chunks(self) -> tuple[int, ...]:
        """Chunk shape as one array: a field's (inner) chunks, one field deep."""
        return (1, *self.field(0).chunks) if self.paths else ()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Any) -> np.ndarray:
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(first, (int, np.integer)):
            i = int(first) + (len(self) if first < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"field {first} out of range for {len(self)} fields")
            return np.asarray(self.field(i)[rest if rest else ...])
        if isinstance(first, slice):
            picked = [np.asarray(self.field(i)[rest if rest else ...]) for i in range(*first.indices(len(self)))]
            return np.stack(picked) if picked else np.zeros((0, *self.field_shape), self.dtype)
        raise TypeError(f"fields are indexed by an int or a slice, got {type(first).__name__}")


def write_plate_store(path: Path, fields: np.ndarray, channels: Sequence[str], plate: str,
                      wells: Sequence[str] | None = None, sites: Sequence[int] | None = None,
                      pixel_size_um: float | None = None) -> Path:
    """Write (atomically) an image plate store from an in-memory (n_fields, C, H, W) array; field i is
    (wells[i], sites[i]), by default well i of row A.. in plate order, site 1."""
    fields = np.asarray(fields)
    n = len(fields)
    wells = list(wells) if wells is not None else [well_name(1 + i // 24, 1 + i % 24) for i in range(n)]
    sites = list(sites) if sites is not None else [1] * n
    if fields.ndim != 4 or fields.shape[1] != len(channels) or len(wells) != n or len(sites) != n:
        raise ValueError(f"fields must be (n, C={len(channels)}, H, W) with a well and site each; got {fields.shape}")
    with atomic_dir(Path(path)) as tmp:
        writer = PlateWriter(tmp, PlateLayout(plate, tuple(wells), tuple(int(s) for s in sites)), "images",
                             fields.shape[1:], fields.dtype, channels=channels, pixel_size_um=pixel_size_um)
        writer.begin(display_ends(fields[0]) if n else None)
        for i in range(n):
            writer.write_field(i, fields[i])
    return Path(path)
