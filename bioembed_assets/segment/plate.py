"""Segment every field of a plate store: an OME-Zarr mask store (NGFF labels `nuclei`, optionally `cells`) and the cell table."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from bioembed_assets.images.ngff import CELLS, NUCLEI, FieldStack, PlateWriter, open_plate_store
from bioembed_assets.schema import CELL_ID, FIELD, PLATE, SITE, WELL, BioembedInputError, ProgressCallback
from bioembed_assets.segment.cellpose_backend import check_cellpose, segment_nuclei_cellpose
from bioembed_assets.segment.cells import segment_cells
from bioembed_assets.segment.nuclei import segment_nuclei_with_params
from bioembed_assets.store.atomic import atomic_dir

CELL_TABLE_SCHEMA: dict[str, pl.DataType] = {
    PLATE: pl.Utf8,
    WELL: pl.Utf8,
    SITE: pl.Int64,
    FIELD: pl.Int64,
    CELL_ID: pl.Utf8,
    "label": pl.Int32,
    "centroid_y": pl.Float64,
    "centroid_x": pl.Float64,
    "area": pl.Int64,
}
"""Columns and dtypes of the cell table returned by `segment_plate` (nuclear-only mode)."""
CELL_AREA = "cell_area"
"""Extra Int64 column in whole-cell mode: the cell's area in pixels (nucleus included)."""
CELL_LABELS = CELLS
"""Name of the whole-cell labels in the mask store (absent in nuclear-only mode)."""
Backend = Literal["classic", "cellpose"]


def cell_id(well: str, site: int, label: int) -> str:
    """The id of a nucleus, unique within a plate: 'B03-s2-17'."""
    return f"{well}-s{site}-{label}"


