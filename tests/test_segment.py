"""Nuclei segmentation, plate segmentation and single-cell crops on synthetic blobs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import zarr

from bioembed_assets.schema import BioembedInputError
from bioembed_assets.segment.crops import crop_origin, extract_crops
from bioembed_assets.segment.nuclei import segment_nuclei
from bioembed_assets.segment.plate import CELL_TABLE_SCHEMA, segment_plate

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]


def blob_image(shape: tuple[int, int], centers: list[tuple[float, float]], radius: float, seed: int = 0) -> np.ndarray:
    """uint16 image of bright soft-edged disks on a dim noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape)
    img = np.zeros(shape, np.float64)
    for cy, cx in centers:
        d = np.hypot(yy - cy, xx - cx)
        img = np.maximum(img, 1.0 / (1.0 + np.exp((d - radius) / 1.0)))
    img = 300 + 3000 * img + rng.normal(0, 60, shape)
    return np.clip(img, 0, 65535).astype(np.uint16)


def grid_centers(n_side: int, size: int, margin: int = 20) -> list[tuple[float, float]]:
    pos = np.linspace(margin, size - margin, n_side)
    return [(float(y), float(x)) for y in pos for x in pos]


def make_store(path: Path, fields: list[list[tuple[float, float]]], size: int = 128,
               channels: list[str] = CHANNELS, plate: str = "P1", radius: float = 7) -> pl.DataFrame:
    """A plate store as the ingest step writes it; returns the image table."""
    n = len(fields)
    group = zarr.open_group(str(path), mode="w")
    arr = group.create_array("images", shape=(n, len(channels), size, size), chunks=(1, 1, size, size), dtype="uint16")
    for f, centers in enumerate(fields):
        dna = blob_image((size, size), centers, radius, seed=f)
        stack = [dna] + [(dna // (c + 2) + 17 * c).astype(np.uint16) for c in range(len(channels) - 1)]
        arr[f] = np.stack(stack)
    group.attrs.update({"plate": plate, "channels": channels, "dtype": "uint16"})
    wells = ["A01", "A01", "B02", "B02", "C03", "C03"]
    sites = [1 + f % 2 for f in range(n)]
    return pl.DataFrame({"plate": [plate] * n, "well": wells[:n], "site": sites, "field": list(range(n))})


# ---- segment_nuclei -------------------------------------------------------------------------

def test_counts_well_separated_nuclei() -> None:
    centers = grid_centers(6, 256, margin=20)
    img = blob_image((256, 256), centers, radius=8)
    t0 = time.perf_counter()
    labels = segment_nuclei(img)
    dt = time.perf_counter() - t0
    print(f"\nsegment_nuclei: {dt * 1000:.1f} ms per 256x256 field")
    assert labels.dtype == np.int32 and labels.shape == img.shape
    assert abs(labels.max() - len(centers)) <= 0.1 * len(centers)
    assert set(np.unique(labels)) == set(range(labels.max() + 1))  # sequential labels
    for cy, cx in centers:  # every nucleus centre is labelled
        assert labels[int(round(cy)), int(round(cx))] > 0


def test_splits_two_touching_nuclei() -> None:
    img = blob_image((96, 96), [(48, 38), (48, 56)], radius=10)  # overlapping disks, one blob
    labels = segment_nuclei(img)
    assert labels.max() == 2
    assert labels[48, 38] != labels[48, 56] and labels[48, 38] > 0 and labels[48, 56] > 0


def test_elongated_nucleus_not_oversplit() -> None:
    yy, xx = np.indices((96, 96))
    ellipse = ((yy - 48) / 8.0) ** 2 + ((xx - 48) / 16.0) ** 2 <= 1
    img = (300 + 3000 * ellipse).astype(np.uint16)
    assert segment_nuclei(img).max() == 1


def test_blank_and_constant_images() -> None:
    assert segment_nuclei(np.zeros((64, 64), np.uint16)).max() == 0
    assert segment_nuclei(np.full((64, 64), 500, np.uint16)).max() == 0
    assert segment_nuclei(np.zeros((64, 64), np.uint16)).dtype == np.int32


def test_small_objects_removed_and_deterministic() -> None:
    img = blob_image((96, 96), [(30, 30), (70, 70)], radius=8)
    img[5:7, 90:92] = 4000  # 4-pixel speck
    a, b = segment_nuclei(img, min_area=30), segment_nuclei(img, min_area=30)
    assert a.max() == 2 and np.array_equal(a, b)


# ---- segment_plate --------------------------------------------------------------------------

@pytest.fixture()
def plate(tmp_path: Path) -> tuple[Path, pl.DataFrame, list[list[tuple[float, float]]]]:
    fields = [grid_centers(3, 128, margin=30), [(64.0, 64.0)], [], [(6.0, 64.0), (64.0, 64.0), (64.0, 121.0)]]
    table = make_store(tmp_path / "P1.zarr", fields)
    return tmp_path / "P1.zarr", table, fields


def test_segment_plate_masks_and_table(plate, tmp_path: Path) -> None:
    store, table, fields = plate
    masks = tmp_path / "P1.masks.zarr"
    cells = segment_plate(store, table, masks)
    labels = zarr.open_group(str(masks), mode="r")["labels"]
    assert labels.shape == (4, 128, 128) and labels.dtype == np.int32
    assert dict(cells.schema) == CELL_TABLE_SCHEMA
    per_field = cells.group_by("field").len().sort("field")
    assert dict(zip(per_field["field"], per_field["len"])) == {0: 9, 1: 1, 3: 3}
    assert cells["cell_id"].n_unique() == cells.height
    assert cells.filter(pl.col("field") == 1)["cell_id"].to_list() == ["A01-s2-1"]
    lab = np.asarray(labels[:])
    for row in cells.iter_rows(named=True):
        region = lab[row["field"]] == row["label"]
        assert region.sum() == row["area"]
        ys, xs = np.nonzero(region)
        assert ys.mean() == pytest.approx(row["centroid_y"]) and xs.mean() == pytest.approx(row["centroid_x"])
    for f in range(4):  # no label without a row
        assert lab[f].max() == cells.filter(pl.col("field") == f).height
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_segment_plate_missing_channel_names_plate(plate, tmp_path: Path) -> None:
    store, table, _ = plate
    with pytest.raises(BioembedInputError, match=r"plate=P1.*'Hoechst'"):
        segment_plate(store, table, tmp_path / "m.zarr", nuclear_channel="Hoechst")
    assert not (tmp_path / "m.zarr").exists()


def test_segment_plate_rewrites_atomically(plate, tmp_path: Path) -> None:
    store, table, _ = plate
    masks = tmp_path / "m.zarr"
    first = segment_plate(store, table, masks)
    second = segment_plate(store, table, masks, progress=True)
    assert first.equals(second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["P1.zarr", "m.zarr"]


# ---- extract_crops --------------------------------------------------------------------------

def test_crops_drop_border_and_match_source(plate, tmp_path: Path) -> None:
    store, table, _ = plate
    masks = tmp_path / "m.zarr"
    cells = segment_plate(store, table, masks)
    crops_path = tmp_path / "crops.zarr"
    kept, summary = extract_crops(store, masks, cells, crops_path, crop_size=32)

    top, left = crop_origin(cells["centroid_y"].to_numpy(), cells["centroid_x"].to_numpy(), 32)
    n_border = int(((top < 0) | (left < 0) | (top + 32 > 128) | (left + 32 > 128)).sum())
    assert n_border == 2  # the two nuclei at the edge of field 3
    assert summary == {"cells": cells.height, "kept": cells.height - 2, "dropped_border": 2, "policy": "drop"}
    assert kept.height == summary["kept"] and kept["crop_index"].to_list() == list(range(kept.height))

    group = zarr.open_group(str(crops_path), mode="r")
    imgs, cmasks = np.asarray(group["images"][:]), np.asarray(group["masks"][:])
    assert imgs.shape == (kept.height, 5, 32, 32) and imgs.dtype == np.uint16
    assert cmasks.shape == (kept.height, 32, 32) and cmasks.dtype == bool
    assert dict(group.attrs)["channels"] == CHANNELS and dict(group.attrs)["crop_size"] == 32
    source = np.asarray(zarr.open_group(str(store), mode="r")["images"][:])
    lab = np.asarray(zarr.open_group(str(masks), mode="r")["labels"][:])
    for row in kept.iter_rows(named=True):
        t, l = (int(v[0]) for v in crop_origin([row["centroid_y"]], [row["centroid_x"]], 32))
        assert np.array_equal(imgs[row["crop_index"]], source[row["field"], :, t : t + 32, l : l + 32])
        m = cmasks[row["crop_index"]]
        assert m[16, 16]  # the centroid pixel
        nucleus = lab[row["field"], t : t + 32, l : l + 32] == row["label"]
        assert m[nucleus].all() and m.sum() > nucleus.sum()  # grown beyond the nucleus
        other = (lab[row["field"], t : t + 32, l : l + 32] > 0) & ~nucleus
        assert not (m & other).any()  # never another nucleus
    assert not np.isnan(imgs.astype(np.float64)).any()


def test_crops_zero_cells(plate, tmp_path: Path) -> None:
    store, table, _ = plate
    masks = tmp_path / "m.zarr"
    cells = segment_plate(store, table, masks).clear()
    kept, summary = extract_crops(store, masks, cells, tmp_path / "c.zarr", crop_size=16)
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert group["images"].shape == (0, 5, 16, 16) and group["masks"].shape == (0, 16, 16)
    assert kept.height == 0 and "crop_index" in kept.columns
    assert summary == {"cells": 0, "kept": 0, "dropped_border": 0, "policy": "drop"}


def test_crops_many_cells_chunked(tmp_path: Path) -> None:
    """More cells than one zarr chunk, across fields: order and content stay right."""
    fields = [grid_centers(7, 160, margin=24)] * 3
    table = make_store(tmp_path / "P.zarr", fields, size=160)
    cells = segment_plate(tmp_path / "P.zarr", table, tmp_path / "m.zarr")
    kept, summary = extract_crops(tmp_path / "P.zarr", tmp_path / "m.zarr", cells, tmp_path / "c.zarr", crop_size=24)
    assert summary["kept"] == 147 and summary["dropped_border"] == 0
    imgs = np.asarray(zarr.open_group(str(tmp_path / "c.zarr"), mode="r")["images"][:])
    source = np.asarray(zarr.open_group(str(tmp_path / "P.zarr"), mode="r")["images"][:])
    t, l = crop_origin(kept["centroid_y"].to_numpy(), kept["centroid_x"].to_numpy(), 24)
    for i, f in enumerate(kept["field"].to_list()):
        assert np.array_equal(imgs[i], source[f, :, t[i] : t[i] + 24, l[i] : l[i] + 24])
