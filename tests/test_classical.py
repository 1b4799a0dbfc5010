"""Classical CellProfiler features: names, groups, known values, agreement with scikit-image and mahotas,
neighbour features. Agreement with cp_measure and a CellProfiler run on real images: test_cp_measure_agreement.py."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy import ndimage as ndi
from skimage.draw import disk, ellipse
from skimage.feature import graycomatrix, graycoprops
from skimage.measure import regionprops

from bioembed_assets.encoders.base import _FAMILIES, Encoder, EncoderSpec
from bioembed_assets.encoders.classical import DEFAULT_GROUPS, GROUPS, classical, classical_features, feature_names
from bioembed_assets.encoders.cp_features import neighbor_feature_names, neighbor_features
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
    assert {"Intensity_MeanIntensity_DNA", "Intensity_LowerQuartileIntensity_ER", "AreaShape_Area",
            "AreaShape_FormFactor", "GLCM_Contrast_Mito", "Correlation_Correlation_DNA_ER"} <= set(NAMES)
    assert enc.feature_names == NAMES and enc.groups == DEFAULT_GROUPS
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
    assert enc.embed(imgs, None).shape == (3, len(NAMES))  # no masks: the whole crop


def test_bad_input_errors_say_what_was_expected(enc) -> None:
    imgs = np.zeros((3, 5, 64, 64), np.uint16)
    masks = np.stack([disk_mask(10)] * 3)
    with pytest.raises(ValueError, match=r"expected crops \(B, 5, S, S\), one channel per stain of \['DNA', 'ER', "
                                         r"'RNA', 'AGP', 'Mito'\], got shape \(3, 3, 64, 64\)"):
        enc.embed(imgs[:, :3], masks)
    with pytest.raises(ValueError, match=r"expected crops \(B, 5, S, S\).*got shape \(5, 64, 64\)"):
        enc.embed(imgs[0], masks[0])
    empty = masks.copy()
    empty[[0, 2]] = False
    with pytest.raises(ValueError, match=r"2 of 3 crops have an empty mask \(at positions \[0, 2\]\): expected each "
                                         r"crop's cell mask to hold at least one pixel"):
        enc.embed(imgs, empty)
    with pytest.raises(ValueError, match=r"masks shape \(3, 32, 32\) does not match the crops: expected "
                                         r"\(B, H, W\) = \(3, 64, 64\)"):
        enc.embed(imgs, masks[:, :32, :32])
    labels = masks.astype(np.uint8) * 7  # a label window, not a boolean mask
    with pytest.raises(ValueError, match=r"masks hold values 0\.\.7: expected boolean masks"):
        enc.embed(imgs, labels)
    assert np.array_equal(enc.embed(imgs, masks.astype(np.uint8)), enc.embed(imgs, masks))  # 0/1 is a mask
    with pytest.raises(ValueError, match=r"unknown classical feature group\(s\) \['haralick'\]; known: \['intensity'"):
        classical(groups=["intensity", "haralick"])
    with pytest.raises(ValueError, match="GLCM levels must be <= 16"):
        classical_features(imgs, masks, levels=32)
    with pytest.raises(ValueError, match="unsupported crop dtype"):
        enc.embed(imgs.astype(np.complex64), masks)


def test_no_nan_on_blank_and_constant(enc) -> None:
    imgs = np.zeros((3, 5, 64, 64), np.uint16)
    imgs[1] = 1000
    imgs[2] = 65535
    masks = np.stack([disk_mask(10), disk_mask(10), np.ones((64, 64), bool)])
    out = enc.embed(imgs, masks)
    assert np.isfinite(out).all()
    for row in out:
        for c in CELL_PAINTING_CHANNELS:
            assert feat(row, f"Intensity_StdIntensity_{c}") == 0 and feat(row, f"GLCM_Contrast_{c}") == 0
            assert feat(row, f"GLCM_Correlation_{c}") == 0 and feat(row, f"GLCM_Entropy_{c}") == 0
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
    for stat in ("Mean", "Median", "LowerQuartile", "UpperQuartile", "Max"):
        assert feat(row, f"Intensity_{stat}Intensity_ER") == pytest.approx(v, rel=1e-6)
    assert feat(row, "Intensity_IntegratedIntensity_ER") == pytest.approx(v * m.sum(), rel=1e-5)
    assert feat(row, "AreaShape_Area") == m.sum()
    # uint8 scales by 255
    row8 = enc.embed(np.full((1, 5, 64, 64), 51, np.uint8), m[None])[0]
    assert feat(row8, "Intensity_MeanIntensity_DNA") == pytest.approx(0.2, rel=1e-6)


def cp_quantile(v: np.ndarray, q: float) -> float:
    """CellProfiler's quantile: sorted values interpolated at position n*q (numpy uses (n-1)*q)."""
    v, pos = np.sort(v), q * len(v)
    lo = min(int(pos), len(v) - 1)
    hi = min(lo + 1, len(v) - 1)
    return float(v[lo] * (1 - (pos - lo)) + v[hi] * (pos - lo))


