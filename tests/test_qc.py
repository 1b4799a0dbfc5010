"""Per-site image QC (focus, saturation, intensity, flags) and the plate heatmap."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import ndimage

from bioembed_assets.images.plots import plate_heatmap_png
from bioembed_assets.images.qc import QCThresholds, power_log_log_slope, site_qc
from bioembed_assets.images.store import ingest_plate, open_plate_images
from bioembed_assets.schema import well_name
from bioembed_assets.sources.phenix import FieldFiles

from .conftest import BBBC013_DIR as BBBC013
from .conftest import make_plate_store

CHANNELS = ["DNA", "AGP"]
SIZE, N_SITES, BLURRED, SATURATED = 192, 24, 5, 11


def make_store(root: Path, fields: np.ndarray, channels: list[str] = CHANNELS, plate: str = "P1") -> tuple[Path, pl.DataFrame]:
    """A plate store from an array (n_fields, C, H, W), one site per well, and its image table."""
    return make_plate_store(root, fields, channels, plate)


def scene(rng: np.random.Generator, blur: float = 0.0) -> np.ndarray:
    """Two stains of textured "cells" (Gaussian blobs of several sizes) with Poisson noise, uint16."""
    planes = []
    for amp in (3e4, 1.5e4):
        img = np.zeros((SIZE, SIZE))
        ys, xs = rng.integers(0, SIZE, (2, rng.poisson(60)))
        np.add.at(img, (ys, xs), rng.uniform(0.5, 1.5, ys.size))
        texture = ndimage.gaussian_filter(rng.random((SIZE, SIZE)), 1.0)
        img = 200 + amp * ndimage.gaussian_filter(img, 3) * (0.5 + texture)
        if blur:
            img = ndimage.gaussian_filter(img, blur)
        planes.append(rng.poisson(img))
    return np.clip(planes, 0, 65535).astype(np.uint16)


def test_blurred_and_saturated_sites_flagged(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    fields = np.stack([scene(rng, blur=4.0 if i == BLURRED else 0.0) for i in range(N_SITES)])
    fields[SATURATED, 1, 20:53, 40:73] = 65535  # 3% of the AGP pixels at the dtype max
    store, table = make_store(tmp_path, fields)
    qc = site_qc(store, table)
    assert qc.height == N_SITES and qc.columns[: table.width] == table.columns
    for c in CHANNELS:
        assert qc.schema[f"qc_focus_{c}"] == pl.Float64 and qc[f"qc_focus_{c}"].is_finite().all()
    flagged = qc.filter(~pl.col("qc_pass"))
    assert flagged["field"].to_list() == [BLURRED, SATURATED], flagged.select("field", "qc_flags")
    flags = dict(zip(qc["field"].to_list(), qc["qc_flags"].to_list()))
    assert set(flags[BLURRED].split(",")) == {"blur:DNA", "blur:AGP"}
    assert "saturated:AGP" in flags[SATURATED].split(",") and "DNA" not in flags[SATURATED]
    assert qc["qc_saturation_AGP"][SATURATED] == pytest.approx(33 * 33 / SIZE**2, rel=0.01)
    assert qc["qc_focus_DNA"][BLURRED] < qc["qc_focus_DNA"].median() - 0.5  # steeper spectrum
    assert all(f == "" for i, f in flags.items() if i not in (BLURRED, SATURATED))

    lenient = site_qc(store, table, QCThresholds(saturation_max=0.5, intensity_z=1000.0))
    assert lenient["qc_flags"][SATURATED] == "blur:AGP"  # the clipped plateau's steep spectrum, no longer explained
    again = site_qc(store, qc)  # re-running replaces the QC columns instead of duplicating them
    assert again.columns == qc.columns and again["qc_flags"].to_list() == qc["qc_flags"].to_list()


def test_clean_and_homogeneous_plates_not_flagged(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    store, table = make_store(tmp_path / "clean", np.stack([scene(rng) for _ in range(N_SITES)]))
    qc = site_qc(store, table)
    assert qc["qc_pass"].all(), qc.filter(~pl.col("qc_pass")).select("field", "qc_flags")
    same = np.stack([scene(np.random.default_rng(2))] * 12)  # MAD = 0: robust z must not explode
    store, table = make_store(tmp_path / "same", same)
    assert site_qc(store, table)["qc_pass"].all()


def test_empty_site_flagged(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    fields = np.stack([scene(rng) for _ in range(12)])
    fields[4] = rng.poisson(3, fields[4].shape)  # shutter closed: dark noise only
    fields[7] = 0  # nothing at all: focus undefined
    store, table = make_store(tmp_path, fields)
    qc = site_qc(store, table)
    assert qc.filter(~pl.col("qc_pass"))["field"].to_list() == [4, 7]
    assert {"empty:DNA", "empty:AGP"} <= set(qc["qc_flags"][4].split(","))
    assert qc["qc_flags"][7] == "empty:DNA,empty:AGP" and np.isnan(qc["qc_focus_DNA"][7])


def _cellprofiler_slope(img: np.ndarray) -> float:
    """centrosome.radial_power_spectrum.rps + MeasureImageQuality's PowerLogLogSlope, as published."""
    img = img.astype(float)
    radii2 = (np.arange(img.shape[0]).reshape((-1, 1)) ** 2) + (np.arange(img.shape[1]) ** 2)
    radii2 = np.minimum(radii2, np.flipud(radii2))
    radii2 = np.minimum(radii2, np.fliplr(radii2))
    power = np.abs(np.fft.fft2(img - img.mean())) ** 2
    radii = np.floor(np.sqrt(radii2)).astype(int) + 1
    labels = np.arange(2, np.floor(min(img.shape) / 8.0)).astype(int)
    ring = ndimage.sum(power, radii, labels)
    return float(np.polyfit(np.log(labels), np.log(ring), 1)[0])


