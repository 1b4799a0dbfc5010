"""Acquisition layouts -> fields -> plate store: every reader on real files (when ../shared/data is there)
and on small fixtures, plus every bad input the issue lists, each failing with plate + file/well named
and nothing left in the store folder."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import tifffile
import zarr
from PIL import Image

from bioembed_assets.config import Home, PlatemapConfig, RunConfig
from bioembed_assets.images.store import ingest_plate, open_plate_images
from bioembed_assets.schema import BioembedInputError, ControlType
from bioembed_assets.sources.layouts import LAYOUTS, FieldFiles, FieldSource, list_fields
from bioembed_assets.sources.phenix import list_phenix_fields
from bioembed_assets.sources.platemap import platemap_from_frame, read_platemap, validate_platemap_join
from bioembed_assets.sources.public import bbbc013_platemap, jump_platemap
from bioembed_assets.sources.synthetic import SYNTHETIC_CHANNEL_MAP
from bioembed_assets.sources.validate import check_plate_folder
from tests.conftest import entries

from .conftest import SHARED_DATA

PEDIATRIC = SHARED_DATA / "cellpainting-fields-cytodataframe/tests/data/cytotable/pediatric_cancer_atlas_profiling/images/orig"
JUMP_FIELD = SHARED_DATA / "cellpainting-fields-cytodataframe/tests/data/cytotable/JUMP_plate_BR00117006/images/orig"
EXAMPLEHUMAN = SHARED_DATA / "cellprofiler-examplehuman/ExampleHuman/images"
EXAMPLEHUMAN_CSV = SHARED_DATA / "cellprofiler-examplehuman/tests/data/cellprofiler/ExampleHuman/Image.csv"
BBBC013 = SHARED_DATA / "cellprofiler-examplesbs-bbbc013/tests/core/data/ExampleSBSImages"
JUMP = SHARED_DATA / "jump-metadata"
BBBC013_PATTERN = r"Channel(?P<channel>\d)-\d+-(?P<row>[A-H])-(?P<col>\d+)\.tif"
# Phenix channel -> stain of the pediatric-atlas field (README: confirmed by Image_FileName_Orig* columns)
PEDIATRIC_MAP = {1: "Brightfield", 2: "ER", 3: "AGP", 4: "Mito", 5: "DNA", 6: "RNA"}
CP = ["DNA", "ER", "RNA", "AGP", "Mito"]
RNG = np.random.default_rng(0)


def real(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not present: {path}")
    return path


def img(dtype=np.uint16, shape=(24, 24)) -> np.ndarray:
    return RNG.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)


def fails(fn: Callable[[], object], *needles: str, store: Path | None = None) -> str:
    """Run `fn`, expect a BioembedInputError whose message holds every needle; the store's folder stays empty."""
    with pytest.raises(BioembedInputError) as e:
        fn()
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    if store is not None:
        assert not store.exists()
        assert not store.parent.exists() or entries(store.parent) == []
    return msg


def stack(store: Path) -> np.ndarray:
    images, _ = open_plate_images(store)
    return images[:]


# -- real data ------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_phenix_real_cell_painting_field(tmp_path: Path) -> None:
    folder = real(PEDIATRIC)
    fields = list_fields("phenix", folder, "BR00143976", PEDIATRIC_MAP)
    assert [(f.well, f.site) for f in fields] == [("C03", 3)]
    assert isinstance(fields[0], FieldSource) and sorted(fields[0].stains) == sorted(PEDIATRIC_MAP.values())
    store = tmp_path / "stores" / "BR00143976.zarr"
    table = ingest_plate(fields, store, CP)
    data = stack(store)
    assert data.shape == (1, 5, 1080, 1080) and data.dtype == np.uint16
    for c, stain in enumerate(CP):  # LZW and uncompressed TIFFs, pixel for pixel
        np.testing.assert_array_equal(data[0, c], tifffile.imread(fields[0].paths[stain]))
    assert table["qc_mean_DNA"][0] > 0
    # the map must name every channel in the files: brightfield (ch1) unmapped is refused, or skipped with ""
    fails(lambda: list_fields("phenix", folder, "BR00143976", {k: v for k, v in PEDIATRIC_MAP.items() if k != 1}),
          "unknown channel", "channel 1 is not in the channel map", "plate=BR00143976", "well=C03", "ch1sk1fk1fl1.tiff")
    (skipped,) = list_fields("phenix", folder, "BR00143976", {**PEDIATRIC_MAP, 1: ""})
    assert sorted(skipped.stains) == sorted(CP)


