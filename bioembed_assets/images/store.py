"""Ingest: a plate's field images into its OME-Zarr HCS plate store (`images.ngff`), with per-field QC.

The store (written atomically: readers see the old store or the new one) holds each field as
`<row>/<col>/<site k>/{0,1,2}`: (C, H, W) in the acquisition dtype (uint8/uint16) and a two-level
pyramid, one shard file per level, uncompressed by default (`compressor="lz4" | "zstd"`: blosc).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import polars as pl

from bioembed_assets.images.ngff import (
    FieldStack,
    PlateLayout,
    PlateWriter,
    blosc_settings,
    display_ends,
    open_plate_store,
)
from bioembed_assets.schema import FIELD, PLATE, SITE, WELL, BioembedInputError, ProgressCallback, validate_plate_name
from bioembed_assets.sources.layouts import MAX_IMAGE_PIXELS, FieldFiles, FieldSource, check_image_size
from bioembed_assets.store.atomic import atomic_dir

Compressor = Literal["none", "lz4", "zstd"]
_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
_T = TypeVar("_T")
_R = TypeVar("_R")


def _kind(location: str) -> str:
    loc = location.lower()
    return "TIFF" if loc.endswith((".tif", ".tiff")) else "PNG" if loc.endswith(".png") else "image"


def _read_tiff_into(path: Path, out: np.ndarray) -> bool:
    """Decode the single-page TIFF at `path` into `out` if its image has out's (squeezed) shape and dtype.

    The pixels are tifffile's own decoding of that page (what `tifffile.imread` returns for a one-page
    file), written in place: no new array, no copy. False (and `out` undefined) for anything else,
    including a file tifffile cannot read, so that the caller's checked path reports it."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            if len(tif.pages) != 1 or page.dtype != out.dtype or tuple(n for n in page.shape if n != 1) != out.shape:
                return False
            page.asarray(out=out, maxworkers=1)  # one thread per file: files are already read on `workers` threads
    except Exception:  # noqa: BLE001 - the checked path re-reads the file and names the error
        return False
    return True


