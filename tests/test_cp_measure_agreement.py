"""The classical encoder's CellProfiler-named features against cp_measure and CellProfiler, on real images.

Crops are cut as the crop store cuts them (`segment.crops.crop_origin` / `window`, a 64 px window
around each nucleus, the cell's own label as the mask) from fields segmented by the project
(`segment_nuclei`, `segment_cells`): ExampleHuman (512 x 512 uint8, DNA / PH3 / cell body) and the
pediatric-atlas Phenix field (1080 x 1080 uint16, five stains). Every feature that carries a
CellProfiler name is compared with cp_measure run on the same crop and the same one-object label
image, pixels scaled to [0, 1] as CellProfiler loads them; the tolerance of each is stated with its
reason in `TOLERANCES`.

Then against CellProfiler itself: the pediatric field's CellProfiler outline overlays give
CellProfiler's own masks for the objects that touch no other (their filled outline has exactly
CellProfiler's area), whose AreaShape features the profile parquet holds (its intensities are of
illumination-corrected images we do not have); and the ExampleHuman Nuclei.csv, whose objects we
can only approach with our own segmentation: matched nuclei agree as populations (stated per
feature), not to the digit.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import ndimage as ndi

from bioembed_assets.encoders.classical import classical
from bioembed_assets.encoders.cp_features import HARALICK_FEATURES
from bioembed_assets.segment.cells import segment_cells
from bioembed_assets.segment.crops import crop_origin, window
from bioembed_assets.segment.nuclei import segment_nuclei
from bioembed_assets.segment.plate import label_stats

tifffile = pytest.importorskip("tifffile")
cp_bulk = pytest.importorskip("cp_measure.bulk")

SHARED = Path(__file__).parents[1] / "../shared/data"
EXAMPLEHUMAN = SHARED / "cellprofiler-examplehuman"
EH_IMAGES = EXAMPLEHUMAN / "ExampleHuman" / "images"
EH_CSV = EXAMPLEHUMAN / "tests" / "data" / "cellprofiler" / "ExampleHuman"
CYTOTABLE = SHARED / "cellpainting-fields-cytodataframe" / "tests" / "data" / "cytotable"
PEDIATRIC = CYTOTABLE / "pediatric_cancer_atlas_profiling"
PHENIX_STAINS = {"DNA": 5, "ER": 2, "RNA": 6, "AGP": 3, "Mito": 4}  # channel numbers (dataset README)
CROP = 64

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data not present at {SHARED.resolve()}"),
]

# feature -> (rel, abs, reason); the first matching prefix applies
TOLERANCES: list[tuple[str, float, float, str]] = [
    ("AreaShape_Area", 0, 0, "pixel count"),
    ("AreaShape_", 1e-5, 1e-6,
     "same definitions (skimage 4-neighbour perimeter, second-moment axes, pixel-count convex hull); "
     "float32 output"),
    ("Correlation_Correlation_", 0, 2e-5,
     "float32 mean-centred products (float64 sums) vs numpy.corrcoef in float64"),
    ("Intensity_", 1e-5, 1e-7,
     "same definitions and quartile convention (n*q, cp_measure legacy=True); float32 output"),
    ("Texture_", 1e-5, 1e-6,
     "our batched Haralick from pixel pairs vs mahotas' dense matrix: equal to ~1e-11 in float64; float32 output"),
]


def tolerance(name: str) -> tuple[float, float]:
    for prefix, rel, abs_, _ in TOLERANCES:
        if name.startswith(prefix):
            return rel, abs_
    raise KeyError(f"no stated tolerance for {name}")


def need(*paths: Path) -> None:
    for p in paths:
        if not p.exists():
            pytest.skip(f"real data file missing: {p}")


def cut_crops(image: np.ndarray, nuclei: np.ndarray, cells: np.ndarray, size: int = CROP) -> tuple[np.ndarray, ...]:
    """Crops (N, C, S, S), cell masks and nucleus masks (N, S, S) of every cell whose window lies inside
    the image, as `segment.crops.extract_crops` cuts them (border policy "drop")."""
    labels, cy, cx, _ = label_stats(nuclei)
    top, left = crop_origin(cy, cx, size)
    h, w = nuclei.shape
    keep = (top >= 0) & (left >= 0) & (top + size <= h) & (left + size <= w)
    crops = np.stack([window(image, t, l, size) for t, l in zip(top[keep], left[keep])])
    cell_masks = np.stack([window(cells, t, l, size) == lab for t, l, lab in zip(top[keep], left[keep], labels[keep])])
    nuc_masks = np.stack([window(nuclei, t, l, size) == lab for t, l, lab in zip(top[keep], left[keep], labels[keep])])
    return crops, cell_masks, nuc_masks


def examplehuman_crops() -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    need(EH_IMAGES / "AS_09125_050116030001_D03f00d0.tif")
    image = np.stack([tifffile.imread(EH_IMAGES / f"AS_09125_050116030001_D03f00d{i}.tif") for i in range(3)])
    nuclei = segment_nuclei(image[0])
    return (*cut_crops(image, nuclei, segment_cells(nuclei, image[2])), ["DNA", "PH3", "cellbody"])


def pediatric_crops() -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    paths = {s: PEDIATRIC / "images" / "orig" / f"r03c03f03p01-ch{c}sk1fk1fl1.tiff" for s, c in PHENIX_STAINS.items()}
    need(*paths.values())
    image = np.stack([tifffile.imread(p) for p in paths.values()])
    nuclei = segment_nuclei(image[0])
    return (*cut_crops(image, nuclei, segment_cells(nuclei, image[3])), list(PHENIX_STAINS))


@pytest.fixture(scope="module", params=["examplehuman", "pediatric"])
def real_crops(request) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    crops, cells, nuclei, stains = examplehuman_crops() if request.param == "examplehuman" else pediatric_crops()
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(crops), size=min(16, len(crops)), replace=False))
    return crops[pick], cells[pick], nuclei[pick], stains


def cp_reference(crop: np.ndarray, mask: np.ndarray, stains: list[str]) -> dict[str, float]:
    """cp_measure's values for one crop under CellProfiler's names."""
    core, corr = cp_bulk.get_core_measurements(legacy=True), cp_bulk.get_correlation_measurements()
    label = mask.astype(np.int32)
    pixels = crop.astype(np.float64) / np.iinfo(crop.dtype).max
    ref = {f"AreaShape_{k}": float(v[0]) for k, v in core["sizeshape"](label, None).items()}
    for c, stain in enumerate(stains):
        ref |= {f"{k}_{stain}": float(v[0]) for k, v in core["intensity"](label, pixels[c]).items()}
        with np.errstate(all="ignore"):
            tex = core["texture"](label, pixels[c])
        ref |= {f"Texture_{k.split('_', 1)[0]}_{stain}_{k.split('_', 1)[1]}": float(v[0]) for k, v in tex.items()}
    for a in range(len(stains)):
        for b in range(a + 1, len(stains)):
            r = corr["pearson"](pixels[a], pixels[b], label)
            ref[f"Correlation_Correlation_{stains[a]}_{stains[b]}"] = float(np.asarray(r["Correlation_Pearson"])[0])
    return ref


def test_every_cellprofiler_named_feature_matches_cp_measure(real_crops) -> None:
    crops, cells, _, stains = real_crops
    enc = classical(stains, CROP, groups=["intensity", "intensity_extra", "shape", "texture", "correlation"])
    ours = enc.embed(crops, cells)
    assert not any(n.startswith("GLCM_") for n in enc.feature_names)  # ours, not CellProfiler's: not compared
    worst: dict[str, float] = {}
    for i in range(len(crops)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = cp_reference(crops[i], cells[i], stains)
        for j, name in enumerate(enc.feature_names):
            r = ref[name]
            if not np.isfinite(r):  # cp_measure's NaN (texture: no pair in some direction) is our 0
                assert ours[i, j] == 0, (i, name)
                continue
            rel, abs_ = tolerance(name)
            assert ours[i, j] == pytest.approx(r, rel=rel, abs=abs_), (i, name, float(ours[i, j]), r)
            worst[name] = max(worst.get(name, 0.0), abs(float(ours[i, j]) - r) / max(abs(r), 1e-12))
    print(f"\n{len(crops)} crops x {len(enc.feature_names)} features; largest relative differences:",
          sorted(worst.items(), key=lambda kv: -kv[1])[:5])


def test_cp_measure_backed_groups_are_cp_measure_per_crop(real_crops) -> None:
    crops, cells, _, stains = real_crops
    crops, cells = crops[:6], cells[:6]
    enc = classical(stains, CROP, groups=["zernike", "feret", "granularity", "radial_distribution", "radial_zernikes"])
    ours = enc.embed(crops, cells)
    core = cp_bulk.get_core_measurements(legacy=True)
    for i in range(len(crops)):
        label = cells[i].astype(np.int32)
        pixels = crops[i].astype(np.float64) / np.iinfo(crops.dtype).max
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            shape = core["zernike"](label, None) | core["feret"](label, None)
            ref = {f"AreaShape_{k}": v[0] for k, v in shape.items()}
            for c, s in enumerate(stains):
                for fn in ("granularity", "radial_distribution", "radial_zernikes"):
                    for k, v in core[fn](label, pixels[c]).items():
                        if k.startswith("Granularity"):
                            ref[f"{k}_{s}"] = v[0]
                        elif "Phase" not in k:  # RadialDistribution_<F>_<bin or n_m>: the stain goes after <F>
                            cat, feat_, rest = k.split("_", 2)
                            ref[f"{cat}_{feat_}_{s}_{rest}"] = v[0]
        for j, name in enumerate(enc.feature_names):
            r = float(np.nan_to_num(ref[name]))
            assert ours[i, j] == pytest.approx(r, rel=1e-6, abs=1e-9), (i, name)  # the same call; float32 output


def cellprofiler_objects(kind: str) -> np.ndarray:
    """Label image of the regions inside CellProfiler's `kind` outline overlay (outlines included)."""
    outline = tifffile.imread(PEDIATRIC / "images" / "outlines" / f"{kind}Outlines_BR00143976_C03_3.tiff").max(-1) > 0
    return ndi.label(ndi.binary_fill_holes(outline))[0]