@pytest.mark.realdata
def test_phenix_real_jump_field_and_orf_platemap(tmp_path: Path) -> None:
    folder = real(JUMP_FIELD)
    jump_map = {"ch2": "AGP", "ch3": "RNA", "ch5": "DNA"}  # CPJUMP1: 3 of its 8 channels are in the snapshot
    (field,) = list_fields("phenix", folder, "BR00117006", jump_map)
    assert (field.well, field.site) == ("A01", 1)
    # asking for all five stains (ER = ch4, Mito = ch1) names the first missing file
    msg = fails(lambda: list_fields("phenix", folder, "BR00117006", {**jump_map, "ch1": "Mito", "ch4": "ER"}),
                "plate=BR00117006", "well=A01", "site 1 is missing channel(s) ch1 (Mito), ch4 (ER)",
                "r01c01f01p01-ch1sk1fk1fl1.tiff")
    assert "r01c01f01p01-ch4sk1fk1fl1.tiff" in msg
    table = ingest_plate([field], tmp_path / "s" / "BR00117006.zarr", ["DNA", "RNA", "AGP"])
    orf = jump_platemap(real(JUMP) / "JUMP-Target-1_orf_platemap.tsv", JUMP / "JUMP-Target-1_orf_metadata.tsv")
    pm = platemap_from_frame(orf, "BR00117006",
                             columns={"perturbation": "Metadata_broad_sample", "control_type": "Metadata_control_type"},
                             controls={"": "treatment", "empty": "treatment"}, source="JUMP-Target-1 ORF")
    assert pm.filter(pl.col("well") == "A01")["perturbation"].item() == "ccsbBroad304_00900"
    join = validate_platemap_join(pm, table, "BR00117006")
    assert join.images_without_platemap == [] and len(join.platemap_without_images) == 383
    assert "383 platemap well(s) have no images" in (join.warning or "")


@pytest.mark.realdata
def test_imagexpress_and_loaddata_real_examplehuman(tmp_path: Path) -> None:
    folder = real(EXAMPLEHUMAN)
    plate, cmap = "AS_09125_050116030001", {"d0": "DNA", "d1": "PH3", "d2": "CellBody"}
    (field,) = list_fields("imagexpress", folder, plate, cmap)
    assert (field.well, field.site) == ("D03", 1)  # field f00 -> site 1
    assert field.paths["PH3"].name == "AS_09125_050116030001_D03f00d1.tif"
    store = tmp_path / "ih" / f"{plate}.zarr"
    ingest_plate([field], store, ["DNA", "PH3", "CellBody"])
    data = stack(store)
    assert data.shape == (1, 3, 512, 512) and data.dtype == np.uint8
    # LoadData: the FileName_* columns of CellProfiler's own Image.csv for these images, paths relative to the CSV
    image_csv = pl.read_csv(real(EXAMPLEHUMAN_CSV))
    rel = os.path.relpath(folder, tmp_path)
    load = image_csv.select(
        pl.lit(plate).alias("Metadata_Plate"), pl.lit("D03").alias("Metadata_Well"),
        *[pl.col(f"FileName_{t}") for t in ("DNA", "PH3", "cellbody")],
        *[pl.lit(rel).alias(f"PathName_{t}") for t in ("DNA", "PH3", "cellbody")],
    )
    load.write_csv(tmp_path / "load_data.csv")
    (lf,) = list_fields("loaddata", tmp_path, plate, {"DNA": "DNA", "PH3": "PH3", "cellbody": "CellBody"})
    assert (lf.well, lf.site) == ("D03", 1) and lf.paths["DNA"].resolve() == field.paths["DNA"].resolve()
    store2 = tmp_path / "ld" / f"{plate}.zarr"
    ingest_plate([lf], store2, ["DNA", "PH3", "CellBody"])
    np.testing.assert_array_equal(stack(store2), data)


@pytest.mark.realdata
def test_regex_real_bbbc013_plate_and_platemap(tmp_path: Path) -> None:
    folder = real(BBBC013)
    fields = list_fields("regex", folder, "BBBC013", {"1": "GFP", "2": "DNA"}, pattern=BBBC013_PATTERN)
    assert len(fields) == 96 and [f.well for f in fields[:2]] == ["A01", "A02"] and fields[-1].well == "H12"
    assert fields[13].paths["GFP"].name == "Channel1-14-B-02.tif"
    store = tmp_path / "s" / "BBBC013.zarr"
    table = ingest_plate(fields, store, ["DNA", "GFP"])
    images, channels = open_plate_images(store)
    assert images.shape == (96, 2, 640, 640) and images.dtype == np.uint8 and channels == ["DNA", "GFP"]
    np.testing.assert_array_equal(images[95, 1], tifffile.imread(folder / "Channel1-96-H-12.tif"))
    # platemap: the helper (compounds per row group) and the generic reader with a column/control mapping
    pm = bbbc013_platemap(folder / "1049_Metadata.csv", "BBBC013")
    counts = dict(pm.group_by("control_type").len().iter_rows())
    assert counts == {"negative": 16, "positive": 8, "treatment": 72}
    row = dict(zip(pm.columns, pm.filter(pl.col("well") == "E05").row(0)))
    assert row["perturbation"] == "LY294002_dose03" and row["moa"] == "PI3K inhibitor"
    assert pm.filter(pl.col("well") == "A12")["perturbation"].item() == "Wortmannin_dose10"
    assert pm.filter(pl.col("perturbation").str.ends_with("_dose05")).height == 8  # 4 replicates x 2 compounds
    generic = read_platemap(folder / "1049_Metadata.csv", "BBBC013",
                            columns={"row": "Row", "column": "Column", "perturbation": "SBS_Doses",
                                     "control_type": "SBS_Controls"},
                            controls={"-1": "negative", "+1": "positive", "0": "treatment"})
    assert generic["control_type"].to_list() == pm["control_type"].to_list()
    assert generic.filter(pl.col("well") == "E05")["perturbation"].item() == "3"
    join = validate_platemap_join(pm, table, "BBBC013")
    assert join.images_without_platemap == join.platemap_without_images == [] and join.warning is None
    # the same plate through a RunConfig (regex layout, the 1049 file via a column mapping)
    cfg = RunConfig(layout="regex", layout_options={"pattern": BBBC013_PATTERN}, channels=["DNA", "GFP"],
                    channel_map={"1": "GFP", "2": "DNA"},
                    platemap=PlatemapConfig(path="1049_Metadata.csv",
                                            columns={"row": "Row", "column": "Column", "perturbation": "SBS_Doses",
                                                     "control_type": "SBS_Controls"},
                                            controls={"-1": "negative", "1": "positive", "0": "treatment"}))
    assert check_plate_folder(folder, cfg, plate="BBBC013") is None