def test_intensity_matches_numpy_inside_mask(enc) -> None:
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 5000, (2, 5, 64, 64), dtype=np.uint16)
    masks = np.stack([disk_mask(9), disk_mask(15, center=(30, 36))])
    out = enc.embed(imgs, masks)
    for b in range(2):
        v = imgs[b, 2][masks[b]].astype(np.float64) / 65535
        ref = {"Mean": v.mean(), "Std": v.std(), "Median": cp_quantile(v, 0.5), "LowerQuartile": cp_quantile(v, 0.25),
               "UpperQuartile": cp_quantile(v, 0.75), "Integrated": v.sum(), "Max": v.max()}
        for k, r in ref.items():
            assert feat(out[b], f"Intensity_{k}Intensity_RNA") == pytest.approx(r, rel=1e-4, abs=1e-7)
        a, c = imgs[b, 0][masks[b]].astype(float), imgs[b, 4][masks[b]].astype(float)
        assert feat(out[b], "Correlation_Correlation_DNA_Mito") == pytest.approx(np.corrcoef(a, c)[0, 1], abs=1e-4)
    # an odd count: CellProfiler's median is not numpy's
    v = np.array([1.0, 2.0, 10.0])
    assert cp_quantile(v, 0.5) == 6.0 != np.median(v)
    img = np.zeros((1, 5, 8, 8), np.uint16)
    img[0, :, 0, :3] = [1, 2, 10]
    m = np.zeros((1, 8, 8), bool)
    m[0, 0, :3] = True
    row = enc.embed(img, m)[0]
    assert feat(row, "Intensity_MedianIntensity_DNA") == pytest.approx(6 / 65535)


def test_shape_matches_regionprops(enc) -> None:
    masks = np.zeros((4, 64, 64), bool)
    masks[0] = disk_mask(12)
    rr, cc = ellipse(30, 34, 8, 20, shape=(64, 64), rotation=0.6)
    masks[1, rr, cc] = True
    masks[2, 10:30, 5:50] = True
    masks[3, 5:40, 5:12] = True
    masks[3, 33:40, 5:45] = True  # an L: solidity well below 1
    out = enc.embed(np.zeros((4, 5, 64, 64), np.uint16), masks)
    for b in range(4):
        rp = regionprops(masks[b].astype(np.uint8))[0]
        assert feat(out[b], "AreaShape_Area") == rp.area
        assert feat(out[b], "AreaShape_Perimeter") == pytest.approx(rp.perimeter, rel=1e-5)
        assert feat(out[b], "AreaShape_MajorAxisLength") == pytest.approx(rp.axis_major_length, rel=1e-4)
        assert feat(out[b], "AreaShape_MinorAxisLength") == pytest.approx(rp.axis_minor_length, rel=1e-4)
        assert feat(out[b], "AreaShape_Eccentricity") == pytest.approx(rp.eccentricity, abs=1e-3)
        assert feat(out[b], "AreaShape_Extent") == pytest.approx(rp.extent, rel=1e-5)
        assert feat(out[b], "AreaShape_Solidity") == pytest.approx(rp.solidity, rel=1e-6)  # CellProfiler's
        assert feat(out[b], "AreaShape_FormFactor") == pytest.approx(4 * np.pi * rp.area / rp.perimeter**2, rel=1e-5)
        assert feat(out[b], "AreaShape_EquivalentDiameter") == pytest.approx(rp.equivalent_diameter_area, rel=1e-5)
    assert feat(out[2], "AreaShape_Solidity") == pytest.approx(1.0)
    assert feat(out[3], "AreaShape_Solidity") < 0.7
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
    assert feat(row, "Correlation_Correlation_DNA_ER") == pytest.approx(1.0, abs=1e-5)
    assert feat(row, "Correlation_Correlation_DNA_RNA") == pytest.approx(-1.0, abs=1e-5)
    assert feat(row, "Correlation_Correlation_DNA_AGP") == pytest.approx(1.0, abs=1e-4)
    assert abs(feat(row, "Correlation_Correlation_DNA_Mito")) < 0.15


