"""Control-PCA alignment steps: `pca_centerscale` (the OpenPhenom card recipe) and `tvn`.

- pca_centerscale: PCA on the pooled control rows, then per batch a StandardScaler fitted on that
  batch's controls (the existing `PCACenterScale`, same numbers: fit and chunked transform share
  its code).
- tvn (Typical Variation Normalization, as EFAAR `tvn_on_controls`):
  1. centre/scale on the controls (mean, population std; `by=global` as EFAAR, or per batch);
  2. PCA fitted on the controls (all components by default, i.e. min(n_controls - 1, d), less
     those with eigenvalue <= tol x the largest);
  3. centre/scale on the controls again (same `by`);
  4. with `coral=true`, per batch b: X_b <- X_b (cov(controls_b) + lam I)^(-1/2), cov with
     ddof 1 (CORAL whitening; no re-centring afterwards, as EFAAR). The inverse square root
     comes from a symmetric eigendecomposition (EFAAR uses scipy's fractional_matrix_power,
     which gives the same matrix for a symmetric positive definite argument).
  Features constant on the controls get scale 1 (centred only), as StandardScaler.
  In `transform` stages 1-3 are one affine map per batch, composed with the batch's CORAL matrix
  when the batch has more rows than components (one GEMM per row instead of two).

Component choice (both steps; `normalize.ComponentChoice`): `n_components=<int>|all` (at most),
`variance=<fraction>` (the fewest components explaining more than it; default 1, no cut) and
`tol=<float>` (drop eigenvalues <= tol x the largest; default 1e-10: below it an axis of the
float64 scatter eigendecomposition is no longer accurate to 1e-5, and its component, scaled to
unit variance, would weigh as much as a real one; 0 keeps all). Specs print `variance` and `tol`
only when not at their defaults (specs written before they existed read the same). The fitted
state records the kept count and the bound that set it (`pca`: n_components, selection,
explained_variance, float32_noise, precision) and the eigenvalues; states saved before have no
record and keep the float32 path.

Precision (both steps): the statistics are float64: means and stds of float32 values, the PCA
scatter matrix (from float64 blocks of the rows, so the components equal those of a float64 fit of
the same numbers). float32 rows are centred, projected and scaled in float32 (the row-sized GEMMs,
as scikit-learn does for float32 input) when float32 resolves every kept component
(`normalize.float32_noise` <= 1e-4 on the PCA's input: tvn's stage-1 rows have unit variance per
feature, so only near-collinear features can push it up; ~8e-6 on the synthetic benchmark
profiles), else in float64 (`precision` "float64"), CORAL included. On the float32 path only the
per-batch CORAL matrices (small Gram products and ~300 x 300 eigendecompositions, the bulk of tvn's
fit) are computed and kept in float32; transformed rows then differ from the float64 path's by
~5 float32_noise of each component's scale at most (tests: < 1e-4). float64 rows take the float64
path throughout.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from scipy import linalg
from threadpoolctl import threadpool_limits

from bioembed_assets.profiles.normalize import (
    _SCATTER_ROWS,
    DEFAULT_TOL,
    ComponentChoice,
    Spectrum,
    _batch_scalers,
    eig_rows,
    eig_scatter,
    fit_pca_centerscale,
    k_max_of,
    pca_selection,
    project_in_place,
    project_scale,
    rows_dtype,
)
from bioembed_assets.profiles.steps import (
    FitData,
    Groups,
    Step,
    batch_affine,
    block_mean_std,
    bool_opt,
    cast_cached,
    choice_opt,
    constant_mask,
    contiguous_groups,
    float_opt,
    grouped_rows,
    int_opt,
    noise_floor,
    runs,
    work_dtype,
)

PCA_OPTIONS = (
    int_opt("n_components", "all", special=("all",), help="PCA components kept at most (all = min(n_ctrl - 1, d))"),
    float_opt("variance", 1.0, lo=0.0, hi=1.0, lo_open=True,
              help="keep the fewest components explaining more than this fraction of control variance (1 = no cut)"),
    float_opt("tol", DEFAULT_TOL, lo=0.0, hi=1.0,
              help="drop components with eigenvalue <= tol x the largest (rounding noise; 0 = keep all)"),
)


def _pca_relevant(opts: dict[str, Any]) -> list[str]:
    """The component-choice options of a spec, in this order: n_components always; variance and tol
    when not at their defaults (so specs written before they existed read the same)."""
    return ["n_components"] + [o.name for o in PCA_OPTIONS[1:] if opts[o.name] != o.default]


def _choice(opts: dict[str, Any], step: str) -> ComponentChoice:
    try:
        return ComponentChoice(None if opts["n_components"] == "all" else int(opts["n_components"]),
                               float(opts["variance"]), float(opts["tol"]))
    except ValueError as e:
        raise ValueError(f"{step}: {e}") from None


def _pca_params(info: dict[str, Any], eigenvalues: np.ndarray | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The fitted component / precision record as state params and arrays."""
    return {"pca": info}, ({} if eigenvalues is None else {"eigenvalues": eigenvalues})


