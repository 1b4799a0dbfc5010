"""NSC / NSCB nearest-neighbour MoA accuracy: hand-checked cases and a brute-force reference."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from bioembed_assets.evaluate.knn import nsc, nscb


def _wells(
    profiles: dict[str, list[float]], moa: dict[str, str | None], plates: dict[str, list[str]]
) -> tuple[pl.DataFrame, np.ndarray]:
    """Two identical wells per compound and plate (so the median is the profile) + 2 DMSO wells."""
    rows, X = [], []
    for c, v in profiles.items():
        for p in plates[c]:
            for _ in range(2):
                rows.append((c, moa[c], p, "treatment"))
                X.append(v)
    for p in ("P1", "P2"):
        rows.append(("DMSO", "ctrl-moa", p, "negative"))  # controls never take part
        X.append([1.0, 0.0, 0.0])
    meta = pl.DataFrame(rows, schema=["perturbation", "moa", "plate", "control_type"], orient="row")
    return meta, np.asarray(X, dtype=np.float32)


PROFILES = {
    "A": [1.0, 0.1, 0.0], "B": [0.9, 0.2, 0.0],      # moa x, nearest to each other
    "C": [0.0, 1.0, 0.1], "D": [0.1, 0.9, 0.3],      # C (y) nearest D (y|z)
    "E": [0.0, 0.3, 1.0],                            # z: nearest D (y|z) -> shares z
    "F": [1.0, 0.08, 0.01],                          # w: only compound -> unmatchable; nearest A
    "G": [0.0, 0.0, -1.0],                           # no MoA -> left out
}  # fmt: skip
MOA = {"A": "x", "B": "x", "C": "y", "D": "y|z", "E": "z", "F": "w", "G": None}


def test_nsc_hand_checked() -> None:
    meta, X = _wells(PROFILES, MOA, {c: ["P1"] for c in PROFILES})
    res = nsc(meta, X)
    t = res.table
    assert t["perturbation"].to_list() == ["A", "B", "C", "D", "E", "F"]
    assert t["neighbour"].to_list() == ["F", "A", "D", "C", "D", "A"]
    assert t["hit"].to_list() == [False, True, True, True, True, False]
    assert t["matchable"].to_list() == [True, True, True, True, True, False]
    assert res.accuracy == pytest.approx(4 / 5)  # F (single-compound MoA) is not counted
    assert nsc(meta, X, only_matchable=False).accuracy == pytest.approx(4 / 6)
    cos_af = np.dot(PROFILES["A"], PROFILES["F"]) / np.linalg.norm(PROFILES["A"]) / np.linalg.norm(PROFILES["F"])
    assert t["similarity"][0] == pytest.approx(cos_af, rel=1e-6)


def test_nscb_needs_another_batch() -> None:
    plates = {"A": ["P1"], "B": ["P1"], "C": ["P1", "P2"], "D": ["P2"], "E": ["P2"], "F": ["P2"], "G": ["P1"]}
    meta, X = _wells(PROFILES, MOA, plates)
    res = nscb(meta, X, batch_col="plate")
    t = res.table
    assert t.select("perturbation", "plate").rows() == [("A", "P1"), ("B", "P1"), ("C", "P1"), ("C", "P2"),
                                                        ("D", "P2"), ("E", "P2"), ("F", "P2")]  # fmt: skip
    # A (P1): B is on the same plate, so its nearest other-batch compound is F (w) -> miss;
    # x has no compound on P2, so A and B are unmatchable
    assert t["neighbour"].to_list() == ["F", "F", "D", "B", "C", "C", "A"]
    assert t["neighbour_plate"].to_list() == ["P2", "P2", "P2", "P1", "P1", "P1", "P1"]
    assert t["hit"].to_list() == [False, False, True, False, True, False, False]
    # (C, P2): no y compound on P1 other than C itself; (E, P2): no z on P1
    assert t["matchable"].to_list() == [False, False, True, False, True, False, False]
    assert res.accuracy == 1.0
    assert nscb(meta, X, batch_col="plate", only_matchable=False).accuracy == pytest.approx(2 / 7)


def test_nsc_matches_brute_force_on_random_data() -> None:
    rng = np.random.default_rng(0)
    n_comp, d = 60, 12
    moas = [f"m{k}" for k in range(8)]
    comp_moa = {f"c{i:02d}": "|".join(sorted(set(rng.choice(moas, rng.integers(1, 3))))) for i in range(n_comp)}
    rows, X = [], []
    for c, m in comp_moa.items():
        base = rng.normal(size=d)
        for p in rng.choice(["P1", "P2", "P3"], 3):
            rows.append((c, m, p, "treatment"))
            X.append(base + rng.normal(0, 0.5, d))
    meta = pl.DataFrame(rows, schema=["perturbation", "moa", "plate", "control_type"], orient="row")
    X = np.asarray(X)
    for batch in (None, "plate"):
        res = nsc(meta, X) if batch is None else nscb(meta, X, batch_col=batch)
        by = ["perturbation"] if batch is None else ["perturbation", "plate"]
        keys = sorted(set(meta.select(by).rows()))
        cons = np.stack([np.median(X[[i for i, r in enumerate(meta.select(by).rows()) if r == k]], axis=0) for k in keys])
        unit = cons / np.linalg.norm(cons, axis=1, keepdims=True)
        S = unit @ unit.T
        for a, ka in enumerate(keys):
            for b, kb in enumerate(keys):
                if ka[0] == kb[0] or (batch is not None and ka[1] == kb[1]):
                    S[a, b] = -np.inf
        nb = np.argmax(S, axis=1)
        assert res.table["neighbour"].to_list() == [keys[j][0] for j in nb]
        labels = [set(comp_moa[k[0]].split("|")) for k in keys]
        hit = np.array([bool(labels[a] & labels[j]) for a, j in enumerate(nb)])
        match = np.array([any(labels[a] & labels[b] for b in range(len(keys)) if np.isfinite(S[a, b])) for a in range(len(keys))])
        np.testing.assert_array_equal(res.table["hit"].to_numpy(), hit)
        np.testing.assert_array_equal(res.table["matchable"].to_numpy(), match)
        assert res.accuracy == pytest.approx(hit[match].mean())


def test_errors() -> None:
    meta, X = _wells(PROFILES, MOA, {c: ["P1"] for c in PROFILES})
    with pytest.raises(ValueError, match="'moa2' not in metadata"):
        nsc(meta, X, moa_col="moa2")
    bad = meta.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("q")).otherwise("moa").alias("moa"))
    with pytest.raises(ValueError, match="'A' has several moa values"):
        nsc(bad, X)
    with pytest.raises(ValueError, match="one per meta row"):
        nsc(meta, X[:-1])


def test_synthetic_moa_structure_is_found_and_shuffling_destroys_it() -> None:
    from bioembed_assets.sources.synthetic_profiles import SyntheticProfilesConfig, generate_profiles

    meta0, X0 = generate_profiles(SyntheticProfilesConfig(n_rows=3000))
    meta, X = generate_profiles(SyntheticProfilesConfig(n_rows=3000, n_moas=15))
    np.testing.assert_array_equal(X0, generate_profiles(SyntheticProfilesConfig(n_rows=3000))[1])
    assert meta0["moa"].null_count() == meta0.height  # default: unchanged, no MoA annotation
    assert meta.filter(pl.col("control_type") == "treatment")["moa"].null_count() == 0
    keep = (meta["active"] | (meta["control_type"] == "negative")).to_numpy()
    act, Xa = meta.filter(pl.Series(keep)), X[keep]
    res = nsc(act, Xa)
    perts = act.filter(pl.col("moa").is_not_null())["perturbation"].unique().sort()
    shuffled = dict(zip(perts, np.random.default_rng(0).permutation(
        act.group_by("perturbation").agg(pl.col("moa").first()).sort("perturbation").filter(
            pl.col("moa").is_not_null())["moa"].to_list())))
    res_s = nsc(act.with_columns(pl.col("perturbation").replace_strict(shuffled, default=None).alias("moa")), Xa)
    assert res.accuracy > 0.6 > 0.2 > res_s.accuracy  # chance ~ 1/15
