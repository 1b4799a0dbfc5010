"""A deterministic synthetic Cell Painting screen, written to disk the way an Opera Phenix writes plates.

Layout (Cell Painting Gallery / Phenix naming)::

    <root>/ground_truth.csv                      perturbation, moa, active
    <root>/<plate>/platemap.csv                  well, perturbation, control_type, moa
    <root>/<plate>/Images/r{RR}c{CC}f{FF}p01-ch{K}sk1fk1fl1.tiff   one uint16 image per site and channel

Cells are drawn one by one in small windows: an elliptical nucleus with chromatin texture and
nucleoli (DNA, RNA), a perinuclear reticular ER, cytoplasmic RNA, cortical actin with stress fibres
(AGP) and filamentous mitochondria (Mito); then a point-spread blur, the plate's batch effects
(per-channel gain, illumination gradient and vignetting, background offset, focus) and shot + read
noise. Every random draw comes from a generator seeded by (seed, plate, well, site), so the output is
byte-identical for a seed whatever the order of work.

Perturbations: `n_moas` mechanism-of-action groups of `compounds_per_moa` active compounds sharing a
phenotype (at a compound-specific strength, plus small compound-specific off-target shifts), and
`n_inactive` compounds without phenotype. The phenotypes, in order of `MOAS`:

- ``nuclear_enlargement``: larger, slightly dimmer nuclei;
- ``mito_fragmentation``: mitochondria break into puncta clustered around the nucleus;
- ``actin_disruption``: stress fibres give way to actin aggregates, weaker cortex;
- ``er_stress``: fewer cells (cytotoxic) with brighter ER.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import tifffile
from scipy import ndimage as ndi

from bioembed_assets.schema import ControlType, validate_plate_name, well_name
from bioembed_assets.store.atomic import atomic_dir, atomic_file

SYNTHETIC_CHANNEL_MAP: dict[int, str] = {1: "DNA", 2: "ER", 3: "RNA", 4: "AGP", 5: "Mito"}
"""Phenix channel number -> stain, for plates written by `generate_screen`."""

MOAS: tuple[str, ...] = ("nuclear_enlargement", "mito_fragmentation", "actin_disruption", "er_stress")
NEGATIVE_CONTROL = "DMSO"
_GENERATOR_VERSION = 1
_MARKER = ".bioembed-synthetic.json"
_DNA, _ER, _RNA, _AGP, _MITO = range(5)
# Counts per unit of emitter density, per channel (DNA, ER, RNA, AGP, Mito): cells peak at ~5-20k.
_CHANNEL_SCALE = np.array([9000.0, 5200.0, 4200.0, 5500.0, 6500.0], dtype=np.float32)


@dataclass(frozen=True)
class SyntheticScreenConfig:
    """Shape of a synthetic screen.

    Defaults (the CPU demo): 3 plates of 6 x 8 = 48 wells, 2 sites/well, 256 x 256 px.
    Wells per plate: (4 MoAs x 4 compounds + 4 inactive) x 2 replicates = 40 treatment wells
    + 8 DMSO wells = 48. Wells left over (smaller designs) get extra DMSO. The well layout is
    shuffled per plate. `cells_per_site` is the typical range of cells in a 256 x 256 site
    (Poisson around its midpoint, times small well/plate factors and the cytotoxic MoA); it scales
    with the image area (cell size in pixels is fixed, nuclei ~17 px across).
    `phenotype_strength` scales every MoA phenotype (0: active compounds do nothing);
    `batch_strength` scales the plate-to-plate batch effects (0: none).
    """

    n_plates: int = 3
    n_rows: int = 6
    n_cols: int = 8
    sites_per_well: int = 2
    image_size: int = 256
    cells_per_site: tuple[int, int] = (15, 25)
    n_moas: int = 4
    compounds_per_moa: int = 4
    n_inactive: int = 4
    replicates_per_plate: int = 2
    n_dmso_wells: int = 8
    seed: int = 0
    plate_prefix: str = "SYN-P"
    phenotype_strength: float = 1.0
    batch_strength: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.n_moas <= len(MOAS):
            raise ValueError(f"n_moas must be in 0..{len(MOAS)} (one phenotype each), got {self.n_moas}")
        if self.n_dmso_wells < 1:
            raise ValueError("every plate needs at least one negative-control (DMSO) well")
        if min(self.n_plates, self.n_rows, self.n_cols, self.sites_per_well, self.replicates_per_plate) < 1:
            raise ValueError("n_plates, n_rows, n_cols, sites_per_well, replicates_per_plate must be >= 1")
        if self.image_size < 64:
            raise ValueError(f"image_size must be >= 64, got {self.image_size}")
        used = self.n_compounds * self.replicates_per_plate + self.n_dmso_wells
        if used > self.n_wells:
            raise ValueError(
                f"design needs {used} wells ({self.n_compounds} compounds x {self.replicates_per_plate} "
                f"replicates + {self.n_dmso_wells} DMSO) but a plate has {self.n_wells}"
            )
        validate_plate_name(self.plate_name(0))

    @property
    def n_compounds(self) -> int:
        return self.n_moas * self.compounds_per_moa + self.n_inactive

    @property
    def n_wells(self) -> int:
        return self.n_rows * self.n_cols

    def plate_name(self, index: int) -> str:
        """Name of plate `index` (0-based): 'SYN-P01', 'SYN-P02', ..."""
        return f"{self.plate_prefix}{index + 1:02d}"


@dataclass(frozen=True)
class _Compound:
    name: str
    moa: str | None
    active: bool
    strength: float  # phenotype magnitude (0 for inactive / DMSO)
    gains: tuple[float, ...]  # small off-target per-channel gains
    nuc: float  # small off-target nuclear-size factor


@dataclass(frozen=True)
class _Batch:
    gain: np.ndarray  # (5,)
    background: np.ndarray  # (5,)
    illum: np.ndarray  # (5, H, W) float32
    psf: float
    density: float


def phenix_file_name(row: int, col: int, site: int, channel: int) -> str:
    """Opera Phenix / Cell Painting Gallery file name of one plane-1 image."""
    return f"r{row:02d}c{col:02d}f{site:02d}p01-ch{channel}sk1fk1fl1.tiff"


def _design(cfg: SyntheticScreenConfig) -> list[_Compound]:
    rng = np.random.default_rng([cfg.seed, 0])
    n = cfg.n_compounds
    names = [f"CPD-{i + 1:03d}" for i in range(n)]
    order = rng.permutation(n)  # compound names do not give the MoA away
    out = []
    for k in range(n):
        i = int(np.flatnonzero(order == k)[0])
        active = i < cfg.n_moas * cfg.compounds_per_moa
        moa = MOAS[i // cfg.compounds_per_moa] if active else None
        s = float(rng.uniform(0.75, 1.2)) * cfg.phenotype_strength if active else 0.0
        gains = tuple(float(g) for g in np.exp(rng.normal(0, 0.06, 5))) if active else (1.0,) * 5
        nuc = float(np.exp(rng.normal(0, 0.03))) if active else 1.0
        out.append(_Compound(names[k], moa, active, s, gains, nuc))
    return out


def _layout(cfg: SyntheticScreenConfig, plate_index: int, compounds: list[_Compound]) -> list[_Compound]:
    dmso = _Compound(NEGATIVE_CONTROL, None, False, 0.0, (1.0,) * 5, 1.0)
    wells = [c for c in compounds for _ in range(cfg.replicates_per_plate)]
    wells += [dmso] * (cfg.n_wells - len(wells))
    rng = np.random.default_rng([cfg.seed, 3, plate_index])
    return [wells[i] for i in rng.permutation(len(wells))]


def _batch(cfg: SyntheticScreenConfig, plate_index: int) -> _Batch:
    rng = np.random.default_rng([cfg.seed, 1, plate_index])
    b, h = cfg.batch_strength, cfg.image_size
    y, x = np.mgrid[0:h, 0:h].astype(np.float32) / (h - 1) - 0.5
    grad = rng.normal(0, 0.18 * b, 2)
    vignette = 0.25 * b * rng.uniform(0.5, 1.0)
    illum = np.empty((5, h, h), np.float32)
    for c in range(5):
        gy, gx = grad + rng.normal(0, 0.04 * b, 2)
        illum[c] = (1 + gy * y + gx * x) * (1 - vignette * (x * x + y * y))
    return _Batch(
        gain=np.exp(rng.normal(0, 0.2 * b, 5)).astype(np.float32),
        background=(300 + rng.uniform(-150, 150, 5) * b).astype(np.float32),
        illum=illum,
        psf=0.9 + float(rng.uniform(0, 0.35 * b)),
        density=float(np.exp(rng.normal(0, 0.08 * b))),
    )


def _textures(seed: int, size: int) -> np.ndarray:
    """Three standardized texture tiles (2*size square): chromatin, reticular ER, fine cytoplasm."""
    rng = np.random.default_rng([seed, 5])
    noise = rng.standard_normal((3, 2 * size, 2 * size), dtype=np.float32)
    chrom = ndi.gaussian_filter(noise[0], 1.0)
    band = ndi.gaussian_filter(noise[1], 1.3) - ndi.gaussian_filter(noise[1], 3.0)
    reticular = np.exp(-((band / (0.3 * band.std())) ** 2))  # zero-crossings of band-pass noise: a network
    fine = ndi.gaussian_filter(noise[2], 2.0)
    tiles = np.stack([chrom / chrom.std(), reticular / reticular.mean(), fine / fine.std()])
    return tiles.astype(np.float32)


def _place(rng: np.random.Generator, n: int, size: int, radii: np.ndarray) -> np.ndarray:
    """Centres for up to n nuclei (major semi-axes `radii`) that do not overlap."""
    cand = rng.uniform(-4, size + 4, (n * 40, 2))
    centres = np.empty((n, 2))
    k = 0
    for y, x in cand:
        if k == n:
            break
        if k == 0 or np.all(
            np.hypot(centres[:k, 0] - y, centres[:k, 1] - x) >= 1.08 * (radii[:k] + radii[k]) + 1.5
        ):
            centres[k] = (y, x)
            k += 1
    return centres[:k]


_N_ANGLES = 64
_ANGLES = np.linspace(0, 2 * np.pi, _N_ANGLES, endpoint=False)


def _ellipse(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, a: float, b: float, theta: float, radius: np.ndarray
) -> np.ndarray:
    """Normalized distance to an ellipse centred at (cy, cx) whose boundary wobbles by `radius` (per angle bin)."""
    c, s = math.cos(theta), math.sin(theta)
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    u, v = dx * np.float32(c / a) + dy * np.float32(s / a), dy * np.float32(c / b) - dx * np.float32(s / b)
    k = (np.arctan2(v, u) * np.float32(_N_ANGLES / (2 * np.pi))).astype(np.int32) % _N_ANGLES
    return np.sqrt(u * u + v * v) / radius[k]


def _outlines(rng: np.random.Generator, amplitude: np.ndarray, harmonics: int) -> np.ndarray:
    """Radii (n, _N_ANGLES) float32 of irregular closed outlines: 1 + random low harmonics."""
    n = len(amplitude)
    amps = rng.uniform(0, 1, (n, harmonics, 1)) * amplitude[:, None, None]
    phases = rng.uniform(0, 2 * np.pi, (n, harmonics, 1))
    k = np.arange(2, 2 + harmonics)[None, :, None]
    return (1 + (amps * np.cos(k * _ANGLES + phases)).sum(1)).astype(np.float32)


def _render_points(
    h: int, y: np.ndarray, x: np.ndarray, w: np.ndarray, owner: np.ndarray, label: np.ndarray, allowed: np.ndarray
) -> np.ndarray:
    """(h, h) image of point emitters that fall inside their own cell (label == owner) where `allowed`."""
    iy, ix = np.rint(y).astype(np.int64), np.rint(x).astype(np.int64)
    ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < h)
    idx, w, owner = iy[ok] * h + ix[ok], w[ok], owner[ok]
    keep = (label.ravel()[idx] == owner) & allowed.ravel()[idx]
    return np.bincount(idx[keep], weights=w[keep], minlength=h * h).reshape(h, h).astype(np.float32)


def _scatter(rng: np.random.Generator, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Owner index, radius fraction (uniform over the unit disc) and angle for counts[i] points per cell."""
    owner = np.repeat(np.arange(len(counts)), counts)
    return owner, np.sqrt(rng.random(len(owner))), rng.uniform(0, 2 * np.pi, len(owner))


