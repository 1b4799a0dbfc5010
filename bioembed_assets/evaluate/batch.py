"""Batch-effect scores on profiles (typically the negative controls): lower silhouette / kNN batch accuracy
and higher kNN batch-label entropy = less batch effect."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import silhouette_score

_BLOCK_ELEMS = 1 << 22


def _knn_batch_scores(Xn: np.ndarray, codes: np.ndarray, k: int, groups: np.ndarray | None = None) -> tuple[float, float]:
    """Leave-one-out k-NN (cosine) over the rows: (accuracy of predicting each row's batch by
    majority vote, ties going to the label of the nearest neighbour among the tied labels;
    mean entropy of the neighbours' batch labels / log(min(k, n_batches))). Rows of the query's
    own group (integer codes in `groups`, e.g. its perturbation) are never its neighbours."""
    n = Xn.shape[0]
    k = min(k, n - 1)
    b = max(1, _BLOCK_ELEMS // n)
    hits, entropy = 0, 0.0
    for lo in range(0, n, b):
        hi = min(lo + b, n)
        S = Xn[lo:hi] @ Xn.T
        S[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf  # leave self out
        if groups is not None:
            S[groups[lo:hi, None] == groups[None, :]] = -np.inf
        nb = np.argpartition(-S, k - 1, axis=1)[:, :k]
        nb = np.take_along_axis(nb, np.argsort(-np.take_along_axis(S, nb, axis=1), axis=1), axis=1)
        lab = codes[nb]  # neighbours by decreasing similarity
        votes = (lab[:, :, None] == lab[:, None, :]).sum(axis=2)
        pred = lab[np.arange(hi - lo), np.argmax(votes, axis=1)]
        hits += int((pred == codes[lo:hi]).sum())
        # a label seen c times among the k neighbours contributes -(c/k) log(c/k) = its c entries' -(1/k) log(c/k)
        entropy += float(-np.log(votes / k).sum() / k)
    n_batches = int(codes.max()) + 1
    top = np.log(min(k, n_batches))
    return hits / n, entropy / n / top if top > 0 else float("nan")


def batch_effect_scores(
    X: np.ndarray,
    batches: np.ndarray,
    mask: np.ndarray | None = None,
    k: int = 5,
    sample_size: int | None = 20000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, float]:
    """Batch mixing on the selected rows (`mask`, e.g. negative controls).

    - `batch_silhouette`: cosine silhouette of the batch labels (sklearn; computed on at most
      `sample_size` random rows); ~0 or negative when batches are mixed.
    - `batch_knn_accuracy`: leave-one-out k-NN (cosine) accuracy of predicting the batch, raw.
    - `batch_chance`: 1 / n_batches, the accuracy expected without batch effect (for balanced
      batches; with unbalanced batches the chance level is higher).
    - `batch_knn_entropy`: mixing of the same k neighbours: mean entropy of their batch labels,
      normalised by log(min(k, n_batches)); 1 = every neighbourhood evenly mixed (balanced
      batches), 0 = every neighbourhood from one batch. Higher = less batch effect.
    `groups` (e.g. the perturbation of each row) excludes same-group rows from each row's kNN
    neighbours, so replicates that share a plate do not pass for a plate effect.
    NaN scores when fewer than 2 batches or fewer than 3 rows are selected.
    """
    X = np.asarray(X, dtype=np.float64)
    batches = np.asarray(batches)
    if X.ndim != 2 or batches.shape != (X.shape[0],):
        raise ValueError(f"X must be 2-D with one batch label per row; got X {X.shape}, batches {batches.shape}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        X, batches = X[mask], batches[mask]
        groups = None if groups is None else np.asarray(groups)[mask]
    if not np.isfinite(X).all():
        raise ValueError("X has non-finite values (NaN/inf)")
    uniq, codes = np.unique(batches, return_inverse=True)
    codes = codes.reshape(-1)
    out = {"batch_silhouette": float("nan"), "batch_knn_accuracy": float("nan"),
           "batch_chance": 1.0 / len(uniq) if len(uniq) else float("nan"), "batch_knn_entropy": float("nan"),
           "n_rows": float(X.shape[0]),
           "n_batches": float(len(uniq))}  # fmt: skip
    if len(uniq) < 2 or X.shape[0] < 3:
        return out
    norm = np.linalg.norm(X, axis=1, keepdims=True)
    if (norm == 0).any():
        raise ValueError("cosine scores are undefined for all-zero rows")
    Xn = X / norm
    if len(uniq) < X.shape[0]:
        n_s = None if sample_size is None or sample_size >= X.shape[0] else sample_size
        out["batch_silhouette"] = float(silhouette_score(Xn, codes, metric="cosine", sample_size=n_s, random_state=seed))
    group_codes = None if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    out["batch_knn_accuracy"], out["batch_knn_entropy"] = _knn_batch_scores(Xn, codes, k, group_codes)
    return out


def batch_asw(X: np.ndarray, batches: np.ndarray, labels: np.ndarray) -> float:
    """Batch ASW as scib's `silhouette_batch` (Luecken et al. 2022; the batch-removal score of
    Arevalo et al. 2024): within each biological label (e.g. the perturbation), the silhouette
    s_i of the batch labels (euclidean, scib's default); per row 1 - |s_i|; the mean per label,
    then over labels. Labels whose rows come from a single batch, or whose every row is its own
    batch, are skipped, as in scib. 1 = batches fully mixed, 0 = separated; NaN if no label counts."""
    from sklearn.metrics import silhouette_samples

    X = np.asarray(X, dtype=np.float64)
    batches, labels = np.asarray(batches).astype(str), np.asarray(labels).astype(str)
    if X.ndim != 2 or batches.shape != (X.shape[0],) or labels.shape != (X.shape[0],):
        raise ValueError(f"X must be 2-D with one batch and one label per row; got X {X.shape}, batches "
                         f"{batches.shape}, labels {labels.shape}")
    per_label = []
    for lab in np.unique(labels):
        rows = labels == lab
        n_b = np.unique(batches[rows]).size
        if n_b < 2 or n_b == rows.sum():
            continue
        per_label.append(float(np.mean(1.0 - np.abs(silhouette_samples(X[rows], batches[rows])))))
    return float(np.mean(per_label)) if per_label else float("nan")