@pytest.mark.realdata
def test_read_platemap_real_jump_layouts(tmp_path: Path) -> None:
    folder = real(JUMP)
    jump_controls = {"NA": "treatment", "": "treatment"}  # negcon / poscon_* are built-in spellings
    for name, n_neg in (("JUMP-Target-1_compound", 64), ("JUMP-Target-2_compound", 64), ("JUMP-MOA_compound", 24)):
        joined = jump_platemap(folder / f"{name}_platemap.tsv", folder / f"{name}_metadata.tsv")
        path = tmp_path / f"{name}.tsv"
        joined.write_csv(path, separator="\t")  # JUMP-style TSV with Metadata_ prefixes and no plate column
        pm = read_platemap(path, "BR00000001", columns={"perturbation": "Metadata_broad_sample"},
                           controls=jump_controls)
        assert pm.height == 384 and set(pm["plate"]) == {"BR00000001"}
        neg = pm.filter(pl.col("control_type") == ControlType.NEGATIVE)
        assert neg.height == n_neg and set(neg["perturbation"]) == {"DMSO"}
        meta = pl.read_csv(folder / f"{name}_metadata.tsv", separator="\t", infer_schema=False)
        poscon = set(meta.filter(pl.col("control_type").str.starts_with("poscon"))["broad_sample"])
        assert set(pm.filter(pl.col("control_type") == ControlType.POSITIVE)["perturbation"]) == poscon
    # without the control mapping, JUMP's "NA" for treatments is refused with a hint
    fails(lambda: read_platemap(path, "BR00000001", columns={"perturbation": "Metadata_broad_sample"}),
          "unknown control_type 'NA'", "PlatemapConfig.controls", "plate=BR00000001", f"{name}.tsv")


# -- each layout on small fixtures ----------------------------------------------------------------
def test_layout_registry_and_options(tmp_path: Path) -> None:
    assert set(LAYOUTS) >= {"phenix", "imagexpress", "loaddata", "rxrx", "omezarr", "regex"}
    fails(lambda: list_fields("opera", tmp_path, "P1", {"1": "DNA"}), "unknown layout 'opera'")
    fails(lambda: list_fields("phenix", tmp_path, "P1", {"1": "DNA"}, pattern="x"), "unknown option(s) ['pattern']")
    fails(lambda: list_fields("regex", tmp_path, "P1", {"1": "DNA"}, pattern="(?P<well>x)"), "(?P<channel>...)")
    fails(lambda: list_fields("phenix", tmp_path, "P1", {"1": "DNA", "ch1": "ER"}), "name the same channel")


def test_phenix_string_int_keys_and_plane(tmp_path: Path) -> None:
    for ch in (1, 2):
        for plane in (1, 2):
            tifffile.imwrite(tmp_path / f"r02c03f01p0{plane}-ch{ch}sk1fk1fl1.tiff", img())
    a = list_phenix_fields(tmp_path, "P1", {1: "DNA", 2: "ER"})
    b = list_fields("phenix", tmp_path, "P1", {"ch1": "DNA", "02": "ER"}, plane="2")
    assert [(f.well, f.site) for f in a] == [("B03", 1)] and a[0].paths["DNA"].name.startswith("r02c03f01p01")
    assert b[0].paths["ER"].name == "r02c03f01p02-ch2sk1fk1fl1.tiff"


