"""Positive- vs negative-control separation: Z'-factor on a cross-fitted 1-D projection."""

from __future__ import annotations

import numpy as np


def z_prime(positive: np.ndarray, negative: np.ndarray) -> float:
    """Z' = 1 - 3 (sd_pos + sd_neg) / |mean_pos - mean_neg| (Zhang et al. 1999); > 0.5 is excellent."""
    gap = abs(float(np.mean(positive)) - float(np.mean(negative)))
    if gap == 0:
        return float("-inf")
    return 1.0 - 3.0 * (float(np.std(positive, ddof=1)) + float(np.std(negative, ddof=1))) / gap


def control_z_prime(X: np.ndarray, is_positive: np.ndarray, is_negative: np.ndarray, seed: int = 0) -> float:
    """Z' of control wells scored on the positive-minus-negative mean direction, cross-fitted in two
    folds: each well is scored with the direction learned from the other fold, so the number is not
    inflated by fitting on the wells it scores. NaN with fewer than 4 wells of either kind."""
    pos, neg = np.flatnonzero(is_positive), np.flatnonzero(is_negative)
    if len(pos) < 4 or len(neg) < 4:
        return float("nan")
    rng = np.random.default_rng(seed)
    fold = {i: k % 2 for idx in (pos, neg) for k, i in enumerate(rng.permutation(idx))}
    scores = np.empty(X.shape[0])
    for k in (0, 1):
        train_p = [i for i in pos if fold[i] != k]
        train_n = [i for i in neg if fold[i] != k]
        direction = X[train_p].mean(0) - X[train_n].mean(0)
        direction /= np.linalg.norm(direction) or 1.0
        test = [i for i in (*pos, *neg) if fold[i] == k]
        scores[test] = X[test] @ direction
    return z_prime(scores[pos], scores[neg])
