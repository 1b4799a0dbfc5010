"""Per-site image QC: focus, saturation and intensity per stain, and flags from robust within-plate statistics.

Measures (one per site x stain, as CellProfiler's MeasureImageQuality):

- ``qc_focus_<stain>``: the power-spectrum log-log slope, CellProfiler's ``PowerLogLogSlope``
  (same numbers): the slope of log(ring power) against log(spatial frequency) over the low
  frequencies (up to min(H, W)/8 cycles per image). It ignores the intensity scale; blur removes
  high frequencies, so a blurred site has a *steeper* (more negative) slope than its plate.
- ``qc_saturation_<stain>``: fraction of pixels at the dtype's maximum (255 / 65535).
- ``qc_intensity_<stain>``: mean intensity (not the median: sparse fluorescence has a median at
  the background level, blind to an empty or over-bright site).

Flag rules (`QCThresholds`), reasons joined in ``qc_flags`` as ``"<reason>:<stain>"``:

- ``blur``: robust z of the focus slope < -`focus_z` (not reported for a stain flagged
  ``saturated``: a clipped plateau steepens the spectrum too, so the slope says nothing there);
- ``saturated``: saturation > `saturation_max`;
- ``empty``: intensity < `empty_fraction` x the plate's median intensity for the stain;
- ``bright`` / ``dim``: robust z of intensity > `intensity_z` / < -`intensity_z`.

Robust z = (x - median) / max(1.4826 MAD, floor), over the sites of the table (one plate). The
floors (`focus_min_scale` in slope units, `intensity_min_rel_scale` x median) keep a very
homogeneous plate from turning tiny differences into huge z-scores, so a clean plate is not
flagged. With the defaults a site is called blurred when its slope is at least 0.3 below the
plate's median (Gaussian blur of sigma 2 px moves it by ~0.6, sigma 4 by 1.5-2; in-focus sites of
a plate spread by ~0.05-0.15 with cell density). Z-score rules need at least `min_sites` sites;
`qc_pass` is true when no rule fires.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from scipy import fft

from bioembed_assets.images.store import open_plate_images
from bioembed_assets.schema import FIELD, PLATE, BioembedInputError

_MAD_TO_SD = 1.4826
_QC_PREFIXES = ("qc_focus_", "qc_saturation_", "qc_intensity_")


@dataclass(frozen=True)
class QCThresholds:
    """Flag rules of `site_qc` (see the module docstring)."""

    focus_z: float = 3.0
    """blur: robust z of the focus slope below -focus_z."""
    focus_min_scale: float = 0.1
    """Floor of the focus slope's robust SD (slope units)."""
    saturation_max: float = 0.01
    """saturated: more than this fraction of pixels at the dtype's maximum."""
    intensity_z: float = 5.0
    """bright/dim: |robust z| of the mean intensity above this; looser than focus_z because
    treatments (toxicity, cell number) move intensity for biological reasons."""
    intensity_min_rel_scale: float = 0.05
    """Floor of the intensity's robust SD, as a fraction of the plate median."""
    empty_fraction: float = 0.05
    """empty: mean intensity below this fraction of the plate median (shutter, missing stain, no cells)."""
    min_sites: int = 8
    """Fewer sites than this: only the absolute rules (saturated, empty) apply."""


