"""Building blocks of normalization recipes: the `Step` interface, option parsing, per-batch statistics.

A step is a fit/transform object with JSON-able parameters plus numpy arrays. Recipes
(`recipe.py`) chain steps; each step sees float arrays whose rows are a subset of the recipe's
rows, with batch codes into the labels of the current `fit`/`transform` call.

Per-batch statistics are computed after one stable sort of the rows by batch (contiguous blocks,
`np.add.reduceat`), never with one boolean mask over all rows per batch.

Precision: steps may compute in the precision of their input (`work_dtype`: float32 rows stay float32
in the row-sized products, as scikit-learn does), but statistics (means, variances, covariances)
are always accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

CHUNK_ELEMS = 1 << 20  # elements per transform chunk (8 MiB float64): a chunk, its copies and its output stay in cache
_EPS = np.finfo(np.float64).eps


# --------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Opt:
    """One option of a step: how to parse it from the recipe string and print it canonically."""

    name: str
    default: Any
    parse: Callable[[Any], Any]
    fmt: Callable[[Any], str]
    help: str = ""


def choice_opt(name: str, values: Sequence[str], default: str, aliases: dict[str, str] | None = None, help: str = "") -> Opt:
    """An option taking one of `values` (case-insensitive; `aliases` map to canonical values)."""
    aliases = aliases or {}

    def parse(v: Any) -> str:
        if not isinstance(v, str):
            raise ValueError(f"option {name!r} takes one value, one of {list(values)}; got a list")
        key = v.lower()
        key = aliases.get(key, key)
        if key not in values:
            raise ValueError(f"option {name}={v!r} must be one of {list(values)}")
        return key

    return Opt(name, default, parse, str, help)


def float_opt(name: str, default: float | str, lo: float = -np.inf, hi: float = np.inf, special: tuple[str, ...] = (),
              lo_open: bool = False, help: str = "") -> Opt:
    """A float option in [lo, hi] (or (lo, hi] with `lo_open`), or one of the `special` words."""

    def parse(v: Any) -> float | str:
        if isinstance(v, str) and v.lower() in special:
            return v.lower()
        try:
            x = float(v)
        except (TypeError, ValueError):
            extra = f" or one of {list(special)}" if special else ""
            raise ValueError(f"option {name}={v!r} must be a number{extra}") from None
        if not np.isfinite(x) or x < lo or x > hi or (lo_open and x == lo):
            bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
            raise ValueError(f"option {name}={v!r} must be in {bound}")
        return x

    def fmt(x: float | str) -> str:
        return x if isinstance(x, str) else repr(float(x))

    return Opt(name, default, parse, fmt, help)


def int_opt(name: str, default: int | str, lo: int = 1, special: tuple[str, ...] = (), help: str = "") -> Opt:
    """An integer option >= lo, or one of the `special` words."""

    def parse(v: Any) -> int | str:
        if isinstance(v, str) and v.lower() in special:
            return v.lower()
        try:
            x = int(str(v))
        except ValueError:
            extra = f" or one of {list(special)}" if special else ""
            raise ValueError(f"option {name}={v!r} must be an integer{extra}") from None
        if x < lo:
            raise ValueError(f"option {name}={v!r} must be >= {lo}")
        return x

    return Opt(name, default, parse, str, help)


def bool_opt(name: str, default: bool, help: str = "") -> Opt:
    def parse(v: Any) -> bool:
        key = str(v).lower()
        if key in ("true", "yes", "1"):
            return True
        if key in ("false", "no", "0"):
            return False
        raise ValueError(f"option {name}={v!r} must be true or false")

    return Opt(name, default, parse, lambda b: "true" if b else "false", help)


def list_opt(name: str, default: tuple[str, ...], help: str = "") -> Opt:
    """A list of names: `[a,b,c]` in the recipe string (a single bare name is a one-item list)."""

    def parse(v: Any) -> tuple[str, ...]:
        return tuple(v) if isinstance(v, (list, tuple)) else (str(v),)

    return Opt(name, default, parse, lambda t: "[" + ",".join(t) + "]", help)


# --------------------------------------------------------------------------------------------- data


@dataclass
class FitData:
    """The rows a step is fitted on, already transformed by the preceding steps.

    `batch` holds codes into `labels`: the labels of the step's grouping (`Step.grouping`: plates or
    batches) of the whole fit call, including groups without any of these rows, so per-batch
    steps can name a group that has too few of them.
    """

    X: np.ndarray
    batch: np.ndarray
    labels: list[str]
    control: np.ndarray
    features: list[str]
    rows: np.ndarray
    perturbation: np.ndarray | None = None
    owned: bool = False  # X is a private copy the step may overwrite (not the caller's array)

    @property
    def n(self) -> int:
        return self.X.shape[0]


class Step:
    """A fit/transform step with a canonical `spec`, JSON params and numpy arrays.

    Subclasses declare `name`, `options` (and optionally `positional`, a list option filled by bare
    words), implement `fit`, `apply` and, if they keep per-batch statistics, `batch_tables`.
    """

    name: ClassVar[str]
    options: ClassVar[tuple[Opt, ...]] = ()
    positional: ClassVar[Opt | None] = None
    numeric: ClassVar[bool] = True  # False for steps that only select columns (NaN may pass through)
    summary: ClassVar[str] = ""

    def __init__(self, **opts: Any) -> None:
        known = {o.name: o for o in self.all_options()}
        self.opts: dict[str, Any] = {}
        for key, value in opts.items():
            if key not in known:
                raise ValueError(f"step {self.name!r} has no option {key!r}; known options: {sorted(known)}")
            try:
                self.opts[key] = known[key].parse(value)
            except ValueError as e:
                raise ValueError(f"{self.name}: {e}") from None
        for o in self.all_options():
            self.opts.setdefault(o.name, o.parse(o.default) if isinstance(o.default, str) else o.default)
        self.check_options()
        self.fitted = False
        self.in_features_: list[str] = []
        self.batches_: list[str] = []

    # ---- options and spec

    @classmethod
    def all_options(cls) -> tuple[Opt, ...]:
        return ((cls.positional,) if cls.positional else ()) + cls.options

    def check_options(self) -> None:
        """Cross-option validation (raise ValueError); default: nothing to check."""

    def check_given(self, given: set[str]) -> None:
        """Validate which options were written in the recipe string (default: any)."""

    def relevant_options(self) -> list[str]:
        """Options printed in the canonical spec (default: all keyword options)."""
        return [o.name for o in self.options]

    @property
    def spec(self) -> str:
        parts = []
        if self.positional is not None:
            parts += list(self.opts[self.positional.name])
        by_name = {o.name: o for o in self.options}
        parts += [f"{k}={by_name[k].fmt(self.opts[k])}" for k in self.relevant_options()]
        return f"{self.name}({','.join(parts)})"

    def fresh(self) -> Step:
        """An unfitted copy with the same options."""
        return type(self)(**self.opts)

    # ---- fitting

    @property
    def per_batch(self) -> bool:
        return False

    @property
    def grouping(self) -> str:
        """The labels a per-batch step keeps its tables by: "plate" or "batch" (the batch column,
        e.g. the week), from the step's `by` option; "plate" when it has none."""
        return "batch" if self.opts.get("by") == "batch" else "plate"

    def fit_rows(self, control: np.ndarray) -> np.ndarray | None:
        """Rows (indices) this step is fitted on, given the control flags; None = all rows."""
        if self.opts.get("on", "controls") == "all":
            return None
        return np.flatnonzero(control)

    def fit(self, data: FitData) -> None:
        raise NotImplementedError

    def batch_tables(self, data: FitData) -> dict[str, np.ndarray]:
        """Per-batch arrays for every label of `data` (used by `fit` and for batches first seen in
        `transform`); only for per-batch steps."""
        raise NotImplementedError

    def stored_tables(self) -> dict[str, np.ndarray]:
        return {}

    def apply(self, Z: np.ndarray, tidx: np.ndarray, tables: dict[str, np.ndarray]) -> np.ndarray:
        """Transform a chunk of rows; `tidx` is each row's row in `tables` (per-batch steps)."""
        raise NotImplementedError

    def output_features(self, features: list[str]) -> list[str]:
        return list(features)

    def width(self) -> int:
        """Widest row this step holds (input or output), for chunk sizing."""
        return max(len(self.in_features_), len(self.output_features(self.in_features_)))

    # ---- persistence

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able params, arrays) of the fitted step."""
        return {}, {}

    def load_state(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------- helpers


def as_float64(Z: np.ndarray) -> np.ndarray:
    return Z if Z.dtype == np.float64 else Z.astype(np.float64)


def work_dtype(Z: np.ndarray) -> type:
    """The precision of row-sized arithmetic on Z: float32 for float32 rows, else float64."""
    return np.float32 if Z.dtype == np.float32 else np.float64


_CASTS: list[tuple[np.ndarray, np.dtype, bool, np.ndarray]] = []


def cast_cached(a: np.ndarray, dtype: Any, transpose: bool = False) -> np.ndarray:
    """a (a.T with `transpose`) as a C-contiguous `dtype` array, remembered for the last few arrays
    (found by identity: for fitted parameters, which are never modified in place), so a transform
    rounds its parameters once, not once per chunk."""
    dt = np.dtype(dtype)
    for src, sdt, tr, res in _CASTS:
        if src is a and sdt == dt and tr == transpose:
            return res
    res = np.array(a.T if transpose else a, dtype=dt, order="C")
    _CASTS.insert(0, (a, dt, transpose, res))
    del _CASTS[8:]
    return res


def noise_floor(dtype: Any, n_terms: int) -> float:
    """Relative rounding noise of a dot product of n_terms values in `dtype` (a few sqrt(n) ulps):
    a projection whose spread is below this fraction of the norm of the projected rows is noise."""
    return 4.0 * np.sqrt(max(n_terms, 1)) * float(np.finfo(dtype).eps)


def all_finite(Z: np.ndarray) -> bool:
    """Whether every value of Z is finite, in one reading pass: the sum of a block is finite unless
    it holds NaN/inf (or overflows, which only costs the exact check)."""
    if Z.size == 0:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(Z, axis=None)):
            return True
    return bool(np.isfinite(Z).all())


def check_finite(Z: np.ndarray, rows: np.ndarray | int, features: Sequence[str], what: str = "X") -> None:
    """Raise ValueError naming the first row (global index) and feature holding NaN/inf.

    `rows` is the global row index of each row of Z, or the global index of Z's first row.
    One summing pass when all is well; the exact scan runs only on failure."""
    if all_finite(Z):
        return
    ok = np.isfinite(Z)
    r, c = (int(v[0]) for v in np.nonzero(~ok))
    row = int(rows[r]) if isinstance(rows, np.ndarray) else rows + r
    n_bad = int((~ok).any(axis=1).sum())
    raise ValueError(f"{what} has non-finite values (NaN/inf) in {n_bad} row(s) that reach a numeric step, first at row "
                     f"{row}, feature {features[c]!r} (value {Z[r, c]}); drop or impute them, or remove the feature first "
                     "(feature_select(nan))")


@dataclass(frozen=True)
class Groups:
    """Rows grouped by batch code: `order` sorts rows by code (stable); block g is
    `order[starts[g]:starts[g] + counts[g]]`."""

    order: np.ndarray
    counts: np.ndarray
    starts: np.ndarray

    @classmethod
    def of(cls, codes: np.ndarray, n_groups: int) -> Groups:
        order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes, minlength=n_groups)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        return cls(order, counts, starts)

    def check_min(self, minimum: int, labels: Sequence[str], step: str, what: str) -> None:
        few = np.flatnonzero(self.counts < minimum)
        if few.size:
            g = few[0]
            others = f" (and {few.size - 1} more batches)" if few.size > 1 else ""
            raise ValueError(f"{step}: batch {labels[g]!r} has {int(self.counts[g])} {what}; at least {minimum} "
                             f"are needed{others}")

    def slices(self) -> list[tuple[int, slice]]:
        return [(g, slice(int(s), int(s + c))) for g, (s, c) in enumerate(zip(self.starts, self.counts)) if c]


def batch_mean_std(Z: np.ndarray, groups: Groups, dtype: Any = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Per-group mean and population std (ddof 0, two-pass; float64 results) of the rows of Z; every
    group non-empty. dtype float64: on a float64 sorted copy; float32: float32 rows stay float32
    (`block_mean_std`: the same statistics, accumulated in float64)."""
    if np.dtype(dtype) != np.float64:
        return block_mean_std(Z[groups.order], groups.starts, groups.counts)
    Zs = as_float64(Z[groups.order])
    counts = groups.counts[:, None]
    mean = np.add.reduceat(Zs, groups.starts, axis=0) / counts
    for g, sl in groups.slices():  # contiguous blocks: no (rows x features) repeat of the means
        Zs[sl] -= mean[g]
    np.multiply(Zs, Zs, out=Zs)
    var = np.add.reduceat(Zs, groups.starts, axis=0) / counts
    return mean, np.sqrt(var)


