"""Illumination correction: recovery of a known multiplicative field, flattening, store round trip, real BBBC013 plate."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage

from bioembed_assets.images.illumination import (
    ILLUM_FLOOR,
    correct_plate_store,
    estimate_illumination,
    load_illumination,
    save_illumination,
)
from bioembed_assets.images.store import ingest_plate, open_plate_images
from bioembed_assets.schema import BioembedInputError
from bioembed_assets.sources.phenix import FieldFiles

from .conftest import BBBC013_DIR as BBBC013
from .conftest import make_plate_store

CHANNELS = ["DNA", "AGP"]
SIZE = 192


def make_store(root: Path, fields: np.ndarray, channels: list[str] = CHANNELS, plate: str = "P1") -> Path:
    """A plate store from an array (n_fields, C, H, W), one site per well."""
    return make_plate_store(root, fields, channels, plate)[0]


def gradient(size: int = SIZE) -> np.ndarray:
    """A vignette (35% darker in the corners) times a left-to-right ramp, per channel."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    vignette = 1 - 0.7 * (x**2 + y**2)
    return np.stack([vignette * (1 + 0.4 * x), vignette * (1 - 0.3 * y)])


def cell_scene(rng: np.random.Generator, size: int = SIZE, n_cells: int = 40) -> np.ndarray:
    """Background plus Gaussian blobs ("cells") at random places, float, one plane."""
    img = np.zeros((size, size))
    ys, xs = rng.integers(0, size, (2, rng.poisson(n_cells)))
    np.add.at(img, (ys, xs), rng.uniform(0.5, 1.5, ys.size))
    return 150 + 4e4 * ndimage.gaussian_filter(img, 4)


@pytest.fixture(scope="module")
def gradient_plate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    g = gradient()
    fields = []
    for _ in range(36):
        scene = np.stack([cell_scene(rng) for _ in CHANNELS]) * g
        fields.append(np.clip(rng.poisson(scene), 0, 65535).astype(np.uint16))
    return make_store(tmp_path_factory.mktemp("grad"), np.stack(fields)), g


def test_estimate_recovers_known_gradient(gradient_plate: tuple[Path, np.ndarray]) -> None:
    store, g = gradient_plate
    illum = estimate_illumination(store)
    assert illum.shape == g.shape and illum.dtype == np.float32
    for k in range(len(CHANNELS)):
        assert np.median(illum[k]) == pytest.approx(1.0, abs=1e-3)
        assert illum[k].min() >= ILLUM_FLOOR
        r = np.corrcoef(illum[k].ravel(), g[k].ravel())[0, 1]
        assert r > 0.95, (CHANNELS[k], r)
    sub = estimate_illumination(store, sample=12)
    assert np.corrcoef(sub[0].ravel(), g[0].ravel())[0, 1] > 0.9


