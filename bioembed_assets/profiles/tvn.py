"""Control-PCA alignment steps: `pca_centerscale` (the OpenPhenom card recipe) and `tvn`.

- pca_centerscale: PCA on the pooled control rows, then per batch a StandardScaler fitted on that
  batch's controls (the existing `PCACenterScale`, same numbers: fit and chunked transform share
  its code).
- tvn (Typical Variation Normalization, as EFAAR `tvn_on_controls`):
  1. centre/scale on the controls (mean, population std; `by=global` as EFAAR, or per batch);
  2. PCA fitted on the controls (all components by default, i.e. min(n_controls - 1, d));
  3. centre/scale on the controls again (same `by`);
  4. with `coral=true`, per batch b: X_b <- X_b (cov(controls_b) + lam I)^(-1/2), cov with
     ddof 1 (CORAL whitening; no re-centring afterwards, as EFAAR). The inverse square root
     comes from a symmetric eigendecomposition (EFAAR uses scipy's fractional_matrix_power,
     which gives the same matrix for a symmetric positive definite argument).
  Features constant on the controls get scale 1 (centred only), as StandardScaler.
  In `transform` stages 1-3 are one affine map per batch, composed with the batch's CORAL matrix
  when the batch has more rows than components (one GEMM per row instead of two).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from bioembed_assets.profiles.normalize import _batch_scalers, control_pca, fit_pca_centerscale, project_scale
from bioembed_assets.profiles.steps import (
    FitData,
    Groups,
    Step,
    as_float64,
    batch_mean_std,
    bool_opt,
    choice_opt,
    constant_mask,
    float_opt,
    grouped_rows,
    int_opt,
)


def _n_components(opt: int | str, n_ctrl: int, d: int, step: str) -> int:
    if n_ctrl < 2:
        raise ValueError(f"{step}: need at least 2 control rows to fit the PCA, got {n_ctrl}")
    k_max = min(n_ctrl - 1, d)
    k = k_max if opt == "all" else int(opt)
    if not 1 <= k <= k_max:
        raise ValueError(f"{step}: n_components must be in [1, {k_max}] (min(n_controls - 1, n_features)), got {k}")
    return k


def _pc_names(k: int) -> list[str]:
    return [f"PC{i}" for i in range(1, k + 1)]


class PCACenterScaleStep(Step):
    """The card recipe as a step (the `card` preset)."""

    name = "pca_centerscale"
    options = (int_opt("n_components", "all", special=("all",), help="PCA components kept (all = min(n_ctrl - 1, d))"),)
    summary = "OpenPhenom card: PCA on pooled controls, then per-batch StandardScaler on each batch's controls"

    @property
    def per_batch(self) -> bool:
        return True

    def fit(self, data: FitData) -> None:
        C = np.array(data.X, dtype=np.float64)  # a copy: centred in place
        k = _n_components(self.opts["n_components"], data.n, C.shape[1], self.name)
        self.mean_, self.components_, self.batch_mean_, self.batch_scale_ = fit_pca_centerscale(
            C, data.batch, data.labels, k)
        self.in_features_, self.batches_ = list(data.features), list(data.labels)
        self.fitted = True

    def batch_tables(self, data: FitData) -> dict[str, np.ndarray]:
        Y = np.subtract(data.X, self.mean_, dtype=np.float64) @ self.components_.T
        m, s = _batch_scalers(Y, data.batch, len(data.labels), data.labels)
        return {"batch_mean": m, "batch_scale": s}

    def stored_tables(self) -> dict[str, np.ndarray]:
        return {"batch_mean": self.batch_mean_, "batch_scale": self.batch_scale_}

    def apply(self, Z: np.ndarray, tidx: np.ndarray, tables: dict[str, np.ndarray]) -> np.ndarray:
        # the same function as PCACenterScale.transform: identical numbers
        return project_scale(Z, self.mean_, self.components_, tables["batch_mean"], tables["batch_scale"], tidx)

    def output_features(self, features: list[str]) -> list[str]:
        return _pc_names(self.components_.shape[0])

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return ({"batches": self.batches_, "in_features": self.in_features_},
                {"mean": self.mean_, "components": self.components_, "batch_mean": self.batch_mean_,
                 "batch_scale": self.batch_scale_})

    def load_state(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.batches_, self.in_features_ = list(params["batches"]), list(params["in_features"])
        self.mean_, self.components_ = arrays["mean"], arrays["components"]
        self.batch_mean_, self.batch_scale_ = arrays["batch_mean"], arrays["batch_scale"]
        self.fitted = True


def _scaler(Z: np.ndarray, groups: Groups | None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) per group (or global, shape (1, d)); constant features get scale 1."""
    if groups is None:
        mean = Z.mean(axis=0, keepdims=True)
        std = np.sqrt(((Z - mean) ** 2).mean(axis=0, keepdims=True))
        n: np.ndarray | int = Z.shape[0]
    else:
        mean, std = batch_mean_std(Z, groups)
        n = groups.counts[:, None]
    std[constant_mask(mean, std, n)] = 1.0
    return mean, std