def test_shape_matches_cellprofiler_on_its_own_masks() -> None:
    parquet = PEDIATRIC / "BR00143976_shrunken.parquet"
    need(parquet, PEDIATRIC / "images" / "outlines" / "NucleiOutlines_BR00143976_C03_3.tiff")
    profiles = pl.read_parquet(parquet)
    enc = classical(["DNA"], 192, groups=["shape", "zernike", "feret"])
    compared = 0
    for kind in ("Nuclei", "Cells"):
        objects = cellprofiler_objects(kind)
        for row in profiles.iter_rows(named=True):
            y, x = row[f"{kind}_Location_Center_Y"], row[f"{kind}_Location_Center_X"]
            mask = objects == objects[round(y), round(x)]
            if mask.sum() != row[f"{kind}_AreaShape_Area"]:
                continue  # touches another object: the shared outline cannot be split back
            top, left = crop_origin(np.array([y]), np.array([x]), 192)  # a window that holds the whole cell
            crop_mask = window(mask, int(top[0]), int(left[0]), 192)[None]
            assert crop_mask.sum() == mask.sum()
            ours = enc.embed(np.zeros((1, 1, 192, 192), np.uint16), crop_mask)[0]
            for name, value in zip(enc.feature_names, ours):
                cp = row[f"{kind}_{name}"]
                if "Zernike" in name:  # one nucleus differs by up to 1e-3 (the cells agree to float32)
                    assert value == pytest.approx(cp, abs=1.5e-3), (kind, name)
                else:
                    assert value == pytest.approx(cp, rel=1e-5, abs=1e-6), (kind, name, float(value), cp)
            compared += 1
    print(f"\n{compared} CellProfiler objects compared on their own masks")
    assert compared >= 2


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# feature -> (min Pearson r, max median relative difference) over matched nuclei whose areas agree
# within 5 %: our segmentation is not CellProfiler's (masks ~4 % larger), so the comparison is of
# populations; features of the outline (Solidity, FormFactor, Extent, edge intensities, Zernike)
# depend on its exact pixels and are not compared.
EXAMPLEHUMAN_POPULATION = {
    "AreaShape_Area": (0.99, 0.05), "AreaShape_Perimeter": (0.98, 0.03), "AreaShape_MajorAxisLength": (0.98, 0.03),
    "AreaShape_MinorAxisLength": (0.98, 0.03), "AreaShape_EquivalentDiameter": (0.99, 0.03),
    "AreaShape_Eccentricity": (0.9, 0.06), "AreaShape_MaxFeretDiameter": (0.98, 0.03),
    "AreaShape_MinFeretDiameter": (0.97, 0.03),
    "Intensity_MeanIntensity_DNA": (0.99, 0.04), "Intensity_MeanIntensity_PH3": (0.99, 0.02),
    "Intensity_IntegratedIntensity_DNA": (0.99, 0.03), "Intensity_IntegratedIntensity_PH3": (0.99, 0.05),
    "Intensity_MedianIntensity_DNA": (0.97, 0.03), "Intensity_UpperQuartileIntensity_DNA": (0.99, 0.02),
    "Intensity_MaxIntensity_DNA": (0.99, 0.01), "Intensity_MaxIntensity_PH3": (0.99, 0.01),
    "Intensity_StdIntensity_DNA": (0.99, 0.06), "Intensity_StdIntensity_PH3": (0.99, 0.02),
}


