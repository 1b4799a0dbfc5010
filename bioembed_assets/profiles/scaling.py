"""Location/scale steps: `standardize` (mean, population std) and `mad_robustize` (median, scaled MAD).

Both are fitted on the negative controls (`on=controls`, default) or on every row (`on=all`), per
plate (`by=plate`, default), per batch (`by=batch`: the batch column, e.g. the week, pooling the
controls of its plates; the plate where no batch is given) or once for all rows (`by=global`).

- standardize: (x - mean) / std with std the population (ddof 0) standard deviation, as
  scikit-learn's StandardScaler and pycytominer `normalize(method="standardize")`. A feature that
  is constant on a batch's fit rows gets scale 1 (only centred), as StandardScaler does.
- mad_robustize: (x - median) / (1.4826 * MAD + epsilon), MAD = median(|x - median|), as
  pycytominer `normalize(method="mad_robustize")` (epsilon 1e-18 by default). A zero MAD would blow
  a feature up by 1/epsilon; by default (`zero_mad=error`) that raises an error naming the batch
  and features, `zero_mad=keep` reproduces pycytominer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bioembed_assets.profiles.steps import (
    FitData,
    Groups,
    Step,
    as_float64,
    batch_affine,
    batch_mean_std,
    choice_opt,
    constant_mask,
    float_opt,
)

_ON = choice_opt("on", ("controls", "all"), "controls", help="rows the statistics are computed on")
_BY = choice_opt("by", ("plate", "batch", "global"), "plate", aliases={"none": "global"},
                 help="one location/scale per plate, per batch (pooled controls of its plates), or one for all rows")
_MAD_SCALE = 1.4826  # normal-consistent MAD (pycytominer passes scale=1/1.4826 to scipy's median_abs_deviation)


class _LocationScale(Step):
    """Shared fit/apply of per-batch or global (x - loc) / scale."""

    numeric = True

    @property
    def per_batch(self) -> bool:
        return self.opts["by"] != "global"

    def _what(self) -> str:
        return "control rows" if self.opts["on"] == "controls" else "rows"

    def _stats(self, Z: np.ndarray, groups: Groups, labels: list[str], features: list[str]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _fit_groups(self, data: FitData, codes: np.ndarray, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
        groups = Groups.of(codes, len(labels))
        groups.check_min(2, labels, self.name, self._what())
        return self._stats(data.X, groups, labels, data.features)

    def fit(self, data: FitData) -> None:
        self.in_features_ = list(data.features)
        if self.per_batch:
            self.batches_ = list(data.labels)
            t = self.batch_tables(data)
            self.loc_, self.scale_ = t["loc"], t["scale"]
        else:
            self.loc_, self.scale_ = self._fit_groups(data, np.zeros(data.n, dtype=np.int64), ["(all batches)"])
        self.fitted = True

    def batch_tables(self, data: FitData) -> dict[str, np.ndarray]:
        loc, scale = self._fit_groups(data, data.batch, data.labels)
        return {"loc": loc, "scale": scale}

    def stored_tables(self) -> dict[str, np.ndarray]:
        return {"loc": self.loc_, "scale": self.scale_}

    def apply(self, Z: np.ndarray, tidx: np.ndarray, tables: dict[str, np.ndarray]) -> np.ndarray:
        if not self.per_batch:
            Y = np.subtract(Z, self.loc_[0], dtype=np.float64)
            Y /= self.scale_[0]
            return Y
        return batch_affine(np.array(Z, dtype=np.float64), tidx, tables["loc"], tables["scale"])

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"batches": self.batches_, "in_features": self.in_features_}, {"loc": self.loc_, "scale": self.scale_}

    def load_state(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.batches_, self.in_features_ = list(params["batches"]), list(params["in_features"])
        self.loc_, self.scale_ = arrays["loc"], arrays["scale"]
        self.fitted = True


class Standardize(_LocationScale):
    name = "standardize"
    options = (_ON, _BY)
    summary = "(x - mean) / population std, on controls or all rows, per batch or global"

    def _stats(self, Z: np.ndarray, groups: Groups, labels: list[str], features: list[str]) -> tuple[np.ndarray, np.ndarray]:
        mean, std = batch_mean_std(Z, groups)
        std[constant_mask(mean, std, groups.counts[:, None])] = 1.0
        return mean, std


class MadRobustize(_LocationScale):
    name = "mad_robustize"
    options = (_ON, _BY, float_opt("epsilon", 1e-18, lo=0.0, help="added to the scaled MAD (pycytominer's fudge factor)"),
               choice_opt("zero_mad", ("error", "keep"), "error",
                          help="a zero MAD raises (error) or is divided by epsilon as pycytominer does (keep)"))
    summary = "(x - median) / (1.4826 MAD + epsilon), as pycytominer mad_robustize"

    def _stats(self, Z: np.ndarray, groups: Groups, labels: list[str], features: list[str]) -> tuple[np.ndarray, np.ndarray]:
        Zs = as_float64(Z[groups.order]) if len(labels) > 1 else as_float64(Z)
        med = np.empty((len(labels), Z.shape[1]))
        mad = np.empty_like(med)
        for g, sl in groups.slices():  # contiguous blocks of the batch-sorted rows
            block = Zs[sl]
            med[g] = np.median(block, axis=0)
            mad[g] = np.median(np.abs(block - med[g]), axis=0) / (1.0 / _MAD_SCALE)
        if self.opts["zero_mad"] == "error" and (mad == 0).any():
            g = int(np.flatnonzero((mad == 0).any(axis=1))[0])
            bad = [features[j] for j in np.flatnonzero(mad[g] == 0)]
            shown = bad[:5] + (["..."] if len(bad) > 5 else [])
            pooled = "" if self.opts["by"] == "batch" else "by=batch (pooling the controls of a batch's plates), "
            raise ValueError(f"mad_robustize: {len(bad)} feature(s) have zero MAD on the {int(groups.counts[g])} "
                             f"{self._what()} of {self.grouping if self.per_batch else 'the fit'} {labels[g]!r}: "
                             f"{shown}; with few controls use {pooled}on=all, or zero_mad=keep (divides by "
                             f"epsilon={self.opts['epsilon']!r}, as pycytominer)")
        return med, mad + self.opts["epsilon"]