def test_focus_matches_cellprofiler_and_is_scale_free() -> None:
    img = scene(np.random.default_rng(4))[0]
    ours = power_log_log_slope(img)
    assert ours == pytest.approx(_cellprofiler_slope(img), abs=0.05)
    assert power_log_log_slope(img.astype(float) * 7) == pytest.approx(ours, abs=1e-6)
    assert np.isnan(power_log_log_slope(np.full((64, 64), 5, dtype=np.uint8)))


def test_plate_heatmap_png() -> None:
    rng = np.random.default_rng(5)
    wells = [well_name(r, c) for r in range(1, 9) for c in range(1, 13) if (r, c) != (3, 5)]
    df = pl.DataFrame({"well": wells, "cells": rng.poisson(300, len(wells))})
    png = plate_heatmap_png(df, "cells", "cells per well")
    assert png.startswith(b"\x89PNG")
    (Path("/tmp") / "bioembed_plate_heatmap_96.png").write_bytes(png)
    wells384 = [well_name(r, c) for r in range(1, 17) for c in range(1, 25)]
    flagged = pl.DataFrame({"well": wells384, "flagged": rng.random(384) < 0.05})
    assert plate_heatmap_png(flagged, "flagged", "flagged sites").startswith(b"\x89PNG")
    odd = pl.DataFrame({"well": ["A01", "C50"], "v": [1.0, None]})  # beyond 1536 wells' 48 columns: 1..max
    assert plate_heatmap_png(odd, "v", "odd").startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="one row per well"):
        plate_heatmap_png(pl.DataFrame({"well": ["A01", "A01"], "v": [1, 2]}), "v", "dup")
    with pytest.raises(ValueError, match="no 'x' column"):
        plate_heatmap_png(df, "x", "missing")


# --- real data -------------------------------------------------------------------------------------------------

@pytest.mark.realdata
def test_bbbc013_qc_all_sites(tmp_path: Path) -> None:
    if not BBBC013.is_dir():
        pytest.skip(f"real data not present at {BBBC013}")
    pattern = re.compile(r"Channel([12])-\d\d-([A-H])-(\d\d)\.tif$")
    by_well: dict[str, dict[str, Path]] = {}
    for p in sorted(BBBC013.glob("Channel*.tif")):
        if m := pattern.match(p.name):
            by_well.setdefault(f"{m.group(2)}{m.group(3)}", {})["GFP" if m.group(1) == "1" else "DNA"] = p
    store = tmp_path / "BBBC013.zarr"
    table = ingest_plate([FieldFiles("BBBC013", w, 1, paths) for w, paths in sorted(by_well.items())], store, ["GFP", "DNA"])

    t0 = time.perf_counter()
    qc = site_qc(store, table)
    seconds = time.perf_counter() - t0
    print(f"BBBC013 site_qc: {qc.height} sites x 2 stains in {seconds:.2f} s; flagged: {qc.filter(~pl.col('qc_pass')).rows()}")
    assert qc.height == 96 and seconds < 30
    assert qc.select(pl.col("^qc_(focus|saturation|intensity)_.*$").is_finite().all()).row(0) == (True,) * 6
    assert (~qc["qc_pass"]).sum() <= 5  # a real, in-focus plate: few flags
    images, _ = open_plate_images(store)
    assert qc["qc_focus_DNA"][0] == pytest.approx(_cellprofiler_slope(np.asarray(images[0, 1])), abs=0.05)

    per_well = qc.group_by("well").agg((~pl.col("qc_pass")).sum().alias("flagged_sites"), pl.col("qc_focus_DNA").mean())
    png = plate_heatmap_png(per_well, "qc_focus_DNA", "BBBC013: DNA focus (PowerLogLogSlope)")
    assert png.startswith(b"\x89PNG")
    (Path("/tmp") / "bioembed_bbbc013_focus_heatmap.png").write_bytes(png)