def label_stats(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(label, centroid_y, centroid_x, area) of every object in a 2-D label image."""
    flat = labels.ravel()
    n = int(flat.max()) + 1 if flat.size else 1
    area = np.bincount(flat, minlength=n)
    yy, xx = np.indices(labels.shape)
    sy = np.bincount(flat, weights=yy.ravel(), minlength=n)
    sx = np.bincount(flat, weights=xx.ravel(), minlength=n)
    ids = np.nonzero(area[1:])[0] + 1
    return ids, sy[ids] / area[ids], sx[ids] / area[ids], area[ids]


def open_plate_masks(masks_path: Path) -> tuple[FieldStack, FieldStack | None]:
    """The nuclei and (whole-cell mode) cell labels of a mask store, each (n_fields, H, W)."""
    store = open_plate_store(Path(masks_path), "masks")
    return store.fields(NUCLEI), store.fields(CELLS) if store.has_label(CELLS) else None


def _check_image_table(table: pl.DataFrame, plate: str, n_fields: int, path: Path) -> pl.DataFrame:
    missing = {PLATE, WELL, SITE, FIELD} - set(table.columns)
    if missing:
        raise BioembedInputError(f"image table lacks columns {sorted(missing)}", plate=plate, path=path)
    table = table.select(PLATE, WELL, SITE, FIELD).with_columns(
        pl.col(PLATE).cast(pl.Utf8), pl.col(WELL).cast(pl.Utf8), pl.col(SITE).cast(pl.Int64),
        pl.col(FIELD).cast(pl.Int64),
    )
    others = set(table[PLATE].unique().to_list()) - {plate}
    if others:
        raise BioembedInputError(f"image table holds other plates {sorted(others)}", plate=plate, path=path)
    bad = table.filter((pl.col(FIELD) < 0) | (pl.col(FIELD) >= n_fields))
    if bad.height:
        raise BioembedInputError(
            f"image table fields {bad[FIELD].to_list()[:5]} outside the store's 0..{n_fields - 1}",
            plate=plate, well=bad[WELL][0], path=path,
        )
    if table.select(FIELD).is_duplicated().any() or table.select(WELL, SITE).is_duplicated().any():
        raise BioembedInputError(
            "image table must have one row per field and per (well, site)", plate=plate, path=path
        )
    return table.sort(FIELD)


def segment_plate(
    store_path: Path,
    image_table: pl.DataFrame,
    masks_path: Path,
    nuclear_channel: str = "DNA",
    progress: bool = False,
    *,
    cell_channel: str | None = None,
    cell_kwargs: dict[str, Any] | None = None,
    backend: Backend = "classic",
    model_path: Path | None = None,
    on_field: ProgressCallback | None = None,
    **segment_kwargs: Any,
) -> pl.DataFrame:
    """Segment nuclei (and optionally whole cells) in every field; write masks, return the cell table.

    Writes (atomically) a zarr group at `masks_path` with `labels` (n_fields, H, W) int32 nuclei,
    one chunk per field; fields absent from `image_table` stay 0. Fields are read and segmented
    one at a time, so memory stays at one field. `segment_kwargs` go to `segment_nuclei` (backend
    "classic") or `segment_nuclei_cellpose` (backend "cellpose", which needs a local
    `model_path`; weights are never downloaded).
    Whole-cell mode (`cell_channel`, e.g. "AGP"): `segment_cells` grows each nucleus over that
    channel (`cell_kwargs` go to it) and a second array `cell_labels` is written; each cell has
    its nucleus's label. The table then gains `cell_area`. Nuclear-only is the default.
    Returns one row per nucleus with the columns of `CELL_TABLE_SCHEMA` (+ `cell_area`), sorted
    by field, label; centroids and `area` are the nucleus's.
    """
    store_path, masks_path = Path(store_path), Path(masks_path)
    source = open_plate_store(store_path, "images")
    images, plate, channels = source.fields(), source.plate, source.channels
    if nuclear_channel not in channels:
        raise BioembedInputError(
            f"nuclear channel {nuclear_channel!r} not in the plate's channels {channels}",
            plate=plate, path=store_path,
        )
    if cell_channel is not None and cell_channel not in channels:
        raise BioembedInputError(
            f"cell channel {cell_channel!r} not in the plate's channels {channels}",
            plate=plate, path=store_path,
        )
    if backend not in ("classic", "cellpose"):
        raise ValueError(f"backend must be 'classic' or 'cellpose', got {backend!r}")
    if backend == "classic" and model_path is not None:
        raise ValueError("model_path is for backend='cellpose'; the classic backend has no weights")
    if backend == "cellpose":
        if model_path is None:
            raise BioembedInputError("backend 'cellpose' needs model_path (a local weights file)", plate=plate)
        check_cellpose(model_path)  # fail before any work, with install / weights advice
    c = channels.index(nuclear_channel)
    cc = channels.index(cell_channel) if cell_channel is not None else None
    n_fields, _, h, w = images.shape
    table = _check_image_table(image_table, plate, n_fields, store_path)
    cell_kwargs = dict(cell_kwargs or {})

    parts: list[np.ndarray] = []
    diameters: list[float] = []
    n_stats = 6 if cc is not None else 5
    names = [NUCLEI] + ([CELLS] if cc is not None else [])
    with atomic_dir(masks_path) as tmp:
        writer = PlateWriter(tmp, source.layout, "masks", (h, w), np.dtype("int32"), compressor="lz4",
                             pixel_size_um=source.attrs.get("pixel_size_um"), attrs={"labels": names})
        writer.begin()
        empty = np.zeros((h, w), np.int32)
        for f in sorted(set(range(n_fields)) - set(table[FIELD].to_list())):
            writer.write_labels(f, dict.fromkeys(names, empty))
        todo = table[FIELD].to_list()
        for done, f in enumerate(tqdm(todo, desc=f"segment {plate}", disable=not progress), 1):
            if backend == "cellpose":
                lab = segment_nuclei_cellpose(np.asarray(images[f, c]), Path(model_path), **segment_kwargs)
            else:
                lab, params = segment_nuclei_with_params(np.asarray(images[f, c]), **segment_kwargs)
                if params is not None:
                    diameters.append(params.diameter)
            lab = lab.astype(np.int32, copy=False)
            ids, cy, cx, area = label_stats(lab)
            cols = [np.full(len(ids), f), ids, cy, cx, area]
            masks = {NUCLEI: lab}
            if cc is not None:
                cell_lab = segment_cells(lab, np.asarray(images[f, cc]), **cell_kwargs).astype(np.int32, copy=False)
                masks[CELLS] = cell_lab
                cols.append(np.bincount(cell_lab.ravel(), minlength=int(lab.max()) + 1)[ids])
            writer.write_labels(f, masks)
            if on_field is not None:
                on_field(done, len(todo))
            parts.append(np.column_stack(cols) if len(ids) else np.zeros((0, n_stats)))
        stats = np.concatenate(parts) if parts else np.zeros((0, n_stats))
        if backend == "cellpose":
            seg_attrs: dict[str, Any] = {"method": "cellpose", "backend": backend}
        else:
            seg_attrs = {"method": f"{segment_kwargs.get('threshold_method', 'li')} threshold + "
                                   f"{segment_kwargs.get('declump', 'shape_intensity')} watershed",
                         "backend": backend}
        seg_attrs.update({k: v for k, v in segment_kwargs.items() if _jsonable(v)})
        if backend == "cellpose":
            seg_attrs["model_path"] = str(model_path)
        if diameters:
            seg_attrs["nuclear_diameter_px"] = {"median": float(np.median(diameters)),
                                                "min": float(np.min(diameters)), "max": float(np.max(diameters))}
        attrs: dict[str, Any] = {"plate": plate, "nuclear_channel": nuclear_channel, "n_cells": int(len(stats)),
                                 "segmentation": seg_attrs, "cell_channel": cell_channel}
        if cell_channel is not None:
            attrs["cell_segmentation"] = {"method": "propagation-watershed",
                                          **{k: v for k, v in cell_kwargs.items() if _jsonable(v)}}
        writer.finish(attrs)

    data = {
        FIELD: stats[:, 0].astype(np.int64),
        "label": stats[:, 1].astype(np.int32),
        "centroid_y": stats[:, 2],
        "centroid_x": stats[:, 3],
        "area": stats[:, 4].astype(np.int64),
    }
    schema = dict(CELL_TABLE_SCHEMA)
    if cc is not None:
        data[CELL_AREA] = stats[:, 5].astype(np.int64)
        schema[CELL_AREA] = pl.Int64
    cells = pl.DataFrame(data)
    cells = cells.join(table, on=FIELD, how="left").with_columns(
        pl.format("{}-s{}-{}", pl.col(WELL), pl.col(SITE), pl.col("label")).alias(CELL_ID)
    )
    return cells.select(list(schema)).cast(schema).sort(FIELD, "label")


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))
