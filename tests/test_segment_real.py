"""Segmentation on real fields, checked against CellProfiler's own outputs where the data has them.

ExampleHuman (512x512, CellProfiler CSVs: 289 nuclei, cell areas), the pediatric-atlas Phenix field
(1080x1080, 5 stains, CellProfiler nuclei/cell outline overlays), the JUMP CPJUMP1 field
(CellProfiler Image_Count_Nuclei = 188) and BBBC013 (FKHR-GFP: cytoplasmic in negative controls,
nuclear in positive ones). Skipped when ../shared/data is absent.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import zarr
from scipy import ndimage as ndi

from bioembed_assets.images.ngff import write_plate_store
from bioembed_assets.segment.cells import segment_cells
from bioembed_assets.segment.crops import extract_crops, extract_tiles
from bioembed_assets.segment.nuclei import segment_nuclei
from bioembed_assets.segment.plate import open_plate_masks, segment_plate

tifffile = pytest.importorskip("tifffile")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EXAMPLEHUMAN = SHARED_DATA / "cellprofiler-examplehuman"
EH_IMAGES = EXAMPLEHUMAN / "ExampleHuman" / "images"
EH_CSV = EXAMPLEHUMAN / "tests" / "data" / "cellprofiler" / "ExampleHuman"
CYTOTABLE = SHARED_DATA / "cellpainting-fields-cytodataframe" / "tests" / "data" / "cytotable"
PEDIATRIC = CYTOTABLE / "pediatric_cancer_atlas_profiling" / "images"
JUMP = CYTOTABLE / "JUMP_plate_BR00117006" / "images" / "orig"
BBBC013 = SHARED_DATA / "cellprofiler-examplesbs-bbbc013" / "tests" / "core" / "data" / "ExampleSBSImages"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data not present at {SHARED_DATA}"),
]


def need(*paths: Path) -> None:
    for p in paths:
        if not p.exists():
            pytest.skip(f"real data file missing: {p}")


def not_on_border(labels: np.ndarray) -> int:
    """Objects not touching the image edge (CellProfiler discards those that do)."""
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return int(labels.max()) - int((edge > 0).sum())


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def outline_objects(path: Path) -> np.ndarray:
    """Label the regions enclosed by a CellProfiler outline overlay (RGB, outlines in one colour)."""
    outline = tifffile.imread(path).max(axis=-1) > 0
    return ndi.label(ndi.binary_fill_holes(outline) & ~outline)[0]


def check_cells(nuc: np.ndarray, cells: np.ndarray) -> None:
    """Every cell has its nucleus's label, contains the whole nucleus and is one piece."""
    assert np.array_equal(cells[nuc > 0], nuc[nuc > 0])
    assert set(np.unique(cells)) == set(np.unique(nuc))
    boxes = ndi.find_objects(cells)
    pieces = {ndi.label(cells[box] == lab)[1] for lab, box in enumerate(boxes, start=1) if box is not None}
    assert pieces == {1}


@pytest.fixture(scope="module")
def example_human() -> dict:
    need(EH_IMAGES / "AS_09125_050116030001_D03f00d0.tif", EH_CSV / "Image.csv", EH_CSV / "Nuclei.csv")
    dna = tifffile.imread(EH_IMAGES / "AS_09125_050116030001_D03f00d0.tif")
    body = tifffile.imread(EH_IMAGES / "AS_09125_050116030001_D03f00d2.tif")
    nuc = segment_nuclei(dna)
    return {"dna": dna, "body": body, "nuc": nuc, "image": read_csv(EH_CSV / "Image.csv")[0],
            "nuclei": read_csv(EH_CSV / "Nuclei.csv"), "cells": read_csv(EH_CSV / "Cells.csv")}


def test_examplehuman_nuclei_match_cellprofiler(example_human) -> None:
    eh = example_human
    nuc, cp_count = eh["nuc"], int(float(eh["image"]["Count_Nuclei"]))
    assert cp_count == 289
    ours = not_on_border(nuc)  # the ExampleHuman pipeline discards border objects
    print(f"\nExampleHuman nuclei: ours {ours} (+{int(nuc.max()) - ours} on the border), CellProfiler {cp_count}")
    assert abs(ours - cp_count) <= 0.15 * cp_count
    # object by object: every CellProfiler centre is in one of ours, and few of ours hold two
    cy = np.array([float(r["Location_Center_Y"]) for r in eh["nuclei"]])
    cx = np.array([float(r["Location_Center_X"]) for r in eh["nuclei"]])
    hit = nuc[np.round(cy).astype(int), np.round(cx).astype(int)]
    assert (hit == 0).mean() < 0.03
    _, counts = np.unique(hit[hit > 0], return_counts=True)
    assert (counts > 1).sum() <= 0.05 * cp_count
    cp_area = np.median([float(r["AreaShape_Area"]) for r in eh["nuclei"]])
    assert np.median(np.bincount(nuc.ravel())[1:]) == pytest.approx(cp_area, rel=0.25)


