"""Synthetic screen generator, Phenix reader, platemap reader and the zarr plate store."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from bioembed_assets.images.store import ingest_plate, open_plate_images
from bioembed_assets.schema import CELL_PAINTING_CHANNELS, PLATEMAP_COLUMNS, BioembedInputError, parse_well
from bioembed_assets.sources.phenix import PHENIX_NAME, list_phenix_fields
from bioembed_assets.sources.platemap import read_platemap
from bioembed_assets.sources.synthetic import (
    SYNTHETIC_CHANNEL_MAP,
    SyntheticScreenConfig,
    generate_screen,
    phenix_file_name,
)
from tests.conftest import entries

SMALL = SyntheticScreenConfig(
    n_plates=2, n_rows=2, n_cols=6, sites_per_well=2, image_size=128, n_moas=1,
    compounds_per_moa=2, n_inactive=1, replicates_per_plate=2, n_dmso_wells=6, seed=3,
)  # 3 compounds x 2 replicates + 6 DMSO = 12 wells; the one MoA is nuclear_enlargement


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("screen")
    return root, generate_screen(root, SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy_plate(screen: tuple[Path, list[str]], tmp_path: Path) -> Path:
    root, plates = screen
    return Path(shutil.copytree(root / plates[0], tmp_path / plates[0]))


def _site(root: Path, plate: str, well: str, site: int) -> np.ndarray:
    r, c = parse_well(well)
    return np.stack([tifffile.imread(root / plate / "Images" / phenix_file_name(r, c, site, k)) for k in range(1, 6)])


# -- generator ----------------------------------------------------------------------------------
def test_generator_is_deterministic_and_idempotent(screen, tmp_path: Path) -> None:
    root, plates = screen
    assert plates == ["SYN-P01", "SYN-P02"]
    again = tmp_path / "again"
    assert generate_screen(again, SMALL) == plates
    assert _files(again) == _files(root)
    stamp = (again / plates[0] / "platemap.csv").stat().st_mtime_ns
    generate_screen(again, SMALL)  # complete plates are skipped
    assert (again / plates[0] / "platemap.csv").stat().st_mtime_ns == stamp
    other = tmp_path / "other"
    generate_screen(other, SyntheticScreenConfig(**{**SMALL.__dict__, "seed": 4, "n_plates": 1}))
    name = f"{plates[0]}/Images/{phenix_file_name(1, 1, 1, 1)}"
    assert _files(other)[name] != _files(root)[name]


def test_generator_layout_names_and_dtype(screen) -> None:
    root, plates = screen
    truth = pl.read_csv(root / "ground_truth.csv")
    assert truth.columns == ["perturbation", "moa", "active"]
    for plate in plates:
        names = sorted(p.name for p in (root / plate / "Images").iterdir())
        assert len(names) == SMALL.n_wells * SMALL.sites_per_well * 5
        assert all(re.fullmatch(r"r0[12]c0[1-6]f0[12]p01-ch[1-5]sk1fk1fl1\.tiff", n) for n in names)
        img = tifffile.imread(root / plate / "Images" / names[0])
        assert img.dtype == np.uint16 and img.shape == (SMALL.image_size, SMALL.image_size)
        pm = pl.read_csv(root / plate / "platemap.csv")
        assert pm.columns == ["well", "perturbation", "control_type", "moa"]
        dmso = pm.filter(pl.col("control_type") == "negative")
        assert dmso.height == SMALL.n_dmso_wells and set(dmso["perturbation"]) == {"DMSO"}
        assert dmso["moa"].null_count() == dmso.height
        joined = pm.join(truth, on="perturbation", how="left", suffix="_truth")
        assert joined["active"].null_count() == 0  # every perturbation is in the ground truth
        assert (joined["moa"].fill_null("") == joined["moa_truth"].fill_null("")).all()
        counts = pm.filter(pl.col("control_type") == "treatment").group_by("perturbation").len()
        assert set(counts["len"]) == {SMALL.replicates_per_plate}
    assert truth.filter(pl.col("active")).height == SMALL.n_moas * SMALL.compounds_per_moa


def test_default_config_fills_the_plate() -> None:
    cfg = SyntheticScreenConfig()
    assert cfg.n_wells == 48 and cfg.n_compounds * cfg.replicates_per_plate + cfg.n_dmso_wells == 48
    with pytest.raises(ValueError, match="needs"):
        SyntheticScreenConfig(n_rows=2, n_cols=2)


def _nuclear_areas(img: np.ndarray) -> np.ndarray:
    dna = ndi.gaussian_filter(img.astype(np.float32), 1.0)
    labels, n = ndi.label(dna > threshold_otsu(dna))
    areas = np.bincount(labels.ravel())[1:]
    return areas[areas > 20]


def test_phenotypes_and_batch_effects(screen) -> None:
    root, plates = screen
    area: dict[str, list[float]] = {"negative": [], "nuclear_enlargement": []}
    plate_means = []
    for plate in plates:
        pm = pl.read_csv(root / plate / "platemap.csv")
        for well, ctype, moa in pm.select("well", "control_type", "moa").iter_rows():
            group = "negative" if ctype == "negative" else moa
            if group in area:
                for site in (1, 2):
                    area[group].extend(_nuclear_areas(_site(root, plate, well, site)[0]))
        dmso = pm.filter(pl.col("control_type") == "negative")["well"]
        plate_means.append(np.mean([_site(root, plate, w, 1).reshape(5, -1).mean(1) for w in dmso], axis=0))
    assert np.mean(area["nuclear_enlargement"]) > 1.3 * np.mean(area["negative"])
    # nuclei are mostly separated: typical objects are single nuclei (~230 px at radius 8.5)
    assert 100 < np.median(area["negative"]) < 400
    ratio = plate_means[1] / plate_means[0]
    assert np.abs(np.log(ratio)).max() > 0.05  # plates differ by per-channel gains / offsets


# -- Phenix reader ------------------------------------------------------------------------------
def test_list_phenix_fields(screen) -> None:
    root, plates = screen
    fields = list_phenix_fields(root / plates[0], plates[0], SYNTHETIC_CHANNEL_MAP)
    assert len(fields) == SMALL.n_wells * SMALL.sites_per_well
    assert [(f.well, f.site) for f in fields[:3]] == [("A01", 1), ("A01", 2), ("A02", 1)]
    assert list(fields[0].paths) == list(CELL_PAINTING_CHANNELS)
    assert fields[0].paths["Mito"].name == "r01c01f01p01-ch5sk1fk1fl1.tiff"
    # the folder itself works when there is no Images/ subfolder
    images = fields[0].paths["DNA"].parent
    assert len(list_phenix_fields(images, plates[0], SYNTHETIC_CHANNEL_MAP)) == len(fields)


def test_phenix_reader_errors(screen, tmp_path: Path) -> None:
    plate_dir = _copy_plate(screen, tmp_path)
    plate, images = plate_dir.name, plate_dir / "Images"
    n_fields = len(list_phenix_fields(plate_dir, plate, SYNTHETIC_CHANNEL_MAP))
    shutil.copy(images / "r01c01f01p01-ch1sk1fk1fl1.tiff", images / "r01c01f01p02-ch1sk1fk1fl1.tiff")
    (images / "Index.xml").write_text("<xml/>")
    assert len(list_phenix_fields(plate_dir, plate, SYNTHETIC_CHANNEL_MAP)) == n_fields  # plane 2, others ignored
    (images / "r01c02f02p01-ch3sk1fk1fl1.tiff").unlink()
    with pytest.raises(BioembedInputError, match=r"r01c02f02p01-ch3sk1fk1fl1\.tiff") as e:
        list_phenix_fields(plate_dir, plate, SYNTHETIC_CHANNEL_MAP)
    assert plate in str(e.value) and "A02" in str(e.value) and "site 2" in str(e.value)
    shutil.copy(images / "r01c01f01p01-ch1sk1fk1fl1.tiff", images / "r01c02f02p01-ch3sk1fk1fl1.tiff")
    shutil.copy(images / "r01c01f01p01-ch1sk1fk1fl1.tiff", images / "r01c01f01p01-ch6sk1fk1fl1.tiff")
    with pytest.raises(BioembedInputError, match="channel 6 is not in the channel map"):
        list_phenix_fields(plate_dir, plate, SYNTHETIC_CHANNEL_MAP)
    (images / "r01c01f01p01-ch6sk1fk1fl1.tiff").rename(images / "r01c01f01p01-ch1sk1fk1fl1.tif")
    with pytest.raises(BioembedInputError, match="duplicate"):
        list_phenix_fields(plate_dir, plate, SYNTHETIC_CHANNEL_MAP)
    empty = tmp_path / "EMPTY"
    (empty / "Images").mkdir(parents=True)
    with pytest.raises(BioembedInputError, match=r"plate=EMPTY.*no Phenix images"):
        list_phenix_fields(empty, "EMPTY", SYNTHETIC_CHANNEL_MAP)
    with pytest.raises(BioembedInputError, match="does not exist"):
        list_phenix_fields(tmp_path / "nope", "NOPE", SYNTHETIC_CHANNEL_MAP)


# -- platemap -----------------------------------------------------------------------------------
def test_read_platemap(screen, tmp_path: Path) -> None:
    root, plates = screen
    pm = read_platemap(root / plates[0] / "platemap.csv", plates[0])
    assert tuple(pm.columns) == PLATEMAP_COLUMNS and pm.height == SMALL.n_wells
    assert pm.schema["moa"] == pl.Utf8 and pm["well"].to_list()[:2] == ["A01", "A02"]
    prefixed = tmp_path / "prefixed.tsv"
    prefixed.write_text(
        "Metadata_Plate\tMetadata_Well\tMetadata_Perturbation\tMetadata_control_type\tMetadata_moa\n"
        "P1\tB1\tDMSO\tnegcon\t\nP1\tA2\tcpd\ttrt\tkinase\nP2\tA1\tx\ttrt\t\n"
    )
    got = read_platemap(prefixed, "P1")
    assert got.rows() == [("P1", "A02", "cpd", "treatment", "kinase"), ("P1", "B01", "DMSO", "negative", None)]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("well,perturbation,control_type\nA01,x,treatment\n", "no negative control wells"),
        ("well,perturbation,control_type\nA01,DMSO,negative\nZZ9x,x,treatment\n", "invalid well id 'ZZ9x'"),
        ("well,perturbation,control_type\nA01,DMSO,negative\nA1,x,treatment\n", r"duplicate wells \['A01'\]"),
        ("well,perturbation,control_type\nA01,DMSO,negative\nA02,x,weird\n", "unknown control_type 'weird'"),
        ("well,compound\nA01,DMSO\n", r"lacks column\(s\) \['perturbation', 'control_type'\]"),
    ],
)
def test_platemap_errors(tmp_path: Path, body: str, match: str) -> None:
    path = tmp_path / "platemap.csv"
    path.write_text(body)
    with pytest.raises(BioembedInputError, match=match) as e:
        read_platemap(path, "PLATE-X")
    assert "plate=PLATE-X" in str(e.value) and "platemap.csv" in str(e.value)


# -- zarr plate store ---------------------------------------------------------------------------
def test_ingest_round_trip_and_atomic_replace(screen, tmp_path: Path) -> None:
    root, plates = screen
    fields = list_phenix_fields(root / plates[0], plates[0], SYNTHETIC_CHANNEL_MAP)
    store = tmp_path / "stores" / f"{plates[0]}.zarr"
    channels = ["Mito", "DNA", "ER"]
    table = ingest_plate(fields, store, channels)
    assert table.columns == ["plate", "well", "site", "field", "qc_mean_Mito", "qc_mean_DNA", "qc_mean_ER",
                             "qc_saturated_fraction"]
    assert table["field"].to_list() == list(range(len(fields)))
    images, names = open_plate_images(store)
    assert names == channels and images.shape == (len(fields), 3, 128, 128) and images.chunks == (1, 1, 128, 128)
    assert images.dtype == np.uint16
    data = images[:]
    for i, f in enumerate(fields):
        for c, stain in enumerate(channels):
            np.testing.assert_array_equal(data[i, c], tifffile.imread(f.paths[stain]))
    assert table["qc_mean_DNA"][3] == pytest.approx(float(data[3, 1].mean()))
    import zarr

    assert dict(zarr.open_group(store, mode="r").attrs)["bioembed"]["plate"] == plates[0]
    # re-ingest (another channel order) replaces the store whole; no temporary folders remain
    ingest_plate(fields[:4], store, list(CELL_PAINTING_CHANNELS))
    images, names = open_plate_images(store)
    assert names == list(CELL_PAINTING_CHANNELS) and images.shape[0] == 4
    assert entries(store.parent) == [store.name]


def test_ingest_errors_and_qc(screen, tmp_path: Path) -> None:
    plate_dir = _copy_plate(screen, tmp_path)
    plate = plate_dir.name
    fields = list_phenix_fields(plate_dir, plate, SYNTHETIC_CHANNEL_MAP)[:6]
    bad = fields[4].paths["ER"]
    bad.write_bytes(bad.read_bytes()[:300])  # truncated
    store = tmp_path / "out" / "plate.zarr"
    with pytest.raises(BioembedInputError, match="cannot read TIFF") as e:
        ingest_plate(fields, store, CELL_PAINTING_CHANNELS)
    assert plate in str(e.value) and bad.name in str(e.value) and fields[4].well in str(e.value)
    assert not store.exists() and entries(store.parent) == []  # nothing half-written
    bad.write_bytes(b"not a tiff at all")
    with pytest.raises(BioembedInputError, match=bad.name):
        ingest_plate(fields, store, CELL_PAINTING_CHANNELS)
    tifffile.imwrite(bad, np.zeros((64, 64), np.uint16))
    with pytest.raises(BioembedInputError, match=r"\(64, 64\)"):
        ingest_plate(fields, store, CELL_PAINTING_CHANNELS)
    tifffile.imwrite(bad, np.zeros((128, 128), np.float32))
    with pytest.raises(BioembedInputError, match="uint8/uint16"):
        ingest_plate(fields, store, CELL_PAINTING_CHANNELS)
    saturated = np.zeros((128, 128), np.uint16)
    saturated[:32] = 65535
    tifffile.imwrite(bad, saturated)
    table = ingest_plate(fields, store, CELL_PAINTING_CHANNELS)
    assert table["qc_saturated_fraction"][4] == pytest.approx(0.25)
    with pytest.raises(BioembedInputError, match="no plate image store"):
        open_plate_images(tmp_path / "missing.zarr")
    with pytest.raises(BioembedInputError, match="'Actin'"):
        ingest_plate(fields, store, ["DNA", "Actin"])


def test_phenix_name_pattern() -> None:
    m = PHENIX_NAME.match("r03c12f09p01-ch5sk1fk1fl1.tiff")
    assert m is not None and m.groups() == ("03", "12", "09", "01", "5")
    assert PHENIX_NAME.match("r03c12f09p01-ch5.tif") and not PHENIX_NAME.match("thumb_r03c12.tiff")
    assert re.fullmatch(r"r\d\dc\d\df\d\dp01-ch\dsk1fk1fl1\.tiff", phenix_file_name(1, 2, 3, 4))
