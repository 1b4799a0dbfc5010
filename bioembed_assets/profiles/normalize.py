"""OpenPhenom model-card normalisation ("PCA-CenterScale") as a fit/transform object.

Recipe (model card, EFAAR `pca_centerscale_on_controls`):
1. PCA fitted on the control rows pooled across all batches (no whitening);
2. per batch, a StandardScaler (mean, population std) fitted on that batch's control rows in
   PCA space, applied to every row of the batch.

Because step 2 rescales every component per batch, PCA-stage whitening would make no difference;
only the rotation and the number of kept components matter. Components with zero control
variance in a batch (std <= 1e-10 x the batch's largest component std, i.e. numerically
constant) get scale 1, as scikit-learn's StandardScaler does for constant features, so they are
only centred instead of having rounding noise blown up to unit variance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bioembed_assets.profiles.steps import batch_affine
from bioembed_assets.store.atomic import atomic_dir

_NPZ, _JSON = "pca_centerscale.npz", "pca_centerscale.json"
_CHUNK = 1 << 24  # float64 elements per transform chunk (128 MiB)
_ZERO_REL = 1e-10  # a component whose batch std is below this fraction of the batch's largest is "zero variance"


def _check_2d(X: np.ndarray, what: str = "X") -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or not np.issubdtype(X.dtype, np.number):
        raise ValueError(f"{what} must be a numeric 2-D (rows x features) array, got {X.dtype} {X.shape}")
    return X


def _rows64(X: np.ndarray, rows: slice | np.ndarray, start: int = 0) -> np.ndarray:
    """X[rows] as float64, rejecting NaN/inf (row numbers in the message are global)."""
    A = np.asarray(X[rows], dtype=np.float64)
    bad = ~np.isfinite(A).all(axis=1)
    if bad.any():
        first = int(np.argmax(bad))
        row = int(np.arange(X.shape[0])[rows][first]) if not isinstance(rows, slice) else start + first
        raise ValueError(f"X has non-finite values (NaN/inf), first at row {row}")
    return A


def _check_finite_rows(A: np.ndarray, start: int) -> None:
    bad = ~np.isfinite(A).all(axis=1)
    if bad.any():
        raise ValueError(f"X has non-finite values (NaN/inf), first at row {start + int(np.argmax(bad))}")


def _codes(batches: np.ndarray, n: int) -> tuple[list[Any], np.ndarray]:
    batches = np.asarray(batches)
    if batches.shape != (n,):
        raise ValueError(f"batches must have one label per row ({n}), got shape {batches.shape}")
    uniq, inv = np.unique(batches, return_inverse=True)
    return uniq.tolist(), inv.reshape(-1)


def _batch_scalers(Y: np.ndarray, codes: np.ndarray, n_batches: int, labels: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch mean and population std of the rows of Y (vectorized over batches)."""
    counts = np.bincount(codes, minlength=n_batches)
    few = np.flatnonzero(counts < 2)
    if few.size:
        b = labels[few[0]]
        raise ValueError(f"batch {b!r} has {int(counts[few[0]])} control rows; at least 2 are needed to fit its scaler")
    order = np.argsort(codes, kind="stable")
    Ys = Y[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    mean = np.add.reduceat(Ys, starts, axis=0) / counts[:, None]
    for b, (s, c) in enumerate(zip(starts, counts)):  # deviations in place, block by block
        Ys[s : s + c] -= mean[b]
    np.multiply(Ys, Ys, out=Ys)
    var = np.add.reduceat(Ys, starts, axis=0) / counts[:, None]
    scale = np.sqrt(var)
    scale[scale <= _ZERO_REL * scale.max(axis=1, keepdims=True)] = 1.0  # (numerically) constant
    return mean, scale


def control_pca(C: np.ndarray, k: int) -> np.ndarray:
    """The first k principal axes (k, d) of the centred rows C (float64).

    Uses the d x d scatter matrix (eigh) when C has at least 10 d rows, else a thin SVD, as
    scikit-learn's `svd_solver="auto"` does; signs are made deterministic (as scikit-learn's
    svd_flip): the largest |loading| of each axis is positive.
    """
    d = C.shape[1]
    if C.shape[0] >= 10 * d:
        _, vecs = np.linalg.eigh(C.T @ C)
        vt = vecs[:, ::-1].T[:k].copy()
    else:
        vt = np.linalg.svd(C, full_matrices=False)[2][:k]
    vt *= np.sign(vt[np.arange(k), np.argmax(np.abs(vt), axis=1)])[:, None]
    return vt


def project_scale(A: np.ndarray, mean: np.ndarray, components: np.ndarray, batch_mean: np.ndarray,
                  batch_scale: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The card transform of a chunk of rows A (any float dtype): ((A - mean) @ components' - batch
    mean) / batch scale, in float64, `codes` indexing the batch tables."""
    Y = np.subtract(A, mean, dtype=np.float64) @ components.T
    return batch_affine(Y, codes, batch_mean, batch_scale)


def fit_pca_centerscale(
    C: np.ndarray, codes: np.ndarray, labels: list[Any], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The card recipe on control rows C (float64, centred in place): (mean, components (k, d),
    per-batch mean (B, k), per-batch scale (B, k)); `codes` index `labels` (all batches)."""
    mean = C.mean(axis=0)
    C -= mean
    vt = control_pca(C, k)
    batch_mean, batch_scale = _batch_scalers(C @ vt.T, codes, len(labels), labels)
    return mean, vt, batch_mean, batch_scale


class PCACenterScale:
    """PCA on pooled controls, then per-batch standardisation on each batch's controls."""

    def __init__(self, n_components: int | None = None, recipe: str = "card") -> None:
        if recipe != "card":
            raise ValueError(f"unknown recipe {recipe!r}; only 'card' (OpenPhenom model card) is implemented")
        self.recipe = recipe
        self.n_components = n_components
        self.mean_: np.ndarray | None = None  # (d,)
        self.components_: np.ndarray | None = None  # (k, d)
        self.batches_: list[Any] = []
        self.batch_mean_: np.ndarray | None = None  # (B, k)
        self.batch_scale_: np.ndarray | None = None  # (B, k)

    def fit(self, X: np.ndarray, batches: np.ndarray, is_control: np.ndarray) -> PCACenterScale:
        """Fit PCA on control rows of all batches, then one scaler per batch on its control rows.

        With no controls, pass `is_control` all True (the model card then fits on all wells).
        The PCA uses the d x d covariance (eigh) when n_controls >= 10 d, else a thin SVD,
        as scikit-learn's `svd_solver="auto"` does.
        """
        X = _check_2d(X)
        ctrl = np.asarray(is_control, dtype=bool)
        if ctrl.shape != (X.shape[0],):
            raise ValueError(f"is_control must have one flag per row ({X.shape[0]}), got shape {ctrl.shape}")
        n_ctrl, d = int(ctrl.sum()), X.shape[1]
        if n_ctrl < 2:
            raise ValueError(f"need at least 2 control rows to fit the PCA, got {n_ctrl}")
        k_max = min(n_ctrl - 1, d)
        k = k_max if self.n_components is None else int(self.n_components)
        if not 1 <= k <= k_max:
            raise ValueError(f"n_components must be in [1, {k_max}] (min(n_controls - 1, n_features)), got {k}")
        labels, codes = _codes(batches, X.shape[0])
        C = _rows64(X, np.flatnonzero(ctrl))
        self.mean_, self.components_, self.batch_mean_, self.batch_scale_ = fit_pca_centerscale(C, codes[ctrl], labels, k)
        self.batches_ = labels
        self.n_components = k
        return self

    def transform(self, X: np.ndarray, batches: np.ndarray, is_control: np.ndarray | None = None) -> np.ndarray:
        """Project and standardise every row with its batch's scaler (float32 output).

        Batches not seen in `fit` get a scaler fitted on their own control rows (`is_control`
        is required then); a batch with fewer than 2 control rows raises ValueError.
        Rows are processed in chunks, so float64 temporaries stay bounded.
        """
        if self.components_ is None or self.mean_ is None:
            raise RuntimeError("PCACenterScale is not fitted")
        X = _check_2d(X)
        if X.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"X has {X.shape[1]} features, the fit had {self.mean_.shape[0]}")
        labels, codes = _codes(batches, X.shape[0])
        known = {b: i for i, b in enumerate(self.batches_)}
        idx = np.array([known.get(b, -1) for b in labels], dtype=np.int64)
        k = self.components_.shape[0]
        mean, scale = np.empty((len(labels), k)), np.empty((len(labels), k))
        seen = idx >= 0
        mean[seen], scale[seen] = self.batch_mean_[idx[seen]], self.batch_scale_[idx[seen]]
        if not seen.all():
            new = np.flatnonzero(~seen)
            if is_control is None:
                raise ValueError(f"batch {labels[new[0]]!r} was not seen in fit; pass is_control to fit its scaler")
            ctrl = np.asarray(is_control, dtype=bool)
            if ctrl.shape != (X.shape[0],):
                raise ValueError(f"is_control must have one flag per row ({X.shape[0]}), got shape {ctrl.shape}")
            remap = np.full(len(labels), -1)
            remap[new] = np.arange(new.size)
            rows = np.flatnonzero(ctrl & (remap[codes] >= 0))
            Y = (_rows64(X, rows) - self.mean_) @ self.components_.T
            m, s = _batch_scalers(Y, remap[codes[rows]], new.size, [labels[i] for i in new])
            mean[new], scale[new] = m, s
        out = np.empty((X.shape[0], k), dtype=np.float32)
        step = max(1, _CHUNK // max(X.shape[1], k))
        for lo in range(0, X.shape[0], step):
            sl = slice(lo, lo + step)
            A = X[sl]
            _check_finite_rows(A, lo)
            out[sl] = project_scale(A, self.mean_, self.components_, mean, scale, codes[sl])
        return out

    def fit_transform(self, X: np.ndarray, batches: np.ndarray, is_control: np.ndarray) -> np.ndarray:
        return self.fit(X, batches, is_control).transform(X, batches, is_control)

    def save(self, path: str | Path) -> Path:
        """Write the fitted parameters to folder `path` (`.npz` arrays + `.json` settings), atomically."""
        if self.components_ is None:
            raise RuntimeError("PCACenterScale is not fitted")
        path = Path(path)
        with atomic_dir(path) as tmp:
            np.savez(
                tmp / _NPZ,
                mean=self.mean_,
                components=self.components_,
                batch_mean=self.batch_mean_,
                batch_scale=self.batch_scale_,
            )
            info = {"recipe": self.recipe, "n_components": self.n_components, "batches": self.batches_}
            (tmp / _JSON).write_text(json.dumps(info, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> PCACenterScale:
        """Read a folder written by `save`."""
        path = Path(path)
        info = json.loads((path / _JSON).read_text())
        obj = cls(n_components=int(info["n_components"]), recipe=info["recipe"])
        with np.load(path / _NPZ) as z:
            obj.mean_, obj.components_ = z["mean"], z["components"]
            obj.batch_mean_, obj.batch_scale_ = z["batch_mean"], z["batch_scale"]
        obj.batches_ = list(info["batches"])
        return obj