def test_imagexpress_metaxpress_names(tmp_path: Path) -> None:
    plate_dir = tmp_path / "Plate1"
    tp = plate_dir / "2024-01-01" / "1234" / "TimePoint_1"
    (tp / "ZStep_1").mkdir(parents=True)
    (plate_dir / "2024-01-01" / "1234" / "TimePoint_2").mkdir()
    arrays = {}
    for well, site, ch, suffix in [("A01", 1, 1, "A1B2C3"), ("A01", 1, 2, "F0F83A3B-0B54-4F65-8A04-5B4E6B1B5C2B"),
                                   ("A01", 2, 1, ""), ("A01", 2, 2, ""), ("B12", 1, 1, ""), ("B12", 1, 2, "")]:
        name = f"Plate1_{well}_s{site}_w{ch}{suffix}.tif"
        arrays[(well, site, ch)] = img()
        tifffile.imwrite(tp / name, arrays[(well, site, ch)])
    tifffile.imwrite(tp / "Plate1_A01_s1_w1_thumbA1B2.tif", img(np.uint8, (4, 4)))  # thumbnail: ignored
    tifffile.imwrite(tp / "ZStep_1" / "Plate1_A01_s1_w1.tif", img())  # a z-plane: ignored
    tifffile.imwrite(plate_dir / "2024-01-01" / "1234" / "TimePoint_2" / "Plate1_A01_s1_w1.tif", img())  # t=2: ignored
    fields = list_fields("imagexpress", plate_dir, "Plate1", {1: "DNA", "w2": "ER"})
    assert [(f.well, f.site) for f in fields] == [("A01", 1), ("A01", 2), ("B12", 1)]
    store = tmp_path / "stores" / "Plate1.zarr"
    ingest_plate(fields, store, ["ER", "DNA"])
    data = stack(store)
    np.testing.assert_array_equal(data[1, 0], arrays[("A01", 2, 2)])
    np.testing.assert_array_equal(data[2, 1], arrays[("B12", 1, 1)])
    no_site = tmp_path / "X"
    no_site.mkdir()
    for ch in (1, 2):
        tifffile.imwrite(no_site / f"X_C04_w{ch}.tif", img())
    assert [(f.well, f.site) for f in list_fields("imagexpress", no_site, "X", {1: "DNA", 2: "ER"})] == [("C04", 1)]


def test_rxrx_png_8_and_16_bit(tmp_path: Path) -> None:
    for dtype, plate in ((np.uint8, "Plate8"), (np.uint16, "Plate16")):
        folder = tmp_path / plate
        folder.mkdir()
        arrays = {}
        for well in ("B02", "A10"):
            for site in (1, 2):
                for ch in (1, 2, 3):
                    arrays[(well, site, ch)] = img(dtype)
                    Image.fromarray(arrays[(well, site, ch)]).save(folder / f"{well}_s{site}_w{ch}.png")
        fields = list_fields("rxrx", folder, plate, {"w1": "DNA", "w2": "ER", "w3": "AGP"})
        assert [(f.well, f.site) for f in fields] == [("A10", 1), ("A10", 2), ("B02", 1), ("B02", 2)]
        store = tmp_path / "stores" / f"{plate}.zarr"
        ingest_plate(fields, store, ["DNA", "ER", "AGP"])
        data = stack(store)
        assert data.dtype == dtype
        np.testing.assert_array_equal(data[3, 2], arrays[("B02", 2, 3)])


def test_regex_well_site_plate_groups(tmp_path: Path) -> None:
    pattern = r"(?P<plate>[^/]+)/(?P<well>[A-P]\d+)/img_s(?P<site>\d+)_(?P<channel>[a-z]+)\.tiff"
    arrays = {}
    for plate in ("P1", "P2"):
        for well in ("A1", "C12"):
            (tmp_path / plate / well).mkdir(parents=True)
            for ch in ("dapi", "gfp"):
                arrays[(plate, well, ch)] = img()
                tifffile.imwrite(tmp_path / plate / well / f"img_s2_{ch}.tiff", arrays[(plate, well, ch)])
    (tmp_path / "P1" / "notes.tif").write_bytes(b"not matched")
    fields = list_fields("regex", tmp_path, "P2", {"DAPI": "DNA", "gfp": "GFP"}, pattern=pattern)
    assert [(f.plate, f.well, f.site) for f in fields] == [("P2", "A01", 2), ("P2", "C12", 2)]
    np.testing.assert_array_equal(fields[1].read("GFP"), arrays[("P2", "C12", "gfp")])


