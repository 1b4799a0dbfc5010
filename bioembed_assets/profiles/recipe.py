"""Normalization recipes: an ordered list of steps declared as one string, fitted and stored together.

Grammar (whitespace is ignored; names are case-insensitive, feature names are not)::

    recipe := step ("|" step)*
    step   := NAME [ "(" [arg ("," arg)*] ")" ]
    arg    := WORD                      # feature_select operations: nan, variance, correlation, ...
            | NAME "=" value            # an option
    value  := WORD | "[" [WORD ("," WORD)*] "]"   # WORD: letters, digits, _ . + - @ : / or '...'

e.g. ``feature_select(nan,variance,correlation)|mad_robustize(on=controls,by=plate)|sphere(method=zca-cor,reg=auto)``.
Per-batch steps keep their statistics per plate (`by=plate`) or per batch (`by=batch`: the batch
column, e.g. the week; the plate where no batch is given).
A preset name (`card`, `tvn`, `jump`, `jump_harmony`, `standardize`, `mad`) is a whole recipe and may
also stand for its steps inside a step string (`jump_harmony`: the JUMP compound recipe's
var → mad → int → featselect → harmony). `Recipe.spec` is the canonical form: every step with all of its
relevant options written out in a fixed order, so equal recipes have equal specs; it is what is
recorded with normalized rows.

Fitting runs the steps in order; step i is fitted on its fit rows (controls or all rows) after
steps 0..i-1, and all row data passes through the steps in chunks of a few MiB (float32 rows are
computed in float32 by the PCA-based steps, with float64 statistics; float32 output). A
`sphere(reg=auto)` step is tuned on a per-batch half of the controls with the preceding steps
refitted on that half, and scored against the other half (see `sphering.py`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from bioembed_assets.profiles.harmony import Harmony
from bioembed_assets.profiles.rank_int import InverseNormal
from bioembed_assets.profiles.scaling import MadRobustize, Standardize
from bioembed_assets.profiles.selection import FeatureSelect
from bioembed_assets.profiles.sphering import Sphere, tuning_split
from bioembed_assets.profiles.steps import FitData, Step, check_finite, empty_touched, label_codes, rows_per_chunk
from bioembed_assets.profiles.tvn import TVN, PCACenterScaleStep
from bioembed_assets.store.atomic import write_arrays_and_json

STEPS: dict[str, type[Step]] = {cls.name: cls for cls in (FeatureSelect, Standardize, MadRobustize, PCACenterScaleStep, TVN,
                                                            Sphere, InverseNormal, Harmony)}
PRESETS: dict[str, str] = {
    "card": "pca_centerscale",
    "tvn": "tvn",
    "jump": "feature_select(nan,variant,variance,correlation,blocklist)|mad_robustize(on=controls,by=plate)"
            "|sphere(method=zca-cor,on=controls,reg=auto)",
    "standardize": "standardize(on=controls,by=plate)",
    "mad": "mad_robustize(on=controls,by=plate)",
    "jump_harmony": "feature_select(nan,variant)|mad_robustize(on=controls,by=plate)|inverse_normal"
                    "|feature_select(correlation,blocklist)|harmony(by=batch)",
}
_JSON, _NPZ, _FORMAT = "recipe.json", "arrays.npz", 1
_TOKEN = re.compile(r"\s*(?:(?P<word>[A-Za-z0-9_.+\-@:/]+)|'(?P<q1>[^']*)'|\"(?P<q2>[^\"]*)\"|(?P<punct>[()\[\],=|]))")


# ------------------------------------------------------------------------------------------------- parsing


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """(kind, value, position) with kind 'word' or the punctuation character."""
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            start = len(text[pos:]) - len(text[pos:].lstrip()) + pos
            raise _syntax(text, start, f"unexpected character {text[start]!r}")
        if m.group("punct"):
            out.append((m.group("punct"), m.group("punct"), m.start("punct")))
        else:
            word = next(g for g in (m.group("word"), m.group("q1"), m.group("q2")) if g is not None)
            out.append(("word", word, m.start()))
        pos = m.end()
    return out


def _syntax(text: str, pos: int, msg: str) -> ValueError:
    return ValueError(f"recipe syntax error at character {pos}: {msg}\n  {text}\n  {' ' * pos}^")


def _known() -> str:
    return f"known steps: {sorted(STEPS)}; presets: {sorted(PRESETS)}"


def parse_steps(text: str) -> list[Step]:
    """Steps of a recipe string (see the module docstring for the grammar)."""
    toks = _tokens(text)
    if not toks:
        raise ValueError(f"empty recipe; {_known()}")
    steps: list[Step] = []
    i = 0

    def expect(kind: str) -> tuple[str, str, int]:
        nonlocal i
        if i >= len(toks):
            raise _syntax(text, len(text), f"expected {kind!r}, got the end of the recipe")
        tok = toks[i]
        if tok[0] != kind:
            raise _syntax(text, tok[2], f"expected {'a name' if kind == 'word' else repr(kind)}, got {tok[1]!r}")
        i += 1
        return tok

    while True:
        _, name, at = expect("word")
        key = name.lower()
        args: list[str] = []
        kwargs: dict[str, str | list[str]] = {}
        has_parens = i < len(toks) and toks[i][0] == "("
        if has_parens:
            i += 1
            while toks[i:] and toks[i][0] != ")":
                _, word, wat = expect("word")
                if i < len(toks) and toks[i][0] == "=":
                    i += 1
                    if i < len(toks) and toks[i][0] == "[":
                        i += 1
                        items: list[str] = []
                        while toks[i:] and toks[i][0] != "]":
                            items.append(expect("word")[1])
                            if toks[i:] and toks[i][0] == ",":
                                i += 1
                        expect("]")
                        value: str | list[str] = items
                    else:
                        value = expect("word")[1]
                    opt = word.lower()
                    if opt in kwargs:
                        raise _syntax(text, wat, f"option {opt!r} given twice")
                    kwargs[opt] = value
                elif kwargs:
                    raise _syntax(text, wat, f"bare word {word!r} after name=value options")
                else:
                    args.append(word)
                if toks[i:] and toks[i][0] == ",":
                    i += 1
            expect(")")
        if key in STEPS:
            steps.append(_build(STEPS[key], args, kwargs, text, at))
        elif key in PRESETS:
            if has_parens:
                raise _syntax(text, at, f"preset {key!r} takes no options; write its steps instead: {PRESETS[key]}")
            steps.extend(parse_steps(PRESETS[key]))
        else:
            raise _syntax(text, at, f"unknown step {name!r}; {_known()}")
        if i == len(toks):
            return steps
        expect("|")


def _build(cls: type[Step], args: list[str], kwargs: dict[str, str | list[str]], text: str, at: int) -> Step:
    try:
        if args:
            if cls.positional is None:
                raise ValueError(f"step {cls.name!r} takes only name=value options, got bare {args}; options: "
                                 f"{[o.name for o in cls.options]}")
            kwargs = {cls.positional.name: args, **kwargs}
        step = cls(**kwargs)
        step.check_given(set(kwargs))
    except ValueError as e:
        raise ValueError(f"{e}\n  in: {text}\n      {' ' * at}^") from None
    return step


# ------------------------------------------------------------------------------------------------- running


def _check_matrix(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or not np.issubdtype(X.dtype, np.number):
        raise ValueError(f"X must be a numeric 2-D (rows x features) array, got {X.dtype} {X.shape}")
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    return X


def _per_row(values: Any, n: int, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{what} must have one entry per row ({n}), got shape {arr.shape}")
    return arr


def _batch_codes(batches: Any, n: int, what: str = "batches") -> tuple[list[str], np.ndarray]:
    arr = _per_row(batches, n, what)
    labels, codes = label_codes(arr.astype(str), n)
    return labels.tolist(), codes.astype(np.int64, copy=False)


Groupings = tuple[dict[str, list[str]], dict[str, np.ndarray]]
"""(labels, row codes) of the call's groupings, "plate" and "batch" (see `Step.grouping`)."""


