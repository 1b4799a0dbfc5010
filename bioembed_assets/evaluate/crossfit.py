"""Replicate mAP whose negative controls are never those the normalizer was fitted on.

Fitting a normalizer on the control wells and then using the same wells as mAP negatives
makes controls look tighter than any treated well, so truly inactive perturbations come out
"active" (peers.md §5.5). Cross-fitting splits each plate's (or batch's) controls into folds; for
fold k the normalizer is fitted on the other folds and fold k's controls are the negatives. Every
treated well gets one AP per fold; a perturbation's mAP is the mean over its wells and folds, and
its permutation null the mean of the members' nulls (as `mean_average_precision` does).

The trade-off (`plan_crossfit`): cross-fitting is honest but fits each fold on fewer controls. With
the few controls of real screens (e.g. 6 per plate: 3 per fold) per-plate statistics of 3 wells
are noisy (a MAD is often zero), so the cross-fitted mAP understates what the recipe does on all
controls. `crossfit="auto"` cross-fits with 2 folds when each group the folds are dealt in (plates
for recipes with per-plate steps, else batches) keeps at least `MIN_FIT_CONTROLS` controls per
fold, and otherwise scores in-sample (optimistic, recorded as `crossfit_folds = 0`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import polars as pl

from bioembed_assets.evaluate.nulls import NullMode
from bioembed_assets.evaluate.retrieval import average_precision_vs_controls, mean_average_precision
from bioembed_assets.schema import CONTROL_TYPE, PERTURBATION, PLATE, ControlType


class ControlFittedNormalizer(Protocol):
    def fit(self, X: np.ndarray, batches: np.ndarray, is_control: np.ndarray) -> ControlFittedNormalizer: ...

    def transform(self, X: np.ndarray, batches: np.ndarray) -> np.ndarray: ...


MIN_FIT_CONTROLS = 4
"""Controls per plate (or batch) a fold must keep for fitting: what `sphere(reg=auto)` splits in halves,
and the fewest wells a median/MAD is not mostly rounding of."""

CrossFit = Literal["auto", "off"] | int
"""`auto`, `off` (in-sample: score against the controls the recipe was fitted on) or a fold count >= 2."""


def parse_crossfit(value: str | int) -> CrossFit:
    """`auto`, `off` or a fold count >= 2, from text (CLI, Dagster config) or a number."""
    text = str(value).strip().lower()
    if text in ("auto", "off"):
        return text  # type: ignore[return-value]
    if text.isdigit() and int(text) >= 2:
        return int(text)
    raise ValueError(f"crossfit must be 'auto', 'off' or a number of folds >= 2, got {value!r}")


@dataclass(frozen=True)
class CrossFitPlan:
    """How a recipe's replicate mAP is scored: `n_folds` (0 = in-sample), the labels folds are dealt
    in (`deal_by`: "plate" or "batch") and why, in words."""

    n_folds: int
    deal_by: str
    reason: str


def plan_crossfit(crossfit: CrossFit, per_plate_steps: bool, plates: np.ndarray, batches: np.ndarray,
                  is_control: np.ndarray) -> CrossFitPlan:
    """Choose folds for a recipe. Folds are dealt within plates when the recipe has per-plate steps
    (each plate must keep controls of its own in every fit), else within batches (pooling the
    controls of a batch's plates). `auto`: 2 folds when every group then has at least
    2 x MIN_FIT_CONTROLS controls, else in-sample; an explicit fold count that cannot be met raises
    with the alternatives that work."""
    deal_by = "plate" if per_plate_steps else "batch"
    labels = plates if per_plate_steps else batches
    counts = {str(b): int((is_control & (labels == b)).sum()) for b in np.unique(labels)}
    fewest = min(counts.values(), default=0)
    if crossfit == "off":
        return CrossFitPlan(0, deal_by, "crossfit=off: scored against the controls the recipe was fitted on")
    if crossfit == "auto":
        if fewest >= 2 * MIN_FIT_CONTROLS:
            return CrossFitPlan(2, deal_by, f"2 folds within each {deal_by} (at least {fewest} controls each)")
        return CrossFitPlan(0, deal_by, f"in-sample: a {deal_by} has only {fewest} negative controls, fewer than the "
                                        f"{2 * MIN_FIT_CONTROLS} two folds of {MIN_FIT_CONTROLS} need")
    if isinstance(crossfit, bool) or not isinstance(crossfit, int) or crossfit < 2:
        raise ValueError(f"crossfit must be 'auto', 'off' or a number of folds >= 2, got {crossfit!r}")
    if fewest < 2 * crossfit:
        worst = min(counts, key=counts.get)
        pooled = (" or steps with by=batch (folds then pool the controls of a batch's plates)"
                  if per_plate_steps else "")
        raise ValueError(f"crossfit={crossfit}: {deal_by} {worst!r} has {fewest} negative-control wells, fewer than "
                         f"the {2 * crossfit} that {crossfit} folds need; use crossfit=auto or off, fewer folds{pooled}")
    return CrossFitPlan(crossfit, deal_by, f"{crossfit} folds within each {deal_by}")


def control_folds(batches: np.ndarray, is_control: np.ndarray, n_folds: int = 2, seed: int = 0) -> np.ndarray:
    """Fold id (0..n_folds-1) of each control row, shuffled and dealt round-robin within each
    batch; -1 for non-control rows. Raises if a batch has too few controls to leave two per
    batch in every fit set."""
    folds = np.full(len(batches), -1, dtype=np.int64)
    rng = np.random.default_rng(seed)
    for batch in np.unique(batches[is_control]):
        rows = np.flatnonzero(is_control & (batches == batch))
        if len(rows) < 2 * n_folds:
            raise ValueError(f"plate/batch {str(batch)!r} has {len(rows)} negative-control wells; cross-fitting "
                             f"with {n_folds} folds needs at least {2 * n_folds}")
        folds[rng.permutation(rows)] = np.arange(len(rows)) % n_folds
    return folds


def cross_fitted_replicate_map(
    meta: pl.DataFrame,
    X: np.ndarray,
    make_normalizer: Callable[[], ControlFittedNormalizer],
    *,
    batch_col: str = PLATE,
    fold_col: str | None = None,
    pert_col: str = PERTURBATION,
    control_col: str = CONTROL_TYPE,
    n_folds: int = 2,
    null_size: int = 10000,
    seed: int = 0,
    threshold: float = 0.05,
    null: NullMode = "exact",
) -> pl.DataFrame:
    """Replicate mAP vs negative controls of profiles normalized without those controls.

    `X` holds the un-normalized profiles; `make_normalizer()` returns a fresh normalizer that
    is fitted on the other folds' controls (given the `batch_col` labels). Folds are dealt within
    each value of `fold_col` (default `batch_col`). `null` as in `mean_average_precision`. Output
    columns as `replicate_map`.
    """
    batches = meta[batch_col].cast(pl.String).to_numpy()
    pert = meta[pert_col].cast(pl.String).to_numpy()
    neg = (meta[control_col] == ControlType.NEGATIVE).fill_null(False).to_numpy()
    folds = control_folds(meta[fold_col or batch_col].cast(pl.String).to_numpy(), neg, n_folds, seed)
    parts: list[tuple[np.ndarray, ...]] = []
    for k in range(n_folds):
        Y = make_normalizer().fit(X, batches, neg & (folds != k)).transform(X, batches)
        rows = ~neg | (folds == k)
        ap, n_pos, n_total = average_precision_vs_controls(Y[rows], pert[rows], neg[rows])
        treated = ~neg[rows]
        parts.append((ap[treated], n_pos[treated], n_total[treated], pert[rows][treated]))
    ap, n_pos, n_total, groups = (np.concatenate(p) for p in zip(*parts))
    return mean_average_precision(ap, n_pos, n_total, groups, null_size, seed, threshold, null=null).rename(
        {"group": pert_col})
