"""bioembed's image, corrected-image and mask stores are OME-Zarr HCS plates that the maintained NGFF
tools accept: validated with `ome-zarr-models`, listed by `ome_zarr info`, and read back through
bioembed's own OME-Zarr source reader."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr_models.v05 import HCS, Image, Labels

from bioembed_assets.images.illumination import correct_plate_store, estimate_illumination
from bioembed_assets.images.ngff import BIOEMBED_KEY, open_plate_store, write_plate_store
from bioembed_assets.images.store import ingest_plate, open_plate_images
from bioembed_assets.schema import BioembedInputError
from bioembed_assets.segment.crops import extract_crops
from bioembed_assets.segment.plate import open_plate_masks, segment_plate
from bioembed_assets.sources.omezarr import list_omezarr_fields
from bioembed_assets.sources.phenix import list_phenix_fields
from bioembed_assets.sources.synthetic import SYNTHETIC_CHANNEL_MAP, SyntheticScreenConfig, generate_screen

CONFIG = SyntheticScreenConfig(
    n_plates=1, n_rows=2, n_cols=3, sites_per_well=2, image_size=96, n_moas=1, compounds_per_moa=1,
    n_inactive=1, replicates_per_plate=2, n_dmso_wells=2, seed=5,
)
CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
INDEX_XML = """<?xml version="1.0" encoding="utf-8"?>
<EvaluationInputData xmlns="http://www.perkinelmer.com/PEHH/HarmonyV6"><Images><Image Version="1">
<ImageResolutionX Unit="m">6.5E-07</ImageResolutionX><ImageResolutionY Unit="m">6.5E-07</ImageResolutionY>
</Image></Images></EvaluationInputData>"""


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A synthetic Phenix plate (with its Index.xml) ingested, illumination-corrected and segmented."""
    root = tmp_path_factory.mktemp("ngff")
    (plate,) = generate_screen(root / "raw", CONFIG)
    images_dir = root / "raw" / plate / "Images"
    (images_dir if images_dir.is_dir() else root / "raw" / plate).joinpath("Index.xml").write_text(INDEX_XML)
    fields = list_phenix_fields(root / "raw" / plate, plate, SYNTHETIC_CHANNEL_MAP)
    table = ingest_plate(fields, root / "images" / f"{plate}.zarr", CHANNELS)
    correct_plate_store(root / "images" / f"{plate}.zarr", estimate_illumination(root / "images" / f"{plate}.zarr"),
                        root / "corrected" / f"{plate}.zarr")
    segment_plate(root / "corrected" / f"{plate}.zarr", table, root / "masks" / f"{plate}.zarr", cell_channel="AGP")
    return {"raw": root / "raw" / plate, "images": root / "images" / f"{plate}.zarr",
            "corrected": root / "corrected" / f"{plate}.zarr", "masks": root / "masks" / f"{plate}.zarr"}


def _field_groups(store: Path) -> list[zarr.Group]:
    return [zarr.open_group(store / path, mode="r") for path in open_plate_store(store).attrs["fields"]]


@pytest.mark.parametrize("kind", ["images", "corrected", "masks"])
def test_every_store_is_a_valid_ngff_hcs_plate(stores: dict[str, Path], kind: str) -> None:
    store = stores[kind]
    hcs = HCS.from_zarr(zarr.open_group(store, mode="r"))  # validates plate -> wells -> field images
    plate = hcs.ome_attributes.plate
    assert [r.name for r in plate.rows] == ["A", "B"] and [c.name for c in plate.columns] == ["1", "2", "3"]
    assert len(list(hcs.well_groups)) == 6 and plate.field_count == 2
    attrs = zarr.open_group(store, mode="r").attrs.asdict()
    assert set(attrs) == {"ome", BIOEMBED_KEY}  # bioembed's own metadata never inside NGFF's
    assert not set(attrs[BIOEMBED_KEY]) & {"plate_", "multiscales", "omero", "well", "labels_"}
    for group in _field_groups(store):
        image = Image.from_zarr(group)
        (ms,) = image.ome_attributes.multiscales
        assert len(ms.datasets) == 3  # a small pyramid
        scales = [d.coordinateTransformations[0].scale[-1] for d in ms.datasets]
        assert scales == pytest.approx([0.65, 1.3, 2.6])  # the Index.xml pixel size, doubling per level
        assert [a.unit for a in ms.axes if a.type == "space"] == ["micrometer", "micrometer"]
        level_shapes = [zarr.open_array(group.store_path.store.root / group.path / d.path, mode="r").shape
                        for d in ms.datasets]
        assert [s[-2:] for s in level_shapes] == [(96, 96), (48, 48), (24, 24)]
        if kind == "masks":
            labels = Labels.from_zarr(group["labels"])
            assert labels.ome_attributes.labels == ["nuclei", "cells"]
            for name in ("nuclei", "cells"):
                label = group["labels"][name]
                assert "image-label" in label.attrs["ome"] and len(label.attrs["ome"]["multiscales"][0]["datasets"]) == 3
                assert label["0"].dtype == np.int32 and label["0"].shape == (96, 96)
        else:
            channels = group.attrs["ome"]["omero"]["channels"]
            assert [c["label"] for c in channels] == CHANNELS
            assert channels[0]["color"] == "0000FF" and all(0 < c["window"]["end"] <= 65535 for c in channels)