def test_glcm_matches_skimage_on_full_mask(enc) -> None:
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
            assert feat(row, f"GLCM_{prop.capitalize()}_{ch}") == pytest.approx(ref, rel=1e-4, abs=1e-6)
        p = g[g > 0]
        assert feat(row, f"GLCM_Entropy_{ch}") == pytest.approx(-(p * np.log2(p)).sum(), rel=1e-5)
    assert feat(row, "GLCM_Contrast_ER") < feat(row, "GLCM_Contrast_DNA")  # ramp is smooth


def test_deterministic_and_batch_independent(enc) -> None:
    rng = np.random.default_rng(4)
    imgs = rng.integers(0, 65535, (300, 5, 64, 64), dtype=np.uint16)
    masks = np.stack([disk_mask(int(r)) for r in rng.integers(3, 25, 300)])
    a, b = enc.embed(imgs, masks), enc.embed(imgs, masks)
    assert np.array_equal(a, b)
    assert np.allclose(enc.embed(imgs[150:160], masks[150:160]), a[150:160], rtol=1e-6, atol=1e-7)


def test_groups_config_and_names() -> None:
    extended = classical(["DNA", "ER"], 64, groups=["texture", "intensity", "intensity_extra"])
    assert extended.groups == ("intensity", "intensity_extra", "texture")  # canonical order
    assert extended.spec.config == {"channels": ["DNA", "ER"], "input_size": 64,
                                    "groups": ["intensity", "intensity_extra", "texture"]}
    assert classical(**extended.spec.config).spec == extended.spec
    names = extended.feature_names
    assert names == feature_names(["DNA", "ER"], extended.groups) and len(names) == len(set(names))
    assert len(names) == extended.spec.embedding_dim == 2 * 7 + 2 * 8 + 2 * 13 * 4
    assert {"Intensity_MADIntensity_ER", "Intensity_MeanIntensityEdge_DNA", "Texture_AngularSecondMoment_DNA_3_00_256",
            "Texture_InfoMeas2_ER_3_03_256"} <= set(names)
    every = feature_names(["DNA", "ER"], GROUPS)
    assert len(every) == len(set(every))
    assert {"AreaShape_Zernike_9_9", "AreaShape_MaxFeretDiameter", "Granularity_16_ER",
            "RadialDistribution_RadialCV_DNA_4of4", "RadialDistribution_ZernikeMagnitude_ER_0_0"} <= set(every)
    default_config = {"channels": list(CELL_PAINTING_CHANNELS), "input_size": 64}
    assert classical(groups=list(DEFAULT_GROUPS)).spec.config == default_config
    with pytest.raises(ValueError, match="unknown classical feature group.*'haralick'"):
        classical(groups=["haralick"])
    with pytest.raises(ValueError, match="at least one"):
        classical(groups=[])
    with pytest.raises(ValueError, match="distinct channel names"):
        classical(["DNA", "DNA"])


