"""Fields of view and the registry of acquisition layouts.

A *field* (one site of one well) is what every reader produces and what `images.store.ingest_plate`
consumes. `FieldSource` is the protocol: plate, well, site, the stains it has and, per stain, a way to
read the 2-D image, to read its header (shape, dtype) cheaply, and a human-readable location for
error messages (a file path, or a zarr path + channel index). `FieldFiles` (one image file per stain)
is the common case; `sources.omezarr.ZarrField` reads from an OME-Zarr HCS plate.

`list_fields(layout, plate_dir, plate, channel_map, **options)` dispatches by layout name
(`LAYOUTS`). Every reader returns fields sorted by (well, site) and raises `BioembedInputError`
(naming plate, well, file and what was expected) for a missing or empty plate folder, a site that lacks
a mapped channel, a channel token that the channel map does not know ("unknown channel"), two images
for one (well, site, channel), and image file names that are not valid UTF-8.

Channel maps map the file's channel token to a stain, e.g. ``{"1": "DNA", "2": "ER"}`` for Phenix
``-ch1``/``-ch2``. Keys may be ints or strings; a key matches a token case-insensitively, with or
without the layout's token prefix (``"w1"`` and ``"1"`` both match ImageXpress ``_w1``) and with or
without leading zeros. Every channel present in the files must be in the map (a stain per token); map a
token to ``""`` to skip it on purpose (e.g. brightfield, or CellProfiler overlay columns).

Sites are 1-based everywhere: layouts whose field numbers start at 0 (`..._D03f00d0.tif`, OME-Zarr
field indices) are shifted by one.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from bioembed_assets.schema import BioembedInputError, parse_well, validate_plate_name, well_name

IMAGE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
"""Suffixes treated as image files when scanning a plate folder (case-insensitive)."""
LENGTH_UNITS_UM = {"m": 1e6, "meter": 1e6, "mm": 1e3, "millimeter": 1e3, "um": 1.0, "µm": 1.0, "micrometer": 1.0,
                   "nm": 1e-3, "nanometer": 1e-3, "angstrom": 1e-4}
"""Micrometres per unit, for pixel sizes in acquisition metadata (Harmony `Unit` attributes, NGFF axis units)."""
MAX_IMAGE_PIXELS = 2**26
"""Default bound on the pixels of one image (8192 x 8192; `RunConfig.max_image_pixels`): a header claiming
more is refused before anything is allocated."""


# -- the field abstraction -----------------------------------------------------------------------
@runtime_checkable
class FieldSource(Protocol):
    """One field of view (site) of a plate, readable per stain.

    A source may also offer `check_stored(stain)`, raising if data `read` needs is absent (OME-Zarr
    chunks); `validate.check_plate_folder` calls it after bounding the image size.
    """

    @property
    def plate(self) -> str: ...

    @property
    def well(self) -> str: ...

    @property
    def site(self) -> int: ...

    @property
    def stains(self) -> tuple[str, ...]:
        """The stains this field has images for."""
        ...

    def read(self, stain: str) -> np.ndarray:
        """The 2-D image of `stain` (raises on a corrupt or unreadable source)."""
        ...

    def header(self, stain: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of `stain`'s image without decoding the pixels (where the format allows)."""
        ...

    def location(self, stain: str) -> str:
        """Where `stain`'s image is, for error messages: a file path or a zarr path + index."""
        ...


@dataclass(frozen=True)
class FieldFiles:
    """The image files of one field of view (site), keyed by stain name. A `FieldSource`."""

    plate: str
    well: str
    site: int
    paths: dict[str, Path]
    pixel_size_um: float | None = None
    """Pixel size in micrometres when the acquisition metadata gives it (Phenix `Index.xml`)."""

    @property
    def stains(self) -> tuple[str, ...]:
        return tuple(self.paths)

    def read(self, stain: str) -> np.ndarray:
        return read_image_file(self.paths[stain])

    def header(self, stain: str) -> tuple[tuple[int, ...], np.dtype]:
        return image_file_header(self.paths[stain])

    def location(self, stain: str) -> str:
        return display_path(self.paths[stain])