_STAT_ROWS = 2048  # rows per float64 block of the statistics of float32 rows (stays in cache)


def block_mean_std(Z: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-block mean and population std, float64, of rows Z[starts[g]:starts[g] + counts[g]] (blocks
    in any order, every block non-empty; Z of any float dtype, not modified).

    Two passes over cache-sized float64 copies of the rows: float32 values convert exactly, so the
    result is the float64 two-pass statistic of the float32 numbers, without a float64 copy of Z."""
    G, d = len(counts), Z.shape[1]
    mean, var = np.empty((G, d)), np.empty((G, d))
    for g, (s, c) in enumerate(zip(np.asarray(starts).tolist(), np.asarray(counts).tolist())):
        acc = np.zeros(d)
        for lo in range(s, s + c, _STAT_ROWS):
            acc += Z[lo : min(lo + _STAT_ROWS, s + c)].sum(axis=0, dtype=np.float64)
        m = acc / c
        acc = np.zeros(d)
        for lo in range(s, s + c, _STAT_ROWS):
            D = np.subtract(Z[lo : min(lo + _STAT_ROWS, s + c)], m, dtype=np.float64)
            np.multiply(D, D, out=D)
            acc += D.sum(axis=0)
        mean[g], var[g] = m, acc / c
    return mean, np.sqrt(var)


def contiguous_groups(codes: np.ndarray, n_groups: int) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(order, starts, counts) of rows grouped by code: group g is rows order[starts[g]:starts[g] +
    counts[g]] (stable order), or with order None, when each group already is one contiguous run of
    rows (plates in order: no copy needed), rows starts[g]:starts[g] + counts[g]."""
    codes = np.asarray(codes)
    counts = np.bincount(codes, minlength=n_groups)
    if codes.size:
        first = np.concatenate([[0], np.flatnonzero(codes[1:] != codes[:-1]) + 1])
        if first.size == np.count_nonzero(counts):  # one run per present group
            starts = np.zeros(n_groups, dtype=np.int64)
            starts[codes[first]] = first
            return None, starts, counts
    order = np.argsort(codes, kind="stable")
    return order, np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64), counts