def _read_field_into(
    field: FieldSource, channels: Sequence[str], out: np.ndarray, max_pixels: int = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """`_read_field`, decoding straight into `out` (C, H, W) when every channel is a one-page TIFF of
    out's shape and dtype (the common case); otherwise (other formats, other shapes or dtypes, missing
    or unreadable files) the checked path, which returns a new array or raises naming the file."""
    if type(field) is FieldFiles and all(
        stain in field.paths and field.paths[stain].suffix.lower() in (".tif", ".tiff") for stain in channels
    ):
        if all(_read_tiff_into(field.paths[stain], out[c]) for c, stain in enumerate(channels)):
            return out  # only pages of out's shape are decoded: field 0's, already bounded
    _check_size(field, channels, max_pixels)
    return _read_field(field, channels)


def _check_size(field: FieldSource, channels: Sequence[str], max_pixels: int) -> None:
    """Refuse, from the headers and before any decoding, an image of more than `max_pixels` pixels. A
    missing channel or a header that does not read is left to `_read_field`, which names the error."""
    for stain in channels:
        if stain not in field.stains:
            continue
        try:
            shape, _ = field.header(stain)
        except BioembedInputError:
            raise
        except Exception:  # noqa: BLE001 - reported by the read that follows
            continue
        check_image_size(shape, max_pixels, plate=field.plate, well=field.well, path=field.location(stain))


def _read_field(field: FieldSource, channels: Sequence[str]) -> np.ndarray:
    """The (C, H, W) stack of `channels` of one field, checked: 2-D, uint8/uint16, one shape and dtype
    (callers bound the size first: `_check_size`)."""
    planes: list[np.ndarray] = []
    for stain in channels:
        if stain not in field.stains:
            raise BioembedInputError(
                f"site {field.site} has no {stain!r} image (has {sorted(field.stains)})", plate=field.plate, well=field.well
            )
        where = field.location(stain)
        try:
            img = field.read(stain)
        except BioembedInputError:
            raise
        except Exception as e:  # noqa: BLE001 - any decode failure means a bad file
            raise _field_error(
                field, where,
                f"cannot read {_kind(where)} (corrupt or truncated?): {type(e).__name__}: {e}",
            ) from e
        img = np.squeeze(img)
        if img.dtype not in _DTYPES:
            what = "non-integer" if not np.issubdtype(img.dtype, np.integer) else "unsupported"
            raise _field_error(
                field, where,
                f"{what} pixel type {img.dtype} for {stain} (site {field.site}): expected a uint8/uint16 image",
            )
        if img.ndim != 2:
            raise _field_error(
                field, where,
                f"expected a 2-D uint8/uint16 image for {stain} (site {field.site}), got shape {img.shape} dtype {img.dtype}",
            )
        if planes and img.dtype != planes[0].dtype:
            raise _field_error(
                field, where,
                f"mixed bit depth in site {field.site}: {stain} is {img.dtype} but {channels[0]} is {planes[0].dtype} "
                f"({field.location(channels[0])}); all channels must share one dtype",
            )
        if planes and img.shape != planes[0].shape:
            raise _field_error(
                field, where,
                f"channels of different shapes in site {field.site}: {stain} image is {img.shape} but {channels[0]} "
                f"is {planes[0].shape} ({field.location(channels[0])})",
            )
        planes.append(img)
    return np.stack(planes)


def _field_error(field: FieldSource, where: str, message: str) -> BioembedInputError:
    """A BioembedInputError naming the field's plate and well and the file (or zarr location)."""
    return BioembedInputError(message, plate=field.plate, well=field.well, path=where)


def _prefetch(fn: Callable[[_T], _R], items: Iterable[_T], workers: int, ahead: int) -> Iterator[_R]:
    """`map(fn, items)` on a thread pool, in order, with at most `ahead` results in flight."""
    with ThreadPoolExecutor(workers) as pool:
        queue: collections.deque[Future[_R]] = collections.deque()
        for item in items:
            queue.append(pool.submit(fn, item))
            if len(queue) >= ahead:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()


def _qc(stack: np.ndarray) -> tuple[list[float], float]:
    """Per-channel means and the largest per-channel fraction of saturated pixels (at the dtype's max).

    Integer sums (exact) and a max per channel; pixels are only counted where a channel reaches the
    maximum, so the common unsaturated field costs two fast passes instead of a float mean and a
    boolean mask (this was ~40% of ingest time)."""
    top = np.iinfo(stack.dtype).max
    n = stack.shape[1] * stack.shape[2]
    # row sums fit uint32 (width * 65535 < 2**32 up to 65536 px), which numpy adds ~3x faster than uint64
    row_dtype = np.uint32 if stack.shape[2] <= 65536 else np.uint64
    sums = np.add.reduce(stack, axis=2, dtype=row_dtype).sum(axis=1, dtype=np.uint64)
    means = [int(v) / n for v in sums]
    maxima = stack.reshape(len(stack), -1).max(axis=1)
    saturated = [np.count_nonzero(plane == top) / n if m == top else 0.0 for plane, m in zip(stack, maxima)]
    return means, float(max(saturated))


def ingest_plate(
    fields: Sequence[FieldSource], store_path: Path, channels: Sequence[str], *, workers: int = 4,
    compressor: Compressor = "none", max_image_pixels: int = MAX_IMAGE_PIXELS, pixel_size_um: float | None = None,
    progress: ProgressCallback | None = None,
) -> pl.DataFrame:
    """Copy a plate's field images into an OME-Zarr HCS plate store at `store_path`; return its image table.

    `channels` picks and orders the stains; `pixel_size_um` (default: the source's, Phenix `Index.xml`
    or OME-Zarr scale, when it has one) becomes the NGFF scale in micrometres. The image table has
    one row per field: plate, well, site, field (index into the store's fields, `open_plate_images`),
    `qc_mean_<stain>` and `qc_saturated_fraction` (the
    largest, over channels, fraction of pixels at the dtype's maximum). Fields are streamed on
    `workers` threads (read, check, QC, write; TIFFs are decoded into a reused per-thread buffer,
    each pyramid level of a field is one shard file); the store replaces any previous one atomically.
    `compressor` is the chunks' codec: "none" (the default: the fastest ingest and reads, the store
    as large as the pixels), "lz4" (blosc-lz4, ~1.6x smaller, ~1 GB/s/core to encode) or "zstd"
    (blosc-zstd level 1, ~1.75x smaller, ~0.3 GB/s/core). `fields` are any `FieldSource` (files of
    a layout, OME-Zarr fields); images must be 2-D uint8 or uint16, every channel of every field one
    shape and one dtype. Bad inputs (corrupt or truncated files, other shapes, mixed bit depth,
    non-integer pixels, an image header of more than `max_image_pixels` pixels, refused before its
    pixels are allocated) raise BioembedInputError naming plate, well and file, and leave no store (nor
    any temporary folder) behind. `progress(done, total)` is called as each field is stored.
    """
    if not fields:
        raise BioembedInputError("no fields to ingest", path=store_path)
    channels = list(channels)
    plate = fields[0].plate
    validate_plate_name(plate)
    if not channels or len(set(channels)) != len(channels):
        raise BioembedInputError(f"channels must be non-empty and distinct, got {channels}", plate=plate)
    if pixel_size_um is None:
        pixel_size_um = getattr(fields[0], "pixel_size_um", None)
    blosc_settings(compressor)  # refuses an unknown name before anything is written
    if any(f.plate != plate for f in fields):
        raise BioembedInputError(f"fields from several plates: {sorted({f.plate for f in fields})}", plate=plate)
    seen: set[tuple[str, int]] = set()
    for f in fields:
        if (f.well, f.site) in seen:
            raise BioembedInputError(f"field (well {f.well}, site {f.site}) listed twice", plate=plate, well=f.well)
        seen.add((f.well, f.site))

    with atomic_dir(store_path) as tmp:
        _check_size(fields[0], channels, max_image_pixels)
        first = _read_field(fields[0], channels)
        writer = PlateWriter(tmp, PlateLayout(plate, tuple(f.well for f in fields), tuple(f.site for f in fields)),
                             "images", first.shape, first.dtype, compressor=compressor, channels=channels,
                             pixel_size_um=pixel_size_um)
        writer.begin(display_ends(first))
        local = threading.local()  # each worker thread decodes into its own buffer, reused field after field

        def ingest(i: int) -> tuple[list[float], float]:
            field = fields[i]
            if i == 0:
                stack = first
            else:
                if getattr(local, "buffer", None) is None:
                    local.buffer = np.empty_like(first)
                stack = _read_field_into(field, channels, local.buffer, max_image_pixels)
            if stack.dtype != first.dtype:
                raise BioembedInputError(
                    f"mixed bit depth across fields: site {field.site} images are {stack.dtype}, but well "
                    f"{fields[0].well} site {fields[0].site} images are {first.dtype}",
                    plate=plate,
                    well=field.well,
                    path=field.location(channels[0]),
                )
            if stack.shape != first.shape:
                raise BioembedInputError(
                    f"fields of different shapes: site {field.site} images are {stack.shape[1:]}, but well "
                    f"{fields[0].well} site {fields[0].site} images are {first.shape[1:]}",
                    plate=plate,
                    well=field.well,
                    path=field.location(channels[0]),
                )
            writer.write_field(i, stack)
            return _qc(stack)

        rows = []
        for i, (f, (means, saturated)) in enumerate(zip(fields, _prefetch(ingest, range(len(fields)), workers, 4 * workers))):
            rows.append((plate, f.well, f.site, i, *means, saturated))
            if progress is not None:
                progress(i + 1, len(fields))
        written = FieldStack(tmp, [f"{writer.paths[0]}/0"])
        if not (np.array_equal(written[0], first) and np.array_equal(written[0, -1], first[-1])):
            raise RuntimeError(f"zarr did not read back field 0 of {store_path} as written (zarr/numcodecs version?)")
    schema = {PLATE: pl.Utf8, WELL: pl.Utf8, SITE: pl.Int64, FIELD: pl.Int64}
    schema |= {f"qc_mean_{c}": pl.Float64 for c in channels} | {"qc_saturated_fraction": pl.Float64}
    return pl.DataFrame(rows, schema=schema, orient="row")


def open_plate_images(store_path: Path) -> tuple[FieldStack, list[str]]:
    """The fields of a plate image store as one (n_fields, C, H, W) array-like, and its channel names."""
    store = open_plate_store(Path(store_path), "images")
    return store.fields(), store.channels
