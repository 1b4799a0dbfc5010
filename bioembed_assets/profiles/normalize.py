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

Component choice (`ComponentChoice`, shared with `tvn`): the first k axes, k the smallest of
`n_components` (default all, min(n_controls - 1, d)), the fewest components explaining more than
`variance` of the control variance (default 1: no cut; as scikit-learn's PCA(n_components=<float>)),
and the number of control eigenvalues above `tol` x the largest (default `DEFAULT_TOL` = 1e-10;
0 keeps every component, as before these options existed). Step 2 gives every kept component unit
variance, so a component that is rounding noise weighs as much as a real one in a cosine
similarity; `tol` drops them. Why 1e-10: the axes come from a float64 eigendecomposition of the
d x d scatter matrix, whose error is ~eps64 x the largest eigenvalue, so small axes lose accuracy as
eps64 lam_max / lam, and eigenvalues below ~d eps64 ~ 1e-13 of the largest are rounding noise.
Measured against scikit-learn's exact SVD (PCA(svd_solver="full")), the card output stays within
5e-6 down to eigenvalues of 1e-10 of the largest (d = 60..384, closely spaced spectra in a random
basis; <= 4e-7 on un-scaled CellProfiler-like features) and departs beyond (1e-5 at 3e-11, 1e-4
and more at 1e-12). sqrt(eps64) ~ 1.5e-8 would leave more margin but drops real directions: PCA is
not scale-invariant, and un-scaled features (the classical encoder's reach 7e-10 of the largest
feature variance) carry signal there; standardize first to weigh small-scale features equally.
The fit records the kept count and the bound that set it (`n_components`, `selection`: all /
n_components / variance / tol) and the eigenvalues.

Precision: the statistics are float64 whatever the input (column means, the scatter matrix
accumulated from float64 blocks of the rows, per-batch means and stds of the projected controls),
so float32 and float64 rows get the same axes. For float32 input, rows are centred, projected (the
1M x d x k GEMM that dominates the cost) and scaled in float32, as scikit-learn does, when float32
resolves every kept component: `float32_noise` (eps32 sqrt(d v' diag(S) v / lam), the largest over
the kept axes v; an estimate from above of the rms rounding noise relative to the component's
std, measured <= 0.5 of it) is <= `FLOAT32_NOISE_MAX` = 1e-4 (max over rows then ~5e-4 of the scale
at most); v' diag(S) v / lam is 1 for an axis along one feature and large for near-cancellations
of larger features (near-collinear features): the eigenvalue / feature-scale spread float32 cannot
resolve. The synthetic benchmark profiles have ~8e-6. Otherwise float32 rows are converted and
computed in float64 (`precision` "float64" in the fitted state; float32 input keeps its own
rounding, ~eps32 of each value, which no arithmetic undoes). For float32 arithmetic a component also
counts as constant in a batch when its std is below the rounding noise of the projection
(~4 sqrt(d) eps32 of the norm of the batch's projected rows). Other inputs are computed in float64.
Output is float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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


Spectrum = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(eigenvalues of a scatter matrix S, descending, clipped at 0; principal axes, float64 rows; diag(S))."""


def eig_scatter(S: np.ndarray) -> Spectrum:
    """The `Spectrum` of a float64 d x d scatter (or covariance) matrix (d axes)."""
    vals, vecs = np.linalg.eigh(S)
    return np.clip(vals[::-1], 0.0, None), _flip(vecs[:, ::-1].T.copy()), np.diag(S).copy()


def eig_rows(A: np.ndarray) -> Spectrum:
    """The `Spectrum` of A'A for centred float64 rows A (thin SVD; min(n, d) axes)."""
    _, s, vt = np.linalg.svd(A, full_matrices=False)
    return s**2, _flip(vt), np.einsum("ij,ij->j", A, A)


def control_pca(C: np.ndarray, mean: np.ndarray | None = None) -> Spectrum:
    """The `Spectrum` of the scatter matrix of the rows C centred by `mean` (None: C is centred).

    Uses the d x d scatter matrix (eigh; accumulated in float64 whatever C's precision) when C has
    at least 10 d rows, else a thin SVD in float64, as scikit-learn's `svd_solver="auto"` does;
    signs are made deterministic (as scikit-learn's svd_flip): the largest |loading| of each axis is positive.
    """
    if C.shape[0] >= 10 * C.shape[1]:
        return eig_scatter(scatter64(C, mean))
    A = np.asarray(C, dtype=np.float64)
    return eig_rows(A if mean is None else A - mean)


DEFAULT_TOL = 1e-10  # relative eigenvalue tolerance: the smallest at which the float64 scatter eigh is accurate (docstring)
FLOAT32_NOISE_MAX = 1e-4  # largest float32 rounding noise (rms, relative to the smallest kept component's std) accepted
_EPS32 = float(np.finfo(np.float32).eps)
SELECTIONS = ("all", "n_components", "variance", "tol")


def k_max_of(n_ctrl: int, d: int, what: str = "") -> int:
    """min(n_controls - 1, d), the most components a control PCA has; raises for < 2 controls."""
    if n_ctrl < 2:
        raise ValueError(f"{what}need at least 2 control rows to fit the PCA, got {n_ctrl}")
    return min(n_ctrl - 1, d)


@dataclass(frozen=True)
class ComponentChoice:
    """Which principal components a control PCA keeps: the first k, k the smallest of `n_components`
    (None: all, min(n_controls - 1, d)); with `variance` < 1, the fewest components explaining more
    than that fraction of the control variance (as scikit-learn's `PCA(n_components=<fraction>)`);
    with `tol` > 0, the number of eigenvalues > tol x the largest (0: no tolerance, every component)."""

    n_components: int | None = None
    variance: float = 1.0
    tol: float = DEFAULT_TOL

    def __post_init__(self) -> None:
        if not 0.0 < self.variance <= 1.0:
            raise ValueError(f"variance must be in (0, 1], got {self.variance}")
        if not 0.0 <= self.tol < 1.0:
            raise ValueError(f"tol must be in [0, 1), got {self.tol}")

    def check(self, k_max: int, what: str = "") -> int:
        """The requested count (k_max for all), checked against k_max = min(n_controls - 1, d)."""
        k_req = k_max if self.n_components is None else int(self.n_components)
        if not 1 <= k_req <= k_max:
            raise ValueError(f"{what}n_components must be in [1, {k_max}] (min(n_controls - 1, n_features)), got {k_req}")
        return k_req

    def select(self, eigenvalues: np.ndarray, k_max: int, what: str = "") -> tuple[int, str]:
        """(k, reason): the kept count and which bound set it (`SELECTIONS`: `all` = every one of the
        k_max components), from the eigenvalues (descending; all of them: the variance total)."""
        lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
        k_req = self.check(k_max, what)
        if lam.size == 0 or lam[0] <= 0.0:
            raise ValueError(f"{what}the control rows have no variance: no principal component to keep")
        bounds = [("all" if self.n_components is None else "n_components", k_req)]
        if self.variance < 1.0:
            ratio = np.cumsum(lam) / lam.sum()
            bounds.append(("variance", min(int(np.searchsorted(ratio, self.variance, side="right")) + 1, k_max)))
        if self.tol > 0.0:
            bounds.append(("tol", int(np.count_nonzero(lam[:k_max] > self.tol * lam[0]))))
        k = min(v for _, v in bounds)
        return k, next(r for r, v in bounds if v == k)


def float32_noise(eigenvalues: np.ndarray, vt: np.ndarray, diag: np.ndarray) -> float:
    """Rounding noise of a float32 projection on the axes vt (k, d), relative to each component's std,
    the largest over the components (rms; an estimate from above: measured <= 0.5 of it):
    eps32 sqrt(d v' diag(S) v / lam) for axis v with eigenvalue lam of the scatter S. Float32
    centring, products and sums err by ~eps32 of each term (x_j - m_j) v_j, ~sqrt(d) of them
    accumulate, and v' diag(S) v / lam (1 for an axis along one feature) is how much larger those
    terms are than their sum: large for near-cancellations of larger features (near-collinear
    features, the noise directions of un-scaled ones), the eigenvalue or feature-scale spread that
    float32 cannot resolve."""
    lam = np.asarray(eigenvalues[: vt.shape[0]], dtype=np.float64)
    if (lam <= 0).any():
        return float("inf")
    through = (vt * vt) @ np.asarray(diag, dtype=np.float64)
    return float(_EPS32 * np.sqrt(vt.shape[1] * (through / lam).max()))


def pca_selection(spectrum: Spectrum, choice: ComponentChoice, k_max: int, n_rows: int,
                  what: str = "") -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(the kept axes (k, d), the first k_max control covariance eigenvalues (ddof 1), the record of
    the choice: n_components, selection, explained_variance, float32_noise, precision) of a control PCA."""
    eigenvalues, vt, diag = spectrum
    k, reason = choice.select(eigenvalues, k_max, what)
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    noise = float32_noise(lam, vt[:k], diag)
    info = {"n_components": k, "selection": reason, "explained_variance": float(lam[:k].sum() / lam.sum()),
            "float32_noise": noise, "precision": "float32" if noise <= FLOAT32_NOISE_MAX else "float64"}
    return vt[:k].copy(), lam[:k_max] / max(n_rows - 1, 1), info


def rows_dtype(Z: np.ndarray, precision: str) -> type:
    """Precision of the row-sized arithmetic on rows Z: float64, or float32 for float32 rows when
    the fit found float32 precise enough (`precision` "float32")."""
    return np.float64 if precision == "float64" else work_dtype(Z)


def project_private(A: np.ndarray, mean: np.ndarray, vt: np.ndarray, precision: str) -> np.ndarray:
    """(A - mean) @ vt' for a private copy A (overwritten), in `rows_dtype(A, precision)`; float32
    rows projected in float64 go block by block (no float64 copy of A)."""
    if rows_dtype(A, precision) == A.dtype:
        return project_in_place(np.subtract(A, mean.astype(A.dtype), out=A), vt)
    Y = np.empty((A.shape[0], vt.shape[0]))
    ct = cast_cached(vt, np.float64, transpose=True)  # as project_in_place: the same products
    for lo in range(0, A.shape[0], _SCATTER_ROWS):
        B = A[lo : lo + _SCATTER_ROWS].astype(np.float64)
        B -= mean
        np.matmul(B, ct, out=Y[lo : lo + _SCATTER_ROWS])
    return Y


def project_scale(A: np.ndarray, mean: np.ndarray, components: np.ndarray, batch_mean: np.ndarray,
                  batch_scale: np.ndarray, codes: np.ndarray, out: np.ndarray | None = None,
                  precision: str = "float32") -> np.ndarray:
    """The card transform of a chunk of rows A: ((A - mean) @ components' - batch mean) / batch scale,
    `codes` indexing the batch tables. In `rows_dtype(A, precision)` (float32: float32 centring, GEMM
    and scaling with the float64 parameters rounded to float32; float64: A converted exactly),
    centred before the product (no cancellation). With `out` (float32, A's rows) the result is
    written there."""
    wd = rows_dtype(A, precision)
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


@dataclass
class CardFit:
    """The fitted card recipe: mean (d,), components (k, d), per-batch mean and scale (B, k), the
    control covariance eigenvalues and the record of the component / precision choice (`pca_selection`)."""

    mean: np.ndarray
    components: np.ndarray
    batch_mean: np.ndarray
    batch_scale: np.ndarray
    eigenvalues: np.ndarray
    info: dict[str, Any]


def fit_pca_centerscale(C: np.ndarray, starts: np.ndarray, counts: np.ndarray, labels: list[Any],
                        choice: ComponentChoice, what: str = "") -> CardFit:
    """The card recipe on control rows C (a private copy, float32 or float64, overwritten), batch b
    being rows starts[b]:starts[b] + counts[b] (every label); all parameters float64.

    Mean and scatter matrix are accumulated in float64; the controls are then centred and projected
    as `project_scale` does it (in the chosen precision), so the batch statistics describe the
    numbers `transform` produces (each batch's controls come out with mean 0, std 1)."""
    n, d = C.shape
    k_max = k_max_of(n, d, what)
    mean = C.mean(axis=0, dtype=np.float64)
    if C.dtype == np.float64:
        C -= mean
        spectrum = control_pca(C)
    else:
        spectrum = control_pca(C, mean)
    vt, eigenvalues, info = pca_selection(spectrum, choice, k_max, n, what)
    if C.dtype == np.float64:
        Y = project_in_place(C, vt)
    else:
        Y = project_private(C, mean, vt, info["precision"])
    batch_mean, batch_scale = _block_scalers(Y, starts, counts, labels, d)
    return CardFit(mean, vt, batch_mean, batch_scale, eigenvalues, info)


class PCACenterScale:
    """PCA on pooled controls, then per-batch standardisation on each batch's controls.

    Component choice as `ComponentChoice` (`n_components` None: all; `variance`; `tol`); after `fit`,
    `n_components` is the kept count, `selection_` the bound that set it and `precision_` the
    precision of float32 rows' arithmetic (module docstring)."""

    def __init__(self, n_components: int | None = None, recipe: str = "card", variance: float = 1.0,
                 tol: float = DEFAULT_TOL) -> None:
        if recipe != "card":
            raise ValueError(f"unknown recipe {recipe!r}; only 'card' (OpenPhenom model card) is implemented")
        ComponentChoice(n_components, variance, tol)  # validates
        self.recipe = recipe
        self.n_components = n_components
        self.variance, self.tol = float(variance), float(tol)
        self.mean_: np.ndarray | None = None  # (d,)
        self.components_: np.ndarray | None = None  # (k, d)
        self.batches_: list[Any] = []
        self.batch_mean_: np.ndarray | None = None  # (B, k)
        self.batch_scale_: np.ndarray | None = None  # (B, k)
        self.eigenvalues_: np.ndarray | None = None  # (min(n_ctrl - 1, d),) control covariance eigenvalues
        self.selection_: str | None = None
        self.precision_ = "float32"
        self.pca_info_: dict[str, Any] = {}

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
        choice = ComponentChoice(self.n_components, self.variance, self.tol)
        choice.check(k_max_of(int(ctrl.sum()), X.shape[1]))
        labels, codes = _codes(batches, X.shape[0])
        rows = np.flatnonzero(ctrl)
        order, starts, counts = contiguous_groups(codes[rows], len(labels))
        _check_counts(counts, labels)
        C = _rows(X, rows if order is None else rows[order])  # controls grouped by batch
        fit = fit_pca_centerscale(C, starts, counts, labels, choice)
        self.mean_, self.components_, self.batch_mean_, self.batch_scale_ = (
            fit.mean, fit.components, fit.batch_mean, fit.batch_scale)
        self.eigenvalues_, self.pca_info_ = fit.eigenvalues, fit.info
        self.selection_, self.precision_ = fit.info["selection"], fit.info["precision"]
        self.batches_ = labels
        self.n_components = fit.info["n_components"]
        return self

    def transform(self, X: np.ndarray, batches: np.ndarray, is_control: np.ndarray | None = None) -> np.ndarray:
        """Project and standardise every row with its batch's scaler (float32 output).

        Batches not seen in `fit` get a scaler fitted on their own control rows (`is_control`
        is required then); a batch with fewer than 2 control rows raises ValueError.
        Rows are processed in chunks (temporaries stay bounded), in the precision of X (float32
        rows: float32 when the fit found it precise enough, `precision_`; statistics are float64).
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
            Y = project_private(_rows(X, rows), self.mean_, self.components_, self.precision_)
            m, s = _batch_scalers(Y, remap[codes[rows]], new.size, [labels[i] for i in new], X.shape[1])
            mean[new], scale[new] = m, s
        out = empty_touched((X.shape[0], k), np.float32)
        step = rows_per_chunk(max(X.shape[1], k))  # the chunks of Recipe.transform: the same numbers
        for lo in range(0, X.shape[0], step):
            sl = slice(lo, lo + step)
            A = X[sl]
            _check_finite_rows(A, lo)
            project_scale(A, self.mean_, self.components_, mean, scale, codes[sl], out=out[sl], precision=self.precision_)
        return out

    def fit_transform(self, X: np.ndarray, batches: np.ndarray, is_control: np.ndarray) -> np.ndarray:
        return self.fit(X, batches, is_control).transform(X, batches, is_control)

    def save(self, path: str | Path) -> Path:
        """Write the fitted parameters to folder `path` (`.npz` arrays + `.json` settings), atomically."""
        if self.components_ is None:
            raise RuntimeError("PCACenterScale is not fitted")
        arrays = {"mean": self.mean_, "components": self.components_, "batch_mean": self.batch_mean_,
                  "batch_scale": self.batch_scale_}
        if self.eigenvalues_ is not None:
            arrays["eigenvalues"] = self.eigenvalues_
        info = {"recipe": self.recipe, "n_components": self.n_components, "batches": self.batches_,
                "variance": self.variance, "tol": self.tol, "pca": self.pca_info_}
        return write_arrays_and_json(path, _NPZ, arrays, _JSON, info)

    @classmethod
    def load(cls, path: str | Path) -> PCACenterScale:
        """Read a folder written by `save` (written before `variance`/`tol` existed: no tolerance,
        input precision, as then)."""
        path = Path(path)
        info = json.loads((path / _JSON).read_text())
        obj = cls(n_components=int(info["n_components"]), recipe=info["recipe"], variance=info.get("variance", 1.0),
                  tol=info.get("tol", 0.0))
        with np.load(path / _NPZ) as z:
            obj.mean_, obj.components_ = z["mean"], z["components"]
            obj.batch_mean_, obj.batch_scale_ = z["batch_mean"], z["batch_scale"]
            obj.eigenvalues_ = z["eigenvalues"] if "eigenvalues" in z.files else None
        obj.batches_ = list(info["batches"])
        obj.pca_info_ = dict(info.get("pca", {}))
        obj.selection_ = obj.pca_info_.get("selection")
        obj.precision_ = obj.pca_info_.get("precision", "float32")
        return obj
