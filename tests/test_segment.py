"""Nuclei and whole-cell segmentation, plate segmentation, single-cell crops and tiles on synthetic blobs."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import zarr
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels

from bioembed_assets.images.ngff import open_plate_store, write_plate_store
from bioembed_assets.images.store import open_plate_images
from bioembed_assets.schema import BioembedInputError
from bioembed_assets.segment.cellpose_backend import segment_nuclei_cellpose
from bioembed_assets.segment.cells import segment_cells
from bioembed_assets.segment.crops import crop_origin, extract_crops, extract_tiles, window
from bioembed_assets.segment.nuclei import estimate_nuclear_diameter, segment_nuclei, segment_nuclei_with_params
from bioembed_assets.segment.plate import (
    CELL_AREA,
    CELL_TABLE_SCHEMA,
    open_plate_masks,
    segment_plate,
)

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
    stacks = []
    for f, centers in enumerate(fields):
        dna = blob_image((size, size), centers, radius, seed=f)
        stacks.append(np.stack([dna] + [(dna // (c + 2) + 17 * c).astype(np.uint16) for c in range(len(channels) - 1)]))
    wells = ["A01", "A01", "B02", "B02", "C03", "C03"]
    sites = [1 + f % 2 for f in range(n)]
    write_plate_store(path, np.stack(stacks).astype(np.uint16), channels, plate, wells[:n], sites)
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
    labels = open_plate_masks(masks)[0]
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
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".lock-")) == ["P1.zarr", "m.zarr"]


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
    source = np.asarray(open_plate_images(store)[0][:])
    lab = np.asarray(open_plate_masks(masks)[0][:])
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
    source = np.asarray(open_plate_images(tmp_path / "P.zarr")[0][:])
    t, l = crop_origin(kept["centroid_y"].to_numpy(), kept["centroid_x"].to_numpy(), 24)
    for i, f in enumerate(kept["field"].to_list()):
        assert np.array_equal(imgs[i], source[f, :, t[i] : t[i] + 24, l[i] : l[i] + 24])


# ---- scale-aware nuclei -----------------------------------------------------------------------

@pytest.mark.parametrize("radius", [4.0, 15.0])
def test_nuclei_scale_to_their_size(radius: float) -> None:
    """Small and large nuclei are counted right with the defaults (settings follow the diameter)."""
    size = int(radius * 20)
    centers = grid_centers(4, size, margin=int(3 * radius))
    img = blob_image((size, size), centers, radius=radius)
    d = estimate_nuclear_diameter(img)
    assert 2 * radius - 2 <= d <= 2 * radius + 4  # the soft edge of the blobs counts a little
    labels, params = segment_nuclei_with_params(img)
    assert labels.max() == len(centers)
    assert params is not None and params.min_distance >= 2 and params.min_area < np.pi * radius**2
    touching = blob_image((size, size), [(size / 2, size / 2 - 0.9 * radius), (size / 2, size / 2 + 0.9 * radius)],
                          radius=radius)
    assert segment_nuclei(touching).max() == 2


def test_nuclei_options_validated() -> None:
    img = blob_image((64, 64), [(32, 32)], radius=6)
    with pytest.raises(ValueError, match="threshold_method"):
        segment_nuclei(img, threshold_method="triangle")  # type: ignore[arg-type]
    assert segment_nuclei(img, threshold_method="otsu", declump="shape").max() == 1
    assert segment_nuclei(img, max_area=20).max() == 0  # the one nucleus is larger


# ---- whole cells ------------------------------------------------------------------------------

def cell_scene(size: int = 128) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float]]]:
    """(dna, cyto, centres): three cells, two touching, one without cytoplasm stain."""
    centers = [(40.0, 40.0), (40.0, 72.0), (95.0, 95.0)]
    dna = blob_image((size, size), centers, radius=7, seed=1)
    yy, xx = np.indices((size, size))
    rng = np.random.default_rng(2)
    cyto = np.full((size, size), 200.0)
    for cy, cx in centers[:2]:  # the third cell's cytoplasm is unstained
        cyto = np.maximum(cyto, 200 + 1500 * (np.hypot(yy - cy, xx - cx) <= 18))
    cyto = np.clip(cyto + rng.normal(0, 30, cyto.shape), 0, 65535).astype(np.uint16)
    return dna, cyto, centers


def test_segment_cells_contain_their_nuclei() -> None:
    dna, cyto, centers = cell_scene()
    nuc = segment_nuclei(dna)
    assert nuc.max() == 3
    cells = segment_cells(nuc, cyto)
    assert cells.dtype == np.int32 and cells.shape == nuc.shape
    assert np.array_equal(cells[nuc > 0], nuc[nuc > 0])  # each nucleus inside the cell of its label
    assert set(np.unique(cells)) == {0, 1, 2, 3}
    a = np.bincount(cells.ravel())
    n = np.bincount(nuc.ravel())
    l1, l2, l3 = (int(nuc[int(y), int(x)]) for y, x in centers)
    assert a[l1] > 4 * n[l1] and a[l2] > 4 * n[l2]  # grown over the stained cytoplasm
    assert a[l3] == n[l3]  # unstained cytoplasm: the cell is its nucleus
    assert cells[40, 50] == l1 and cells[40, 62] == l2  # the touching pair is split between them
    for lab in (l1, l2, l3):  # one piece each
        assert ndi.label(cells == lab)[1] == 1
    assert segment_cells(np.zeros_like(nuc), cyto).max() == 0
    assert np.array_equal(segment_cells(nuc, np.zeros_like(cyto)), nuc)  # blank stain: cells = nuclei
    with pytest.raises(ValueError, match="one shape"):
        segment_cells(nuc, cyto[:64])


def test_segment_plate_whole_cell_mode(tmp_path: Path) -> None:
    dna, cyto, _ = cell_scene()
    write_plate_store(tmp_path / "P.zarr", np.stack([[dna, cyto], [dna[::-1], cyto[::-1]]]).astype(np.uint16),
                      ["DNA", "AGP"], "P", ["A01", "A02"])
    table = pl.DataFrame({"plate": ["P", "P"], "well": ["A01", "A02"], "site": [1, 1], "field": [0, 1]})
    masks = tmp_path / "m.zarr"
    cells = segment_plate(tmp_path / "P.zarr", table, masks, cell_channel="AGP")
    assert dict(cells.schema) == {**CELL_TABLE_SCHEMA, CELL_AREA: pl.Int64}
    nuclei, whole = open_plate_masks(masks)
    lab, cl = nuclei[:], whole[:]
    assert cl.shape == lab.shape and cl.dtype == np.int32
    assert np.array_equal(cl[lab > 0], lab[lab > 0])
    for row in cells.iter_rows(named=True):
        assert row["cell_area"] == (cl[row["field"]] == row["label"]).sum() >= row["area"]
    assert open_plate_store(masks, "masks").attrs["cell_channel"] == "AGP"
    # nuclear-only (the default) writes no cell labels and keeps the contract
    plain = segment_plate(tmp_path / "P.zarr", table, tmp_path / "n.zarr")
    assert dict(plain.schema) == CELL_TABLE_SCHEMA
    assert open_plate_masks(tmp_path / "n.zarr")[1] is None
    assert plain.select("field", "label", "area").equals(cells.select("field", "label", "area"))
    with pytest.raises(BioembedInputError, match="'ER'"):
        segment_plate(tmp_path / "P.zarr", table, tmp_path / "x.zarr", cell_channel="ER")


# ---- Cellpose backend (not installed here: the error paths) ------------------------------------

def test_cellpose_missing_weights_is_a_clear_error(plate, tmp_path: Path) -> None:
    img = blob_image((64, 64), [(32, 32)], radius=6)
    with pytest.raises(BioembedInputError, match="never downloads"):
        segment_nuclei_cellpose(img, tmp_path / "nope.pth")
    store, table, _ = plate
    with pytest.raises(BioembedInputError, match="never downloads"):
        segment_plate(store, table, tmp_path / "m.zarr", backend="cellpose", model_path=tmp_path / "nope.pth")
    assert not (tmp_path / "m.zarr").exists()
    with pytest.raises(BioembedInputError, match="model_path"):
        segment_plate(store, table, tmp_path / "m.zarr", backend="cellpose")


@pytest.mark.skipif(importlib.util.find_spec("cellpose") is not None, reason="cellpose is installed")
def test_cellpose_not_installed_says_how_to_install(plate, tmp_path: Path) -> None:
    weights = tmp_path / "nuclei.pth"
    weights.write_bytes(b"not really weights")
    img = blob_image((64, 64), [(32, 32)], radius=6)
    with pytest.raises(RuntimeError, match="pip install cellpose"):
        segment_nuclei_cellpose(img, weights)
    store, table, _ = plate
    with pytest.raises(RuntimeError, match="not installed"):
        segment_plate(store, table, tmp_path / "m.zarr", backend="cellpose", model_path=weights)
    assert not (tmp_path / "m.zarr").exists()


# ---- crops: padding, neighbour masking ---------------------------------------------------------

def test_crops_pad_keeps_border_cells_with_zeros(plate, tmp_path: Path) -> None:
    store, table, _ = plate
    masks = tmp_path / "m.zarr"
    cells = segment_plate(store, table, masks)
    kept, summary = extract_crops(store, masks, cells, tmp_path / "c.zarr", crop_size=32, border="pad")
    assert kept.height == cells.height
    border = kept.filter(pl.col("padded_pixels") > 0)
    assert border.height == 2
    assert summary == {"cells": cells.height, "kept": cells.height, "dropped_border": 0, "policy": "pad",
                       "padded_cells": 2, "padded_pixels": int(border["padded_pixels"].sum())}
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert dict(group.attrs)["policy"] == "pad" and dict(group.attrs)["padded_cells"] == 2
    imgs, cmasks = np.asarray(group["images"][:]), np.asarray(group["masks"][:])
    source = np.asarray(open_plate_images(store)[0][:])
    for row in kept.iter_rows(named=True):
        t, l = (int(v[0]) for v in crop_origin([row["centroid_y"]], [row["centroid_x"]], 32))
        crop, m = imgs[row["crop_index"]], cmasks[row["crop_index"]]
        inside = np.zeros((32, 32), bool)
        y0, x0 = max(t, 0), max(l, 0)
        y1, x1 = min(t + 32, 128), min(l + 32, 128)
        inside[y0 - t : y1 - t, x0 - l : x1 - l] = True
        assert row["padded_pixels"] == (~inside).sum()
        assert (crop[:, ~inside] == 0).all() and not m[~inside].any()  # zeros outside, never NaN
        assert np.array_equal(crop[:, inside].reshape(5, y1 - y0, x1 - x0), source[row["field"], :, y0:y1, x0:x1])
        assert m[16, 16]
    # the drop policy on the same cells: the same interior crops, in order
    dkept, _ = extract_crops(store, masks, cells, tmp_path / "d.zarr", crop_size=32)
    assert (dkept["padded_pixels"] == 0).all()
    dimgs = np.asarray(zarr.open_group(str(tmp_path / "d.zarr"), mode="r")["images"][:])
    interior = kept.filter(pl.col("padded_pixels") == 0)["crop_index"].to_numpy()
    assert np.array_equal(dimgs, imgs[interior])


def test_crops_mask_neighbors_zeroes_other_cells(tmp_path: Path) -> None:
    fields = [[(40.0, 40.0), (40.0, 60.0), (62.0, 50.0)], [(64.0, 64.0)]]
    table = make_store(tmp_path / "P.zarr", fields, size=128)
    masks = tmp_path / "m.zarr"
    cells = segment_plate(tmp_path / "P.zarr", table, masks)
    assert cells.height == 4
    kept, summary = extract_crops(tmp_path / "P.zarr", masks, cells, tmp_path / "c.zarr", crop_size=48,
                                  mask_neighbors=True)
    plain, _ = extract_crops(tmp_path / "P.zarr", masks, cells, tmp_path / "p.zarr", crop_size=48)
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert dict(group.attrs)["mask_neighbors"] is True and dict(group.attrs)["mask_source"] == "grown_nuclei"
    imgs, cm = np.asarray(group["images"][:]), np.asarray(group["masks"][:])
    raw = np.asarray(zarr.open_group(str(tmp_path / "p.zarr"), mode="r")["images"][:])
    grown = expand_labels(np.asarray(open_plate_masks(masks)[0][:])[0], distance=4)
    total = 0
    for row in kept.iter_rows(named=True):
        t, l = (int(v[0]) for v in crop_origin([row["centroid_y"]], [row["centroid_x"]], 48))
        i = row["crop_index"]
        if row["field"] == 0:
            seg = grown[t : t + 48, l : l + 48]
            others = (seg > 0) & (seg != row["label"])
            assert others.sum() > 50  # the neighbours are in the window ...
            assert (imgs[i][:, others] == 0).all()  # ... and blanked in every channel
            assert np.array_equal(imgs[i][:, ~others], raw[i][:, ~others])  # own cell and background kept
            total += int(others.sum())
        else:
            assert np.array_equal(imgs[i], raw[i])  # a lone cell is untouched
        assert cm[i][24, 24]
    assert summary["masked_neighbor_pixels"] == total and plain.height == kept.height


def test_crops_use_whole_cell_labels_when_present(tmp_path: Path) -> None:
    dna, cyto, _ = cell_scene()
    write_plate_store(tmp_path / "P.zarr", np.stack([[dna, cyto]]).astype(np.uint16), ["DNA", "AGP"], "P")
    table = pl.DataFrame({"plate": ["P"], "well": ["A01"], "site": [1], "field": [0]})
    cells = segment_plate(tmp_path / "P.zarr", table, tmp_path / "m.zarr", cell_channel="AGP")
    kept, summary = extract_crops(tmp_path / "P.zarr", tmp_path / "m.zarr", cells, tmp_path / "c.zarr", crop_size=48,
                                  border="pad", mask_neighbors=True)
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert dict(g.attrs)["mask_source"] == "cell_labels"
    cl = open_plate_masks(tmp_path / "m.zarr")[1][0]
    imgs, cm = np.asarray(g["images"][:]), np.asarray(g["masks"][:])
    for row in kept.iter_rows(named=True):
        t, l = (int(v[0]) for v in crop_origin([row["centroid_y"]], [row["centroid_x"]], 48))
        seg = window(cl, t, l, 48)
        assert np.array_equal(cm[row["crop_index"]], seg == row["label"])
        assert cm[row["crop_index"]].sum() == row["cell_area"]  # whole cell inside the window
        assert (imgs[row["crop_index"]][:, (seg > 0) & (seg != row["label"])] == 0).all()
    assert summary["masked_neighbor_pixels"] > 0


def test_crops_refuse_nan_pixels(tmp_path: Path) -> None:
    img = blob_image((64, 64), [(32, 32)], radius=6).astype(np.float32)
    write_plate_store(tmp_path / "P.zarr", img[None, None], ["DNA"], "P")
    table = pl.DataFrame({"plate": ["P"], "well": ["A01"], "site": [1], "field": [0]})
    cells = segment_plate(tmp_path / "P.zarr", table, tmp_path / "m.zarr")
    img[0, 0] = np.nan
    write_plate_store(tmp_path / "P.zarr", img[None, None], ["DNA"], "P")
    with pytest.raises(BioembedInputError, match=r"plate=P, well=A01.*non-finite"):
        extract_crops(tmp_path / "P.zarr", tmp_path / "m.zarr", cells, tmp_path / "c.zarr", crop_size=16)
    assert not (tmp_path / "c.zarr").exists()


def test_crops_border_option_validated(plate, tmp_path: Path) -> None:
    store, table, _ = plate
    cells = segment_plate(store, table, tmp_path / "m.zarr")
    with pytest.raises(ValueError, match="border"):
        extract_crops(store, tmp_path / "m.zarr", cells, tmp_path / "c.zarr", border="mirror")  # type: ignore[arg-type]


# ---- tiles ------------------------------------------------------------------------------------

def test_tiles_inside_the_image_and_counted(plate, tmp_path: Path) -> None:
    store, table, _ = plate
    tiles, summary = extract_tiles(store, tmp_path / "t.zarr", tile_size=48, image_table=table)
    # 128 = 2 x 48 + 32: 2 x 2 tiles per field, 32 rows and columns dropped
    assert summary == {"fields": 4, "tiles": 16, "tiles_per_field": 4, "dropped_rows": 32, "dropped_cols": 32,
                       "dropped_pixels_per_field": 128 * 128 - 4 * 48 * 48, "policy": "inside"}
    assert tiles.columns == ["plate", "well", "site", "field", "tile_id", "y0", "x0", "crop_index"]
    assert tiles.filter(pl.col("field") == 1)[["tile_id", "y0", "x0"]].rows() == [(0, 0, 0), (1, 0, 48), (2, 48, 0),
                                                                                   (3, 48, 48)]
    assert tiles["well"].to_list()[:4] == ["A01"] * 4 and tiles["plate"].unique().to_list() == ["P1"]
    g = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")
    imgs = np.asarray(g["images"][:])
    assert imgs.shape == (16, 5, 48, 48) and imgs.dtype == np.uint16 and np.asarray(g["masks"][:]).all()
    assert dict(g.attrs)["tile_size"] == 48 and dict(g.attrs)["n_tiles"] == 16
    source = np.asarray(open_plate_images(store)[0][:])
    for row in tiles.iter_rows(named=True):
        y, x = row["y0"], row["x0"]
        assert np.array_equal(imgs[row["crop_index"]], source[row["field"], :, y : y + 48, x : x + 48])
    # overlapping tiles with a stride; fields (A01 s1, A01 s2, B02 s1, B02 s2) from the store's own layout
    tiles2, s2 = extract_tiles(store, tmp_path / "t2.zarr", tile_size=48, stride=40)
    assert s2["tiles_per_field"] == 9 and s2["dropped_rows"] == 0 and tiles2.height == 36
    assert tiles2.filter(pl.col("field") == 3)["site"].unique().to_list() == [2]
    with pytest.raises(BioembedInputError, match="larger than"):
        extract_tiles(store, tmp_path / "t3.zarr", tile_size=256)
