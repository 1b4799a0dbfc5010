"""Single-cell crops (a fixed window around each nucleus, all channels, plus the cell's own mask)
and whole-image tiles (non-overlapping fixed windows, as OpenPhenom-style encoders take).

Never silent about the image edge: a window that leaves the image is either dropped or padded
with zeros, and both are counted (per cell and per plate). Crops never hold NaN: the store's
pixels are checked finite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import zarr
from skimage.segmentation import expand_labels

from bioembed_assets.images.ngff import PlateLayout, open_plate_store
from bioembed_assets.schema import FIELD, PLATE, SITE, WELL, BioembedInputError, ProgressCallback
from bioembed_assets.segment.plate import CELL_LABELS, open_plate_masks
from bioembed_assets.store.atomic import atomic_dir

CROP_INDEX = "crop_index"
PADDED_PIXELS = "padded_pixels"
TILE_ID = "tile_id"
_CHUNK_CELLS = 64
BorderPolicy = Literal["drop", "pad"]


def crop_origin(centroid_y: np.ndarray, centroid_x: np.ndarray, crop_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corner of the crop_size window centred on each (rounded half-up) centroid."""
    half = crop_size // 2
    top = np.floor(np.asarray(centroid_y, dtype=np.float64) + 0.5).astype(np.int64) - half
    left = np.floor(np.asarray(centroid_x, dtype=np.float64) + 0.5).astype(np.int64) - half
    return top, left


def window(plane: np.ndarray, top: int, left: int, size: int, fill: int | bool = 0) -> np.ndarray:
    """The size x size window of the last two axes of `plane` at (top, left); outside pixels = `fill`."""
    h, w = plane.shape[-2:]
    if top >= 0 and left >= 0 and top + size <= h and left + size <= w:
        return plane[..., top : top + size, left : left + size]
    out = np.full((*plane.shape[:-2], size, size), fill, dtype=plane.dtype)
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + size, h), min(left + size, w)
    if y1 > y0 and x1 > x0:
        out[..., y0 - top : y1 - top, x0 - left : x1 - left] = plane[..., y0:y1, x0:x1]
    return out


def _outside_pixels(top: np.ndarray, left: np.ndarray, size: int, h: int, w: int) -> np.ndarray:
    """Pixels of each size x size window that fall outside an h x w image."""
    ny = np.clip(np.minimum(top + size, h) - np.maximum(top, 0), 0, None)
    nx = np.clip(np.minimum(left + size, w) - np.maximum(left, 0), 0, None)
    return (size * size - ny * nx).astype(np.int64)


def _check_finite(field_img: np.ndarray, plate: str, field: int, well: str | None, path: Path) -> None:
    if np.issubdtype(field_img.dtype, np.floating):
        bad = int((~np.isfinite(field_img)).sum())
        if bad:
            raise BioembedInputError(
                f"field {field} has {bad} non-finite (NaN/inf) pixels; crops must be finite", plate=plate, well=well,
                path=path,
            )


