"""Synthetic well-level profiles at screen scale, with known truth, for metric and normalizer checks.

The layout follows the peer benchmark described in `shared/reference/peers.md` §5.1:
1536-well plates with 300 negative-control wells each, 4 replicates per perturbation dealt
round-robin onto different plates, 2 % random well dropout; features (float32) are
heteroscedastic noise (per-feature scale ~ lognormal(0, 0.5)) + a rank-16 correlated component
+ a per-plate additive shift N(0, 0.5²) and multiplicative factor 1 + N(0, 0.1²); half of the
perturbations are inactive (no shift), the others get a per-feature shift N(0, (0.8·U(0.3, 1.5))²).

Optional MoA structure (`n_moas > 0`; the default 0 leaves the output unchanged): every treated
perturbation is annotated `moa-k` (k uniform in 0..n_moas-1) and an active perturbation's shift
direction mixes its own direction with its MoA's: sqrt(1 - s)·own + sqrt(s)·moa, s =
`moa_strength` (same amplitude). Inactive perturbations keep their label but have no shift.

Generated plate by plate, so memory is the output plus one plate.

`generate_screen` (`SyntheticScreenConfig`) imitates a standard compound screen instead: compounds
at several doses (`perturbation` = "cmpd-007@3.333", `compound`, numeric-text `dose`), MoAs shared by
several compounds, 384-well plates grouped into weekly batches (`batch`) with a per-batch effect on
top of a smaller per-plate one, only 6 DMSO wells per plate, a sigmoid dose response, and
un-normalized CellProfiler-like feature scales (log-uniform over 8 orders, positive areas and
intensities, near-constant features, near-collinear sums and ratios). `write_screen_csv` writes it
as a pycytominer-style table (`Metadata_Plate`, `Metadata_Well`, ..., `Cells_AreaShape_Area`, ...).
"""

from __future__ import annotations

import gzip
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from bioembed_assets import schema as s

CONTROL_NAME = "DMSO"
_PLATE_SHAPES = {96: (8, 12), 384: (16, 24), 1536: (32, 48)}


def plate_wells(n_wells: int) -> list[str]:
    """Well ids of a 96-, 384- or 1536-well plate in row-major order (A01, A02, ...)."""
    rows, cols = _PLATE_SHAPES[n_wells]
    return [s.well_name(r, c) for r in range(1, rows + 1) for c in range(1, cols + 1)]


_WELLS = plate_wells(1536)