def test_examplehuman_cells_match_cellprofiler(example_human) -> None:
    eh = example_human
    nuc = eh["nuc"]
    cells = segment_cells(nuc, eh["body"])
    check_cells(nuc, cells)
    # pair each CellProfiler cell with ours through its nucleus centre (Cells share Nuclei numbers)
    cp_cell_area = {r["ObjectNumber"]: float(r["AreaShape_Area"]) for r in eh["cells"]}
    cy = np.array([float(r["Location_Center_Y"]) for r in eh["nuclei"]])
    cx = np.array([float(r["Location_Center_X"]) for r in eh["nuclei"]])
    cp = np.array([cp_cell_area[r["ObjectNumber"]] for r in eh["nuclei"]])
    hit = nuc[np.round(cy).astype(int), np.round(cx).astype(int)]
    ids, counts = np.unique(hit, return_counts=True)
    one_to_one = np.isin(hit, ids[counts == 1]) & (hit > 0)
    ours = np.bincount(cells.ravel(), minlength=int(nuc.max()) + 1)[hit[one_to_one]]
    ratio = ours / cp[one_to_one]
    print(f"\nExampleHuman cells: median area ours {np.median(ours):.0f}, CellProfiler {np.median(cp):.0f}; "
          f"r = {np.corrcoef(ours, cp[one_to_one])[0, 1]:.2f}; within 25 %: {np.mean(np.abs(ratio - 1) < 0.25):.2f}")
    assert np.median(ratio) == pytest.approx(1.0, abs=0.15)
    assert np.corrcoef(ours, cp[one_to_one])[0, 1] > 0.8
    assert np.mean(np.abs(ratio - 1) < 0.25) > 0.75


def test_jump_field_nuclei_match_cellprofiler() -> None:
    need(JUMP / "r01c01f01p01-ch5sk1fk1fl1.tiff")
    nuc = segment_nuclei(tifffile.imread(JUMP / "r01c01f01p01-ch5sk1fk1fl1.tiff"))
    ours = not_on_border(nuc)
    print(f"\nJUMP BR00117006 A01 nuclei: ours {ours} (+{int(nuc.max()) - ours} on the border), CellProfiler 188")
    assert abs(ours - 188) <= 0.15 * 188


def test_phenix_field_nuclei_and_cells_match_cellprofiler() -> None:
    orig = PEDIATRIC / "orig"
    need(orig / "r03c03f03p01-ch5sk1fk1fl1.tiff", PEDIATRIC / "outlines" / "NucleiOutlines_BR00143976_C03_3.tiff")
    dna = tifffile.imread(orig / "r03c03f03p01-ch5sk1fk1fl1.tiff")
    agp = tifffile.imread(orig / "r03c03f03p01-ch3sk1fk1fl1.tiff")
    t0 = time.perf_counter()
    nuc = segment_nuclei(dna)
    t1 = time.perf_counter()
    cells = segment_cells(nuc, agp)
    t2 = time.perf_counter()
    print(f"\nPhenix 1080x1080: nuclei {t1 - t0:.2f} s, cells {t2 - t1:.2f} s")
    cp_nuc = outline_objects(PEDIATRIC / "outlines" / "NucleiOutlines_BR00143976_C03_3.tiff")
    cp_nuc = cp_nuc * np.isin(cp_nuc, np.nonzero(np.bincount(cp_nuc.ravel()) > 50)[0])  # outline slivers
    n_cp = len(np.unique(cp_nuc)) - 1
    print(f"Phenix nuclei: ours {nuc.max()}, CellProfiler outlines {n_cp}")
    assert abs(int(nuc.max()) - n_cp) <= 0.15 * n_cp
    check_cells(nuc, cells)
    # each CellProfiler cell that holds one of our nuclei: areas agree
    cp_cells = outline_objects(PEDIATRIC / "outlines" / "CellsOutlines_BR00143976_C03_3.tiff")
    com = np.round(ndi.center_of_mass(nuc > 0, nuc, range(1, int(nuc.max()) + 1))).astype(int)
    cp_id = cp_cells[com[:, 0], com[:, 1]]
    ours = np.bincount(cells.ravel(), minlength=int(nuc.max()) + 1)[1:][cp_id > 0]
    cp = np.bincount(cp_cells.ravel())[cp_id[cp_id > 0]]
    assert len(ours) >= 20
    assert np.median(ours / cp) == pytest.approx(1.0, abs=0.15)
    assert np.corrcoef(ours, cp)[0, 1] > 0.8