def test_intensity_extra_matches_numpy() -> None:
    enc = classical(["A", "B"], 32, groups=["intensity_extra"])
    rng = np.random.default_rng(5)
    imgs = rng.integers(0, 60000, (2, 2, 32, 32), dtype=np.uint16)
    masks = np.stack([disk_mask(8, 32, (16, 16)), disk_mask(6, 32, (12, 20))])
    out = enc.embed(imgs, masks)
    names = enc.feature_names
    for b in range(2):
        x = imgs[b, 1].astype(np.float64) / 65535
        v, m = x[masks[b]], masks[b]
        er = m & ~ndi.binary_erosion(m, border_value=1)  # inner boundary, 4-connected
        yy, xx = np.nonzero(m)
        cm = np.array([yy.mean(), xx.mean()])
        cmi = np.array([(yy * x[m]).sum(), (xx * x[m]).sum()]) / x[m].sum()
        ref = {"MinIntensity": v.min(), "MADIntensity": cp_quantile(np.abs(v - cp_quantile(v, 0.5)), 0.5),
               "MassDisplacement": np.hypot(*(cmi - cm)), "IntegratedIntensityEdge": x[er].sum(),
               "MeanIntensityEdge": x[er].mean(), "StdIntensityEdge": x[er].std(), "MinIntensityEdge": x[er].min(),
               "MaxIntensityEdge": x[er].max()}
        for k, r in ref.items():
            assert out[b, names.index(f"Intensity_{k}_B")] == pytest.approx(r, rel=1e-4, abs=1e-7), k


def test_texture_group_matches_mahotas_haralick() -> None:
    mahotas = pytest.importorskip("mahotas")
    enc = classical(["A", "B"], 40, groups=["texture"])
    rng = np.random.default_rng(6)
    imgs = rng.integers(0, 30000, (2, 2, 40, 40), dtype=np.uint16)
    imgs[1, 0] = np.add.outer(np.arange(40), np.arange(40)).astype(np.uint16) * 300  # smooth ramp
    masks = np.stack([disk_mask(12, 40, (20, 20)), disk_mask(9, 40, (18, 22))])
    out = enc.embed(imgs, masks)
    for b in range(2):
        for ci, ch in enumerate("AB"):
            # CellProfiler: img_as_ubyte of the [0, 1] image, the object's pixels only, zeros ignored
            q = np.rint(imgs[b, ci] / 65535 * 255).astype(np.uint8) * masks[b]
            ref = mahotas.features.haralick(q, distance=3, ignore_zeros=True)  # (4 directions, 13)
            for fi, f in enumerate(("AngularSecondMoment", "Contrast", "Correlation", "Variance",
                                    "InverseDifferenceMoment", "SumAverage", "SumVariance", "SumEntropy", "Entropy",
                                    "DifferenceVariance", "DifferenceEntropy", "InfoMeas1", "InfoMeas2")):
                for d in range(4):
                    got = out[b, enc.feature_names.index(f"Texture_{f}_{ch}_3_{d:02d}_256")]
                    assert got == pytest.approx(ref[d, fi], rel=1e-5, abs=1e-6), (b, ch, f, d)
    # an object too small for a pair at distance 3 in every direction: all zero, not NaN
    tiny = np.zeros((1, 40, 40), bool)
    tiny[0, 5:7, 5:7] = True
    assert (enc.embed(imgs[:1], tiny) == 0).all()


def test_cp_measure_groups_run_per_crop() -> None:
    pytest.importorskip("cp_measure")
    groups = ["zernike", "feret", "granularity", "radial_distribution", "radial_zernikes"]
    enc = classical(["A", "B"], 32, groups=groups)
    rng = np.random.default_rng(7)
    imgs = rng.integers(0, 255, (2, 2, 32, 32), dtype=np.uint8)
    masks = np.stack([disk_mask(8, 32, (16, 16)), disk_mask(10, 32, (15, 17))])
    out = enc.embed(imgs, masks)
    assert out.shape == (2, 30 + 2 + 2 * (16 + 12 + 30)) and np.isfinite(out).all()
    names = enc.feature_names
    # a disk: Feret diameters close to its diameter, Zernike_0_0 near 1
    lo, hi = (out[0, names.index(f"AreaShape_{k}FeretDiameter")] for k in ("Min", "Max"))  # pixel centres
    assert 13 <= lo <= hi <= 17
    assert out[0, names.index("AreaShape_Zernike_0_0")] > 0.8
    frac = out[:2, [names.index(f"RadialDistribution_FracAtD_A_{i}of4") for i in range(1, 5)]]
    assert np.allclose(frac.sum(1), 1.0, atol=1e-5)