def _render_site(
    rng: np.random.Generator,
    cfg: SyntheticScreenConfig,
    cpd: _Compound,
    batch: _Batch,
    well_factor: np.ndarray,
    textures: np.ndarray,
) -> np.ndarray:
    """One site: (5, H, W) uint16 in SYNTHETIC_CHANNEL_MAP order."""
    h = cfg.image_size
    effect = {m: (cpd.strength if cpd.moa == m else 0.0) for m in MOAS}
    lo, hi = cfg.cells_per_site
    mean_cells = (lo + hi) / 2 * (h / 256) ** 2 * batch.density * well_factor[5]
    mean_cells *= 1 - 0.45 * min(effect["er_stress"], 1.5)
    n_target = max(1, int(rng.poisson(mean_cells)))

    # Per-cell parameters; ~85% of treated cells respond, ~4% are mitotic (small, bright, round).
    responder = rng.random(n_target) < 0.85
    mitotic = rng.random(n_target) < 0.04
    r0 = np.clip(rng.normal(8.5, 1.0, n_target), 6.0, 12.0)
    r_nuc = r0 * cpd.nuc * (1 + 0.38 * effect["nuclear_enlargement"] * responder)
    r_nuc = np.where(mitotic, r0 * 0.62, r_nuc)
    elong = rng.uniform(1.0, 1.35, n_target)
    centres = _place(rng, n_target, h, r_nuc * elong)
    n = len(centres)
    r0, r_nuc, elong, responder, mitotic = r0[:n], r_nuc[:n], elong[:n], responder[:n], mitotic[:n]
    cy, cx = centres[:, 0], centres[:, 1]
    a_n, b_n = r_nuc * elong, r_nuc / elong
    a_c = np.where(mitotic, r_nuc * 1.9, np.maximum(r0 * rng.uniform(2.5, 3.3, n), a_n * 1.5))
    b_c = a_c / np.where(mitotic, 1.05, rng.uniform(1.1, 1.6, n))
    theta_n, theta_c = rng.uniform(0, np.pi, n), rng.uniform(0, np.pi, n)
    ccy, ccx = cy + rng.normal(0, 0.12, n) * a_c, cx + rng.normal(0, 0.12, n) * a_c
    cell_outline = _outlines(rng, np.where(mitotic, 0.03, 0.09), 4)
    nuc_outline = _outlines(rng, np.full(n, 0.035), 3)

    bright = np.exp(rng.normal(0, 0.22, (n, 5)) + rng.normal(0, 0.15, (n, 1))) * well_factor[None, :5]
    bright *= np.array(cpd.gains)[None, :]
    gain_resp = np.ones(5)
    gain_resp[_DNA] /= 1 + 0.2 * effect["nuclear_enlargement"]
    gain_resp[_ER] *= 1 + 0.8 * effect["er_stress"]
    bright = np.where(responder[:, None], bright * gain_resp, bright)
    bright[mitotic, _DNA] *= 2.2
    bright[mitotic, _RNA] *= 0.6
    frag = np.where(responder, np.clip(0.1 + 0.85 * effect["mito_fragmentation"], 0, 1), 0.1)
    actin = np.where(responder, np.clip(0.9 * effect["actin_disruption"], 0, 1), 0.0)
    lut = np.vstack([np.zeros((1, 5)), bright]).T.astype(np.float32)  # (5, n + 1): brightness by label

    # Geometry, cell by cell in small windows: nearest cell (normalized distance) wins each pixel.
    best_c = np.full((h, h), np.inf, np.float32)
    best_n = np.full((h, h), np.inf, np.float32)
    label = np.zeros((h, h), np.int32)
    grid = np.arange(h, dtype=np.float32)
    for i in range(n):
        half = int(a_c[i] * cell_outline[i].max()) + 2
        y0, y1 = max(int(ccy[i]) - half, 0), min(int(ccy[i]) + half + 2, h)
        x0, x1 = max(int(ccx[i]) - half, 0), min(int(ccx[i]) + half + 2, h)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx, win = grid[y0:y1, None], grid[None, x0:x1], (slice(y0, y1), slice(x0, x1))
        d = _ellipse(yy, xx, ccy[i], ccx[i], a_c[i], b_c[i], theta_c[i], cell_outline[i])
        closer = d < best_c[win]
        best_c[win][closer], label[win][closer] = d[closer], i + 1
        d = _ellipse(yy, xx, cy[i], cx[i], a_n[i], b_n[i], theta_n[i], nuc_outline[i])
        np.minimum(best_n[win], d, out=best_n[win])
    inside = best_c < 1.0
    label[~inside] = 0
    nuc = (best_n < 1.0) & inside
    cyto = inside & ~nuc

    # Point emitters (all cells at once): y, x, weight (x cell brightness), owner label.
    def pts(ch: int, owner: np.ndarray, y: np.ndarray, x: np.ndarray, w: float | np.ndarray) -> tuple:
        owner = np.broadcast_to(owner, y.shape).ravel()
        w = np.broadcast_to(w, y.shape).ravel() * lut[ch, owner + 1]
        return y.ravel(), x.ravel(), w, owner + 1

    normal = ~mitotic
    o, r, t = _scatter(rng, rng.integers(1, 5, n) * normal)  # nucleoli: RNA-bright blobs
    jy, jx = rng.normal(0, 1.0, (2, len(o), 8))
    ny = (cy[o] + 0.67 * r * b_n[o] * np.sin(t))[:, None] + jy
    nx = (cx[o] + 0.67 * r * b_n[o] * np.cos(t))[:, None] + jx
    rna_pts = pts(_RNA, o[:, None], ny, nx, 0.9)
    o, r, t = _scatter(rng, np.where(mitotic, 20, rng.integers(6, 14, n)))  # chromocenters: DNA-bright
    dna_pts = pts(_DNA, o, cy[o] + 0.9 * r * b_n[o] * np.sin(t), cx[o] + 0.9 * r * a_n[o] * np.cos(t), 1.6)

    area = a_c * b_c / 400.0
    # Mitochondria: worms; fragmented ones are short puncta pulled towards the nucleus.
    o = np.repeat(np.arange(n), rng.poisson(28 * area * (1 + 1.5 * frag)))
    steps = 16
    length = np.rint(14 * (1 - frag[o]) + 2)
    inner = r_nuc[o] / a_c[o]
    rho = inner + (1 - inner) * rng.beta(1.2, 1.2 + 2.5 * frag[o])
    t = rng.uniform(0, 2 * np.pi, len(o))
    heading = rng.uniform(0, 2 * np.pi, (len(o), 1)) + np.cumsum(rng.normal(0, 0.35, (len(o), steps)), 1)
    wy = (ccy[o] + rho * b_c[o] * np.sin(t))[:, None] + np.cumsum(0.7 * np.sin(heading), 1)
    wx = (ccx[o] + rho * a_c[o] * np.cos(t))[:, None] + np.cumsum(0.7 * np.cos(heading), 1)
    w = (np.arange(steps)[None, :] < length[:, None]) * (1.2 + frag[o])[:, None]
    mito_pts = pts(_MITO, o[:, None], wy, wx, w)

    # Actin: stress fibres roughly along the cell's long axis; aggregates when disrupted.
    o, r, t = _scatter(rng, rng.poisson(12 * area * (1 - actin)) * normal)
    tf = theta_c[o] + rng.normal(0, 0.3, len(o))
    span = a_c[o] * rng.uniform(0.4, 1.0, len(o))
    s = np.linspace(-0.5, 0.5, 32)[None, :] * span[:, None]
    fy = (ccy[o] + 0.77 * r * b_c[o] * np.sin(t))[:, None] + s * np.sin(tf)[:, None]
    fx = (ccx[o] + 0.77 * r * a_c[o] * np.cos(t))[:, None] + s * np.cos(tf)[:, None]
    fib = pts(_AGP, o[:, None], fy, fx, (0.45 / 0.7 * span / 31)[:, None])
    o, r, t = _scatter(rng, rng.poisson(14 * area * actin))
    jy, jx = rng.normal(0, 0.8, (2, len(o), 5))
    gy = (ccy[o] + 0.9 * r * b_c[o] * np.sin(t))[:, None] + jy
    gx = (ccx[o] + 0.9 * r * a_c[o] * np.cos(t))[:, None] + jx
    agg = pts(_AGP, o[:, None], gy, gx, 1.3)
    agp_pts = tuple(np.concatenate(z) for z in zip(fib, agg))

    # Continuous fields from the per-pixel geometry.
    oy, ox = rng.integers(0, h, 2)
    tex = textures[:, oy : oy + h, ox : ox + h]
    one = np.float32(1.0)
    dn = np.where(nuc, best_n, one)
    out_n = np.clip(best_n - one, 0.0, 10.0)
    chrom_amp = np.where(np.concatenate([[False], mitotic])[label], np.float32(0.8), np.float32(0.4))
    act_px = np.concatenate([[0.0], actin]).astype(np.float32)[label]
    field = np.empty((5, h, h), np.float32)
    field[_DNA] = lut[_DNA][label] * nuc * (one - np.float32(0.3) * dn * dn) * np.maximum(one + chrom_amp * tex[0], 0.1)
    envelope = np.exp(-(((best_n - one) / np.float32(0.12)) ** 2))
    er = cyto * np.exp(-out_n / np.float32(0.9)) * (np.float32(0.25) + np.float32(0.75) * tex[1])
    field[_ER] = lut[_ER][label] * (er + inside * np.float32(0.55) * envelope + nuc * np.float32(0.08))
    rna = nuc * np.float32(0.22) + cyto * np.float32(0.4) * np.exp(-out_n / np.float32(1.4))
    field[_RNA] = lut[_RNA][label] * rna * (one + np.float32(0.25) * tex[2])
    edge = np.zeros((h, h), bool)  # borders between touching cells
    step = label[1:] != label[:-1]
    edge[1:] |= step
    edge[:-1] |= step
    step = label[:, 1:] != label[:, :-1]
    edge[:, 1:] |= step
    edge[:, :-1] |= step
    cortex = np.maximum(np.exp(-(((one - best_c) / np.float32(0.06)) ** 2)) * inside, edge * (label > 0) * np.float32(0.8))
    field[_AGP] = lut[_AGP][label] * (cortex * (one - np.float32(0.35) * act_px) + cyto * (0.12 + 0.1 * act_px))
    field[_MITO] = lut[_MITO][label] * cyto * np.float32(0.1)
    for ch, p, allowed in ((_DNA, dna_pts, nuc), (_RNA, rna_pts, nuc), (_AGP, agp_pts, inside), (_MITO, mito_pts, cyto)):
        field[ch] += _render_points(h, *p, label, allowed)

    # Optics, batch effects and camera noise (shot noise ~ sqrt(2 * counts), read noise 6 counts).
    img = np.empty((5, h, h), np.float32)
    for ch in range(5):
        ndi.gaussian_filter(field[ch], batch.psf * (0.85 if ch == _DNA else 1.0), output=img[ch], truncate=3.0)
    img *= (_CHANNEL_SCALE * batch.gain)[:, None, None]
    img += batch.background[:, None, None]
    img *= batch.illum
    img += np.sqrt(np.maximum(img, 0) * 2.0 + 36.0) * rng.standard_normal((5, h, h), dtype=np.float32)
    return np.clip(np.rint(img), 0, 65535).astype(np.uint16)