def test_loaddata_synthetic(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    rows = []
    for plate in ("P1", "P2"):
        for well, site in (("B01", 1), ("A02", 2), ("A02", 1)):
            row = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": str(site)}
            for token in ("OrigDNA", "OrigER", "IllumDNA"):
                name = f"{plate}_{well}_{site}_{token}.tif"
                tifffile.imwrite(tmp_path / "imgs" / name, img())
                row |= {f"FileName_{token}": name, f"PathName_{token}": "imgs"}
            rows.append(row)
    pl.DataFrame(rows).write_csv(tmp_path / "meta.csv")
    cmap = {"OrigDNA": "DNA", "OrigER": "ER", "IllumDNA": ""}  # illumination functions skipped
    fields = list_fields("loaddata", tmp_path, "P2", cmap, csv="meta.csv")
    assert [(f.well, f.site) for f in fields] == [("A02", 1), ("A02", 2), ("B01", 1)]
    assert fields[0].paths["ER"] == tmp_path / "imgs" / "P2_A02_1_OrigER.tif" and fields[0].stains == ("DNA", "ER")
    fails(lambda: list_fields("loaddata", tmp_path, "P2", {"OrigDNA": "DNA", "OrigER": "ER"}, csv="meta.csv"),
          "unknown channel", "column FileName_IllumDNA", "plate=P2", "meta.csv")
    fails(lambda: list_fields("loaddata", tmp_path, "P3", cmap, csv="meta.csv"), "no rows for plate 'P3'")
    (tmp_path / "imgs" / "P2_B01_1_OrigER.tif").unlink()
    fails(lambda: list_fields("loaddata", tmp_path, "P2", cmap, csv="meta.csv"),
          "plate=P2", "well=B01", "P2_B01_1_OrigER.tif", "does not exist")


def write_hcs(root: Path, zarr_format: int, labels=("DNA", "ER", "RNA"), nz: int = 3, fields: int = 2,
              dtype=np.uint16, wells=(("A", "1"), ("B", "3"))) -> dict[tuple[str, int], np.ndarray]:
    """A small OME-Zarr HCS plate: NGFF 0.5 on zarr v3 (metadata under 'ome') or 0.4 on zarr v2."""

    def ome(meta: dict) -> dict:
        return {"ome": {"version": "0.5", **meta}} if zarr_format == 3 else meta

    rows = sorted({r for r, _ in wells})
    cols = sorted({c for _, c in wells}, key=int)
    group = zarr.open_group(root, mode="w", zarr_format=zarr_format)
    plate_meta = {"name": root.stem, "field_count": fields, "rows": [{"name": r} for r in rows],
                  "columns": [{"name": c} for c in cols],
                  "wells": [{"path": f"{r}/{c}", "rowIndex": rows.index(r), "columnIndex": cols.index(c)} for r, c in wells]}
    if zarr_format == 2:
        plate_meta["version"] = "0.4"
    group.attrs.update(ome({"plate": plate_meta}))
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}, {"name": "z", "type": "space"},
            {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    out = {}
    for r, c in wells:
        well = group.require_group(r).require_group(c)
        well.attrs.update(ome({"well": {"images": [{"path": str(k)} for k in range(fields)]}}))
        for k in range(fields):
            field = well.create_group(str(k))
            data = RNG.integers(0, 4000, (1, len(labels), nz, 16, 16), dtype=dtype)
            field.create_array("0", data=data, chunks=(1, 1, 1, 16, 16))
            ms = {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [1, 1, 1, 0.5, 0.5]}]}]}
            if zarr_format == 2:
                ms["version"] = "0.4"
            field.attrs.update(ome({"multiscales": [ms], "omero": {"channels": [{"label": lab} for lab in labels]}}))
            out[(f"{r}{int(c):02d}", k + 1)] = data
    return out


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_omezarr_hcs_plate(tmp_path: Path, zarr_format: int) -> None:
    truth = write_hcs(tmp_path / "P1.zarr", zarr_format)
    by_label = list_fields("omezarr", tmp_path, "P1", {"DNA": "DNA", "ER": "ER", "RNA": "RNA"})
    assert [(f.well, f.site) for f in by_label] == [("A01", 1), ("A01", 2), ("B03", 1), ("B03", 2)]
    assert "P1.zarr/B/3/1/0 [c=1, t=0, z=0]" in by_label[3].location("ER")
    np.testing.assert_array_equal(by_label[3].read("ER"), truth[("B03", 2)][0, 1, 0])
    by_index = list_fields("omezarr", tmp_path / "P1.zarr", "P1", {"0": "DNA", "1": "ER", "2": "RNA"}, z="max")
    np.testing.assert_array_equal(by_index[0].read("RNA"), truth[("A01", 1)][0, 2].max(axis=0))
    assert by_index[0].header("DNA") == ((16, 16), np.dtype(np.uint16))
    store = tmp_path / "out" / "P1.zarr"
    ingest_plate(by_label, store, ["RNA", "DNA"])
    data = stack(store)
    np.testing.assert_array_equal(data[2, 0], truth[("B03", 1)][0, 2, 0])
    fails(lambda: list_fields("omezarr", tmp_path, "P1", {"DNA": "DNA", "ER": "ER"}),
          "unknown channel", "index 2 (label 'RNA')", "plate=P1", "well=A01", "P1.zarr/A/1/0/0 [c=2]")


