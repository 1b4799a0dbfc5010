"""`harmony`: Harmony batch correction (harmonypy >= 2, the maintained package) as a fitted recipe step.

Fit: `harmonypy.run_harmony` on the fit rows (`on=all`, as the JUMP recipe; or the controls) with
their batch labels (`by=batch`, JUMP's `Metadata_Batch`; `by=plate`), `n_clusters` clusters (JUMP:
300, but at most one per 30 fit rows, harmonypy's own default rule, so that small fits keep
clusters of ~30 rows), `max_iter` Harmony iterations (JUMP: 20), and harmonypy's defaults for the
rest (theta 2, sigma 0.1, ridge penalty estimated per cluster as lambda_kb = 0.2 E_kb).

Harmony is transductive (it returns corrected fit rows, `Z_corr`), so the step keeps the model
harmonypy ends with, in the formulas of its C++ backend (R harmony2):

- harmonypy's final cluster centroids Y (unit columns, d x K; harmony2 takes them from the
  ridge intercepts), and per batch the diversity factor
  ((2 E_kb + 1) / (O_kb + E_kb + 1))^theta of the final soft assignments R (O_kb = sum of R_ik
  over the batch's rows, E_kb = N_b / N sum_i R_ik);
- per cluster k the mixture-of-experts ridge regression of the rows on [1, batch one-hot],
  weighted by R_ik, with penalty diag(0, lambda_k), fitted on the batches with mean R_ik above
  1e-5 (none when fewer than two batches qualify); the per-batch coefficients W_kb are stored
  (B x K x d float64), the intercept (the biology) is kept.

`apply` corrects a row x of fitted batch b as z = x - sum_k R_k(z) W_kb, where
R_k(z) ~ exp(-2 (1 - cos(z, Y_k)) / sigma) x diversity_kb is the soft assignment of the
corrected row: the self-consistent state that Harmony's alternation of clustering (on the
corrected rows) and correction converges to, found by fixed-point iteration from z = x (a few to
~15 rounds of ~4 n d K flops). On the fit rows this reproduces harmonypy's `Z_corr` up to
Harmony's own iteration-to-iteration movement (relative error 1e-3 on the test data; larger when
harmonypy stops after one iteration, its convergence test on the first objective change); the
same model corrects rows harmonypy never saw, e.g. treated wells of a fit on controls or a later
plate of a fitted batch. A batch without fit rows has no corrections: its rows raise an error
naming it. Output features keep their names. Stored: B x K x d + B x K + d x K float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bioembed_assets.profiles.steps import FitData, Step, as_float64, choice_opt, float_opt, grouped_rows, int_opt

ROWS_PER_CLUSTER = 30  # harmonypy's default number of clusters is N / 30
ALPHA = 0.2  # harmonypy's alpha: lambda_kb = alpha * E_kb when the penalty is estimated
BATCH_CUTOFF = 1e-5  # harmonypy's batch_prop_cutoff: batches with mean R_ik below it are left out of cluster k
MAX_ROUNDS, ROUND_TOL = 100, 1e-7  # fixed-point iteration of `apply`: stop when a round moves a row by < 1e-7 of its size


def ridge_corrections(X: np.ndarray, codes: np.ndarray, n_batches: int, R: np.ndarray, lamb: float | None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W (B x K x d), O (K x B), E (K x B)) of harmony's final ridge step on rows X (codes 0..B-1,
    every batch present) with soft assignments R (N x K); lamb None: estimated, ALPHA * E_kb."""
    n, d = X.shape
    K = R.shape[1]
    sizes = np.bincount(codes, minlength=n_batches).astype(np.float64)
    order = np.argsort(codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes).astype(np.int64)])
    O = np.empty((K, n_batches))
    S = np.empty((n_batches, K, d))  # S[b, k] = sum of R_ik x_i over the rows of batch b
    for b in range(n_batches):
        rows = order[bounds[b] : bounds[b + 1]]
        O[:, b] = R[rows].sum(axis=0)
        S[b] = R[rows].T @ X[rows]
    E = np.outer(R.sum(axis=0), sizes / n)
    W = np.zeros((n_batches, K, d))
    for k in range(K):
        keep = np.flatnonzero(O[k] / sizes > BATCH_CUTOFF)
        if keep.size < 2:
            continue
        ok = O[k, keep]
        A = np.diag(np.concatenate([[ok.sum()], ok + (ALPHA * E[k, keep] if lamb is None else lamb)]))
        A[0, 1:] = A[1:, 0] = ok
        rhs = np.concatenate([S[keep, k].sum(axis=0, keepdims=True), S[keep, k]])
        W[keep, k] = np.linalg.solve(A, rhs)[1:]
    return W, O, E