def _groupings(plates: Any, batches: Any | None, n: int) -> Groupings:
    """Plate and batch labels/codes of a call; without batches every plate is its own batch."""
    p_labels, p_codes = _batch_codes(plates, n, "plates")
    if batches is None:
        return {"plate": p_labels, "batch": p_labels}, {"plate": p_codes, "batch": p_codes}
    b_labels, b_codes = _batch_codes(batches, n, "batches")
    return {"plate": p_labels, "batch": b_labels}, {"plate": p_codes, "batch": b_codes}


Plan = list[tuple[Step, np.ndarray, dict[str, np.ndarray]]]
"""Steps of one fit/transform call: (step, table row of each call-level code of the step's grouping,
per-batch tables)."""


def _run(plan: Plan, X: np.ndarray, rows: np.ndarray | None, codes: dict[str, np.ndarray], check_at: int,
         check_names: list[str], out_dtype: type | None = None) -> np.ndarray:
    """Rows `rows` (None: all) of X through the planned steps, chunk by chunk, stacked; before step
    `check_at` (== len(plan): after the last) each chunk is checked for NaN/inf. With an empty plan
    X itself (or X[rows]) is returned, checked when `check_at` is 0."""
    n = X.shape[0] if rows is None else rows.size
    step = rows_per_chunk(max([X.shape[1]] + [s.width() for s, _, _ in plan]))
    if not plan and out_dtype is None:
        Z = X if rows is None else X[rows]  # one gather, then checked chunk by chunk
        if check_at == 0:
            for lo in range(0, n, step):
                check_finite(Z[lo : lo + step], lo if rows is None else rows[lo : lo + step], check_names)
        return Z
    out: np.ndarray | None = None
    last = len(plan) - 1
    into = bool(plan) and getattr(plan[-1][0], "writes_out", False)  # the last step can write into `out`
    for lo in range(0, max(n, 1), step):
        hi = min(lo + step, n)
        idx = slice(lo, hi) if rows is None else rows[lo:hi]
        Z = X[idx]
        c = {g: v[idx] for g, v in codes.items()}
        ids: np.ndarray | int = lo if rows is None else rows[lo:hi]
        dest = None if out is None else out[lo:hi]
        for j, (s, lut, tables) in enumerate(plan):
            if j == check_at:
                check_finite(Z, ids, check_names)
            if j == last and into and dest is not None:
                Z = s.apply(Z, lut[c[s.grouping]], tables, out=dest)
            else:
                Z = s.apply(Z, lut[c[s.grouping]], tables)
        if len(plan) == check_at:
            check_finite(Z, ids, check_names)
        if out is None:
            out = empty_touched((n, Z.shape[1]), out_dtype or Z.dtype)
            out[lo:hi] = Z
        elif Z is not dest:
            out[lo:hi] = Z
    assert out is not None
    return out