# -- image files ---------------------------------------------------------------------------------
def display_path(path: str | os.PathLike[str]) -> str:
    """`path` as printable text: bytes that are not UTF-8 are shown escaped (`\\xff`)."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def check_image_size(
    shape: Sequence[int], limit: int, *, plate: str | None, well: str | None, path: str | None
) -> None:
    """Raise BioembedInputError if an image of `shape` has more than `limit` pixels (all axes)."""
    n = math.prod(int(s) for s in shape)
    if n > limit:
        side = math.isqrt(limit)
        raise BioembedInputError(
            f"image is {' x '.join(str(int(s)) for s in shape)} = {n:,} pixels, more than max_image_pixels = {limit:,} "
            f"(about {side} x {side}); if the image is genuine, raise max_image_pixels in the run config "
            "(RunConfig.max_image_pixels)",
            plate=plate, well=well, path=path,
        )


def _is_pil_format(path: Path) -> bool:
    return path.suffix.lower() in (".png", ".jpg", ".jpeg")


def _pil_array(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.dtype.byteorder == ">":  # PIL's 'I;16B'
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def read_image_file(path: str | Path) -> np.ndarray:
    """The pixels of one image file: TIFF via tifffile (Pillow as a fallback for compressions that
    need the optional `imagecodecs`), PNG/JPEG via Pillow. Palette TIFFs return their indices."""
    path = Path(path)
    if _is_pil_format(path):
        return _pil_array(path)
    import tifffile

    try:
        return tifffile.imread(path)
    except ValueError as e:
        if "imagecodecs" not in str(e):
            raise
    return _pil_array(path)


_PIL_MODES = {"1": np.bool_, "L": np.uint8, "P": np.uint8, "I;16": np.uint16, "I;16B": np.uint16, "I;16L": np.uint16,
              "I": np.int32, "F": np.float32}


def image_file_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an image file from its header (squeezed: singleton axes dropped)."""
    path = Path(path)
    if _is_pil_format(path):
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
            bands = len(im.getbands())
            dtype = np.dtype(_PIL_MODES.get(im.mode, np.uint8))
        return ((h, w) if bands == 1 else (h, w, bands)), dtype
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        shape = tuple(int(s) for s in series.shape if s != 1)
        return shape, np.dtype(series.dtype)


def scan_image_files(folder: Path, plate: str, *, recursive: bool = False) -> Iterator[Path]:
    """Image files (by suffix) under `folder`, sorted, hidden files skipped.

    Raises BioembedInputError for an image file whose name is not valid UTF-8 (it could not be named
    in tables or messages); the message shows the name with its bad bytes escaped.
    """
    if recursive:
        walk: Iterator[tuple[str, list[str], list[str]]] = os.walk(folder)
    else:
        names = [e.name for e in os.scandir(folder) if e.is_file()]
        walk = iter([(os.fspath(folder), [], names)])
    for root, dirs, files in walk:
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise BioembedInputError(
                    f"image file name '{display_path(name)}' is not valid UTF-8 (bad bytes shown escaped); "
                    "rename it to UTF-8 to read this plate",
                    plate=plate,
                    path=display_path(Path(root) / name),
                ) from None
            yield Path(root) / name


