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

Precision: computed in the precision of the input, as scikit-learn does. float32 rows are
centred, projected (the 1M x d x k GEMM that dominates the cost) and scaled in float32, with
the parameters rounded to float32 once; the statistics are float64 (column means, the scatter
matrix accumulated from float64 blocks of the rows, per-batch means and stds of the projected
controls), so the components equal those of a float64 fit of the same numbers. For float32 rows
a component also counts as constant in a batch when its std is below the float32 rounding noise
of the projection (~4 sqrt(d) eps32 of the norm of the batch's projected rows). Other inputs are
computed in float64. Output is float32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bioembed_assets.profiles.steps import (
    all_finite,
    batch_affine,
    block_mean_std,
    cast_cached,
    contiguous_groups,
    empty_touched,
    label_codes,
    noise_floor,
    rows_per_chunk,
    work_dtype,
)
from bioembed_assets.store.atomic import write_arrays_and_json

_NPZ, _JSON = "pca_centerscale.npz", "pca_centerscale.json"
_ZERO_REL = 1e-10  # a component whose batch std is below this fraction of the batch's largest is "zero variance"
_SCATTER_ROWS = 4096  # rows per float64 block of the scatter matrix of float32 rows


def _check_2d(X: np.ndarray, what: str = "X") -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or not np.issubdtype(X.dtype, np.number):
        raise ValueError(f"{what} must be a numeric 2-D (rows x features) array, got {X.dtype} {X.shape}")
    return X


def _rows(X: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """X[rows] as a private copy in the working precision (float32 stays float32), rejecting NaN/inf
    (the row number in the message is global)."""
    A = np.asarray(X[rows], dtype=work_dtype(X))
    if not all_finite(A):
        first = int(np.argmax(~np.isfinite(A).all(axis=1)))
        raise ValueError(f"X has non-finite values (NaN/inf), first at row {int(rows[first])}")
    return A


def _check_finite_rows(A: np.ndarray, start: int) -> None:
    if not all_finite(A):
        bad = ~np.isfinite(A).all(axis=1)
        raise ValueError(f"X has non-finite values (NaN/inf), first at row {start + int(np.argmax(bad))}")


def _codes(batches: np.ndarray, n: int) -> tuple[list[Any], np.ndarray]:
    batches = np.asarray(batches)
    if batches.shape != (n,):
        raise ValueError(f"batches must have one label per row ({n}), got shape {batches.shape}")
    uniq, codes = label_codes(batches, n)
    return uniq.tolist(), codes


def _check_counts(counts: np.ndarray, labels: list[Any]) -> None:
    few = np.flatnonzero(counts < 2)
    if few.size:
        b = labels[few[0]]
        raise ValueError(f"batch {b!r} has {int(counts[few[0]])} control rows; at least 2 are needed to fit its scaler")


def _block_scalers(Y: np.ndarray, starts: np.ndarray, counts: np.ndarray, labels: list[Any],
                   n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch mean and population std (float64) of projected rows Y, batch b being rows
    starts[b]:starts[b] + counts[b]. A component is numerically constant in a batch (scale 1) when
    its std is below 1e-10 x the batch's largest, or below the rounding noise of an n_in-term
    product in Y's precision relative to the batch's rows (float32: ~1e-5 of their norm)."""
    _check_counts(counts, labels)
    mean, scale = block_mean_std(Y, starts, counts)
    norm = np.sqrt((scale**2 + mean**2).sum(axis=1, keepdims=True))
    floor = np.maximum(_ZERO_REL * scale.max(axis=1, keepdims=True), noise_floor(Y.dtype, n_in) * norm)
    scale[scale <= floor] = 1.0  # (numerically) constant
    return mean, scale


def _batch_scalers(Y: np.ndarray, codes: np.ndarray, n_batches: int, labels: list[Any],
                   n_in: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch mean and population std of the rows of Y (any order); see `_block_scalers`."""
    order, starts, counts = contiguous_groups(codes, n_batches)
    _check_counts(counts, labels)
    return _block_scalers(Y if order is None else Y[order], starts, counts, labels, Y.shape[1] if n_in is None else n_in)


def project_in_place(C: np.ndarray, vt: np.ndarray) -> np.ndarray:
    """C[:, :k] <- C @ vt' block by block (k <= d), in C's precision; returns the view C[:, :k]
    (no second rows-sized array)."""
    k = vt.shape[0]
    ct = cast_cached(vt, C.dtype, transpose=True)
    for lo in range(0, C.shape[0], _SCATTER_ROWS):
        blk = C[lo : lo + _SCATTER_ROWS]
        blk[:, :k] = blk @ ct
    return C[:, :k]


def scatter64(C: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """(C - mean)'(C - mean) accumulated in float64 (mean None: C is already centred). float64 rows
    are one GEMM; float32 rows go through float64 blocks (exact products and centring: the same
    matrix as from float64 rows, up to summation order)."""
    if C.dtype == np.float64 and mean is None:
        return C.T @ C
    d = C.shape[1]
    S = np.zeros((d, d))
    for lo in range(0, C.shape[0], _SCATTER_ROWS):
        B = C[lo : lo + _SCATTER_ROWS].astype(np.float64)
        if mean is not None:
            B -= mean
        S += B.T @ B
    return S


def _flip(vt: np.ndarray) -> np.ndarray:
    """Deterministic signs (as scikit-learn's svd_flip): the largest |loading| of each axis is positive."""
    vt *= np.sign(vt[np.arange(vt.shape[0]), np.argmax(np.abs(vt), axis=1)])[:, None]
    return vt


def axes_from_scatter(S: np.ndarray, k: int) -> np.ndarray:
    """The first k principal axes (k, d) from a float64 d x d scatter (or covariance) matrix."""
    _, vecs = np.linalg.eigh(S)
    return _flip(vecs[:, ::-1].T[:k].copy())


def axes_from_rows(A: np.ndarray, k: int) -> np.ndarray:
    """The first k principal axes (k, d) of centred float64 rows A (thin SVD)."""
    return _flip(np.linalg.svd(A, full_matrices=False)[2][:k])


def control_pca(C: np.ndarray, k: int, mean: np.ndarray | None = None) -> np.ndarray:
    """The first k principal axes (k, d), float64, of the rows C centred by `mean` (None: C is centred).

    Uses the d x d scatter matrix (eigh; accumulated in float64 whatever C's precision) when C has
    at least 10 d rows, else a thin SVD in float64, as scikit-learn's `svd_solver="auto"` does;
    signs are made deterministic (as scikit-learn's svd_flip): the largest |loading| of each axis is positive.
    """
    if C.shape[0] >= 10 * C.shape[1]:
        return axes_from_scatter(scatter64(C, mean), k)
    A = np.asarray(C, dtype=np.float64)
    return axes_from_rows(A if mean is None else A - mean, k)


def project_scale(A: np.ndarray, mean: np.ndarray, components: np.ndarray, batch_mean: np.ndarray,
                  batch_scale: np.ndarray, codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The card transform of a chunk of rows A: ((A - mean) @ components' - batch mean) / batch scale,
    `codes` indexing the batch tables. In A's precision (float32 rows: float32 centring, GEMM and
    scaling with the float64 parameters rounded to float32; others: float64), centred before the
    product (no cancellation). With `out` (float32, A's rows) the result is written there."""
    wd = work_dtype(A)
    Ac = np.subtract(A, cast_cached(mean, wd), dtype=wd)
    ct = cast_cached(components, wd, transpose=True)
    if out is not None and out.dtype == wd:
        Y = np.matmul(Ac, ct, out=out)
    else:
        Y = Ac @ ct
    batch_affine(Y, codes, batch_mean, batch_scale)
    if out is not None and Y is not out:
        out[...] = Y
        return out
    return Y


def fit_pca_centerscale(
    C: np.ndarray, starts: np.ndarray, counts: np.ndarray, labels: list[Any], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The card recipe on control rows C (a private copy, float32 or float64, overwritten), batch b
    being rows starts[b]:starts[b] + counts[b] (every label): (mean, components (k, d), per-batch
    mean (B, k), per-batch scale (B, k)), all float64.

    Mean and scatter matrix are accumulated in float64; the controls are then centred and projected
    in C's precision as `project_scale` does it, so the batch statistics describe the numbers
    `transform` produces (each batch's controls come out with mean 0, std 1)."""
    mean = C.mean(axis=0, dtype=np.float64)
    if C.dtype == np.float64:
        C -= mean
        vt = control_pca(C, k)
    else:
        vt = control_pca(C, k, mean)
        C -= mean.astype(C.dtype)
    Y = project_in_place(C, vt)
    batch_mean, batch_scale = _block_scalers(Y, starts, counts, labels, C.shape[1])
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
        rows = np.flatnonzero(ctrl)
        order, starts, counts = contiguous_groups(codes[rows], len(labels))
        _check_counts(counts, labels)
        C = _rows(X, rows if order is None else rows[order])  # controls grouped by batch
        self.mean_, self.components_, self.batch_mean_, self.batch_scale_ = fit_pca_centerscale(
            C, starts, counts, labels, k)
        self.batches_ = labels
        self.n_components = k
        return self

    def transform(self, X: np.ndarray, batches: np.ndarray, is_control: np.ndarray | None = None) -> np.ndarray:
        """Project and standardise every row with its batch's scaler (float32 output).

        Batches not seen in `fit` get a scaler fitted on their own control rows (`is_control`
        is required then); a batch with fewer than 2 control rows raises ValueError.
        Rows are processed in chunks (temporaries stay bounded), in the precision of X: float32
        rows are centred, projected and scaled in float32 (statistics were fitted in float64).
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
            A = _rows(X, rows)
            Y = project_in_place(np.subtract(A, self.mean_.astype(A.dtype), out=A), self.components_)
            m, s = _batch_scalers(Y, remap[codes[rows]], new.size, [labels[i] for i in new], X.shape[1])
            mean[new], scale[new] = m, s
        out = empty_touched((X.shape[0], k), np.float32)
        step = rows_per_chunk(max(X.shape[1], k))  # the chunks of Recipe.transform: the same numbers
        for lo in range(0, X.shape[0], step):
            sl = slice(lo, lo + step)
            A = X[sl]
            _check_finite_rows(A, lo)
            project_scale(A, self.mean_, self.components_, mean, scale, codes[sl], out=out[sl])
        return out

    def fit_transform(self, X: np.ndarray, batches: np.ndarray, is_control: np.ndarray) -> np.ndarray:
        return self.fit(X, batches, is_control).transform(X, batches, is_control)

    def save(self, path: str | Path) -> Path:
        """Write the fitted parameters to folder `path` (`.npz` arrays + `.json` settings), atomically."""
        if self.components_ is None:
            raise RuntimeError("PCACenterScale is not fitted")
        arrays = {"mean": self.mean_, "components": self.components_, "batch_mean": self.batch_mean_,
                  "batch_scale": self.batch_scale_}
        info = {"recipe": self.recipe, "n_components": self.n_components, "batches": self.batches_}
        return write_arrays_and_json(path, _NPZ, arrays, _JSON, info)

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