def _marker(cfg: SyntheticScreenConfig, plate_index: int) -> str:
    return json.dumps(
        {"generator_version": _GENERATOR_VERSION, "plate_index": plate_index, "config": asdict(cfg)},
        sort_keys=True,
    )


def _platemap(layout: list[_Compound], cfg: SyntheticScreenConfig) -> pl.DataFrame:
    wells, perts, ctypes, moas = [], [], [], []
    for k, cpd in enumerate(layout):
        r, c = divmod(k, cfg.n_cols)
        wells.append(well_name(r + 1, c + 1))
        perts.append(cpd.name)
        ctypes.append(ControlType.NEGATIVE if cpd.name == NEGATIVE_CONTROL else ControlType.TREATMENT)
        moas.append(cpd.moa)
    return pl.DataFrame(
        {"well": wells, "perturbation": perts, "control_type": ctypes, "moa": moas},
        schema={"well": pl.Utf8, "perturbation": pl.Utf8, "control_type": pl.Utf8, "moa": pl.Utf8},
    )


def _write_plate(root: Path, cfg: SyntheticScreenConfig, index: int, compounds: list[_Compound], textures: np.ndarray) -> None:
    plate = cfg.plate_name(index)
    layout = _layout(cfg, index, compounds)
    batch = _batch(cfg, index)
    with atomic_dir(root / plate) as tmp:
        images = tmp / "Images"
        images.mkdir()
        for k, cpd in enumerate(layout):
            r, c = divmod(k, cfg.n_cols)
            well_rng = np.random.default_rng([cfg.seed, 4, index, k])
            well_factor = np.exp(well_rng.normal(0, [0.05] * 5 + [0.1]))
            for site in range(1, cfg.sites_per_well + 1):
                rng = np.random.default_rng([cfg.seed, 2, index, k, site])
                stack = _render_site(rng, cfg, cpd, batch, well_factor, textures)
                for ch, _stain in SYNTHETIC_CHANNEL_MAP.items():
                    name = phenix_file_name(r + 1, c + 1, site, ch)
                    tifffile.imwrite(images / name, stack[ch - 1], photometric="minisblack", metadata=None)
        _platemap(layout, cfg).write_csv(tmp / "platemap.csv")
        (tmp / _MARKER).write_text(_marker(cfg, index))