def test_bbbc013_gfp_cytoplasm_in_negative_controls_only() -> None:
    """FKHR-GFP fills the cytoplasm of untreated cells (A01) and moves into the nucleus under
    PI3K inhibition (A12): grown cells are much larger than nuclei in A01 only."""
    need(BBBC013 / "Channel2-01-A-01.tif", BBBC013 / "Channel1-12-A-12.tif")
    ratios = {}
    for well in ("01-A-01", "12-A-12"):
        nuc = segment_nuclei(tifffile.imread(BBBC013 / f"Channel2-{well}.tif"))
        cells = segment_cells(nuc, tifffile.imread(BBBC013 / f"Channel1-{well}.tif"))
        check_cells(nuc, cells)
        n, c = np.bincount(nuc.ravel())[1:], np.bincount(cells.ravel())[1:]
        ratios[well] = float(np.median(c[n > 0] / n[n > 0]))
        assert 150 <= nuc.max() <= 400
    print(f"\nBBBC013 median cell/nucleus area: {ratios}")
    assert ratios["01-A-01"] > 1.8 and ratios["12-A-12"] < 1.3


def test_phenix_field_through_plate_segmentation_crops_and_tiles(tmp_path: Path) -> None:
    """The real 5-stain field end to end: whole-cell masks, padded + neighbour-masked crops, tiles."""
    orig = PEDIATRIC / "orig"
    stains = {"DNA": 5, "ER": 2, "AGP": 3, "Mito": 4, "RNA": 6}
    need(*(orig / f"r03c03f03p01-ch{c}sk1fk1fl1.tiff" for c in stains.values()))
    stack = np.stack([tifffile.imread(orig / f"r03c03f03p01-ch{c}sk1fk1fl1.tiff") for c in stains.values()])
    write_plate_store(tmp_path / "BR00143976.zarr", stack[None], list(stains), "BR00143976", ["C03"], [3])
    table = pl.DataFrame({"plate": ["BR00143976"], "well": ["C03"], "site": [3], "field": [0]})
    store, masks = tmp_path / "BR00143976.zarr", tmp_path / "masks.zarr"

    cells = segment_plate(store, table, masks, cell_channel="AGP")
    assert 30 <= cells.height <= 50 and (cells["cell_area"] > 2 * cells["area"]).mean() > 0.8
    assert open_plate_masks(masks)[1] is not None

    kept, summary = extract_crops(store, masks, cells, tmp_path / "crops.zarr", crop_size=128, border="pad",
                                  mask_neighbors=True)
    assert kept.height == cells.height and summary["padded_cells"] == int((kept["padded_pixels"] > 0).sum()) > 0
    crops = zarr.open_group(str(tmp_path / "crops.zarr"), mode="r")
    assert dict(crops.attrs)["mask_source"] == "cell_labels" and summary["masked_neighbor_pixels"] > 0
    imgs = np.asarray(crops["images"][:])
    assert imgs.dtype == np.uint16 and imgs.shape == (cells.height, 5, 128, 128)  # integer: never NaN
    dropped, dsum = extract_crops(store, masks, cells, tmp_path / "drop.zarr", crop_size=128)
    assert dsum["dropped_border"] == summary["padded_cells"] and dropped.height == cells.height - dsum["dropped_border"]

    tiles, tsum = extract_tiles(store, tmp_path / "tiles.zarr", tile_size=256)
    # 1080 = 4 x 256 + 56: 16 tiles, the last 56 rows and columns dropped and counted
    assert tsum["tiles"] == 16 and tsum["dropped_rows"] == tsum["dropped_cols"] == 56
    assert tiles["well"].unique().to_list() == ["C03"]
    t = np.asarray(zarr.open_group(str(tmp_path / "tiles.zarr"), mode="r")["images"][:])
    assert t.shape == (16, 5, 256, 256) and np.array_equal(t[5], stack[:, 256:512, 256:512])