def _inv_sqrt_from_rows(A: np.ndarray, lam: float) -> np.ndarray:
    """(A'A / (n - 1) + lam I)^(-1/2) for centred rows A (n x k) with n <= k, from the n x n Gram
    matrix: with A A' / (n - 1) = U diag(s) U', the covariance has eigenvectors V = A' U diag(((n-1) s)^-1/2)
    for s > 0 and eigenvalue 0 elsewhere, so the result is lam^-1/2 I + V diag((s + lam)^-1/2 - lam^-1/2) V'."""
    n, k = A.shape
    s, U = np.linalg.eigh(A @ A.T / (n - 1))
    keep = s > 1e-12 * max(s[-1], lam)
    s, U = s[keep], U[:, keep]
    V = (A.T @ U) / np.sqrt((n - 1) * s)
    M = (V * ((s + lam) ** -0.5 - lam**-0.5)) @ V.T
    M.flat[:: k + 1] += lam**-0.5
    return M


def _inv_sqrt_from_cov(A: np.ndarray, lam: float) -> np.ndarray:
    """(A'A / (n - 1) + lam I)^(-1/2) for centred rows A (n x k), from the k x k covariance."""
    C = A.T @ A / (A.shape[0] - 1)
    C.flat[:: C.shape[0] + 1] += lam
    vals, vecs = np.linalg.eigh(C)
    return (vecs / np.sqrt(vals)) @ vecs.T


def coral_matrices(Z: np.ndarray, groups: Groups, lam: float) -> np.ndarray:
    """(cov_ddof1(rows of group b) + lam I)^(-1/2) for every group (all with >= 2 rows): (B, k, k).

    From the k x k covariance, or from the n x n Gram matrix of groups with n <= k rows (cheaper,
    same matrix). The many small eigendecompositions run single-threaded inside BLAS/LAPACK, one
    group per worker thread: multithreaded LAPACK on a 300 x 300 matrix is slower than one thread,
    and much slower when other processes share the cores."""
    k = Z.shape[1]
    Zs = Z[groups.order]
    out = np.empty((groups.counts.size, k, k))

    def one(item: tuple[int, slice]) -> None:
        g, sl = item
        A = Zs[sl] - Zs[sl].mean(axis=0)
        out[g] = _inv_sqrt_from_rows(A, lam) if A.shape[0] <= k else _inv_sqrt_from_cov(A, lam)

    with threadpool_limits(limits=1), ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(one, groups.slices()))
    return out