def test_examplehuman_nuclei_agree_with_cellprofiler_csv() -> None:
    need(EH_IMAGES / "AS_09125_050116030001_D03f00d0.tif", EH_CSV / "Nuclei.csv")
    image = np.stack([tifffile.imread(EH_IMAGES / f"AS_09125_050116030001_D03f00d{i}.tif") for i in range(2)])
    nuclei = segment_nuclei(image[0])
    crops, masks, _ = cut_crops(image, nuclei, nuclei)
    labels, cy, cx, _ = label_stats(nuclei)
    top, left = crop_origin(cy, cx, CROP)
    inside = (top >= 0) & (left >= 0) & (top + CROP <= 512) & (left + CROP <= 512)
    row_of = {int(lab): i for i, lab in enumerate(labels[inside])}
    enc = classical(["DNA", "PH3"], CROP, groups=["intensity", "shape", "feret"])
    ours = enc.embed(crops, masks)
    rows = read_csv(EH_CSV / "Nuclei.csv")
    yx = np.array([[float(r["Location_Center_Y"]), float(r["Location_Center_X"])] for r in rows])
    hit = nuclei[np.round(yx[:, 0]).astype(int), np.round(yx[:, 1]).astype(int)]
    ids, counts = np.unique(hit, return_counts=True)
    pairs = [(k, row_of[h]) for k, h in enumerate(hit) if h > 0 and counts[ids == h][0] == 1 and h in row_of]
    col = {n: j for j, n in enumerate(enc.feature_names)}

    def values(name: str) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([ours[i, col[name]] for _, i in pairs], np.float64),
                np.array([float(rows[k][name]) for k, _ in pairs]))

    o_area, cp_area = values("AreaShape_Area")
    close = np.abs(o_area / cp_area - 1) < 0.05
    assert close.sum() >= 80, f"only {close.sum()} of {len(pairs)} matched nuclei agree in area within 5 %"
    report = []
    for name, (min_r, max_rel) in EXAMPLEHUMAN_POPULATION.items():
        o, cp = (v[close] for v in values(name))
        r, rel = float(np.corrcoef(o, cp)[0, 1]), float(np.median(np.abs(o - cp) / np.abs(cp)))
        report.append(f"{name}: r={r:.4f} median |rel|={rel:.4f}")
        assert r >= min_r and rel <= max_rel, report[-1]
    print(f"\n{close.sum()} matched nuclei:\n  " + "\n  ".join(report))


def test_texture_names_are_cellprofilers() -> None:
    """The names CellProfiler writes (from the pediatric profile parquet) are the ones we write."""
    parquet = PEDIATRIC / "BR00143976_shrunken.parquet"
    need(parquet)
    columns = set(pl.read_parquet(parquet).columns)
    groups = ["intensity", "intensity_extra", "shape", "zernike", "feret", "texture", "granularity",
              "radial_distribution", "radial_zernikes", "correlation"]
    ours = classical(["CorrDNA", "CorrER", "CorrRNA"], CROP, groups=groups).feature_names
    missing = [n for n in ours if f"Cells_{n}" not in columns]
    assert not missing, missing[:10]
    assert len(HARALICK_FEATURES) == 13