class _ChunkWriter:
    """Append rows to zarr arrays, writing whole chunks at once so every chunk is written once."""

    def __init__(self, arrays: dict[str, zarr.Array], chunk: int) -> None:
        self.arrays, self.chunk, self.start = arrays, chunk, 0
        self.pending: dict[str, list[np.ndarray]] = {k: [] for k in arrays}

    def add(self, **rows: np.ndarray) -> None:
        for k, v in rows.items():
            self.pending[k].append(v)
        n = len(next(iter(self.pending.values())))
        if n >= self.chunk:
            self._flush((n // self.chunk) * self.chunk)

    def _flush(self, n: int) -> None:
        for k, arr in self.arrays.items():
            arr[self.start : self.start + n] = np.stack(self.pending[k][:n])
            del self.pending[k][:n]
        self.start += n

    def close(self) -> int:
        n = len(next(iter(self.pending.values())))
        if n:
            self._flush(n)
        return self.start


def extract_crops(
    store_path: Path,
    masks_path: Path,
    cells: pl.DataFrame,
    crops_path: Path,
    crop_size: int = 64,
    grow: int = 4,
    *,
    border: BorderPolicy = "drop",
    mask_neighbors: bool = False,
    progress: ProgressCallback | None = None,
) -> tuple[pl.DataFrame, dict]:
    """Cut a crop_size x crop_size window around every cell; write images + masks to zarr.
    `progress(done, total)` is called after each field with cells (total: those fields).

    Writes (atomically) a zarr group at `crops_path` with `images` (N, C, S, S) in the store's
    dtype and `masks` (N, S, S) bool, attrs {plate, channels, crop_size, grow, policy,
    mask_source, mask_neighbors, n_cells, padded_cells}. A cell's mask is its whole-cell label
    when the masks store has `cell_labels` (`segment_plate(..., cell_channel=...)`), else its
    nucleus grown by `grow` pixels without entering other nuclei or their growth
    (`skimage.segmentation.expand_labels`), a simple stand-in for the cell body.

    Border policy `border`: "drop" (default) drops cells whose window leaves the image;
    "pad" keeps them and fills the outside pixels with 0 (mask False). Either way the kept
    table gets a `padded_pixels` column (pixels of the window outside the image; 0 for interior
    cells, always 0 under "drop"). `mask_neighbors` zeroes, in every channel, the pixels of
    other cells inside each crop (background pixels are kept), as SubCell expects.
    Returns (kept cells with `padded_pixels` and `crop_index` = row in the crop arrays, summary
    dict {"cells", "kept", "dropped_border", "policy"}, plus "padded_cells" and
    "padded_pixels" under "pad" and "masked_neighbor_pixels" with `mask_neighbors`).
    Fields are processed one at a time. Raises BioembedInputError if the store holds NaN/inf.
    """
    store_path, masks_path, crops_path = Path(store_path), Path(masks_path), Path(crops_path)
    if crop_size < 1:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    if border not in ("drop", "pad"):
        raise ValueError(f"border must be 'drop' or 'pad', got {border!r}")
    source = open_plate_store(store_path, "images")
    images, plate, channels = source.fields(), source.plate, source.channels
    n_fields, n_ch, h, w = images.shape
    labels, cell_labels = open_plate_masks(masks_path)
    for name, arr in (("nuclei", labels), (CELL_LABELS, cell_labels)):
        if arr is not None and tuple(arr.shape) != (n_fields, h, w):
            raise BioembedInputError(
                f"{name} shape {arr.shape} does not match images {(n_fields, h, w)}", plate=plate, path=masks_path
            )
    missing = {FIELD, "label", "centroid_y", "centroid_x"} - set(cells.columns)
    if missing:
        raise BioembedInputError(f"cell table lacks columns {sorted(missing)}", plate=plate)
    mask_source = "cell_labels" if cell_labels is not None else "grown_nuclei"

    s = crop_size
    top, left = crop_origin(cells["centroid_y"].to_numpy(), cells["centroid_x"].to_numpy(), s)
    outside = _outside_pixels(top, left, s, h, w)
    keep = outside == 0 if border == "drop" else np.ones(cells.height, dtype=bool)
    kept = (
        cells.with_columns(pl.Series("_top", top), pl.Series("_left", left), pl.Series(PADDED_PIXELS, outside))
        .filter(pl.Series(keep))
        .with_row_index("_order")
        .sort(FIELD, "_order")  # contiguous per field, input order kept within a field
        .drop("_order")
        .with_row_index(CROP_INDEX)
    )
    n = kept.height
    masked_neighbor_pixels = 0

    with atomic_dir(crops_path) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        chunk = max(1, min(_CHUNK_CELLS, n))
        img_arr = group.create_array(
            "images", shape=(n, n_ch, s, s), chunks=(chunk, n_ch, s, s), dtype=images.dtype, fill_value=0
        )
        mask_arr = group.create_array("masks", shape=(n, s, s), chunks=(chunk, s, s), dtype="bool", fill_value=False)
        writer = _ChunkWriter({"images": img_arr, "masks": mask_arr}, chunk)
        n_with_cells = kept[FIELD].n_unique() if n else 0
        for done, ((f,), sub) in enumerate(kept.group_by(FIELD, maintain_order=True), 1):
            field_img = np.asarray(images[int(f)])
            _check_finite(field_img, plate, int(f), sub[WELL][0] if WELL in sub.columns else None, store_path)
            if cell_labels is not None:
                seg = np.asarray(cell_labels[int(f)])
            else:
                field_lab = np.asarray(labels[int(f)])
                seg = expand_labels(field_lab, distance=grow) if grow > 0 else field_lab
            for t, l, lab in zip(sub["_top"].to_list(), sub["_left"].to_list(), sub["label"].to_list()):
                crop = window(field_img, t, l, s)
                seg_crop = window(seg, t, l, s)
                own = seg_crop == lab
                if mask_neighbors:
                    others = (seg_crop > 0) & ~own
                    if others.any():
                        crop = crop.copy()
                        crop[:, others] = 0
                        masked_neighbor_pixels += int(others.sum())
                writer.add(images=crop, masks=own)
            if progress is not None:
                progress(done, n_with_cells)
        written = writer.close()
        assert written == n, (written, n)
        padded_cells = int((kept[PADDED_PIXELS] > 0).sum()) if n else 0
        group.attrs.update(
            {"plate": plate, "channels": channels, "crop_size": s, "grow": grow, "policy": border, "n_cells": n,
             "mask_source": mask_source, "mask_neighbors": bool(mask_neighbors), "padded_cells": padded_cells}
        )

    summary: dict = {"cells": cells.height, "kept": n, "dropped_border": cells.height - n, "policy": border}
    if border == "pad":
        summary["padded_cells"] = padded_cells
        summary["padded_pixels"] = int(kept[PADDED_PIXELS].sum()) if n else 0
    if mask_neighbors:
        summary["masked_neighbor_pixels"] = masked_neighbor_pixels
    kept = kept.drop("_top", "_left").with_columns(pl.col(CROP_INDEX).cast(pl.Int64), pl.col(PADDED_PIXELS).cast(pl.Int64))
    return kept.select(pl.exclude(CROP_INDEX), CROP_INDEX), summary


def _field_index(store_path: Path, layout: PlateLayout, n_fields: int, image_table: pl.DataFrame | None) -> pl.DataFrame:
    """(plate, well, site, field) of the fields to tile: from `image_table`, else the store's layout."""
    plate = layout.plate
    if image_table is not None:
        missing = {WELL, SITE, FIELD} - set(image_table.columns)
        if missing:
            raise BioembedInputError(f"image table lacks columns {sorted(missing)}", plate=plate, path=store_path)
        table = image_table.select(WELL, SITE, FIELD)
    else:
        table = pl.DataFrame({WELL: list(layout.wells), SITE: list(layout.sites), FIELD: list(range(n_fields))})
    table = table.with_columns(pl.col(WELL).cast(pl.Utf8), pl.col(SITE).cast(pl.Int64), pl.col(FIELD).cast(pl.Int64))
    bad = table.filter((pl.col(FIELD) < 0) | (pl.col(FIELD) >= n_fields))
    if bad.height:
        raise BioembedInputError(f"fields {bad[FIELD].to_list()[:5]} outside the store's 0..{n_fields - 1}",
                                 plate=plate, path=store_path)
    return table.unique(FIELD, keep="first").sort(FIELD).select(pl.lit(plate).alias(PLATE), WELL, SITE, FIELD)


def tile_origins(h: int, w: int, tile_size: int, stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners (y0, x0), row-major, of the tile_size tiles that lie fully inside h x w."""
    step = tile_size if stride is None else stride
    ys = np.arange(0, h - tile_size + 1, step, dtype=np.int64)
    xs = np.arange(0, w - tile_size + 1, step, dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return yy.ravel(), xx.ravel()


def extract_tiles(
    store_path: Path,
    tiles_path: Path,
    tile_size: int = 256,
    stride: int | None = None,
    *,
    image_table: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, dict]:
    """Cut every field into tile_size x tile_size tiles that lie fully inside the image; write zarr.

    Tiles start at (0, 0) and step by `stride` (default tile_size: non-overlapping, as
    OpenPhenom's 256x256 crops of a 512x512 image). The remainder at the bottom/right edge that
    cannot hold a whole tile is dropped and counted, never padded. Writes (atomically) a zarr
    group at `tiles_path` with `images` (N, C, T, T) in the store's dtype, `masks` (N, T, T)
    all True (so any crop consumer reads tiles unchanged) and attrs {plate, channels,
    tile_size, stride, policy, n_tiles}. Fields come from `image_table` (plate, well, site,
    field) or, when None, from the store's per-field `wells`/`sites` attrs.
    Returns (table with plate, well, site, field, tile_id (0.. within a field, row-major), y0,
    x0 and crop_index = row in the arrays; summary {"fields", "tiles", "tiles_per_field",
    "dropped_rows", "dropped_cols", "dropped_pixels_per_field", "policy"}).
    """
    store_path, tiles_path = Path(store_path), Path(tiles_path)
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    if stride is not None and stride < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    source = open_plate_store(store_path, "images")
    images, plate, channels = source.fields(), source.plate, source.channels
    n_fields, n_ch, h, w = images.shape
    if tile_size > min(h, w):
        raise BioembedInputError(f"tile_size {tile_size} larger than the {h}x{w} images", plate=plate, path=store_path)
    fields = _field_index(store_path, source.layout, n_fields, image_table)
    y0, x0 = tile_origins(h, w, tile_size, stride)
    per_field = len(y0)
    covered_h = int(y0.max()) + tile_size
    covered_w = int(x0.max()) + tile_size
    covered = np.zeros((h, w), dtype=bool)
    for y, x in zip(y0, x0):
        covered[y : y + tile_size, x : x + tile_size] = True
    n = fields.height * per_field
    t = tile_size

    with atomic_dir(tiles_path) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        chunk = max(1, min(_CHUNK_CELLS, n))
        img_arr = group.create_array(
            "images", shape=(n, n_ch, t, t), chunks=(chunk, n_ch, t, t), dtype=images.dtype, fill_value=0
        )
        group.create_array("masks", shape=(n, t, t), chunks=(chunk, t, t), dtype="bool", fill_value=True)
        writer = _ChunkWriter({"images": img_arr}, chunk)
        for f, well in zip(fields[FIELD].to_list(), fields[WELL].to_list()):
            field_img = np.asarray(images[f])
            _check_finite(field_img, plate, f, well, store_path)
            for y, x in zip(y0, x0):
                writer.add(images=field_img[:, y : y + t, x : x + t])
        written = writer.close()
        assert written == n, (written, n)
        group.attrs.update(
            {"plate": plate, "channels": channels, "tile_size": t, "stride": stride or t, "policy": "inside",
             "n_tiles": n}
        )

    tiles = (
        fields.join(pl.DataFrame({TILE_ID: np.arange(per_field, dtype=np.int64), "y0": y0, "x0": x0}), how="cross")
        .sort(FIELD, TILE_ID)
        .with_row_index(CROP_INDEX)
        .with_columns(pl.col(CROP_INDEX).cast(pl.Int64))
    )
    summary = {
        "fields": fields.height, "tiles": n, "tiles_per_field": per_field,
        "dropped_rows": h - covered_h, "dropped_cols": w - covered_w,
        "dropped_pixels_per_field": int((~covered).sum()), "policy": "inside",
    }
    return tiles.select(PLATE, WELL, SITE, FIELD, TILE_ID, "y0", "x0", CROP_INDEX), summary