def constant_mask(mean: np.ndarray, std: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    """Features whose std is zero up to the rounding of a mean over n values (treated as constant:
    scale 1, as scikit-learn's StandardScaler does)."""
    n = np.asarray(n, dtype=np.float64)  # broadcastable against mean (e.g. counts[:, None])
    return std <= 4.0 * n * _EPS * np.maximum(np.abs(mean), np.finfo(np.float64).tiny)


def label_codes(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique labels, code of each row), as np.unique(labels, return_inverse=True). Rows usually
    come grouped by batch (plates in order): then only the first label of each run is sorted."""
    if n > 1:
        cut = np.flatnonzero(labels[1:] != labels[:-1]) + 1
        if cut.size < n // 16:
            starts = np.concatenate([[0], cut])
            uniq, inv = np.unique(labels[starts], return_inverse=True)
            return uniq, np.repeat(inv.reshape(-1), np.diff(np.append(starts, n)))
    uniq, inv = np.unique(labels, return_inverse=True)
    return uniq, inv.reshape(-1)


def empty_touched(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """np.empty(shape, dtype) with every memory page written once, in order: the first-touch page
    faults (and the zeroing of huge pages) happen in one cheap pass instead of inside the chunked
    GEMMs that fill the array, which measured ~1.5x slower on a 1M x 384 float32 output."""
    a = np.empty(shape, dtype=dtype)
    if a.size:
        a.reshape(-1)[:: max(1, 4096 // a.itemsize)] = 0
    return a


def rows_per_chunk(width: int) -> int:
    return max(1, CHUNK_ELEMS // max(1, width))


def runs(codes: np.ndarray, max_fraction: float = 1 / 32) -> list[tuple[int, slice]] | None:
    """(code, slice) for each run of equal consecutive codes, or None when there are more than
    `max_fraction` x len runs (rows not grouped by batch: gather instead)."""
    if codes.size == 0:
        return []
    cut = np.flatnonzero(codes[1:] != codes[:-1]) + 1
    if cut.size + 1 > max(1, int(codes.size * max_fraction)):
        return None
    edges = np.concatenate([[0], cut, [codes.size]])
    return [(int(codes[a]), slice(int(a), int(b))) for a, b in zip(edges[:-1], edges[1:])]


def grouped_rows(tidx: np.ndarray) -> list[tuple[int, slice | np.ndarray]]:
    """(table row, rows) for each table row present in `tidx`: slices when the rows come in runs
    (rows sorted by batch, as plates usually are), else index arrays from one stable sort."""
    r = runs(tidx)
    if r is not None:
        return r
    order = np.argsort(tidx, kind="stable")
    cut = np.flatnonzero(np.diff(tidx[order])) + 1
    return [(int(tidx[p[0]]), p) for p in np.split(order, cut)]


def batch_affine(Y: np.ndarray, tidx: np.ndarray, loc: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """In place: Y <- (Y - loc[tidx]) / scale[tidx], in Y's precision (the table rows are rounded to
    it); runs of one batch are broadcast instead of gathered. Same values as the gathered expression."""
    r = runs(tidx)
    dt = Y.dtype
    if r is None:
        Y -= loc[tidx].astype(dt, copy=False)
        Y /= scale[tidx].astype(dt, copy=False)
    else:
        lw, sw = loc.astype(dt, copy=False), scale.astype(dt, copy=False)
        if len(r) * 4 < loc.shape[0]:  # few batches in this chunk: round only their rows
            lw, sw = loc[[t for t, _ in r]].astype(dt, copy=False), scale[[t for t, _ in r]].astype(dt, copy=False)
            r = [(j, sl) for j, (_, sl) in enumerate(r)]
        for t, sl in r:
            Y[sl] -= lw[t]
            Y[sl] /= sw[t]
    return Y