class Harmony(Step):
    name = "harmony"
    options = (
        choice_opt("on", ("all", "controls"), "all", help="rows harmonypy is run on (JUMP: all)"),
        choice_opt("by", ("batch", "plate"), "batch", help="batch labels corrected for (JUMP: Metadata_Batch)"),
        int_opt("n_clusters", 300, help="clusters (JUMP: 300), at most one per 30 fit rows"),
        int_opt("max_iter", 20, help="Harmony iterations (JUMP: 20)"),
        float_opt("theta", 2.0, lo=0.0, help="diversity penalty (harmonypy default 2)"),
        float_opt("sigma", 0.1, lo=0.0, lo_open=True, help="soft-clustering bandwidth (harmonypy default 0.1)"),
        float_opt("lamb", "auto", lo=0.0, lo_open=True, special=("auto",),
                  help="ridge penalty; auto = estimated per cluster, 0.2 x expected batch mass (harmonypy default)"),
        int_opt("seed", 0, lo=0, help="harmonypy random_state"),
    )
    summary = "Harmony (harmonypy) batch correction; the fitted mixture-of-experts model corrects any row of a fitted batch"

    @property
    def per_batch(self) -> bool:
        return True

    def n_clusters_for(self, n_fit: int) -> int:
        """Clusters used for n_fit rows: n_clusters, at most one per ROWS_PER_CLUSTER rows."""
        return max(1, min(self.opts["n_clusters"], round(n_fit / ROWS_PER_CLUSTER)))

    def fit(self, data: FitData) -> None:
        import harmonypy

        X = as_float64(data.X)
        n, d = X.shape
        if n < 2:
            raise ValueError(f"harmony: need at least 2 fit rows (on={self.opts['on']}), got {n}")
        present, codes = np.unique(data.batch, return_inverse=True)
        codes = codes.reshape(-1)
        K = self.n_clusters_for(n)
        o = self.opts
        lamb = None if o["lamb"] == "auto" else float(o["lamb"])
        ho = harmonypy.run_harmony(X, {"batch": codes}, "batch", theta=o["theta"], lamb=lamb, sigma=o["sigma"],
                                   nclust=K, max_iter_harmony=o["max_iter"], alpha=ALPHA,
                                   batch_prop_cutoff=BATCH_CUTOFF, random_state=o["seed"], verbose=False)
        R = np.asarray(ho.R, dtype=np.float64)
        W, O, E = ridge_corrections(X, codes, present.size, R, lamb)
        B = len(data.labels)
        self.corr_ = np.zeros((B, K, d))
        self.corr_[present] = W
        self.log_div_ = np.zeros((B, K))
        self.log_div_[present] = (o["theta"] * np.log((2 * E + 1) / (O + E + 1))).T
        self.known_ = np.zeros(B, dtype=bool)
        self.known_[present] = True
        self.centroids_ = np.asarray(ho.Y, dtype=np.float64)  # d x K, unit columns
        self.n_iter_ = len(ho.objective_harmony) - 1
        self.batches_ = list(data.labels)
        self.in_features_ = list(data.features)
        self.fitted = True

    def batch_tables(self, data: FitData) -> dict[str, np.ndarray]:
        fitted = [b for b, k in zip(self.batches_, self.known_) if k]
        more = f" (and {len(data.labels) - 1} more)" if len(data.labels) > 1 else ""
        plural = "batches" if self.grouping == "batch" else "plates"
        raise ValueError(f"harmony: {self.grouping} {data.labels[0]!r} was not seen in fit{more}; Harmony corrections "
                         f"exist only for the fitted {plural} {fitted[:5]}{'...' if len(fitted) > 5 else ''}; "
                         "refit the recipe with it")

    def stored_tables(self) -> dict[str, np.ndarray]:
        return {"corr": self.corr_, "log_div": self.log_div_, "known": self.known_}

    def apply(self, Z: np.ndarray, tidx: np.ndarray, tables: dict[str, np.ndarray]) -> np.ndarray:
        X = np.array(Z, dtype=np.float64)
        for t, rows in grouped_rows(tidx):
            if not tables["known"][t]:
                raise ValueError(f"harmony: {self.grouping} {self.batches_[t]!r} had no fit rows (on={self.opts['on']}), so it "
                                 "has no Harmony corrections")
            X[rows] = self._correct(X[rows], tables["corr"][t], tables["log_div"][t])
        return X

    def _correct(self, x: np.ndarray, W: np.ndarray, log_div: np.ndarray) -> np.ndarray:
        """Fixed point z = x - R(z) W of rows x of one batch (W: K x d, log_div: K)."""
        scale = 2.0 / self.opts["sigma"]
        z = x.copy()
        todo = np.arange(x.shape[0])
        for _ in range(MAX_ROUNDS):
            if todo.size == 0:
                break
            zt = z[todo]
            norm = np.maximum(np.linalg.norm(zt, axis=1, keepdims=True), np.finfo(np.float64).tiny)
            logit = (zt / norm @ self.centroids_ - 1.0) * scale + log_div
            logit -= logit.max(axis=1, keepdims=True)
            R = np.exp(logit)
            R /= R.sum(axis=1, keepdims=True)
            new = x[todo] - R @ W
            step = np.abs(new - zt).max(axis=1)
            z[todo] = new
            todo = todo[step > ROUND_TOL * (1.0 + np.abs(new).max(axis=1))]
        return z

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return ({"batches": self.batches_, "in_features": self.in_features_, "n_iter": self.n_iter_},
                {"corr": self.corr_, "log_div": self.log_div_, "known": self.known_, "centroids": self.centroids_})

    def load_state(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.batches_, self.in_features_ = list(params["batches"]), list(params["in_features"])
        self.n_iter_ = int(params["n_iter"])
        self.corr_, self.log_div_ = arrays["corr"], arrays["log_div"]
        self.known_, self.centroids_ = arrays["known"].astype(bool), arrays["centroids"]
        self.fitted = True