def _deal(n_items: int, replicates: int, n_plates: int) -> tuple[np.ndarray, np.ndarray]:
    """(item, plate) of every replicate slot: replicate r of item i goes to plate (i + r * stride) % n_plates,
    so the replicates of an item land on different plates when replicates <= n_plates."""
    stride = max(1, n_plates // replicates)
    slot = np.arange(n_items * replicates)
    item, rep = slot // replicates, slot % replicates
    return item, (item + rep * stride) % n_plates


def _mix_moa(own: np.ndarray, centers: np.ndarray, moa_of: np.ndarray, strength: float) -> np.ndarray:
    """sqrt(1 - strength)·own + sqrt(strength)·centers[moa_of] (float32 in, float32 out)."""
    return np.float32(np.sqrt(1 - strength)) * own + np.float32(np.sqrt(strength)) * centers[moa_of]


def _well_noise(rng: np.random.Generator, n: int, scale: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Per-well noise (float32, n x d): heteroscedastic N(0, scale²) plus a rank-k correlated component."""
    X = rng.standard_normal((n, scale.size), dtype=np.float32) * scale
    X += rng.standard_normal((n, basis.shape[0]), dtype=np.float32) @ basis
    return X


@dataclass(frozen=True)
class SyntheticProfilesConfig:
    n_rows: int = 10_000
    """Nominal number of wells (before dropout); rounded up to whole plates."""
    n_features: int = 384
    wells_per_plate: int = 1536
    controls_per_plate: int = 300
    replicates: int = 4
    dropout: float = 0.02
    active_fraction: float = 0.5
    rank: int = 16
    seed: int = 0
    n_moas: int = 0
    """MoA groups among treated perturbations (0: no MoA annotation, `moa` stays null)."""
    moa_strength: float = 0.5
    """Share of an active perturbation's shift variance along its MoA's direction."""


def generate_profiles(config: SyntheticProfilesConfig = SyntheticProfilesConfig()) -> tuple[pl.DataFrame, np.ndarray]:
    """(meta, X): meta has plate, well, perturbation, control_type, moa (null unless `n_moas`)
    and `active` (the truth: True for perturbations with a real shift); X is float32 (rows,
    n_features)."""
    c = config
    rng = np.random.default_rng(c.seed)
    n_plates = max(c.replicates, -(-c.n_rows // c.wells_per_plate))
    treated_per_plate = c.wells_per_plate - c.controls_per_plate
    n_perts = n_plates * treated_per_plate // c.replicates
    d = c.n_features
    scale = rng.lognormal(0.0, 0.5, d).astype(np.float32)
    basis = (rng.standard_normal((c.rank, d)) / np.sqrt(c.rank)).astype(np.float32)
    active = rng.random(n_perts) < c.active_fraction
    shifts = rng.standard_normal((n_perts, d), dtype=np.float32)
    amplitude = (0.8 * rng.uniform(0.3, 1.5, n_perts) * active).astype(np.float32)[:, None]
    moa_of = None
    if c.n_moas > 0:  # a separate stream: the main one (and the n_moas=0 output) is unchanged
        mrng = np.random.default_rng([c.seed, 1])
        moa_of = mrng.integers(0, c.n_moas, n_perts)
        centers = mrng.standard_normal((c.n_moas, d), dtype=np.float32)
        shifts = _mix_moa(shifts, centers, moa_of, c.moa_strength)
    shifts *= amplitude
    pert_of_slot, plate_of_slot = _deal(n_perts, c.replicates, n_plates)
    metas, blocks = [], []
    for p in range(n_plates):
        perts = pert_of_slot[plate_of_slot == p]
        is_ctrl = np.concatenate([np.ones(c.controls_per_plate, bool), np.zeros(perts.size, bool)])
        pert_id = np.concatenate([np.full(c.controls_per_plate, -1), perts])
        keep = rng.random(pert_id.size) >= c.dropout
        pert_id, is_ctrl = pert_id[keep], is_ctrl[keep]
        n = pert_id.size
        X = _well_noise(rng, n, scale, basis)
        X[~is_ctrl] += shifts[pert_id[~is_ctrl]]  # the same shift on every replicate
        X *= np.float32(1.0 + 0.1 * rng.standard_normal())
        X += (0.5 * rng.standard_normal(d)).astype(np.float32)
        wells = np.flatnonzero(keep)
        names = np.where(is_ctrl, CONTROL_NAME, np.char.add("cmpd-", pert_id.astype(str)))
        metas.append(pl.DataFrame({
            s.PLATE: f"SP{p:04d}",
            s.WELL: [_WELLS[w] for w in wells],
            s.PERTURBATION: names,
            s.CONTROL_TYPE: np.where(is_ctrl, s.ControlType.NEGATIVE, s.ControlType.TREATMENT),
            s.MOA: pl.Series([None] * n, dtype=pl.Utf8) if moa_of is None else
                   pl.Series(np.char.add("moa-", moa_of[np.maximum(pert_id, 0)].astype(str)), dtype=pl.Utf8)
                   .scatter(np.flatnonzero(is_ctrl), None),
            "active": ~is_ctrl & active[np.maximum(pert_id, 0)],
        }))
        blocks.append(X)
    return pl.concat(metas), np.concatenate(blocks)


# --- a synthetic compound screen of the standard kind ------------------------------------------------------------

_COMPARTMENTS = ("Cells", "Cytoplasm", "Nuclei")
_MEASUREMENTS = {  # CellProfiler-like measurement names per feature kind ({ch}, {ch2}: stains, {k}: a counter)
    "positive": ("AreaShape_Area", "AreaShape_Perimeter", "Intensity_MeanIntensity_{ch}", "Intensity_StdIntensity_{ch}",
                 "Granularity_{k}_{ch}", "Texture_SumAverage_{ch}_{k}_00_256"),
    "signed": ("AreaShape_Zernike_{k}_1", "Correlation_Correlation_{ch}_{ch2}", "Texture_InfoMeas1_{ch}_{k}_00_256"),
    "sum": ("Intensity_IntegratedIntensity_{ch}", "RadialDistribution_FracAtD_{ch}_{k}of4"),
    "ratio": ("AreaShape_FormFactor", "Intensity_MeanIntensityEdge_{ch}", "RadialDistribution_MeanFrac_{ch}_{k}of4"),
    "constant": ("AreaShape_EulerNumber", "Intensity_MaxIntensity_{ch}", "Neighbors_AngleBetweenNeighbors_{k}"),
}
FEATURE_KINDS = tuple(_MEASUREMENTS)
"""positive (log-normal: areas, intensities), signed, sum (a linear combination of two base features),
ratio (of two positive features), constant (near-constant)."""


@dataclass(frozen=True)
class SyntheticScreenConfig:
    """A compound x dose screen on 384-well plates in weekly batches, with CellProfiler-like feature scales."""

    n_compounds: int = 24
    n_doses: int = 4
    top_dose: float = 10.0
    """Highest dose (µM); the others follow a `dilution`-fold series below it."""
    dilution: float = 3.0
    replicates: int = 3
    """Wells per treatment (compound at one dose); each replicate puts every dose of a compound on one
    plate, and the replicates of a compound go to different plates."""
    n_plates: int = 8
    plates_per_batch: int = 4
    wells_per_plate: int = 384
    controls_per_plate: int = 6
    """DMSO wells per plate, at the same spread-out positions on every plate."""
    n_moas: int = 6
    """MoA labels `moa-k` dealt evenly over the compounds (0: no MoA annotation)."""
    moa_strength: float = 0.5
    """Share of an active compound's effect variance along its MoA's direction."""
    active_fraction: float = 0.75
    """Compounds with a real effect (the others: none at any dose; `active` is the truth)."""
    effect_size: float = 1.5
    """Mean full-effect shift per latent feature, in units of the well noise (x U(0.5, 1.5) per compound)."""
    hill: float = 2.0
    """Hill slope of the dose response 1 / (1 + (ec50 / dose)^hill); ec50 log-uniform between the
    second-lowest and the top dose, so the lowest dose is nearly inactive."""
    n_features: int = 96
    constant_fraction: float = 0.05
    collinear_fraction: float = 0.15
    """Features derived from two others: linear combinations and (of positive features) ratios."""
    positive_fraction: float = 0.6
    """Base features that are positive, log-normal (areas, intensities); the rest are signed."""
    scale_range: tuple[float, float] = (1e-4, 1e4)
    """Per-feature scale, log-uniform in this range (control variances then span ~1e7 down to ~1e-16)."""
    constant_noise: float = 1e-4
    collinear_noise: float = 1e-5
    """Relative noise of the near-constant and the derived features."""
    rank: int = 8
    batch_shift: float = 1.0
    """SD of the per-batch, per-feature additive shift (latent units)."""
    batch_scale: float = 0.15
    """SD of the log of the per-batch, per-feature multiplicative factor."""
    plate_shift: float = 0.3
    plate_scale: float = 0.05
    """Per-plate additive shift SD (per feature) and multiplicative factor SD (one per plate)."""
    seed: int = 0

    def doses(self) -> np.ndarray:
        """The doses, ascending (µM)."""
        return self.top_dose / self.dilution ** np.arange(self.n_doses - 1, -1, -1.0)


def dose_label(dose: float) -> str:
    """Dose as text, e.g. 10.0 -> "10", 10 / 3 -> "3.333"."""
    return f"{dose:.4g}"


@dataclass(frozen=True)
class _ScreenParams:
    """Everything drawn once per screen (from its own stream, so feature tables need no wells)."""

    kinds: np.ndarray  # kind of each feature, kind-ordered: positive, signed, sum, ratio, constant
    names: list[str]
    scale: np.ndarray
    z_scale: np.ndarray  # latent noise SD per base feature
    basis: np.ndarray
    log_sd: np.ndarray  # positive base features: x = scale * exp(log_sd * z)
    loc: np.ndarray  # signed base features: x = scale * (loc + z)
    sources: np.ndarray  # (n_sum + n_ratio, 2): the base features each derived feature is made of
    n_sum: int
    order: np.ndarray  # output column j is kind-ordered feature order[j]
    active: np.ndarray  # per compound
    efficacy: np.ndarray  # per treatment (compound-major), 0 for inactive compounds
    shifts: np.ndarray  # per treatment, latent units
    moa_of: np.ndarray | None
    batch_add: np.ndarray
    batch_mul: np.ndarray
    plate_add: np.ndarray
    plate_mul: np.ndarray


def _feature_names(kind: str, n: int) -> list[str]:
    """`n` distinct CellProfiler-like names for features of `kind`."""
    names: dict[str, None] = {}
    channels = s.CELL_PAINTING_CHANNELS
    for k in itertools.count(1):
        if len(names) >= n:
            return list(names)[:n]
        for template, compartment, (i, ch) in itertools.product(_MEASUREMENTS[kind], _COMPARTMENTS, enumerate(channels)):
            ch2 = channels[(i + 1 + (k - 1) % (len(channels) - 1)) % len(channels)]
            names.setdefault(f"{compartment}_{template.format(ch=ch, ch2=ch2, k=k)}")
    raise AssertionError("unreachable")


def _screen_params(c: SyntheticScreenConfig) -> _ScreenParams:
    if min(c.n_compounds, c.n_doses, c.replicates, c.n_plates, c.plates_per_batch) < 1 or c.controls_per_plate < 0:
        raise ValueError("n_compounds, n_doses, replicates, n_plates and plates_per_batch must be >= 1")
    if c.replicates > c.n_plates:
        raise ValueError(f"{c.replicates} replicates need at least as many plates (n_plates={c.n_plates})")
    rng = np.random.default_rng([c.seed, 0])
    n_const = round(c.constant_fraction * c.n_features)
    n_coll = round(c.collinear_fraction * c.n_features)
    n_base = c.n_features - n_const - n_coll
    n_pos = round(c.positive_fraction * n_base)
    if n_base < 2:
        raise ValueError(f"n_features={c.n_features} leaves {n_base} base feature(s); need 2")
    n_ratio = n_coll // 2 if n_pos >= 2 else 0
    counts = {"positive": n_pos, "signed": n_base - n_pos, "sum": n_coll - n_ratio, "ratio": n_ratio, "constant": n_const}
    kinds = np.repeat(np.array(FEATURE_KINDS), list(counts.values()))
    lo, hi = np.log10(c.scale_range)
    scale = 10.0 ** rng.uniform(lo, hi, c.n_features)
    z_scale = rng.lognormal(0.0, 0.3, n_base).astype(np.float32)
    basis = (rng.standard_normal((c.rank, n_base)) / np.sqrt(c.rank)).astype(np.float32)
    log_sd = rng.uniform(0.1, 0.5, n_pos)
    loc = rng.standard_normal(n_base - n_pos)
    sums = np.stack([rng.choice(n_base, 2, replace=False) for _ in range(counts["sum"])]).reshape(-1, 2)
    ratios = np.stack([rng.choice(n_pos, 2, replace=False) for _ in range(n_ratio)]).reshape(-1, 2)
    order = rng.permutation(c.n_features)
    # compounds: activity, dose response, effect direction (own, mixed with the MoA's)
    active = rng.random(c.n_compounds) < c.active_fraction
    amplitude = c.effect_size * rng.uniform(0.5, 1.5, c.n_compounds) * active
    doses = c.doses()
    ec50 = 10.0 ** rng.uniform(np.log10(doses[min(1, c.n_doses - 1)]), np.log10(doses[-1]), c.n_compounds)
    efficacy = active[:, None] / (1.0 + (ec50[:, None] / doses[None, :]) ** c.hill)  # (compound, dose)
    direction = rng.standard_normal((c.n_compounds, n_base), dtype=np.float32)
    moa_of = None
    if c.n_moas > 0:
        moa_of = rng.permutation(np.arange(c.n_compounds) % c.n_moas)
        centers = rng.standard_normal((c.n_moas, n_base), dtype=np.float32)
        direction = _mix_moa(direction, centers, moa_of, c.moa_strength)
    shifts = (amplitude[:, None, None] * efficacy[:, :, None] * direction[:, None, :]).reshape(-1, n_base)
    n_batches = -(-c.n_plates // c.plates_per_batch)
    names = [n for kind, k in counts.items() for n in _feature_names(kind, k)]
    return _ScreenParams(
        kinds=kinds, names=names, scale=scale, z_scale=z_scale, basis=basis, log_sd=log_sd, loc=loc,
        sources=np.concatenate([sums, ratios]), n_sum=counts["sum"], order=order, active=active,
        efficacy=efficacy.reshape(-1), shifts=shifts.astype(np.float32), moa_of=moa_of,
        batch_add=c.batch_shift * rng.standard_normal((n_batches, n_base)),
        batch_mul=np.exp(c.batch_scale * rng.standard_normal((n_batches, n_base))),
        plate_add=c.plate_shift * rng.standard_normal((c.n_plates, n_base)),
        plate_mul=1.0 + c.plate_scale * rng.standard_normal(c.n_plates),
    )


def screen_features(config: SyntheticScreenConfig = SyntheticScreenConfig()) -> pl.DataFrame:
    """The columns of `generate_screen`'s X, in order: feature (name), kind (see FEATURE_KINDS), scale."""
    p = _screen_params(config)
    return pl.DataFrame({"feature": [p.names[j] for j in p.order], "kind": p.kinds[p.order].tolist(), "scale": p.scale[p.order]})


def _cellprofiler_features(rng: np.random.Generator, z: np.ndarray, p: _ScreenParams, c: SyntheticScreenConfig) -> np.ndarray:
    """Latent wells (n, n_base) -> CellProfiler-like features (n, n_features) float64, in output order."""
    scale, n_sum = p.scale, p.n_sum
    n, n_pos = z.shape[0], p.log_sd.size
    n_base, n_derived = z.shape[1], p.sources.shape[0]
    base = np.empty((n, n_base))
    base[:, :n_pos] = scale[:n_pos] * np.exp(p.log_sd * z[:, :n_pos])
    base[:, n_pos:] = scale[n_pos:n_base] * (p.loc + z[:, n_pos:])
    unit = base / scale[:n_base]  # each base feature over its scale
    a, b = unit[:, p.sources[:, 0]], unit[:, p.sources[:, 1]]
    derived = np.concatenate([a[:, :n_sum] + b[:, :n_sum], a[:, n_sum:] / b[:, n_sum:]], axis=1)
    derived *= scale[n_base:n_base + n_derived] * (1.0 + c.collinear_noise * rng.standard_normal((n, n_derived)))
    n_const = scale.size - n_base - n_derived
    constant = scale[n_base + n_derived:] * (1.0 + c.constant_noise * rng.standard_normal((n, n_const)))
    return np.concatenate([base, derived, constant], axis=1)[:, p.order]


def generate_screen(config: SyntheticScreenConfig = SyntheticScreenConfig()) -> tuple[pl.DataFrame, np.ndarray]:
    """(meta, X) of a synthetic compound screen (see `SyntheticScreenConfig`; column names: `screen_features`).

    meta: plate, well, perturbation ("cmpd-007@3.333"; controls "DMSO"), control_type, moa, batch
    ("week01", ...), compound, dose (text; "0" for DMSO), and the truth: `active` (the compound has an
    effect) and `efficacy` (its fraction of the full effect at that dose, 0 for controls and inactive
    compounds). X: float32 (wells, n_features), un-normalized. Rows are sorted by plate, then well.
    """
    c = config
    p = _screen_params(c)
    rng = np.random.default_rng([c.seed, 1])
    wells = plate_wells(c.wells_per_plate)
    control_wells = np.round(np.linspace(0, c.wells_per_plate - 1, c.controls_per_plate)).astype(int)
    free_wells = np.setdiff1d(np.arange(c.wells_per_plate), control_wells)
    cmpd_of, dose_idx = np.divmod(np.arange(c.n_compounds * c.n_doses), c.n_doses)  # per treatment
    cmpd_of_slot, plate_of_slot = _deal(c.n_compounds, c.replicates, c.n_plates)  # all doses of a compound together
    busiest = np.bincount(plate_of_slot, minlength=c.n_plates).max() * c.n_doses
    if busiest > free_wells.size:
        raise ValueError(f"{busiest} treated wells do not fit on a plate with {free_wells.size} non-control wells")
    dose_of = np.array([dose_label(d) for d in c.doses()])[dose_idx]
    compound_of = np.array([f"cmpd-{i:03d}" for i in range(c.n_compounds)])[cmpd_of]
    moa_of = None if p.moa_of is None else np.char.add("moa-", p.moa_of.astype(str))[cmpd_of]
    metas, blocks = [], []
    for plate in range(c.n_plates):
        batch = plate // c.plates_per_batch
        treats = (cmpd_of_slot[plate_of_slot == plate][:, None] * c.n_doses + np.arange(c.n_doses)).ravel()
        position = np.concatenate([control_wells, rng.choice(free_wells, treats.size, replace=False)])
        order = np.argsort(position)
        position, treat = position[order], np.concatenate([np.full(c.controls_per_plate, -1), treats])[order]
        is_ctrl, t = treat < 0, np.maximum(treat, 0)
        z = _well_noise(rng, treat.size, p.z_scale, p.basis)
        z[~is_ctrl] += p.shifts[treat[~is_ctrl]]
        z = z * (p.batch_mul[batch] * p.plate_mul[plate]) + p.batch_add[batch] + p.plate_add[plate]
        blocks.append(_cellprofiler_features(rng, z, p, c).astype(np.float32))
        metas.append(pl.DataFrame({
            s.PLATE: f"SC{plate:04d}",
            s.WELL: [wells[w] for w in position],
            s.PERTURBATION: np.where(is_ctrl, CONTROL_NAME, np.char.add(np.char.add(compound_of[t], "@"), dose_of[t])),
            s.CONTROL_TYPE: np.where(is_ctrl, s.ControlType.NEGATIVE, s.ControlType.TREATMENT),
            s.MOA: pl.Series([None] * treat.size if moa_of is None else np.where(is_ctrl, None, moa_of[t]).tolist(),
                             dtype=pl.Utf8),
            s.BATCH: f"week{batch + 1:02d}",
            s.COMPOUND: np.where(is_ctrl, CONTROL_NAME, compound_of[t]),
            "dose": np.where(is_ctrl, "0", dose_of[t]),
            "active": ~is_ctrl & p.active[cmpd_of[t]],
            "efficacy": np.where(is_ctrl, 0.0, p.efficacy[t]),
        }))
    return pl.concat(metas), np.concatenate(blocks)


def write_screen_csv(path: str | Path, config: SyntheticScreenConfig = SyntheticScreenConfig()) -> Path:
    """Write `generate_screen(config)` as a pycytominer-style well table (gzipped if `path` ends in .gz):
    Metadata_Plate, Metadata_Well, Metadata_Batch, Metadata_broad_sample (compound; "DMSO"), Metadata_dose,
    Metadata_moa, Metadata_pert_type ("control" / "trt"), then the CellProfiler-like feature columns."""
    meta, X = generate_screen(config)
    names = screen_features(config)["feature"].to_list()
    table = pl.DataFrame({
        "Metadata_Plate": meta[s.PLATE],
        "Metadata_Well": meta[s.WELL],
        "Metadata_Batch": meta[s.BATCH],
        "Metadata_broad_sample": meta[s.COMPOUND],
        "Metadata_dose": meta["dose"],
        "Metadata_moa": meta[s.MOA],
        "Metadata_pert_type": pl.Series(np.where(meta[s.CONTROL_TYPE] == s.ControlType.NEGATIVE, "control", "trt")),
    }).hstack(pl.from_numpy(X, schema=names, orient="row"))
    path = Path(path)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            table.write_csv(f)
    else:
        table.write_csv(path)
    return path
