"""NSC / NSCB (Ljosa 2013; Ando 2017): hand-checked cases and an independent brute-force reference."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from bioembed_assets.evaluate.knn import nsc, nscb

SCHEMA = ["perturbation", "compound", "moa", "plate", "batch", "control_type"]


def _wells(spec: list[tuple[str, str, str | None, list[float], str, str]]) -> tuple[pl.DataFrame, np.ndarray]:
    """Rows (treatment, compound, moa, profile, plate, batch), two identical wells each, + DMSO wells."""
    rows, X = [], []
    for t, c, m, v, plate, batch in spec:
        for _ in range(2):
            rows.append((t, c, m, plate, batch, "treatment"))
            X.append(v)
    for plate, batch in (("P1", "W1"), ("P2", "W2")):
        rows.append(("DMSO", "DMSO", "ctrl-moa", plate, batch, "negative"))  # controls never take part
        X.append([1.0, 0.0, 0.0])
    return pl.DataFrame(rows, schema=SCHEMA, orient="row"), np.asarray(X, dtype=np.float32)


# A@1 and A@10 are two doses of compound A: NSC never pairs them
SPEC = [
    ("A@1", "A", "x", [1.0, 0.1, 0.0], "P1", "W1"),
    ("A@10", "A", "x", [1.0, 0.12, 0.0], "P1", "W1"),
    ("B@1", "B", "x", [0.8, 0.3, 0.0], "P2", "W2"),
    ("C@1", "C", "y", [0.0, 1.0, 0.1], "P1", "W1"),
    ("D@1", "D", "y|z", [0.1, 0.9, 0.3], "P2", "W2"),
    ("E@1", "E", "w", [0.95, 0.2, 0.0], "P1", "W1"),  # the only w compound: unmatchable
    ("G@1", "G", None, [0.0, 0.0, -1.0], "P1", "W1"),  # no MoA: left out
]


def test_nsc_excludes_every_dose_of_the_same_compound() -> None:
    meta, X = _wells(SPEC)
    res = nsc(meta, X)
    t = res.table
    assert t["treatment"].to_list() == ["A@1", "A@10", "B@1", "C@1", "D@1", "E@1"]
    # A@1's nearest profile is A@10 (same compound, excluded), then E (w): a miss
    assert t["neighbour"].to_list() == ["E@1", "E@1", "E@1", "D@1", "C@1", "A@10"]
    assert t["hit"].to_list() == [False, False, False, True, True, False]
    assert t["matchable"].to_list() == [True, True, True, True, True, False]
    assert res.accuracy == pytest.approx(2 / 5) and res.n_counted == 5
    assert nsc(meta, X, only_matchable=False).accuracy == pytest.approx(2 / 6)
    cos = np.dot(SPEC[0][3], SPEC[5][3]) / np.linalg.norm(SPEC[0][3]) / np.linalg.norm(SPEC[5][3])
    assert t["similarity"][0] == pytest.approx(cos, rel=1e-6)
    # without a compound column every treatment is its own compound: A@1 -> A@10 is then a hit
    loose = nsc(meta.drop("compound"), X)
    assert loose.table["neighbour"][0] == "A@10" and loose.table["hit"][0]


def test_nscb_uses_the_batch_column_not_the_plate() -> None:
    spec = [(t, c, m, v, p, "W1") for t, c, m, v, p, _ in SPEC]  # two plates, one batch
    meta, X = _wells(spec)
    assert nscb(meta, X).n_counted == 0  # one batch: no neighbour from another batch
    assert np.isnan(nscb(meta, X).accuracy)
    by_plate = nscb(meta.drop("batch"), X)  # no batch column: the plate stands in
    t = by_plate.table
    assert t["batch"].to_list() == ["P1", "P1", "P2", "P1", "P2", "P1"]
    # A@1 (P1): other-batch treatments are B and D on P2 -> B (x) is a hit
    assert t["neighbour"].to_list() == ["B@1", "B@1", "E@1", "D@1", "C@1", "B@1"]
    assert t["hit"].to_list() == [True, True, False, True, True, False]
    # B (x, P2): A is x on P1 -> matchable; E (w) never
    assert t["matchable"].to_list() == [True, True, True, True, True, False]
    assert by_plate.accuracy == pytest.approx(4 / 5)


def test_treatments_are_aggregated_across_plates_mean_or_median() -> None:
    rows = [("A@1", "A", "x", "P1"), ("A@1", "A", "x", "P2"), ("A@1", "A", "x", "P3"),
            ("B@1", "B", "x", "P1"), ("C@1", "C", "y", "P2")]  # fmt: skip
    X = np.array([[1.0, 0.0], [1.0, 0.0], [-50.0, 100.0], [0.9, 0.1], [-0.5, 1.0]])
    meta = pl.DataFrame([(*r, "treatment") for r in rows], schema=["perturbation", "compound", "moa", "plate",
                                                                    "control_type"], orient="row")
    # mean of A = (-16, 33.3): nearest is C (y, a miss); median of A = (1, 0): nearest is B (x, a hit)
    assert nsc(meta, X).table["neighbour"][0] == "C@1"
    assert nsc(meta, X, aggregate="median").table["neighbour"][0] == "B@1"


def _brute_force(meta: pl.DataFrame, X: np.ndarray, batch: bool, aggregate: str) -> tuple[list, np.ndarray, np.ndarray]:
    """Neighbour names, hits and matchable flags by loops over treatments, or treatment x batch
    profiles for NSCB (no shared code)."""
    rows = meta.rows(named=True)
    def key(r: dict) -> tuple:
        return (r["perturbation"], r["batch"]) if batch else (r["perturbation"],)

    keys = sorted({key(r) for r in rows if r["control_type"] != "negative" and r["moa"]})
    treatments = [k[0] for k in keys]
    prof, comp, moas, batches = [], [], [], []
    for k in keys:
        idx = [i for i, r in enumerate(rows) if key(r) == k]
        prof.append(np.mean(X[idx], axis=0) if aggregate == "mean" else np.median(X[idx], axis=0))
        comp.append(rows[idx[0]]["compound"])
        moas.append(set(rows[idx[0]]["moa"].split("|")))
        batches.append(k[-1])
    names, hits, match = [], [], []
    for a in range(len(keys)):
        best, best_sim, can = None, -np.inf, False
        for b in range(len(keys)):
            if comp[a] == comp[b] or (batch and batches[a] == batches[b]):
                continue
            can |= bool(moas[a] & moas[b])
            s = float(prof[a] @ prof[b] / np.linalg.norm(prof[a]) / np.linalg.norm(prof[b]))
            if s > best_sim:
                best, best_sim = b, s
        names.append(None if best is None else treatments[best])
        hits.append(best is not None and bool(moas[a] & moas[best]))
        match.append(can)
    return names, np.array(hits), np.array(match)


@pytest.mark.parametrize("aggregate", ["mean", "median"])
def test_nsc_and_nscb_match_brute_force_on_random_screens(aggregate: str) -> None:
    rng = np.random.default_rng(0)
    moa_names = [f"m{k}" for k in range(6)]
    rows, X = [], []
    for c in range(30):
        moa = "|".join(sorted(set(rng.choice(moa_names, rng.integers(1, 3)))))
        base = rng.normal(size=10)
        for dose in rng.choice([0.1, 1.0, 10.0], rng.integers(1, 4), replace=False):
            for _ in range(3):
                plate = int(rng.integers(0, 6))
                rows.append((f"c{c}@{dose}", f"c{c}", moa, f"P{plate}", f"W{plate // 2}", "treatment"))
                X.append(base * dose ** 0.3 + rng.normal(0, 0.7, 10))
    for plate in range(6):
        rows.append(("DMSO", "DMSO", None, f"P{plate}", f"W{plate // 2}", "negative"))
        X.append(rng.normal(size=10))
    meta = pl.DataFrame(rows, schema=SCHEMA, orient="row")
    X = np.asarray(X)
    for batch in (False, True):
        res = (nscb if batch else nsc)(meta, X, aggregate=aggregate)
        names, hits, match = _brute_force(meta, X, batch, aggregate)
        assert res.table["neighbour"].to_list() == names
        np.testing.assert_array_equal(res.table["hit"].to_numpy(), hits)
        np.testing.assert_array_equal(res.table["matchable"].to_numpy(), match)
        assert res.accuracy == pytest.approx(hits[match].mean())
        assert res.n_counted == match.sum() > 10


def test_errors() -> None:
    meta, X = _wells(SPEC)
    with pytest.raises(ValueError, match="'moa2' not in metadata"):
        nsc(meta, X, moa_col="moa2")
    bad = meta.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("q")).otherwise("moa").alias("moa"))
    with pytest.raises(ValueError, match="'A@1' has several moa values"):
        nsc(bad, X)
    bad = meta.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("Z")).otherwise("compound").alias("compound"))
    with pytest.raises(ValueError, match="'A@1' has several compound values"):
        nsc(bad, X)
    with pytest.raises(ValueError, match="one per meta row"):
        nsc(meta, X[:-1])


def test_synthetic_moa_structure_is_found_and_shuffling_destroys_it() -> None:
    from bioembed_assets.sources.synthetic_profiles import SyntheticProfilesConfig, generate_profiles

    meta, X = generate_profiles(SyntheticProfilesConfig(n_rows=3000, n_moas=15))
    keep = (meta["active"] | (meta["control_type"] == "negative")).to_numpy()
    act, Xa = meta.filter(pl.Series(keep)), X[keep]
    res = nsc(act, Xa)
    perts = act.filter(pl.col("moa").is_not_null())["perturbation"].unique().sort()
    shuffled = dict(zip(perts, np.random.default_rng(0).permutation(
        act.group_by("perturbation").agg(pl.col("moa").first()).sort("perturbation").filter(
            pl.col("moa").is_not_null())["moa"].to_list())))
    res_s = nsc(act.with_columns(pl.col("perturbation").replace_strict(shuffled, default=None).alias("moa")), Xa)
    assert res.accuracy > 0.6 > 0.2 > res_s.accuracy  # chance ~ 1/15