def test_neighbor_features() -> None:
    cells = pl.DataFrame({
        "plate": ["P"] * 6, "well": ["A01"] * 4 + ["A02"] * 2, "site": [1, 1, 1, 1, 1, 1],
        "cell_id": [f"c{i}" for i in range(6)],
        "centroid_y": [0.0, 3.0, 0.0, 100.0, 0.0, 0.0], "centroid_x": [0.0, 4.0, 10.0, 100.0, 0.0, 30.0],
    })
    out = neighbor_features(cells, 6)
    assert out.columns == ["plate", "well", "site", "cell_id", *neighbor_feature_names(6)]
    assert neighbor_feature_names(6) == ["Neighbors_CentroidNeighbors_6", "Neighbors_FirstClosestDistance_6",
                                         "Neighbors_SecondClosestDistance_6"]
    assert neighbor_feature_names(2.5)[1] == "Neighbors_FirstClosestDistance_2_5"
    assert out["Neighbors_CentroidNeighbors_6"].to_list() == [1, 1, 0, 0, 0, 0]
    first = out["Neighbors_FirstClosestDistance_6"].to_list()
    second = out["Neighbors_SecondClosestDistance_6"].to_list()
    assert first[:3] == pytest.approx([5.0, 5.0, np.hypot(3, 6)]) and second[2] == pytest.approx(10.0)
    assert second[0] == pytest.approx(10.0) and second[1] == pytest.approx(np.hypot(3, 6))
    assert first[4:] == pytest.approx([30.0, 30.0]) and second[4:] == [None, None]  # a field of two cells
    with pytest.raises(ValueError, match="lacks columns"):
        neighbor_features(cells.drop("site"), 6)
    with pytest.raises(ValueError, match="positive"):
        neighbor_features(cells, 0)


def test_pipeline_default_is_the_fast_groups_and_groups_opt_in_by_config() -> None:
    """What the demo embeds (`pipeline.DEFAULT_ENCODERS` "classical" with the run's stains) uses only the
    default groups; `[encoder_options.classical] groups = [...]` adds CellProfiler's other modules."""
    from bioembed_assets.pipeline import encoder_setups

    setup = encoder_setups(["classical"])[0]
    default = setup.build(CELL_PAINTING_CHANNELS)
    assert default.groups == DEFAULT_GROUPS and default.feature_names == NAMES
    assert not any(n.startswith(("Texture_", "Granularity_", "RadialDistribution_")) for n in default.feature_names)
    extended = setup.build(["DNA", "ER"], {"groups": ["intensity", "texture", "granularity"]})
    assert extended.groups == ("intensity", "texture", "granularity")
    assert "Texture_Contrast_ER_3_00_256" in extended.feature_names and "Granularity_1_DNA" in extended.feature_names
    with pytest.raises(ValueError, match=r"unknown classical feature group\(s\) \['zernikes'\]"):
        setup.build(["DNA"], {"groups": ["zernikes"]})


def test_engine_names_the_crop_store_and_crops_of_an_encoder_error(tmp_path) -> None:
    import zarr

    from bioembed_assets.inference import embed_crop_store

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(6, 2, 32, 32), dtype=np.uint16)
    masks = np.zeros((6, 32, 32), dtype=bool)
    masks[:, 8:24, 8:24] = True
    masks[4] = False  # one cell's mask is empty
    group = zarr.open_group(str(tmp_path / "P1.zarr"), mode="w")
    group.create_array("images", data=images)
    group.create_array("masks", data=masks)
    group.attrs["channels"] = ["DNA", "ER"]
    encoder = classical(channels=["DNA", "ER"])
    with pytest.raises(ValueError, match=r"P1\.zarr, crops 3\.\.5 .*crop_index.*empty mask"):
        embed_crop_store(encoder, tmp_path / "P1.zarr", batch_size=3)