class TVN(Step):
    """Typical Variation Normalization on controls (EFAAR `tvn_on_controls`)."""

    name = "tvn"
    options = (
        choice_opt("by", ("global", "batch"), "global", aliases={"plate": "batch", "none": "global"},
                   help="centre/scale stages on all controls (EFAAR) or per batch"),
        int_opt("n_components", "all", special=("all",), help="PCA components kept (all = min(n_ctrl - 1, d))"),
        bool_opt("coral", True, help="per-batch CORAL whitening of the control covariance"),
        float_opt("lam", 0.5, lo=0.0, lo_open=True, help="CORAL ridge added to each batch's control covariance"),
    )
    summary = "scale on controls -> control PCA -> scale on controls -> per-batch CORAL (cov + lam I)^(-1/2)"

    def relevant_options(self) -> list[str]:
        return ["by", "n_components", "coral"] + (["lam"] if self.opts["coral"] else [])

    def check_given(self, given: set[str]) -> None:
        if "lam" in given and not self.opts["coral"]:
            raise ValueError("tvn: option lam only applies with coral=true")

    @property
    def per_batch(self) -> bool:
        return self.opts["by"] == "batch" or self.opts["coral"]

    def _stages(self, data: FitData, fit_globals: bool) -> dict[str, np.ndarray]:
        """Fit the per-batch tables (and, with `fit_globals`, the global parts) on control rows."""
        by_batch = self.opts["by"] == "batch"
        groups = Groups.of(data.batch, len(data.labels)) if self.per_batch else None
        if groups is not None:
            groups.check_min(2, data.labels, self.name, "control rows")
        tables: dict[str, np.ndarray] = {}
        Z = as_float64(data.X)
        t = data.batch
        if by_batch:
            tables["mu1"], tables["sd1"] = _scaler(Z, groups)
            Z = (Z - tables["mu1"][t]) / tables["sd1"][t]
        else:
            if fit_globals:
                self.mu1_, self.sd1_ = _scaler(Z, None)
            Z = (Z - self.mu1_) / self.sd1_
        if fit_globals:
            k = _n_components(self.opts["n_components"], data.n, Z.shape[1], self.name)
            self.pmean_ = Z.mean(axis=0)
            self.components_ = control_pca(Z - self.pmean_, k)
        Z = (Z - self.pmean_) @ self.components_.T
        if by_batch:
            tables["mu2"], tables["sd2"] = _scaler(Z, groups)
            Z = (Z - tables["mu2"][t]) / tables["sd2"][t]
        else:
            if fit_globals:
                self.mu2_, self.sd2_ = _scaler(Z, None)
            Z = (Z - self.mu2_) / self.sd2_
        if self.opts["coral"]:
            assert groups is not None
            tables["coral"] = coral_matrices(Z, groups, self.opts["lam"])
        return tables

    def fit(self, data: FitData) -> None:
        self.in_features_ = list(data.features)
        self.batches_ = list(data.labels) if self.per_batch else []
        self.tables_ = self._stages(data, fit_globals=True)
        self.fitted = True

    def batch_tables(self, data: FitData) -> dict[str, np.ndarray]:
        return self._stages(data, fit_globals=False)

    def stored_tables(self) -> dict[str, np.ndarray]:
        return self.tables_

    def _affine(self, tables: dict[str, np.ndarray], t: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stages 1-3 of a batch (global stages when t is None) as y = (x - mu1) @ G + g."""
        if t is None:
            mu1, sd1, mu2, sd2 = self.mu1_[0], self.sd1_[0], self.mu2_[0], self.sd2_[0]
        else:
            mu1, sd1, mu2, sd2 = (tables[key][t] for key in ("mu1", "sd1", "mu2", "sd2"))
        G = self.components_.T / sd1[:, None] / sd2[None, :]
        g = (-(self.pmean_ @ self.components_.T) - mu2) / sd2
        return mu1, G, g

    def apply(self, Z: np.ndarray, tidx: np.ndarray, tables: dict[str, np.ndarray]) -> np.ndarray:
        k = self.components_.shape[0]
        by_batch = self.opts["by"] == "batch"
        if not by_batch:
            glob = self._affine(tables, None)
            if not self.opts["coral"]:
                mu1, G, g = glob
                Y = np.subtract(Z, mu1, dtype=np.float64) @ G
                Y += g
                return Y
        Y = np.empty((Z.shape[0], k))
        for t, rows in grouped_rows(tidx):
            mu1, G, g = self._affine(tables, t) if by_batch else glob
            Zc = np.subtract(Z[rows], mu1, dtype=np.float64)
            if self.opts["coral"]:
                M = tables["coral"][t]
                if Zc.shape[0] > k:  # compose once per batch: (Zc G + g) M = Zc (G M) + g M
                    G, g = G @ M, g @ M
                else:
                    Y[rows] = (Zc @ G + g) @ M
                    continue
            Y[rows] = Zc @ G + g
        return Y

    def output_features(self, features: list[str]) -> list[str]:
        return _pc_names(self.components_.shape[0])

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {"pmean": self.pmean_, "components": self.components_, **self.tables_}
        if self.opts["by"] == "global":
            arrays |= {"mu1": self.mu1_, "sd1": self.sd1_, "mu2": self.mu2_, "sd2": self.sd2_}
        return {"batches": self.batches_, "in_features": self.in_features_, "tables": sorted(self.tables_)}, arrays

    def load_state(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.batches_, self.in_features_ = list(params["batches"]), list(params["in_features"])
        self.pmean_, self.components_ = arrays["pmean"], arrays["components"]
        self.tables_ = {key: arrays[key] for key in params["tables"]}
        if self.opts["by"] == "global":
            self.mu1_, self.sd1_, self.mu2_, self.sd2_ = arrays["mu1"], arrays["sd1"], arrays["mu2"], arrays["sd2"]
        self.fitted = True