# -- bad inputs -----------------------------------------------------------------------------------
def phenix_plate(folder: Path, wells=("A01", "A02"), sites=(1, 2), channels=(1, 2, 3), dtype=np.uint16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for w in wells:
        r, c = ord(w[0]) - 64, int(w[1:])
        for s in sites:
            for ch in channels:
                tifffile.imwrite(folder / f"r{r:02d}c{c:02d}f{s:02d}p01-ch{ch}sk1fk1fl1.tiff", img(dtype))
    return folder


MAP3 = {1: "DNA", 2: "ER", 3: "RNA"}
CFG3 = RunConfig(channels=["DNA", "ER", "RNA"], channel_map={str(k): v for k, v in MAP3.items()})


def sample_plate(layout: str, folder: Path, plate: str = "BADP") -> tuple[dict, dict]:
    """A 2-well x 2-site x 3-channel plate in `layout`; returns (channel map, options)."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "omezarr":
        write_hcs(folder / f"{plate}.zarr", 3, nz=1)
        return {"DNA": "DNA", "ER": "ER", "RNA": "RNA"}, {}
    rows = []
    for w in ("A01", "A02"):
        for s in (1, 2):
            row = {"Metadata_Plate": plate, "Metadata_Well": w, "Metadata_Site": str(s)}
            for ch in (1, 2, 3):
                name = {"phenix": f"r01c{int(w[1:]):02d}f{s:02d}p01-ch{ch}sk1fk1fl1.tiff",
                        "imagexpress": f"{plate}_{w}_s{s}_w{ch}.tif",
                        "rxrx": f"{w}_s{s}_w{ch}.png",
                        "regex": f"{w}-{s}-c{ch}.tif",
                        "loaddata": f"{w}-{s}-c{ch}.tif"}[layout]
                if layout == "rxrx":
                    Image.fromarray(img()).save(folder / name)
                else:
                    tifffile.imwrite(folder / name, img())
                row |= {f"FileName_c{ch}": name}
            rows.append(row)
    if layout == "loaddata":
        pl.DataFrame(rows).write_csv(folder / "load_data.csv")
        return {"c1": "DNA", "c2": "ER", "c3": "RNA"}, {}
    if layout == "regex":
        return {"c1": "DNA", "c2": "ER", "c3": "RNA"}, {"pattern": r"(?P<well>[A-H]\d+)-(?P<site>\d)-(?P<channel>c\d)\.tif"}
    return MAP3, {}


FILE_LAYOUTS = ["phenix", "imagexpress", "rxrx", "regex", "loaddata"]


@pytest.mark.parametrize("layout", [*FILE_LAYOUTS, "omezarr"])
def test_missing_folder_empty_folder_and_bad_plate_names(tmp_path: Path, layout: str) -> None:
    cmap, options = sample_plate(layout, tmp_path / "template")
    fails(lambda: list_fields(layout, tmp_path / "nope", "NOPE", cmap, **options), "plate=NOPE", "does not exist", "nope")
    (tmp_path / "EMPTY").mkdir()
    msg = fails(lambda: list_fields(layout, tmp_path / "EMPTY", "EMPTY", cmap, **options), "plate=EMPTY", "EMPTY")
    assert any(w in msg for w in ("no ", "not exist", "expected"))
    for bad in ("../x", "/abs", "a/b"):
        fails(lambda bad=bad: list_fields(layout, tmp_path / "template", bad, cmap, **options), "invalid plate name")


@pytest.mark.parametrize("layout", [*FILE_LAYOUTS, "omezarr"])
def test_missing_channel_for_one_site(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "BADP"
    cmap, options = sample_plate(layout, folder)
    if layout == "omezarr":  # field A/2/1 has only DNA and ER
        field = zarr.open_group(folder / "BADP.zarr" / "B" / "3" / "1", mode="a")
        field.create_array("0", data=RNG.integers(0, 9, (1, 2, 1, 16, 16), dtype=np.uint16), overwrite=True)
        field.attrs.update({"ome": {**field.attrs["ome"], "omero": {"channels": [{"label": "DNA"}, {"label": "ER"}]}}})
        fails(lambda: list_fields(layout, folder, "BADP", cmap, **options), "plate=BADP", "well=B03",
              "site 2 is missing channel(s) RNA (RNA)", "BADP.zarr/B/3/1/0")
        return
    victim = {"phenix": "r01c02f02p01-ch3sk1fk1fl1.tiff", "imagexpress": "BADP_A02_s2_w3.tif",
              "rxrx": "A02_s2_w3.png", "regex": "A02-2-c3.tif", "loaddata": "A02-2-c3.tif"}[layout]
    if layout == "loaddata":
        csv = pl.read_csv(folder / "load_data.csv", infer_schema=False)
        csv.with_columns(pl.when(pl.col("FileName_c3") == victim).then(None).otherwise(pl.col("FileName_c3"))
                         .alias("FileName_c3")).write_csv(folder / "load_data.csv")
        needles = ["FileName_c3 for this site", "A02-2-c1.tif"]
    else:
        (folder / victim).unlink()
        needles = [victim] if layout in ("phenix", "rxrx") else []
    fails(lambda: list_fields(layout, folder, "BADP", cmap, **options), "plate=BADP", "well=A02", "site 2",
          "missing channel", "(RNA)", *needles)


@pytest.mark.parametrize("layout", [*FILE_LAYOUTS, "omezarr"])
def test_unknown_channel_and_duplicates(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "BADP"
    cmap, options = sample_plate(layout, folder)
    two = dict(list(cmap.items())[:2])  # the third channel is not in the map
    where = ["load_data.csv", "column FileName_c3"] if layout == "loaddata" else ["well=A01"]  # a column, not a well
    fails(lambda: list_fields(layout, folder, "BADP", two, **options), "unknown channel", "plate=BADP", *where)
    if layout == "omezarr":  # two channels labelled DNA
        field = zarr.open_group(folder / "BADP.zarr" / "A" / "1" / "0", mode="a")
        field.attrs.update({"ome": {**field.attrs["ome"], "omero": {"channels": [{"label": x} for x in ("DNA", "DNA", "RNA")]}}})
        fails(lambda: list_fields(layout, folder, "BADP", cmap, **options), "duplicate image for site 1", "well=A01",
              "BADP.zarr/A/1/0/0 [c=1]")
        return
    if layout == "loaddata":
        csv = pl.read_csv(folder / "load_data.csv", infer_schema=False)
        pl.concat([csv, csv.head(1)]).write_csv(folder / "load_data.csv")
        dup = "A01-1-c1.tif"
    else:
        src = {"phenix": "r01c01f01p01-ch1sk1fk1fl1.tiff", "imagexpress": "BADP_A01_s1_w1.tif", "rxrx": "A01_s1_w1.png",
               "regex": "A01-1-c1.tif"}[layout]
        dup = {"phenix": "r01c01f01p01-ch1sk1fk1fl1.tif", "imagexpress": "BADP_A01_s1_w1ABCDEF.tif",
               "rxrx": "A01_s1_w01.png", "regex": "A1-1-c1.tif"}[layout]
        shutil.copy(folder / src, folder / dup)
    fails(lambda: list_fields(layout, folder, "BADP", cmap, **options), "duplicate image for site 1", "plate=BADP",
          "well=A01", dup)


@pytest.mark.parametrize("layout", ["phenix", "imagexpress", "rxrx", "regex"])
def test_non_utf8_file_name(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "BADP"
    cmap, options = sample_plate(layout, folder)
    bad = os.fsencode(folder) + b"/r01c01f01p01-ch1\xff\xfe.tiff"
    os.close(os.open(bad, os.O_CREAT | os.O_WRONLY, 0o644))
    msg = fails(lambda: list_fields(layout, folder, "BADP", cmap, **options), "plate=BADP", "not valid UTF-8",
                r"r01c01f01p01-ch1\xff\xfe.tiff")
    msg.encode("utf-8")  # the message itself is printable


def test_corrupt_and_truncated_images_leave_no_store(tmp_path: Path) -> None:
    folder = phenix_plate(tmp_path / "raw" / "CORRUPT")
    store = tmp_path / "stores" / "CORRUPT.zarr"
    victim = folder / "r01c02f01p01-ch2sk1fk1fl1.tiff"
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])  # truncated in the pixel data
    fields = list_fields("phenix", folder, "CORRUPT", MAP3)
    fails(lambda: ingest_plate(fields, store, ["DNA", "ER", "RNA"]), "cannot read TIFF", "plate=CORRUPT", "well=A02",
          victim.name, store=store)
    victim.write_bytes(good[:100])  # truncated header
    fails(lambda: ingest_plate(fields, store, ["DNA", "ER", "RNA"]), "plate=CORRUPT", "well=A02", victim.name, store=store)
    assert "unreadable image header" in check_plate_folder(folder, CFG3)
    png_folder = tmp_path / "raw" / "PNG"
    cmap, _ = sample_plate("rxrx", png_folder, "PNG")
    png = png_folder / "A02_s1_w2.png"
    png.write_bytes(png.read_bytes()[:60])
    fails(lambda: ingest_plate(list_fields("rxrx", png_folder, "PNG", cmap), store, ["DNA", "ER"]), "cannot read PNG",
          "plate=PNG", "well=A02", png.name, store=store)


def test_shapes_bit_depths_and_dtypes_leave_no_store(tmp_path: Path) -> None:
    folder = phenix_plate(tmp_path / "raw" / "P")
    store = tmp_path / "stores" / "P.zarr"
    victim = folder / "r01c02f02p01-ch3sk1fk1fl1.tiff"
    cases = [
        (img(np.uint16, (20, 24)), ["channels of different shapes in site 2", "RNA image is (20, 24)"]),
        (img(np.uint8), ["mixed bit depth in site 2", "RNA is uint8 but DNA is uint16"]),
        (RNG.random((24, 24), dtype=np.float32), ["non-integer pixel type float32", "uint8/uint16"]),
        (img(np.uint16, (2, 24, 24)), ["expected a 2-D uint8/uint16 image", "(2, 24, 24)"]),
    ]
    for array, needles in cases:
        tifffile.imwrite(victim, array)
        fields = list_fields("phenix", folder, "P", MAP3)
        fails(lambda fields=fields: ingest_plate(fields, store, ["DNA", "ER", "RNA"]), *needles, "plate=P", "well=A02",
              victim.name, store=store)
    # across fields: a whole site at another shape, or another bit depth
    for dtype, shape, needle in ((np.uint16, (20, 20), "fields of different shapes"),
                                 (np.uint8, (24, 24), "mixed bit depth across fields")):
        for ch in (1, 2, 3):
            tifffile.imwrite(folder / f"r01c02f02p01-ch{ch}sk1fk1fl1.tiff", img(dtype, shape))
        fields = list_fields("phenix", folder, "P", MAP3)
        fails(lambda fields=fields: ingest_plate(fields, store, ["DNA", "ER", "RNA"]), needle, "plate=P", "well=A02",
              "r01c02f02p01-ch1sk1fk1fl1.tiff", store=store)
        check = {"fields of different shapes": "images of different shapes", "mixed bit depth across fields": "mixed bit depth"}
        assert check[needle] in check_plate_folder(folder, CFG3)  # the sensor refuses the folder too


def test_uint8_any_channel_count(tmp_path: Path) -> None:
    folder = phenix_plate(tmp_path / "raw" / "P8", channels=range(1, 8), dtype=np.uint8)
    cmap = {k: f"S{k}" for k in range(1, 8)}
    fields = list_fields("phenix", folder, "P8", cmap)
    store = tmp_path / "s" / "P8.zarr"
    table = ingest_plate(fields, store, [f"S{k}" for k in range(7, 0, -1)])
    data = stack(store)
    assert data.shape == (4, 7, 24, 24) and data.dtype == np.uint8 and table.width == 4 + 7 + 1
    np.testing.assert_array_equal(data[3, 0], tifffile.imread(fields[3].paths["S7"]))


def test_platemap_join_and_control_mapping(tmp_path: Path) -> None:
    path = tmp_path / "pm.csv"
    path.write_text("Well,Compound,Role\nA1,DMSO,ctrl-\nA2,drugX,ctrl+\nB1,drugY,x\n")
    pm = read_platemap(path, "P1", columns={"well": "Well", "perturbation": "Compound", "control_type": "Role"},
                       controls={"ctrl-": "negative", "ctrl+": "positive", "x": "treatment"})
    assert pm["control_type"].to_list() == ["negative", "positive", "treatment"]
    images = pl.DataFrame({"plate": ["P1"] * 3, "well": ["A01", "A01", "A02"], "site": [1, 2, 1]})
    join = validate_platemap_join(pm, images, "P1")
    assert join.images_without_platemap == [] and join.platemap_without_images == ["B01"]
    assert join.warning == "plate P1: 1 platemap well(s) have no images: B01"
    more = images.vstack(pl.DataFrame({"plate": ["P1", "P1"], "well": ["H12", "C03"], "site": [1, 1]}))
    fails(lambda: validate_platemap_join(pm, more, "P1"), "plate=P1", "well=C03",
          "2 well(s) have images but are not in the platemap: C03, H12")
    # bad mappings and a platemap without negative controls
    fails(lambda: read_platemap(path, "P1", columns={"drug": "Compound"}), "unknown bioembed column(s) ['drug']")
    fails(lambda: read_platemap(path, "P1", columns={"well": "Position"}), "no such column", "plate=P1", "pm.csv")
    fails(lambda: read_platemap(path, "P1", columns={"well": "Well", "perturbation": "Compound", "control_type": "Role"},
                                controls={"ctrl-": "negatory"}), "control mapping 'ctrl-' -> 'negatory'")
    fails(lambda: read_platemap(path, "P1", columns={"well": "Well", "perturbation": "Compound", "control_type": "Role"},
                                controls={"ctrl-": "treatment", "ctrl+": "positive", "x": "treatment"}),
          "no negative control wells", "plate=P1", "pm.csv")


def test_check_plate_folder_with_config_and_names(tmp_path: Path) -> None:
    folder = tmp_path / "raw" / "PLATE-1"
    cmap, options = sample_plate("imagexpress", folder, "PLATE-1")
    (folder / "platemap.csv").write_text("well,perturbation,control_type\nA01,DMSO,negative\nA02,x,treatment\n")
    cfg = RunConfig(layout="imagexpress", channels=["DNA", "RNA"], channel_map={f"w{k}": v for k, v in cmap.items()})
    assert check_plate_folder(folder, cfg) is None
    assert "invalid plate name '../x'" in check_plate_folder(folder, cfg, plate="../x")
    assert "invalid plate name '/abs'" in check_plate_folder(folder, cfg, plate="/abs")
    assert "not stains of the channel map" in check_plate_folder(folder, cfg.model_copy(update={"channels": ["Actin"]}))
    shared = tmp_path / "maps" / "PLATE-1.csv"
    shared.parent.mkdir()
    shutil.move(folder / "platemap.csv", shared)
    assert "no platemap" in check_plate_folder(folder, cfg)
    cfg2 = cfg.model_copy(update={"platemap": PlatemapConfig(path="maps/{plate}.csv")})
    assert check_plate_folder(folder, cfg2, config_dir=tmp_path) is None
    for bad in ("../x", "/abs"):
        with pytest.raises(BioembedInputError, match="invalid plate name"):
            Home(root=tmp_path).raw_plate_dir(bad)
        fake = FieldFiles(bad, "A01", 1, {"DNA": folder / "PLATE-1_A01_s1_w1.tif"})
        fails(lambda fake=fake: ingest_plate([fake], tmp_path / "s" / "x.zarr", ["DNA"]), "invalid plate name")
    # the default (no config) is the synthetic Phenix plate
    assert "no Phenix images" in check_plate_folder(folder)
    phenix = phenix_plate(tmp_path / "raw" / "SYN", channels=sorted(SYNTHETIC_CHANNEL_MAP))
    (phenix / "platemap.csv").write_text("well,perturbation,control_type\nA01,DMSO,negative\nA02,x,treatment\n")
    assert check_plate_folder(phenix) is None