def _load_pca(params: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[dict[str, Any], str, np.ndarray | None]:
    """(record, precision, eigenvalues) from a saved state; states saved before the record existed
    computed float32 rows in float32."""
    info = dict(params.get("pca", {}))
    return info, info.get("precision", "float32"), arrays.get("eigenvalues")


def _pc_names(k: int) -> list[str]:
    return [f"PC{i}" for i in range(1, k + 1)]


class PCACenterScaleStep(Step):
    """The card recipe as a step (the `card` preset); component choice and precision as
    `PCACenterScale` (`normalize.py`), recorded in the fitted state (`pca`)."""

    name = "pca_centerscale"
    options = PCA_OPTIONS
    precision_ = "float32"
    summary = "OpenPhenom card: PCA on pooled controls, then per-batch StandardScaler on each batch's controls"
    writes_out = True  # apply(..., out=) fills the recipe's output rows directly

    def relevant_options(self) -> list[str]:
        return _pca_relevant(self.opts)

    def check_options(self) -> None:
        _choice(self.opts, self.name)

    @property
    def per_batch(self) -> bool:
        return True

    def fit(self, data: FitData) -> None:
        what = f"{self.name}: "
        choice = _choice(self.opts, self.name)
        choice.check(k_max_of(data.n, data.X.shape[1], what), what)
        C, starts, counts, _ = _private_grouped(data, len(data.labels))  # as PCACenterScale.fit
        fit = fit_pca_centerscale(C, starts, counts, data.labels, choice, what)
        self.mean_, self.components_, self.batch_mean_, self.batch_scale_ = (
            fit.mean, fit.components, fit.batch_mean, fit.batch_scale)
        self.eigenvalues_, self.pca_info_, self.precision_ = fit.eigenvalues, fit.info, fit.info["precision"]
        self.in_features_, self.batches_ = list(data.features), list(data.labels)
        self.fitted = True

    def batch_tables(self, data: FitData) -> dict[str, np.ndarray]:
        wd = rows_dtype(data.X, self.precision_)
        Y = project_in_place(np.subtract(data.X, self.mean_.astype(wd), dtype=wd), self.components_)
        m, s = _batch_scalers(Y, data.batch, len(data.labels), data.labels, data.X.shape[1])
        return {"batch_mean": m, "batch_scale": s}

    def stored_tables(self) -> dict[str, np.ndarray]:
        return {"batch_mean": self.batch_mean_, "batch_scale": self.batch_scale_}

    def apply(self, Z: np.ndarray, tidx: np.ndarray, tables: dict[str, np.ndarray],
              out: np.ndarray | None = None) -> np.ndarray:
        # the same function as PCACenterScale.transform: identical numbers
        return project_scale(Z, self.mean_, self.components_, tables["batch_mean"], tables["batch_scale"], tidx, out,
                             self.precision_)

    def output_features(self, features: list[str]) -> list[str]:
        return _pc_names(self.components_.shape[0])

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        pca, eig = _pca_params(self.pca_info_, self.eigenvalues_)
        return ({"batches": self.batches_, "in_features": self.in_features_} | pca,
                {"mean": self.mean_, "components": self.components_, "batch_mean": self.batch_mean_,
                 "batch_scale": self.batch_scale_} | eig)

    def load_state(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.batches_, self.in_features_ = list(params["batches"]), list(params["in_features"])
        self.mean_, self.components_ = arrays["mean"], arrays["components"]
        self.batch_mean_, self.batch_scale_ = arrays["batch_mean"], arrays["batch_scale"]
        self.pca_info_, self.precision_, self.eigenvalues_ = _load_pca(params, arrays)
        self.fitted = True


def _private_grouped(data: FitData, n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(Z, starts, counts, codes): the fit rows in their working precision as an array the step
    may overwrite, grouped by batch (batch g: rows starts[g]:starts[g] + counts[g]; `codes` per row
    of Z). Rows already grouped (plates in order) are not reordered, and not copied when owned."""
    order, starts, counts = contiguous_groups(data.batch, n_groups)
    wd = work_dtype(data.X)
    if order is not None:
        return np.asarray(data.X[order], dtype=wd), starts, counts, data.batch[order]
    if data.owned and data.X.dtype == wd:
        return data.X, starts, counts, data.batch
    return np.array(data.X, dtype=wd), starts, counts, data.batch


def _scaler(Z: np.ndarray, blocks: tuple[np.ndarray, np.ndarray] | None,
            n_terms: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) per block (starts, counts) of rows (or global, shape (1, d)), float64, of the rows
    of Z (float32 or float64, float64 sums). Constant features get scale 1, as StandardScaler; with
    `n_terms` (Z holds n_terms-term products) so do features whose spread is below that product's
    rounding noise (`noise_floor`) relative to the rows' norm."""
    if blocks is None:
        mean, std = block_mean_std(Z, np.array([0]), np.array([Z.shape[0]]))
        n: np.ndarray | int = Z.shape[0]
    else:
        mean, std = block_mean_std(Z, *blocks)
        n = blocks[1][:, None]
    const = constant_mask(mean, std, n)
    if n_terms:
        const |= std <= noise_floor(Z.dtype, n_terms) * np.sqrt((std**2 + mean**2).sum(axis=1, keepdims=True))
    std[const] = 1.0
    return mean, std


def _lapack_syevd(dtype: Any) -> Callable[..., None] | None:
    """LAPACK ?syevd from scipy's `cython_lapack` function table, called through ctypes, which
    releases the GIL during the call (scipy.linalg.eigh holds it, so worker threads could not
    decompose two batches at once). None when unavailable."""
    try:
        import ctypes

        from scipy.linalg import cython_lapack

        capsule = cython_lapack.__pyx_capi__["ssyevd" if np.dtype(dtype) == np.float32 else "dsyevd"]
        get_name = ctypes.pythonapi.PyCapsule_GetName
        get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        address = get_pointer(capsule, get_name(capsule))
        return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 11)(address)
    except Exception:  # pragma: no cover - other scipy builds: scipy.linalg.eigh below
        return None


_SYEVD: dict[Any, Callable[..., None] | None] = {}


def _eigh(S: np.ndarray, dtype: Any = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors (as columns), in `dtype`, of the symmetric matrix S:
    LAPACK divide and conquer (syevd, as np.linalg.eigh), from scipy's LAPACK (~1.5x faster than
    numpy's build on 300 x 300 matrices here), without holding the GIL."""
    dt = np.dtype(dtype)
    if dt not in _SYEVD:
        _SYEVD[dt] = _lapack_syevd(dt)
    fn = _SYEVD[dt]
    if fn is None:
        return linalg.eigh(S.astype(dt), driver="evd", overwrite_a=True, check_finite=False)
    import ctypes

    n = S.shape[0]
    A = np.array(S, dtype=dt, order="C")  # symmetric: its C layout is its Fortran layout
    w = np.empty(n, dtype=dt)
    work = np.empty(1 + 6 * n + 2 * n * n, dtype=dt)
    iwork = np.empty(3 + 5 * n, dtype=np.int32)
    ints = np.array([n, n, work.size, iwork.size, 0], dtype=np.int32)  # n, lda, lwork, liwork, info
    jobz, uplo = ctypes.c_char(b"V"), ctypes.c_char(b"L")
    at = ints.ctypes.data
    fn(ctypes.addressof(jobz), ctypes.addressof(uplo), at, A.ctypes.data, at + 4, w.ctypes.data, work.ctypes.data,
       at + 8, iwork.ctypes.data, at + 12, at + 16)
    if ints[4] != 0:
        raise np.linalg.LinAlgError(f"?syevd failed (info {int(ints[4])}) on a {n} x {n} CORAL matrix")
    return w, A.T  # Fortran columns = eigenvectors


def _stage1_pca(Z: np.ndarray, t: np.ndarray, mu1: np.ndarray, sd1: np.ndarray) -> tuple[np.ndarray, Spectrum]:
    """(pmean, `Spectrum` of the scatter matrix) of TVN stage 2: the PCA of the stage-1 rows
    (Z - mu1[t]) / sd1[t] (one table row: global), computed from float64 values of those rows, block
    by block, whatever Z's precision: float32 rows get the float64 fit's PCA. The stage-1 rows are
    centred on these very rows, so their mean is zero up to rounding and the one-pass scatter
    S - n pmean pmean' is exact."""
    n, d = Z.shape

    def block(lo: int, hi: int) -> np.ndarray:
        B = Z[lo:hi].astype(np.float64)
        if mu1.shape[0] == 1:
            B -= mu1[0]
            B /= sd1[0]
        else:
            B -= mu1[t[lo:hi]]
            B /= sd1[t[lo:hi]]
        return B

    if n < 10 * d:  # few rows: thin SVD, as control_pca
        A = block(0, n)
        pmean = A.mean(axis=0)
        return pmean, eig_rows(A - pmean)
    S, total = np.zeros((d, d)), np.zeros(d)
    for lo in range(0, n, _SCATTER_ROWS):
        B = block(lo, min(lo + _SCATTER_ROWS, n))
        total += B.sum(axis=0)
        S += B.T @ B
    pmean = total / n
    S -= n * np.outer(pmean, pmean)
    return pmean, eig_scatter(S)


def _inv_sqrt_from_rows(A: np.ndarray, lam: float) -> np.ndarray:
    """(A'A / (n - 1) + lam I)^(-1/2) for centred rows A (n x k) with n <= k, from the n x n Gram
    matrix: with A A' / (n - 1) = U diag(s) U', the covariance has eigenvectors V = A' U diag(((n-1) s)^-1/2)
    for s > 0 and eigenvalue 0 elsewhere, so the result is lam^-1/2 I - B B' with
    B = V diag((lam^-1/2 - (s + lam)^-1/2)^1/2) (a symmetric rank-r update: one SYRK). In A's precision."""
    n, k = A.shape
    dt = A.dtype
    S = A @ A.T
    S /= n - 1
    s, U = _eigh(S, dt)
    s = s.astype(np.float64)
    keep = s > 1e-12 * max(s[-1], lam)
    s, U = s[keep], U[:, keep]
    B = A.T @ (U * np.sqrt((lam**-0.5 - (s + lam) ** -0.5) / ((n - 1) * s)).astype(dt))
    M = B @ B.T
    M *= -1.0
    M.flat[:: k + 1] += lam**-0.5
    return M


def _inv_sqrt_from_cov(A: np.ndarray, lam: float) -> np.ndarray:
    """(A'A / (n - 1) + lam I)^(-1/2) for centred rows A (n x k), from the k x k covariance
    (accumulated in float64; decomposed in A's precision)."""
    A64 = A.astype(np.float64, copy=False)
    C = A64.T @ A64 / (A.shape[0] - 1)
    C.flat[:: C.shape[0] + 1] += lam
    vals, vecs = _eigh(C, A.dtype)
    vals, vecs = vals.astype(np.float64), vecs.astype(np.float64)
    return ((vecs / np.sqrt(vals)) @ vecs.T).astype(A.dtype, copy=False)


def coral_matrices(Z: np.ndarray, groups: Groups | tuple[np.ndarray, np.ndarray], lam: float) -> np.ndarray:
    """(cov_ddof1(rows of group b) + lam I)^(-1/2) for every group (all with >= 2 rows): (B, k, k),
    in Z's precision.

    From the k x k covariance, or from the n x n Gram matrix of groups with n <= k rows (cheaper,
    same matrix). Each group's mean is a float64 statistic; the small products and the
    eigendecomposition run in Z's precision: for float32 rows ~40% of the float64 time, and the
    matrix differs from float64's by ~1e-7 of its norm (~1e-5 of each transformed component's
    scale at most), (cov + lam I)^-1/2 being well conditioned for lam > 0. The many small
    eigendecompositions run single-threaded inside LAPACK, one group per worker thread (without
    the GIL, `_eigh`): multithreaded LAPACK on a 300 x 300 matrix is slower than one thread,
    and much slower when other processes share the cores."""
    k, wd = Z.shape[1], work_dtype(Z)
    if isinstance(groups, Groups):
        Zs, starts, counts = Z[groups.order], groups.starts, groups.counts
    else:  # (starts, counts) of blocks of rows of Z
        Zs, (starts, counts) = Z, groups
    out = np.empty((len(counts), k, k), dtype=wd)

    def one(g: int) -> None:
        rows = Zs[int(starts[g]) : int(starts[g] + counts[g])]
        A = np.subtract(rows, rows.mean(axis=0, dtype=np.float64).astype(wd), dtype=wd)
        out[g] = (_inv_sqrt_from_rows if A.shape[0] <= k else _inv_sqrt_from_cov)(A, lam)

    with threadpool_limits(limits=1), ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(one, np.flatnonzero(counts).tolist()))
    return out


class TVN(Step):
    """Typical Variation Normalization on controls (EFAAR `tvn_on_controls`)."""

    name = "tvn"
    options = (
        choice_opt("by", ("global", "plate", "batch"), "global", aliases={"none": "global"},
                   help="centre/scale stages on all controls (EFAAR), per plate or per batch; CORAL is per batch "
                        "with by=batch, else per plate"),
        *PCA_OPTIONS,
        bool_opt("coral", True, help="per-batch CORAL whitening of the control covariance"),
        float_opt("lam", 0.5, lo=0.0, lo_open=True, help="CORAL ridge added to each batch's control covariance"),
    )
    precision_ = "float32"
    summary = "scale on controls -> control PCA -> scale on controls -> per-batch CORAL (cov + lam I)^(-1/2)"
    writes_out = True  # apply(..., out=) fills the recipe's output rows directly

    def __init__(self, **opts: Any) -> None:
        super().__init__(**opts)
        self._memo: dict[str, tuple[tuple[Any, ...], Any]] = {}

    def relevant_options(self) -> list[str]:
        return ["by", *_pca_relevant(self.opts), "coral"] + (["lam"] if self.opts["coral"] else [])

    def check_options(self) -> None:
        _choice(self.opts, self.name)

    def check_given(self, given: set[str]) -> None:
        if "lam" in given and not self.opts["coral"]:
            raise ValueError("tvn: option lam only applies with coral=true")

    @property
    def per_batch(self) -> bool:
        return self.opts["by"] != "global" or self.opts["coral"]

    def _stages(self, data: FitData, fit_globals: bool) -> dict[str, np.ndarray]:
        """Fit the per-batch tables (and, with `fit_globals`, the global parts) on control rows.

        The rows stay in their precision (float32 rows: float32 centring, scaling and projection);
        every statistic (means, stds, the PCA scatter matrix, CORAL covariances) is float64."""
        by_batch = self.opts["by"] != "global"
        d = data.X.shape[1]
        if self.per_batch:
            Z, starts, counts, t = _private_grouped(data, len(data.labels))  # rows grouped by batch
            Groups(np.arange(0), counts, starts).check_min(2, data.labels, self.name, "control rows")
            blocks: tuple[np.ndarray, np.ndarray] | None = (starts, counts)
        else:
            wd = work_dtype(data.X)
            Z = data.X if data.owned and data.X.dtype == wd else np.array(data.X, dtype=wd)
            blocks, t = None, data.batch
        wd = Z.dtype.type
        tables: dict[str, np.ndarray] = {}
        if by_batch:
            tables["mu1"], tables["sd1"] = mu1, sd1 = _scaler(Z, blocks)
        else:
            if fit_globals:
                self.mu1_, self.sd1_ = _scaler(Z, None)
            mu1, sd1 = self.mu1_, self.sd1_
        if fit_globals:
            self._fit_pca(Z, t, mu1, sd1)
        if rows_dtype(Z, self.precision_) != Z.dtype:  # float32 rows the conditioning needs in float64
            Z, wd = Z.astype(np.float64), np.float64
        if by_batch:
            batch_affine(Z, t, mu1, sd1)
        else:
            Z -= mu1.astype(wd)
            Z /= sd1.astype(wd)
        Z -= self.pmean_.astype(wd)
        Z = project_in_place(Z, self.components_)
        if by_batch:
            tables["mu2"], tables["sd2"] = _scaler(Z, blocks, n_terms=d)
            batch_affine(Z, t, tables["mu2"], tables["sd2"])
        else:
            if fit_globals:
                self.mu2_, self.sd2_ = _scaler(Z, None, n_terms=d)
            Z -= self.mu2_.astype(wd)
            Z /= self.sd2_.astype(wd)
        if self.opts["coral"]:
            assert blocks is not None
            tables["coral"] = coral_matrices(Z, blocks, self.opts["lam"])
        return tables

    def _fit_pca(self, Z: np.ndarray, t: np.ndarray, mu1: np.ndarray, sd1: np.ndarray) -> None:
        """Stage 2: the control PCA of the stage-1 rows, its component choice and the precision of
        float32 rows' arithmetic (`pca_selection`; the stage-1 rows have unit variance per feature, so
        only the eigenvalue spread decides)."""
        what = f"{self.name}: "
        choice = _choice(self.opts, self.name)
        k_max = k_max_of(Z.shape[0], Z.shape[1], what)
        choice.check(k_max, what)
        self.pmean_, spectrum = _stage1_pca(Z, t, mu1, sd1)
        self.components_, self.eigenvalues_, self.pca_info_ = pca_selection(spectrum, choice, k_max, Z.shape[0], what)
        self.precision_ = self.pca_info_["precision"]

    def fit(self, data: FitData) -> None:
        self._memo = {}
        self.in_features_ = list(data.features)
        self.batches_ = list(data.labels) if self.per_batch else []
        self.tables_ = self._stages(data, fit_globals=True)
        self.fitted = True

    def batch_tables(self, data: FitData) -> dict[str, np.ndarray]:
        return self._stages(data, fit_globals=False)

    def stored_tables(self) -> dict[str, np.ndarray]:
        return self.tables_

    # ---- transform: y = (((x - mu1) / sd1 - pmean) V' - mu2) / sd2, then (with coral) @ M_batch

    def _cached(self, name: str, deps: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        """make() memoized under `name` while `deps` are the same (arrays: the same objects)."""
        hit = self._memo.get(name)
        if hit is not None and len(hit[0]) == len(deps) and all(
                a is b or (not isinstance(a, np.ndarray) and not isinstance(b, np.ndarray) and a == b)
                for a, b in zip(hit[0], deps)):
            return hit[1]
        value = make()
        self._memo[name] = (deps, value)
        return value

    def _params(self, tables: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(mu1, sd1, loc, sd2), float64, one row per table row (or one global row): stage 3 reads
        (u V' - loc) / sd2 with u = (x - mu1) / sd1 and loc = pmean V' + mu2."""
        if self.opts["by"] != "global":
            mu1, sd1, mu2, sd2 = (tables[key] for key in ("mu1", "sd1", "mu2", "sd2"))
        else:
            mu1, sd1, mu2, sd2 = self.mu1_, self.sd1_, self.mu2_, self.sd2_
        loc = self._cached("loc", (self.pmean_, self.components_, mu2),
                           lambda: (self.pmean_ @ self.components_.T)[None, :] + mu2)
        return mu1, sd1, loc, sd2

    def _composed(self, tables: dict[str, np.ndarray], t: int, wd: type) -> tuple[np.ndarray, np.ndarray]:
        """(W, h) of batch table row t, in precision wd, with stages 1-3 + CORAL as (x - mu1) @ W - h:
        W = diag(1 / sd1) V' diag(1 / sd2) M, h = (loc / sd2) M (composed in wd: one d x k x k GEMM).
        Kept for the next chunk: a batch's rows usually straddle at most two consecutive chunks."""
        mu1, sd1, loc, sd2 = self._params(tables)
        a, b = (0 if sd1.shape[0] == 1 else t), (0 if sd2.shape[0] == 1 else t)
        M = tables["coral"][t]

        def make() -> tuple[np.ndarray, np.ndarray]:
            H = self._cached("H", (self.components_, sd1, sd2, a, b, wd),  # one for all batches when by=global
                             lambda: (self.components_.T / sd1[a][:, None] / sd2[b][None, :]).astype(wd))
            return H @ M.astype(wd, copy=False), ((loc[b] / sd2[b]) @ M).astype(wd)

        return self._cached("coral", (tables["coral"], sd1, sd2, loc, t, wd), make)

    def apply(self, Z: np.ndarray, tidx: np.ndarray, tables: dict[str, np.ndarray],
              out: np.ndarray | None = None) -> np.ndarray:
        """Transform a chunk in Z's precision (float32 rows: float32 products, parameters rounded to
        float32 once, unless the fit chose float64, `precision_`); with `out` (float32) the rows are
        written there."""
        wd = rows_dtype(Z, self.precision_)
        k, d = self.components_.shape
        direct = out is not None and out.dtype == wd
        Y = out if direct else np.empty((Z.shape[0], k), dtype=wd)
        mu1, sd1, loc, sd2 = self._params(tables)
        if not self.opts["coral"]:
            if sd1.shape[0] == 1:  # global: one affine map (x - mu1) @ G - loc / sd2
                G = self._cached(f"G{np.dtype(wd).char}", (self.components_, sd1, sd2),
                                 lambda: np.ascontiguousarray(self.components_.T / sd1[0][:, None] / sd2[0][None, :], dtype=wd))
                np.matmul(np.subtract(Z, cast_cached(mu1, wd), dtype=wd), G, out=Y)
                Y -= self._cached(f"g{np.dtype(wd).char}", (loc, sd2), lambda: (loc / sd2).astype(wd))
            else:
                U = np.array(Z, dtype=wd)
                batch_affine(U, tidx, mu1, sd1)
                np.matmul(U, cast_cached(self.components_, wd, transpose=True), out=Y)
                batch_affine(Y, tidx, loc, sd2)
        else:
            for t, rows in (runs(tidx) or grouped_rows(tidx)):
                a, b = (0 if sd1.shape[0] == 1 else t), (0 if sd2.shape[0] == 1 else t)
                U = np.subtract(Z[rows], mu1[a].astype(wd), dtype=wd)
                if U.shape[0] > d:  # compose once per batch: (x - mu1) W - h
                    W, h = self._composed(tables, t, wd)
                    if isinstance(rows, slice):
                        np.matmul(U, W, out=Y[rows])
                        Y[rows] -= h
                    else:
                        Y[rows] = U @ W - h
                else:  # few rows: two thin products instead of a d x k x k composition
                    U /= sd1[a].astype(wd)
                    P = U @ cast_cached(self.components_, wd, transpose=True)
                    P -= loc[b].astype(wd)
                    P /= sd2[b].astype(wd)
                    Y[rows] = P @ tables["coral"][t].astype(wd, copy=False)
        if out is not None and not direct:
            out[...] = Y
            return out
        return Y

    def output_features(self, features: list[str]) -> list[str]:
        return _pc_names(self.components_.shape[0])

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        pca, eig = _pca_params(self.pca_info_, self.eigenvalues_)
        arrays = {"pmean": self.pmean_, "components": self.components_, **self.tables_} | eig
        if self.opts["by"] == "global":
            arrays |= {"mu1": self.mu1_, "sd1": self.sd1_, "mu2": self.mu2_, "sd2": self.sd2_}
        return {"batches": self.batches_, "in_features": self.in_features_, "tables": sorted(self.tables_)} | pca, arrays

    def load_state(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self._memo = {}
        self.batches_, self.in_features_ = list(params["batches"]), list(params["in_features"])
        self.pmean_, self.components_ = arrays["pmean"], arrays["components"]
        self.pca_info_, self.precision_, self.eigenvalues_ = _load_pca(params, arrays)
        self.tables_ = {key: arrays[key] for key in params["tables"]}
        if self.opts["by"] == "global":
            self.mu1_, self.sd1_, self.mu2_, self.sd2_ = arrays["mu1"], arrays["sd1"], arrays["mu2"], arrays["sd2"]
        self.fitted = True