@functools.lru_cache(maxsize=8)
def _rings(h: int, w: int) -> tuple[np.ndarray, tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...], int]:
    """CellProfiler's ring labels mapped onto the rfft2 half-spectrum: (columns used, per half
    (column index, mask, labels), top). The full spectrum's column w - j is the conjugate mirror of
    rfft column j at row (h - i) % h, so each half needs its own label map to reproduce
    `centrosome.rps` exactly (it folds frequencies with flipud/fliplr, i.e. min(i, h - 1 - i))."""
    top = int(np.floor(min(h, w) / 8.0))

    def label(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        fy, fx = np.minimum(i, h - 1 - i), np.minimum(j, w - 1 - j)
        return np.floor(np.sqrt(fy * fy + fx * fx)).astype(np.int64) + 1

    cols = np.arange(min(top + 2, w // 2 + 1))
    rows = np.arange(h)[:, None]
    mirror = cols[(cols >= 1) & (cols < (w + 1) // 2)]
    halves = []
    for j, lab in ((cols, label(rows, cols[None, :])), (mirror, label((h - rows) % h, w - mirror[None, :]))):
        keep = (lab >= 2) & (lab < top)
        halves.append((j, keep, lab[keep]))
    return cols, tuple(halves), top


def power_log_log_slope(img: np.ndarray) -> float:
    """CellProfiler's PowerLogLogSlope of a 2-D image (NaN for a constant or tiny image).

    As `centrosome.radial_power_spectrum.rps` + MeasureImageQuality: power of the mean-subtracted
    image summed over rings of integer frequency radius (labels 2 .. min(H, W)/8 - 1, i.e. the
    lowest eighth of frequencies), least-squares slope of log power on log label. Computed from a
    float32 real FFT (half the work), equal to CellProfiler's value to ~1e-5.
    """
    img = np.asarray(img, dtype=np.float32)
    h, w = img.shape
    if min(h, w) < 32 or img.min() == img.max():
        return float("nan")
    cols, halves, top = _rings(h, w)
    spec = fft.rfft2(img - img.mean())[:, cols]
    power = spec.real.astype(np.float64) ** 2 + spec.imag.astype(np.float64) ** 2
    ring = sum(np.bincount(lab, weights=power[:, j][keep], minlength=top) for j, keep, lab in halves)[2:top]
    radii = np.arange(2, top)
    ok = ring > 0
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(radii[ok]), np.log(ring[ok]), 1)[0])


def _site_metrics(stack: np.ndarray) -> list[float]:
    hi = np.iinfo(stack.dtype).max
    out: list[float] = []
    for plane in stack:
        out += [power_log_log_slope(plane), float((plane == hi).mean()), float(plane.mean(dtype=np.float64))]
    return out


def _robust_z(x: np.ndarray, min_scale: float) -> np.ndarray:
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.full_like(x, np.nan)
    med = np.median(finite)
    scale = max(_MAD_TO_SD * float(np.median(np.abs(finite - med))), min_scale, 1e-12)
    return (x - med) / scale


def _flags(metrics: pl.DataFrame, channels: Sequence[str], t: QCThresholds) -> list[str]:
    n = metrics.height
    reasons: list[list[str]] = [[] for _ in range(n)]
    use_z = n >= t.min_sites

    def add(mask: np.ndarray, reason: str) -> None:
        for i in np.flatnonzero(mask):
            reasons[i].append(reason)

    for c in channels:
        focus = metrics[f"qc_focus_{c}"].to_numpy().astype(np.float64)
        sat = metrics[f"qc_saturation_{c}"].to_numpy()
        inten = metrics[f"qc_intensity_{c}"].to_numpy()
        med = float(np.median(inten)) if n else 0.0
        empty = inten < t.empty_fraction * med if med > 0 else np.zeros(n, dtype=bool)
        saturated = sat > t.saturation_max
        if use_z:
            add((_robust_z(focus, t.focus_min_scale) < -t.focus_z) & ~saturated, f"blur:{c}")
        add(saturated, f"saturated:{c}")
        add(empty, f"empty:{c}")
        if use_z:
            z = _robust_z(inten, t.intensity_min_rel_scale * abs(med))
            add(z > t.intensity_z, f"bright:{c}")
            add((z < -t.intensity_z) & ~empty, f"dim:{c}")
    return [",".join(r) for r in reasons]


def site_qc(
    store_path: Path,
    image_table: pl.DataFrame,
    thresholds: QCThresholds | None = None,
    *,
    workers: int = 4,
) -> pl.DataFrame:
    """`image_table` (one plate; `field` indexes the store's fields) plus per-stain QC measures,
    ``qc_flags`` (Utf8, "" when fine) and ``qc_pass`` (bool). Sites stream through `workers`
    threads, one field each in memory. Earlier QC columns of the same names are replaced."""
    t = thresholds or QCThresholds()
    images, channels = open_plate_images(Path(store_path))
    plate = str(image_table[PLATE][0]) if PLATE in image_table.columns and image_table.height else None
    if FIELD not in image_table.columns:
        raise BioembedInputError(f"image table has no {FIELD!r} column", plate=plate, path=store_path)
    fields = image_table[FIELD].to_list()
    bad = [f for f in fields if f is None or not 0 <= f < images.shape[0]]
    if bad:
        raise BioembedInputError(
            f"image table names fields {bad[:5]} but the store has {images.shape[0]}", plate=plate, path=store_path
        )
    with ThreadPoolExecutor(max(1, workers)) as pool:
        rows = list(pool.map(lambda f: _site_metrics(np.asarray(images[f])), fields))
    names = [f"{p}{c}" for c in channels for p in _QC_PREFIXES]
    metrics = pl.DataFrame(rows, schema={name: pl.Float64 for name in names}, orient="row")
    flags = _flags(metrics, channels, t)
    base = image_table.drop([c for c in (*names, "qc_flags", "qc_pass") if c in image_table.columns])
    return pl.concat([base, metrics], how="horizontal").with_columns(
        pl.Series("qc_flags", flags, dtype=pl.Utf8), pl.Series("qc_pass", [not f for f in flags], dtype=pl.Boolean)
    )