def require_folder(folder: Path, plate: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise BioembedInputError("plate folder does not exist (or is not a folder)", plate=plate,
                                 path=display_path(folder))
    return folder


def canonical_well(text: str, *, plate: str | None = None, path: str | None = None) -> str:
    """'a1', 'A1', 'A01', 'A001' -> 'A01'; raises BioembedInputError for anything else."""
    m = re.fullmatch(r"\s*([A-Za-z]{1,2})0*(\d{1,2})\s*", text or "")
    if m and int(m.group(2)) > 0:
        return well_name(*parse_well(f"{m.group(1).upper()}{int(m.group(2)):02d}"))
    raise BioembedInputError(f"invalid well id {text!r}: expected a row letter (A-ZZ) and a column number (1-99), "
                             "e.g. 'A01'", plate=plate, path=path)


def well_from_row_col(row: str, col: str, *, plate: str | None = None, path: str | None = None) -> str:
    """Well id from a row (letters 'C' or a 1-based number '3') and a 1-based column ('7' or '07')."""
    row, col = row.strip(), col.strip()
    try:
        if row.isdigit():
            r = int(row)
        elif row.isalpha():
            r = parse_well(f"{row.upper()}01")[0]
        else:
            raise ValueError(row)
        well = well_name(r, int(col))
        parse_well(well)  # representable: rows A-ZZ, columns 1-99
        return well
    except (ValueError, BioembedInputError):
        raise BioembedInputError(f"invalid well row {row!r} / column {col!r}: expected e.g. 'C' (or 3) and 7 "
                                 "(rows A-ZZ, columns 1-99)", plate=plate, path=path) from None


def well_sort_key(well: str) -> tuple[int, int]:
    return parse_well(well)


# -- channel maps --------------------------------------------------------------------------------
_UNKNOWN = object()


class ChannelMap:
    """A channel map (file channel token -> stain) with lenient token matching.

    Tokens and keys match case-insensitively, with or without one of `prefixes` (e.g. "ch", "w")
    and with or without leading zeros. A stain of "" skips the token. Two keys for one token, or one
    stain for two tokens, are errors.
    """

    def __init__(self, channel_map: Mapping[Any, str], plate: str, prefixes: Sequence[str] = ()) -> None:
        self.plate = plate
        self.prefixes = tuple(p.lower() for p in sorted(prefixes, key=len, reverse=True))
        self.raw = {str(k).strip(): (v or "").strip() for k, v in dict(channel_map).items()}
        if not self.raw:
            raise BioembedInputError("the channel map is empty: map each file channel token to a stain", plate=plate)
        stains = [v for v in self.raw.values() if v]
        if len(set(stains)) != len(stains):
            raise BioembedInputError(f"channel map has repeated stain names: {self.raw}", plate=plate)
        self._lookup: dict[str, tuple[str, str]] = {}
        for key, stain in self.raw.items():
            norm = self.normalize(key)
            if norm in self._lookup:
                raise BioembedInputError(
                    f"channel map keys {self._lookup[norm][0]!r} and {key!r} name the same channel", plate=plate
                )
            self._lookup[norm] = (key, stain)

    def normalize(self, token: str) -> str:
        t = str(token).strip().lower()
        for p in self.prefixes:
            if t.startswith(p) and t[len(p) :].isdigit():
                t = t[len(p) :]
                break
        if t.isdigit():
            t = str(int(t))
        return t

    def lookup(self, token: str) -> tuple[str, str] | None:
        """(key as written in the map, stain) for a file token, or None when the map lacks it."""
        return self._lookup.get(self.normalize(token))

    @property
    def stains(self) -> dict[str, str]:
        """stain -> map key, for the stains that are read (not skipped)."""
        return {stain: key for key, stain in self.raw.items() if stain}

    def unknown(self, token: str, *, well: str | None, path: str | None, what: str = "channel") -> BioembedInputError:
        return BioembedInputError(
            f"unknown channel: {what} {token} is not in the channel map {self.raw}; map it to a stain "
            "(or to \"\" to skip it) to read this plate",
            plate=self.plate,
            well=well,
            path=path,
        )


# -- collecting fields ---------------------------------------------------------------------------
class FieldCollector:
    """Gathers (well, site, channel token) -> item from a reader and checks the plate is complete.

    `add` raises for unknown channel tokens and duplicates; `complete` raises for a site lacking a
    mapped stain and returns ((well, site), {stain: item}) sorted by well (row, column) then site.
    """

    def __init__(self, plate: str, channel_map: ChannelMap) -> None:
        self.plate, self.cmap = plate, channel_map
        self.sites: dict[tuple[str, int], dict[str, tuple[Any, str, str]]] = {}  # stain -> (item, token, where)
        self.n_skipped = 0

    def add(self, well: str, site: int, token: str, item: Any, where: str, *, what: str = "channel") -> None:
        found = self.cmap.lookup(token)
        if found is None:
            raise self.cmap.unknown(token, well=well, path=where, what=what)
        stain = found[1]
        if not stain:
            self.n_skipped += 1
            return
        channels = self.sites.setdefault((well, site), {})
        if stain in channels:
            raise BioembedInputError(
                f"duplicate image for site {site} channel {token} ({stain}): {channels[stain][2]} and {where}",
                plate=self.plate,
                well=well,
                path=where,
            )
        channels[stain] = (item, token, where)

    def __bool__(self) -> bool:
        return bool(self.sites) or self.n_skipped > 0

    def complete(
        self, expected: Callable[[str, int, str, str, Any], str] | None = None, *, expected_is_path: bool = True
    ) -> list[tuple[tuple[str, int], dict[str, Any]]]:
        """Check every site has every mapped stain. `expected(well, site, key, stain, example_item)`
        spells what was expected for a missing channel: the file path (`expected_is_path`, then it is
        also the error's file) or a description."""
        wanted = self.cmap.stains
        out = []
        for (well, site), channels in sorted(self.sites.items(), key=lambda kv: (well_sort_key(kv[0][0]), kv[0][1])):
            missing = [s for s in wanted if s not in channels]
            if missing:
                example = next(iter(channels.values()))
                keys = ", ".join(f"{wanted[s]} ({s})" for s in missing)
                hints = [expected(well, site, wanted[s], s, example[0]) for s in missing] if expected else []
                hint = f": expected {', '.join(hints)}" if hints else f" (site has {sorted(channels)})"
                raise BioembedInputError(
                    f"site {site} is missing channel(s) {keys}{hint}",
                    plate=self.plate,
                    well=well,
                    path=hints[0] if hints and expected_is_path else example[2],
                )
            out.append(((well, site), {s: channels[s][0] for s in wanted}))
        return out

    def file_fields(
        self, expected: Callable[[str, int, str, str, Any], str] | None = None, *, expected_is_path: bool = True,
        pixel_size_um: float | None = None,
    ) -> list[FieldFiles]:
        return [FieldFiles(self.plate, well, site, paths, pixel_size_um)
                for (well, site), paths in self.complete(expected, expected_is_path=expected_is_path)]


def as_bool(value: bool | str, name: str) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise BioembedInputError(f"option {name}={value!r}: expected true or false")


def as_int(value: int | str, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BioembedInputError(f"option {name}={value!r}: expected an integer") from None


# -- the registry --------------------------------------------------------------------------------
Reader = Callable[..., Sequence[FieldSource]]

LAYOUTS: dict[str, str | Reader] = {
    "phenix": "bioembed_assets.sources.phenix:list_phenix_fields",
    "imagexpress": "bioembed_assets.sources.imagexpress:list_imagexpress_fields",
    "loaddata": "bioembed_assets.sources.loaddata:list_loaddata_fields",
    "rxrx": "bioembed_assets.sources.rxrx:list_rxrx_fields",
    "omezarr": "bioembed_assets.sources.omezarr:list_omezarr_fields",
    "regex": "bioembed_assets.sources.regex:list_regex_fields",
}
"""Layout name -> reader `(plate_dir, plate, channel_map, **options) -> list[FieldSource]`
(a callable, or "module:function" imported on first use). Add layouts with `register_layout`."""


def register_layout(name: str, reader: Reader | str) -> None:
    """Make `list_fields(name, ...)` call `reader(plate_dir, plate, channel_map, **options)`."""
    LAYOUTS[name] = reader


def get_reader(layout: str) -> Reader:
    target = LAYOUTS.get(layout)
    if target is None:
        raise BioembedInputError(f"unknown layout {layout!r}: expected one of {sorted(LAYOUTS)}")
    if isinstance(target, str):
        module, func = target.split(":")
        target = getattr(importlib.import_module(module), func)
        LAYOUTS[layout] = target
    return target


def layout_options(layout: str) -> list[str]:
    """The option names a layout's reader accepts (keyword-only parameters)."""
    sig = inspect.signature(get_reader(layout))
    return [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def list_fields(
    layout: str, plate_dir: str | Path, plate: str, channel_map: Mapping[Any, str], **options: Any
) -> list[FieldSource]:
    """Every field of `plate` in `plate_dir`, read with the named layout, sorted by (well, site).

    `options` are the layout's own (strings are accepted, as a TOML `[layout_options]` gives them):
    phenix `plane`; imagexpress `recursive`, `timepoint`; loaddata `csv`; rxrx none; omezarr `store`,
    `z` (index or "max"), `t`; regex `pattern` (required), `recursive`.

    An OSError while listing (a symbolic-link loop, an unreadable folder) becomes a BioembedInputError
    naming the plate and the path.
    """
    validate_plate_name(plate)
    reader = get_reader(layout)
    allowed = layout_options(layout)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise BioembedInputError(f"unknown option(s) {unknown} for layout {layout!r}: expected {allowed}", plate=plate)
    try:
        return list(reader(Path(plate_dir), plate, channel_map, **options))
    except OSError as e:
        raise os_error(e, plate, plate_dir) from e


def os_error(err: OSError, plate: str, fallback: str | os.PathLike[str]) -> BioembedInputError:
    """A BioembedInputError for an OSError met while reading `plate` (its path, else `fallback`)."""
    where = err.filename if err.filename is not None else fallback
    return BioembedInputError(
        f"cannot read the plate folder: {err.strerror or err} ({type(err).__name__}); expected a readable folder of "
        "image files (is a symbolic link looping or dangling, or a folder unreadable?)",
        plate=plate, path=display_path(where),
    )
