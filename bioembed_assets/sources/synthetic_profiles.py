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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from bioembed_assets import schema as s

CONTROL_NAME = "DMSO"
_WELLS = [s.well_name(r, c) for r in range(1, 33) for c in range(1, 49)]  # 1536-well plate


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
        shifts = np.float32(np.sqrt(1 - c.moa_strength)) * shifts + np.float32(np.sqrt(c.moa_strength)) * centers[moa_of]
    shifts *= amplitude
    # replicate r of perturbation p goes to plate (p + r * stride) % n_plates: different plates
    stride = max(1, n_plates // c.replicates)
    slot = np.arange(n_perts * c.replicates)
    pert_of_slot, rep = slot // c.replicates, slot % c.replicates
    plate_of_slot = (pert_of_slot + rep * stride) % n_plates
    metas, blocks = [], []
    for p in range(n_plates):
        perts = pert_of_slot[plate_of_slot == p]
        is_ctrl = np.concatenate([np.ones(c.controls_per_plate, bool), np.zeros(perts.size, bool)])
        pert_id = np.concatenate([np.full(c.controls_per_plate, -1), perts])
        keep = rng.random(pert_id.size) >= c.dropout
        pert_id, is_ctrl = pert_id[keep], is_ctrl[keep]
        n = pert_id.size
        X = rng.standard_normal((n, d), dtype=np.float32) * scale
        X += rng.standard_normal((n, c.rank), dtype=np.float32) @ basis
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
