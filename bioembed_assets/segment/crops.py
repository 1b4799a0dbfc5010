"""Single-cell crops: a fixed window around each nucleus, all channels, plus the cell's own mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import zarr
from skimage.segmentation import expand_labels

from bioembed_assets.schema import FIELD, BioembedInputError
from bioembed_assets.segment.plate import open_plate_images
from bioembed_assets.store.atomic import atomic_dir

CROP_INDEX = "crop_index"
_CHUNK_CELLS = 64


def crop_origin(centroid_y: np.ndarray, centroid_x: np.ndarray, crop_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corner of the crop_size window centred on each (rounded half-up) centroid."""
    half = crop_size // 2
    top = np.floor(np.asarray(centroid_y, dtype=np.float64) + 0.5).astype(np.int64) - half
    left = np.floor(np.asarray(centroid_x, dtype=np.float64) + 0.5).astype(np.int64) - half
    return top, left


def extract_crops(
    store_path: Path,
    masks_path: Path,
    cells: pl.DataFrame,
    crops_path: Path,
    crop_size: int = 64,
    grow: int = 4,
) -> tuple[pl.DataFrame, dict]:
    """Cut a crop_size x crop_size window around every cell; write images + masks to zarr.

    Writes (atomically) a zarr group at `crops_path` with `images` (N, C, S, S) in the store's
    dtype and `masks` (N, S, S) bool, attrs {plate, channels, crop_size, grow, policy}. A cell's
    mask is its nucleus label grown by `grow` pixels without entering other nuclei or their
    growth (`skimage.segmentation.expand_labels`), a simple stand-in for the cell body.
    Border policy "drop": cells whose window leaves the image are dropped, never padded.
    Returns (kept cells with a `crop_index` column = row in the crop arrays, summary dict
    {"cells", "kept", "dropped_border", "policy"}). Fields are processed one at a time.
    """
    store_path, masks_path, crops_path = Path(store_path), Path(masks_path), Path(crops_path)
    if crop_size < 1:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    images, plate, channels = open_plate_images(store_path)
    n_fields, n_ch, h, w = images.shape
    try:
        labels = zarr.open_group(str(masks_path), mode="r")["labels"]
    except (FileNotFoundError, KeyError) as exc:
        raise BioembedInputError("masks store missing or has no 'labels'", plate=plate, path=masks_path) from exc
    if tuple(labels.shape) != (n_fields, h, w):
        raise BioembedInputError(
            f"labels shape {labels.shape} does not match images {(n_fields, h, w)}", plate=plate, path=masks_path
        )
    missing = {FIELD, "label", "centroid_y", "centroid_x"} - set(cells.columns)
    if missing:
        raise BioembedInputError(f"cell table lacks columns {sorted(missing)}", plate=plate)

    s = crop_size
    top, left = crop_origin(cells["centroid_y"].to_numpy(), cells["centroid_x"].to_numpy(), s)
    inside = (top >= 0) & (left >= 0) & (top + s <= h) & (left + s <= w)
    kept = (
        cells.with_columns(pl.Series("_top", top), pl.Series("_left", left))
        .filter(pl.Series(inside))
        .with_row_index("_order")
        .sort(FIELD, "_order")  # contiguous per field, input order kept within a field
        .drop("_order")
        .with_row_index(CROP_INDEX)
    )
    n = kept.height

    with atomic_dir(crops_path) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        chunk = max(1, min(_CHUNK_CELLS, n))
        img_arr = group.create_array(
            "images", shape=(n, n_ch, s, s), chunks=(chunk, n_ch, s, s), dtype=images.dtype, fill_value=0
        )
        mask_arr = group.create_array("masks", shape=(n, s, s), chunks=(chunk, s, s), dtype="bool", fill_value=False)
        start = 0
        pending_img: list[np.ndarray] = []
        pending_mask: list[np.ndarray] = []
        for (f,), sub in kept.group_by(FIELD, maintain_order=True):
            field_img = np.asarray(images[int(f)])
            field_lab = np.asarray(labels[int(f)])
            grown = expand_labels(field_lab, distance=grow) if grow > 0 else field_lab
            for t, l, lab in zip(sub["_top"].to_list(), sub["_left"].to_list(), sub["label"].to_list()):
                pending_img.append(field_img[:, t : t + s, l : l + s])
                pending_mask.append(grown[t : t + s, l : l + s] == lab)
            # flush whole chunks so every chunk is written once
            full = (len(pending_img) // chunk) * chunk
            if full:
                img_arr[start : start + full] = np.stack(pending_img[:full])
                mask_arr[start : start + full] = np.stack(pending_mask[:full])
                start += full
                del pending_img[:full], pending_mask[:full]
        if pending_img:
            img_arr[start : start + len(pending_img)] = np.stack(pending_img)
            mask_arr[start : start + len(pending_mask)] = np.stack(pending_mask)
            start += len(pending_img)
        assert start == n, (start, n)
        group.attrs.update(
            {"plate": plate, "channels": channels, "crop_size": s, "grow": grow, "policy": "drop", "n_cells": n}
        )

    summary = {"cells": cells.height, "kept": n, "dropped_border": cells.height - n, "policy": "drop"}
    kept = kept.drop("_top", "_left").with_columns(pl.col(CROP_INDEX).cast(pl.Int64))
    return kept.select(pl.exclude(CROP_INDEX), CROP_INDEX), summary
