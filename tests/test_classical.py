"""Classical CellProfiler-like features: shapes, known values, agreement with scikit-image, speed."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk, ellipse
from skimage.feature import graycomatrix, graycoprops
from skimage.measure import regionprops

from bioembed_assets.encoders.base import _FAMILIES, Encoder, EncoderSpec
from bioembed_assets.encoders.classical import classical, feature_names
from bioembed_assets.schema import CELL_PAINTING_CHANNELS

NAMES = feature_names(CELL_PAINTING_CHANNELS)


def disk_mask(radius: float, size: int = 64, center: tuple[int, int] = (32, 32)) -> np.ndarray:
    m = np.zeros((size, size), bool)
    rr, cc = disk(center, radius, shape=(size, size))
    m[rr, cc] = True
    return m


def feat(row: np.ndarray, name: str) -> float:
    return float(row[NAMES.index(name)])


@pytest.fixture(scope="module")
def enc():
    return classical()


def test_spec_registry_and_protocol(enc) -> None:
    assert _FAMILIES["classical"] is classical
    assert isinstance(enc, Encoder)
    assert enc.spec == EncoderSpec(
        family="classical", embedding_dim=len(NAMES), input_size=64, channels=CELL_PAINTING_CHANNELS,
        per_cell=True, trainable=False, config={"channels": list(CELL_PAINTING_CHANNELS), "input_size": 64},
    )
    assert len(NAMES) == len(set(NAMES)) == 79
    assert {"Intensity_Mean_DNA", "AreaShape_Area", "Texture_Contrast_Mito", "Correlation_DNA_ER"} <= set(NAMES)
    assert enc.state_dict() == {} and enc.load_state_dict({}) is enc and enc.to("cpu") is enc
    with pytest.raises(ValueError):
        enc.load_state_dict({"w": np.zeros(1)})
    rebuilt = classical(**enc.spec.config)
    assert rebuilt.spec == enc.spec
    assert classical(["A", "B"], 32).spec.embedding_dim == len(feature_names(["A", "B"]))


def test_output_shape_dtype_and_channel_check(enc) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 65535, (3, 5, 64, 64), dtype=np.uint16)
    out = enc.embed(imgs, np.stack([disk_mask(10)] * 3))
    assert out.shape == (3, len(NAMES)) and out.dtype == np.float32
    assert enc.embed(imgs[:0], np.zeros((0, 64, 64), bool)).shape == (0, len(NAMES))
    with pytest.raises(ValueError):
        enc.embed(imgs[:, :3], np.stack([disk_mask(10)] * 3))


def test_no_nan_on_blank_constant_and_empty(enc) -> None:
    imgs = np.zeros((4, 5, 64, 64), np.uint16)
    imgs[1] = 1000
    imgs[2] = 65535
    masks = np.stack([disk_mask(10), disk_mask(10), np.ones((64, 64), bool), np.zeros((64, 64), bool)])
    out = enc.embed(imgs, masks)
    assert np.isfinite(out).all()
    assert (out[3] == 0).all()  # empty mask -> all zeros
    for row in out[:3]:
        for c in CELL_PAINTING_CHANNELS:
            assert feat(row, f"Intensity_Std_{c}") == 0 and feat(row, f"Texture_Contrast_{c}") == 0
            assert feat(row, f"Texture_Correlation_{c}") == 0 and feat(row, f"Texture_Entropy_{c}") == 0
        assert all(feat(row, n) == 0 for n in NAMES if n.startswith("Correlation_"))
    # uint8 and float crops work too
    assert np.isfinite(enc.embed(np.full((1, 5, 64, 64), 7, np.uint8), disk_mask(5)[None])).all()
    fl = np.full((1, 5, 64, 64), np.nan, np.float32)
    assert np.isfinite(enc.embed(fl, disk_mask(5)[None])).all()


def test_known_intensity_values(enc) -> None:
    imgs = np.full((1, 5, 64, 64), 1000, np.uint16)
    m = disk_mask(10)
    row = enc.embed(imgs, m[None])[0]
    v = 1000 / 65535
    for stat in ("Mean", "Median", "P10", "P90", "Max"):
        assert feat(row, f"Intensity_{stat}_ER") == pytest.approx(v, rel=1e-6)
    assert feat(row, "Intensity_Integrated_ER") == pytest.approx(v * m.sum(), rel=1e-5)
    assert feat(row, "AreaShape_Area") == m.sum()
    # uint8 scales by 255
    row8 = enc.embed(np.full((1, 5, 64, 64), 51, np.uint8), m[None])[0]
    assert feat(row8, "Intensity_Mean_DNA") == pytest.approx(0.2, rel=1e-6)


def test_intensity_matches_numpy_inside_mask(enc) -> None:
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 5000, (2, 5, 64, 64), dtype=np.uint16)
    masks = np.stack([disk_mask(9), disk_mask(15, center=(30, 36))])
    out = enc.embed(imgs, masks)
    for b in range(2):
        v = imgs[b, 2][masks[b]].astype(np.float64) / 65535
        ref = {"Mean": v.mean(), "Std": v.std(), "Median": np.median(v), "P10": np.percentile(v, 10),
               "P90": np.percentile(v, 90), "Integrated": v.sum(), "Max": v.max()}
        for k, r in ref.items():
            assert feat(out[b], f"Intensity_{k}_RNA") == pytest.approx(r, rel=1e-4, abs=1e-7)
        a, c = imgs[b, 0][masks[b]].astype(float), imgs[b, 4][masks[b]].astype(float)
        assert feat(out[b], "Correlation_DNA_Mito") == pytest.approx(np.corrcoef(a, c)[0, 1], abs=1e-4)


def test_shape_matches_regionprops(enc) -> None:
    masks = np.zeros((3, 64, 64), bool)
    masks[0] = disk_mask(12)
    rr, cc = ellipse(30, 34, 8, 20, shape=(64, 64), rotation=0.6)
    masks[1, rr, cc] = True
    masks[2, 10:30, 5:50] = True
    out = enc.embed(np.zeros((3, 5, 64, 64), np.uint16), masks)
    for b in range(3):
        rp = regionprops(masks[b].astype(np.uint8))[0]
        assert feat(out[b], "AreaShape_Area") == rp.area
        assert feat(out[b], "AreaShape_Perimeter") == pytest.approx(rp.perimeter, rel=1e-5)
        assert feat(out[b], "AreaShape_MajorAxisLength") == pytest.approx(rp.axis_major_length, rel=1e-4)
        assert feat(out[b], "AreaShape_MinorAxisLength") == pytest.approx(rp.axis_minor_length, rel=1e-4)
        assert feat(out[b], "AreaShape_Eccentricity") == pytest.approx(rp.eccentricity, abs=1e-3)
        assert feat(out[b], "AreaShape_Extent") == pytest.approx(rp.extent, rel=1e-5)
        # hull of the pixel squares (continuous) is a little larger than skimage's pixel-count hull
        assert rp.solidity - 0.05 <= feat(out[b], "AreaShape_Solidity") <= rp.solidity + 1e-6
    assert feat(out[2], "AreaShape_Solidity") == pytest.approx(1.0)
    assert feat(out[0], "AreaShape_Eccentricity") < 0.1 < feat(out[1], "AreaShape_Eccentricity")


def test_larger_disk_larger_area(enc) -> None:
    masks = np.stack([disk_mask(r) for r in (5, 10, 20)])
    out = enc.embed(np.zeros((3, 5, 64, 64), np.uint16), masks)
    for name in ("AreaShape_Area", "AreaShape_Perimeter", "AreaShape_MajorAxisLength"):
        col = [feat(r, name) for r in out]
        assert col[0] < col[1] < col[2]


def test_correlation_of_identical_and_inverted_channels(enc) -> None:
    rng = np.random.default_rng(2)
    base = rng.integers(100, 30000, (64, 64), dtype=np.uint16)
    imgs = np.stack([base, base, 40000 - base, base // 2, rng.integers(0, 30000, (64, 64), dtype=np.uint16)])[None]
    row = enc.embed(imgs, disk_mask(20)[None])[0]
    assert feat(row, "Correlation_DNA_ER") == pytest.approx(1.0, abs=1e-5)
    assert feat(row, "Correlation_DNA_RNA") == pytest.approx(-1.0, abs=1e-5)
    assert feat(row, "Correlation_DNA_AGP") == pytest.approx(1.0, abs=1e-4)
    assert abs(feat(row, "Correlation_DNA_Mito")) < 0.15


def test_texture_matches_skimage_glcm_on_full_mask(enc) -> None:
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 4000, (1, 5, 32, 32), dtype=np.uint16)
    imgs[0, 1] = np.add.outer(np.arange(32), np.arange(32)).astype(np.uint16) * 50  # smooth ramp
    row = enc.embed(imgs, np.ones((1, 32, 32), bool))[0]
    for ci, ch in enumerate(("DNA", "ER")):
        x = imgs[0, ci].astype(np.float32) / 65535
        q = np.clip(((x - x.min()) * np.float32(8 / (x.max() - x.min()))).astype(int), 0, 7).astype(np.uint8)
        g = graycomatrix(q, [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=8, symmetric=True)
        g = g.sum(3, keepdims=True).astype(float)
        g /= g.sum()
        for prop in ("contrast", "homogeneity", "energy", "correlation"):
            ref = graycoprops(g, prop)[0, 0]
            assert feat(row, f"Texture_{prop.capitalize()}_{ch}") == pytest.approx(ref, rel=1e-4, abs=1e-6)
        p = g[g > 0]
        assert feat(row, f"Texture_Entropy_{ch}") == pytest.approx(-(p * np.log2(p)).sum(), rel=1e-5)
    assert feat(row, "Texture_Contrast_ER") < feat(row, "Texture_Contrast_DNA")  # ramp is smooth


def test_deterministic_and_batch_independent(enc) -> None:
    rng = np.random.default_rng(4)
    imgs = rng.integers(0, 65535, (300, 5, 64, 64), dtype=np.uint16)
    masks = np.stack([disk_mask(int(r)) for r in rng.integers(3, 25, 300)])
    a, b = enc.embed(imgs, masks), enc.embed(imgs, masks)
    assert np.array_equal(a, b)
    assert np.allclose(enc.embed(imgs[150:160], masks[150:160]), a[150:160], rtol=1e-6, atol=1e-7)
