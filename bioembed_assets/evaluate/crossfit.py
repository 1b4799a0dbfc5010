"""Replicate mAP whose negative controls are never those the normalizer was fitted on.

Fitting a normalizer on the control wells and then using the same wells as mAP negatives
makes controls look tighter than any treated well, so truly inactive perturbations come out
"active" (peers.md §5.5). Cross-fitting splits each plate's controls into folds; for fold k the
normalizer is fitted on the other folds and fold k's controls are the negatives. Every treated
well gets one AP per fold; a perturbation's mAP is the mean over its wells and folds, and its
permutation null the mean of the members' nulls (as `mean_average_precision` does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import polars as pl

from bioembed_assets.evaluate.nulls import NullMode
from bioembed_assets.evaluate.retrieval import average_precision_vs_controls, mean_average_precision
from bioembed_assets.schema import CONTROL_TYPE, PERTURBATION, PLATE, ControlType


class ControlFittedNormalizer(Protocol):
    def fit(self, X: np.ndarray, batches: np.ndarray, is_control: np.ndarray) -> ControlFittedNormalizer: ...

    def transform(self, X: np.ndarray, batches: np.ndarray) -> np.ndarray: ...


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
    is fitted on the other folds' controls. `null` as in `mean_average_precision`. Output
    columns as `replicate_map`.
    """
    batches = meta[batch_col].cast(pl.String).to_numpy()
    pert = meta[pert_col].cast(pl.String).to_numpy()
    neg = (meta[control_col] == ControlType.NEGATIVE).fill_null(False).to_numpy()
    folds = control_folds(batches, neg, n_folds, seed)
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