def test_smooth_field_recovered_up_to_the_corners(tmp_path: Path) -> None:
    """A flat scene under a linear ramp: the local linear smoother has no edge bias."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    ramp = 1 + 0.8 * x + 0.4 * y
    fields = np.stack([np.stack([rng.poisson(2000 * ramp)] * 2).astype(np.uint16) for _ in range(6)])
    illum = estimate_illumination(make_store(tmp_path, fields))
    truth = ramp / np.median(ramp)
    assert np.abs(illum[0] / truth - 1).max() < 0.02


def test_correction_flattens_uniform_scene(tmp_path: Path, gradient_plate: tuple[Path, np.ndarray]) -> None:
    store, g = gradient_plate
    illum = estimate_illumination(store)
    rng = np.random.default_rng(2)
    flat = np.stack([np.clip(rng.normal(3000 * g, 20), 0, 65535).astype(np.uint16) for _ in range(3)])
    raw_store = make_store(tmp_path, flat, plate="FLAT")
    out = tmp_path / "FLAT-corrected.zarr"
    correct_plate_store(raw_store, illum, out)
    images, channels = open_plate_images(out)
    assert channels == CHANNELS and images.dtype == np.uint16 and images.shape == flat.shape
    attrs = dict(zarr.open_group(out, mode="r").attrs)["bioembed"]
    assert attrs["illumination_corrected"] is True and attrs["plate"] == "FLAT"
    for k in range(len(CHANNELS)):
        before = flat[:, k].astype(float)
        after = np.asarray(images[:, k]).astype(float)
        cv_before, cv_after = before.std() / before.mean(), after.std() / after.mean()
        assert cv_after < cv_before / 4, (CHANNELS[k], cv_before, cv_after)
        assert after.mean() == pytest.approx(before.mean(), rel=0.1)  # median-1 illum keeps the scale


def test_correction_clips_to_dtype_and_checks_shape(tmp_path: Path) -> None:
    fields = np.full((2, 2, 64, 64), 250, dtype=np.uint8)
    store = make_store(tmp_path, fields, plate="U8")
    illum = np.full((2, 64, 64), 0.5, dtype=np.float32)
    correct_plate_store(store, illum, tmp_path / "u8c.zarr")
    images, _ = open_plate_images(tmp_path / "u8c.zarr")
    out = np.asarray(images[:])
    assert out.dtype == np.uint8 and (out == 255).all()  # 500 clipped, not wrapped
    correct_plate_store(store, np.ones((2, 64, 64), np.float32), store)  # in place: replaced whole
    assert zarr.open_group(store, mode="r").attrs["bioembed"]["illumination_corrected"] is True
    assert (np.asarray(open_plate_images(store)[0][:]) == 250).all()
    with pytest.raises(BioembedInputError, match="illumination function is"):
        correct_plate_store(store, illum[:, :32], tmp_path / "bad.zarr")
    assert not (tmp_path / "bad.zarr").exists()


def test_save_load_round_trip(tmp_path: Path) -> None:
    illum = np.random.default_rng(3).uniform(0.5, 1.5, (2, 16, 20)).astype(np.float32)
    path = save_illumination(illum, tmp_path / "illum" / "P1.npz", CHANNELS)
    assert path.exists() and not list(path.parent.glob(".tmp-*"))
    back, channels = load_illumination(path)
    assert channels == CHANNELS and back.dtype == np.float32 and np.array_equal(back, illum)
    with pytest.raises(ValueError, match="C = 3"):
        save_illumination(illum, tmp_path / "x.npz", ["a", "b", "c"])


# --- real data -------------------------------------------------------------------------------------------------

def bbbc013_fields() -> list[FieldFiles]:
    pattern = re.compile(r"Channel([12])-\d\d-([A-H])-(\d\d)\.tif$")
    by_well: dict[str, dict[str, Path]] = {}
    for p in sorted(BBBC013.glob("Channel*.tif")):
        m = pattern.match(p.name)
        if m:
            by_well.setdefault(f"{m.group(2)}{m.group(3)}", {})["GFP" if m.group(1) == "1" else "DNA"] = p
    return [FieldFiles("BBBC013", well, 1, paths) for well, paths in sorted(by_well.items())]


@pytest.fixture(scope="module")
def bbbc013_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not BBBC013.is_dir():
        pytest.skip(f"real data not present at {BBBC013}")
    store = tmp_path_factory.mktemp("bbbc013") / "BBBC013.zarr"
    ingest_plate(bbbc013_fields(), store, ["GFP", "DNA"])
    return store


@pytest.mark.realdata
def test_bbbc013_estimate_and_correct(bbbc013_store: Path, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    illum = estimate_illumination(bbbc013_store, sample=24)
    seconds = time.perf_counter() - t0
    assert seconds < 10, seconds
    assert illum.shape == (2, 640, 640) and np.isfinite(illum).all()
    assert np.allclose(np.median(illum, axis=(1, 2)), 1.0, atol=1e-3)
    assert 0.4 < illum.min() and illum.max() < 2.0  # a real illumination field, not noise
    full = estimate_illumination(bbbc013_store)
    assert min(np.corrcoef(full[k].ravel(), illum[k].ravel())[0, 1] for k in range(2)) > 0.8  # a subset suffices

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4))
    for k, stain in enumerate(["GFP", "DNA"]):
        ax = fig.add_subplot(1, 2, k + 1)
        fig.colorbar(ax.imshow(full[k], cmap="magma"), ax=ax)
        ax.set_title(f"BBBC013 illumination, {stain}")
    FigureCanvasAgg(fig)
    fig.savefig(Path("/tmp") / "bioembed_bbbc013_illumination.png", dpi=70)

    out = tmp_path / "corrected.zarr"
    correct_plate_store(bbbc013_store, full, out)
    raw, _ = open_plate_images(bbbc013_store)
    corrected, channels = open_plate_images(out)
    assert channels == ["GFP", "DNA"] and corrected.dtype == np.uint8 and corrected.shape == raw.shape
    # the plate's average image gets flatter: the CV of its 16 column-strip and 16 row-strip means
    # (cells average out, the illumination profile stays) drops from ~0.075 to ~0.035
    for k in range(2):
        cv = []
        for arr in (raw, corrected):
            mean = np.mean([np.asarray(arr[i, k], dtype=float) for i in range(96)], axis=0)
            strips = np.concatenate([mean.reshape(640, 16, 40).mean(axis=(0, 2)), mean.reshape(16, 40, 640).mean(axis=(1, 2))])
            cv.append(strips.std() / strips.mean())
        assert cv[1] < 0.7 * cv[0], cv