@pytest.mark.parametrize("kind", ["images", "masks"])
def test_ome_zarr_info_reads_the_stores(stores: dict[str, Path], kind: str) -> None:
    cli = Path(sys.executable).with_name("ome_zarr")
    done = subprocess.run([str(cli), "info", str(stores[kind])], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Plate" in done.stdout and "version: 0.5" in done.stdout


def test_own_ome_zarr_reader_reads_bioembeds_stores_back(stores: dict[str, Path], tmp_path: Path) -> None:
    """bioembed's stores are valid input plates: listed by the OME-Zarr source reader, every well, site,
    channel label, pixel value and the pixel size come back; re-ingesting them gives the same store."""
    images, channels = open_plate_images(stores["images"])
    layout = open_plate_store(stores["images"]).layout
    folder = tmp_path / "plate"
    folder.mkdir()
    shutil.copytree(stores["images"], folder / stores["images"].name)
    fields = list_omezarr_fields(folder, layout.plate, {c: c for c in channels})
    assert [(f.well, f.site) for f in fields] == [(w, k) for w, k in zip(layout.wells, _site_numbers(layout.wells))]
    assert [f.pixel_size_um for f in fields] == pytest.approx([0.65] * len(fields))
    again = tmp_path / "again.zarr"
    ingest_plate(fields, again, channels)
    back, back_channels = open_plate_images(again)
    assert back_channels == channels and back.shape == images.shape
    np.testing.assert_array_equal(back[:], images[:])
    assert open_plate_store(again).attrs["pixel_size_um"] == pytest.approx(0.65)


def _site_numbers(wells: tuple[str, ...]) -> list[int]:
    """The 1-based position of each field within its well (what the reader calls the site)."""
    seen: dict[str, int] = {}
    out = []
    for w in wells:
        seen[w] = seen.get(w, 0) + 1
        out.append(seen[w])
    return out


def test_masks_read_back_and_match_the_table(stores: dict[str, Path]) -> None:
    nuclei, cells = open_plate_masks(stores["masks"])
    assert cells is not None and nuclei.shape == cells.shape == (12, 96, 96)
    assert nuclei[:].max() > 0 and ((cells[:] > 0) >= (nuclei[:] > 0)).all()  # every nucleus inside its cell


def test_reader_errors_name_the_store(tmp_path: Path) -> None:
    with pytest.raises(BioembedInputError, match=r"no mask store here .*segmentation"):
        open_plate_masks(tmp_path / "nothing.zarr")
    flat = zarr.open_group(tmp_path / "old.zarr", mode="w")
    flat.create_array("images", shape=(1, 1, 8, 8), dtype="uint16")
    with pytest.raises(BioembedInputError, match=r"old\.zarr.*not a bioembed OME-Zarr plate store"):
        open_plate_images(tmp_path / "old.zarr")
    write_plate_store(tmp_path / "p.zarr", np.zeros((1, 1, 8, 8), np.uint16), ["DNA"], "P")
    with pytest.raises(BioembedInputError, match="expected a masks store, this is a images store"):
        open_plate_masks(tmp_path / "p.zarr")


def test_plate_stages_report_progress_per_field(stores: dict[str, Path], tmp_path: Path) -> None:
    """ingest, illumination correction, segmentation and crops call progress(done, total) as they go."""
    calls: dict[str, list[tuple[int, int]]] = {}

    def recorder(stage: str):
        return lambda done, total: calls.setdefault(stage, []).append((done, total))

    fields = list_phenix_fields(stores["raw"], stores["raw"].name, SYNTHETIC_CHANNEL_MAP)
    table = ingest_plate(fields, tmp_path / "i.zarr", CHANNELS, progress=recorder("ingest"))
    correct_plate_store(tmp_path / "i.zarr", np.ones((5, 96, 96), np.float32), tmp_path / "c.zarr",
                        progress=recorder("illumination"))
    cells = segment_plate(tmp_path / "c.zarr", table, tmp_path / "m.zarr", on_field=recorder("segmentation"))
    kept, _ = extract_crops(tmp_path / "c.zarr", tmp_path / "m.zarr", cells, tmp_path / "crops.zarr", crop_size=32,
                            progress=recorder("crops"))
    for stage in ("ingest", "illumination", "segmentation"):
        assert calls[stage] == [(k, 12) for k in range(1, 13)], stage
    with_cells = kept["field"].n_unique()  # fields with a kept cell
    assert calls["crops"] == [(k, with_cells) for k in range(1, with_cells + 1)]