def ground_truth(config: SyntheticScreenConfig) -> pl.DataFrame:
    """The screen's answer key: perturbation, moa (None for inactive/DMSO), active."""
    rows = [(c.name, c.moa, c.active) for c in _design(config)] + [(NEGATIVE_CONTROL, None, False)]
    return pl.DataFrame(rows, schema={"perturbation": pl.Utf8, "moa": pl.Utf8, "active": pl.Boolean}, orient="row")


def generate_screen(root: Path, config: SyntheticScreenConfig = SyntheticScreenConfig()) -> list[str]:
    """Write the synthetic screen under `root`; return the plate names.

    Idempotent: a plate folder that is complete for the same config is skipped; one from another
    config is replaced atomically. Same seed -> byte-identical files.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    compounds = _design(config)
    textures: np.ndarray | None = None
    plates = []
    for index in range(config.n_plates):
        plate = config.plate_name(index)
        plates.append(plate)
        marker = root / plate / _MARKER
        if marker.is_file() and marker.read_text() == _marker(config, index):
            continue
        if textures is None:
            textures = _textures(config.seed, config.image_size)
        _write_plate(root, config, index, compounds, textures)
    gt = root / "ground_truth.csv"
    with atomic_file(gt) as tmp:
        ground_truth(config).write_csv(tmp)
    return plates