class Recipe:
    """An ordered list of fitted normalization steps (see the module docstring)."""

    def __init__(self, steps: list[Step], name: str | None = None) -> None:
        if not steps:
            raise ValueError("a recipe needs at least one step")
        self.steps = steps
        self._name = name
        self.in_features_: list[str] = []
        self.fit_info_: dict[str, Any] = {}

    @classmethod
    def parse(cls, text: str) -> Recipe:
        """A preset name (`card`, `tvn`, `jump`, `standardize`, `mad`) or a step string."""
        key = text.strip().lower()
        if key in PRESETS:
            return cls(parse_steps(PRESETS[key]), name=key)
        return cls(parse_steps(text))

    @property
    def spec(self) -> str:
        """Canonical step string (stable order and format)."""
        return "|".join(s.spec for s in self.steps)

    @property
    def name(self) -> str:
        """The preset name, or the canonical spec."""
        return self._name or self.spec

    @property
    def fitted(self) -> bool:
        return all(s.fitted for s in self.steps)

    @property
    def output_features(self) -> list[str]:
        """Feature names of the transformed rows (after selection / projection)."""
        self._require_fitted()
        names = self.in_features_
        for s in self.steps:
            names = s.output_features(names)
        return names

    def __repr__(self) -> str:
        return f"Recipe({self.name!r}: {self.spec})" if self._name else f"Recipe({self.spec})"

    def _first_numeric(self) -> int:
        return next((j for j, s in enumerate(self.steps) if s.numeric), len(self.steps))

    def _features_before(self, j: int) -> list[str]:
        names = self.in_features_
        for s in self.steps[:j]:
            names = s.output_features(names)
        return names

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError(f"recipe {self.name!r} is not fitted")

    # ---------------------------------------------------------------------------------------- fit

    def fit(self, X: np.ndarray, plates: np.ndarray, is_control: np.ndarray, feature_names: list[str] | None = None,
            perturbations: np.ndarray | None = None, batches: np.ndarray | None = None) -> Recipe:
        """Fit every step in order. `plates` and `batches` (e.g. weeks; default: the plates) label
        each row; per-batch steps keep tables per plate or per batch (`Step.grouping`). `is_control`
        flags the negative-control rows; `perturbations` (one label per row) is needed only by
        `sphere(reg=auto)`. Returns self."""
        X = _check_matrix(X)
        n, d = X.shape
        labels, codes = _groupings(plates, batches, n)
        ctrl = _per_row(is_control, n, "is_control").astype(bool)
        names = [f"feature_{j}" for j in range(d)] if feature_names is None else [str(f) for f in feature_names]
        if len(names) != d:
            raise ValueError(f"feature_names has {len(names)} names for {d} features")
        if len(set(names)) != d:
            dup = sorted({f for f in names if names.count(f) > 1})[:5]
            raise ValueError(f"feature_names must be unique; repeated: {dup}")
        pert = None if perturbations is None else _per_row(perturbations, n, "perturbations").astype(str)
        self.steps = [s.fresh() for s in self.steps]
        self.in_features_ = names
        self._fit_steps(X, codes, labels, ctrl, pert)
        self.fit_info_ = {"n_rows": n, "n_controls": int(ctrl.sum()), "n_plates": len(labels["plate"]),
                          "n_batches": len(labels["batch"])}
        return self

    def _fit_steps(self, X: np.ndarray, codes: dict[str, np.ndarray], labels: dict[str, list[str]], ctrl: np.ndarray,
                   pert: np.ndarray | None, upto: int | None = None) -> None:
        """Fit steps[:upto] (all by default) in order, each on its fit rows after the previous ones."""
        for i, step in enumerate(self.steps[:upto]):
            if step.fitted:  # reused from the full fit (see _tune)
                continue
            if getattr(step, "needs_tuning", False):
                self._tune(i, X, codes, labels, ctrl, pert)
            rows = step.fit_rows(ctrl)
            idx = np.arange(X.shape[0]) if rows is None else rows
            Z = self._through_fitted(i, X, rows, codes, labels)
            g = step.grouping
            step.fit(FitData(Z, codes[g][idx], labels[g], ctrl[idx], self._features_before(i), idx,
                             None if pert is None else pert[idx], owned=not np.may_share_memory(Z, X)))

    def _through_fitted(self, i: int, X: np.ndarray, rows: np.ndarray | None, codes: dict[str, np.ndarray],
                        labels: dict[str, list[str]]) -> np.ndarray:
        """Rows of X through steps[:i], fitted in the current fit call (their tables cover every
        label of the call, in order), checked for NaN/inf before the first numeric step."""
        plan = [(s, np.arange(len(labels[s.grouping])) if s.per_batch else np.zeros(len(labels[s.grouping]), dtype=np.int64),
                 s.stored_tables()) for s in self.steps[:i]]
        first = self._first_numeric()
        return _run(plan, X, rows, codes, first, self._features_before(min(first, i)))

    def _tune(self, i: int, X: np.ndarray, codes: dict[str, np.ndarray], labels: dict[str, list[str]], ctrl: np.ndarray,
              pert: np.ndarray | None) -> None:
        """Tune step i on half of each plate's controls (steps[:i] refitted on that half), scoring
        against the other half; half of each batch's when no step up to i keeps per-plate tables
        (e.g. `mad_robustize(by=batch)|sphere(by=batch,reg=auto)` on 6 controls per plate)."""
        step = self.steps[i]
        g = "plate" if any(s.per_batch and s.grouping == "plate" for s in self.steps[: i + 1]) else "batch"
        fit_ctrl, eval_rows = tuning_split(codes[g], len(labels[g]), labels[g], ctrl, pert, step.opts["seed"], step.name)
        assert pert is not None
        # steps fitted on all rows (none before them on controls) do not depend on the split: reuse them
        shared = 0
        while shared < i and self.steps[shared].opts.get("on") == "all" and not getattr(self.steps[shared], "needs_tuning", 0):
            shared += 1
        half = Recipe(self.steps[:shared] + [s.fresh() for s in self.steps[shared:i]] + [step])
        half.in_features_ = self.in_features_
        half._fit_steps(X, codes, labels, fit_ctrl, pert, upto=i)
        train_rows = step.fit_rows(fit_ctrl)
        if train_rows is None:  # on=all: every row but the held-out controls
            train_rows = np.flatnonzero(~(ctrl & ~fit_ctrl))
        names = half._features_before(i)
        data = []
        g = step.grouping
        for rows in (train_rows, eval_rows):
            Z = half._through_fitted(i, X, rows, codes, labels)
            data.append(FitData(Z, codes[g][rows], labels[g], ctrl[rows], names, rows, pert[rows]))
        step.tune(*data)

    # ---------------------------------------------------------------------------------------- transform

    def transform(self, X: np.ndarray, plates: np.ndarray, is_control: np.ndarray | None = None,
                  batches: np.ndarray | None = None) -> np.ndarray:
        """Normalize every row (float32 output). Plates (batches) not seen in `fit` get per-plate
        (per-batch) statistics from their own fit rows (`is_control` is required then)."""
        self._require_fitted()
        X = _check_matrix(X)
        n, d = X.shape
        if d != len(self.in_features_):
            raise ValueError(f"X has {d} features, the recipe was fitted on {len(self.in_features_)}")
        labels, codes = _groupings(plates, batches, n)
        ctrl = None if is_control is None else _per_row(is_control, n, "is_control").astype(bool)
        first_numeric = self._first_numeric()
        check_names = self._features_before(first_numeric)
        plan: list[tuple[Step, np.ndarray, dict[str, np.ndarray]]] = []
        for step in self.steps:
            names = labels[step.grouping]
            if not step.per_batch:
                plan.append((step, np.zeros(len(names), dtype=np.int64), {}))
                continue
            known = {b: j for j, b in enumerate(step.batches_)}
            lut = np.array([known.get(b, -1) for b in names], dtype=np.int64)
            tables = step.stored_tables()
            if (lut < 0).any():
                lut, tables = self._extend(step, plan, lut, tables, labels, codes, X, ctrl, first_numeric, check_names)
            plan.append((step, lut, tables))
        return _run(plan, X, None, codes, first_numeric, check_names, out_dtype=np.float32)

    def _extend(self, step: Step, plan: list[tuple[Step, np.ndarray, dict[str, np.ndarray]]], lut: np.ndarray,
                tables: dict[str, np.ndarray], all_labels: dict[str, list[str]], all_codes: dict[str, np.ndarray],
                X: np.ndarray, ctrl: np.ndarray | None, first_numeric: int,
                check_names: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Per-batch tables for plates/batches first seen here, fitted on their own fit rows."""
        labels, codes = all_labels[step.grouping], all_codes[step.grouping]
        new = np.flatnonzero(lut < 0)
        if ctrl is None:
            raise ValueError(f"{step.name}: {step.grouping} {labels[new[0]]!r} was not seen in fit; pass is_control to "
                             "fit its statistics on its own control rows")
        remap = np.full(len(labels), -1)
        remap[new] = np.arange(new.size)
        member = remap[codes] >= 0
        fit_rows = step.fit_rows(ctrl)
        if fit_rows is not None:
            member &= np.isin(np.arange(codes.size), fit_rows, assume_unique=True)
        rows = np.flatnonzero(member)
        Z = _run(plan, X, rows, all_codes, first_numeric, check_names)
        new_labels = [labels[j] for j in new]
        extra = step.batch_tables(FitData(Z, remap[codes[rows]], new_labels, ctrl[rows],
                                          self._features_before(len(plan)), rows))
        base = len(step.batches_)
        lut = lut.copy()
        lut[new] = base + np.arange(new.size)
        return lut, {k: np.concatenate([tables[k], extra[k]]) for k in tables}

    def fit_transform(self, X: np.ndarray, plates: np.ndarray, is_control: np.ndarray,
                      feature_names: list[str] | None = None, perturbations: np.ndarray | None = None,
                      batches: np.ndarray | None = None) -> np.ndarray:
        return self.fit(X, plates, is_control, feature_names, perturbations, batches).transform(
            X, plates, is_control, batches)

    # ---------------------------------------------------------------------------------------- persistence

    def save(self, folder: str | Path) -> Path:
        """Write the fitted recipe to `folder` (`recipe.json` + `arrays.npz`), atomically."""
        self._require_fitted()
        arrays: dict[str, np.ndarray] = {}
        steps = []
        for i, s in enumerate(self.steps):
            params, arrs = s.state()
            steps.append({"spec": s.spec, "params": params})
            arrays |= {f"s{i}.{k}": np.asarray(v) for k, v in arrs.items()}
        info = {"format": _FORMAT, "name": self.name, "preset": self._name, "spec": self.spec,
                "in_features": self.in_features_, "output_features": self.output_features, "fit": self.fit_info_,
                "steps": steps}
        return write_arrays_and_json(folder, _NPZ, arrays, _JSON, info)

    @classmethod
    def load(cls, folder: str | Path) -> Recipe:
        """Read a folder written by `save` (no pickles)."""
        folder = Path(folder)
        info = json.loads((folder / _JSON).read_text())
        if info.get("format") != _FORMAT:
            raise ValueError(f"{folder}: unknown recipe format {info.get('format')!r} (expected {_FORMAT})")
        steps = parse_steps(info["spec"])
        with np.load(folder / _NPZ, allow_pickle=False) as z:
            for i, (s, saved) in enumerate(zip(steps, info["steps"])):
                prefix = f"s{i}."
                s.load_state(saved["params"], {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)})
        recipe = cls(steps, name=info.get("preset"))
        recipe.in_features_ = list(info["in_features"])
        recipe.fit_info_ = dict(info.get("fit", {}))
        if recipe.spec != info["spec"]:
            raise ValueError(f"{folder}: stored spec {info['spec']!r} re-parses as {recipe.spec!r}")
        return recipe
