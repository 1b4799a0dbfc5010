"""Grad-CAMO on constructed maps with known answers, its edge cases, and the per-plate / per-perturbation summary."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from bioembed_assets.interpret.gradcamo import ZERO_MAP, gradcamo_scores, summarize

S = 16


def square(top: int, left: int, size: int, shape: tuple[int, ...] = (S, S)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[..., top : top + size, left : left + size] = True
    return m


def test_known_answers_inside_outside_uniform() -> None:
    cell = square(4, 4, 6)  # 36 of 256 pixels
    inside = np.where(cell, 2.5, 0.0)
    outside = np.where(cell, 0.0, 1.0)
    uniform = np.full((S, S), 0.7)
    r = gradcamo_scores(np.stack([inside, outside, uniform]), np.stack([cell] * 3))
    chance = 36 / 256
    np.testing.assert_allclose(r.score, [1.0, 0.0, chance])
    np.testing.assert_allclose(r.chance, [chance] * 3)
    np.testing.assert_allclose(r.enrichment, [1 / chance, 0.0, 1.0])
    assert np.isnan(r.neighbour_fraction).all()  # no neighbour masks given
    assert list(r.reason) == ["", "", ""]


def test_score_is_scale_free_but_not_shift_free() -> None:
    """Dividing a map by a constant leaves the ratio; a min-max shift (grad-cam's display scaling) does not."""
    rng = np.random.default_rng(0)
    g = 0.5 + rng.random((S, S))  # minimum well above 0
    cell = square(2, 3, 5)
    a, b = gradcamo_scores(np.stack([g, g / 7.0]), np.stack([cell, cell])).score
    assert a == pytest.approx(b)
    shifted = gradcamo_scores((g - g.min())[None], cell[None]).score[0]
    assert abs(shifted - a) > 1e-3


def test_neighbour_fraction() -> None:
    cell, other = square(0, 0, 4), square(8, 8, 4)  # 16 px each
    g = np.where(cell, 1.0, 0.0) + np.where(other, 3.0, 0.0) + 0.0
    g[15, 0] = 2.0  # background
    r = gradcamo_scores(g[None], cell[None], other[None])
    total = 16 + 48 + 2
    assert r.score[0] == pytest.approx(16 / total)
    assert r.neighbour_fraction[0] == pytest.approx(48 / total)
    assert r.score[0] + r.neighbour_fraction[0] <= 1.0


def test_zero_map_is_nan_with_reason_and_left_out_of_means() -> None:
    cell = square(4, 4, 4)
    maps = np.stack([np.zeros((S, S)), np.where(cell, 1.0, 0.0)])
    r = gradcamo_scores(maps, np.stack([cell, cell]), np.stack([~cell, ~cell]))
    assert np.isnan(r.score[0]) and np.isnan(r.enrichment[0]) and np.isnan(r.neighbour_fraction[0])
    assert list(r.reason) == [ZERO_MAP, ""]
    assert r.chance[0] == pytest.approx(16 / 256)  # chance does not depend on the map
    table = r.to_frame().with_columns(pl.lit("P1").alias("plate"))
    row = summarize(table).row(0, named=True)
    assert (row["n_cells"], row["n_scored"], row["mean_score"], row["fraction_above"]) == (2, 1, 1.0, 1.0)


def test_errors_name_the_cell() -> None:
    cell = square(4, 4, 4)
    maps = np.ones((2, S, S))
    with pytest.raises(ValueError, match=r"cell 'A01-s1-7' \(row 1\).*empty cell mask"):
        gradcamo_scores(maps, np.stack([cell, np.zeros_like(cell)]), cell_ids=["A01-s1-3", "A01-s1-7"])
    negative = maps.copy()
    negative[0, 0, 0] = -0.1
    with pytest.raises(ValueError, match=r"cell 'c0'.*negative or non-finite.*un-shifted ReLU"):
        gradcamo_scores(negative, np.stack([cell, cell]), cell_ids=["c0", "c1"])
    nan = maps.copy()
    nan[1, 3, 3] = np.nan
    with pytest.raises(ValueError, match="cell at row 1: map has negative or non-finite"):
        gradcamo_scores(nan, np.stack([cell, cell]))
    with pytest.raises(ValueError, match=r"cell 'c1'.*neighbour mask overlaps"):
        gradcamo_scores(maps, np.stack([cell, cell]), np.stack([~cell, np.ones_like(cell)]), cell_ids=["c0", "c1"])
    with pytest.raises(ValueError, match="does not match maps"):
        gradcamo_scores(maps, cell[None, :8])
    with pytest.raises(ValueError, match="expected maps"):
        gradcamo_scores(np.ones((S, S)), cell)


def test_z_stacks() -> None:
    z = 5
    cell3d = np.zeros((z, S, S), dtype=bool)
    cell3d[1:4, 4:8, 4:8] = True  # 3 slices x 16 px = 48 voxels
    inside = np.where(cell3d, 1.0, 0.0)
    uniform = np.ones((z, S, S))
    r = gradcamo_scores(np.stack([inside, uniform]), np.stack([cell3d, cell3d]))
    np.testing.assert_allclose(r.score, [1.0, 48 / (z * S * S)])
    np.testing.assert_allclose(r.chance, [48 / (z * S * S)] * 2)
    # a 2-D mask (one per slice) applies to every slice: uniform attention scores its area share
    flat = square(4, 4, 4)
    r2 = gradcamo_scores(uniform[None], flat[None], (~flat)[None])
    assert r2.score[0] == pytest.approx(16 / 256) and r2.neighbour_fraction[0] == pytest.approx(240 / 256)
    top_slice = np.zeros((z, S, S))
    top_slice[0] = np.where(flat, 1.0, 0.0)
    assert gradcamo_scores(top_slice[None], cell3d[None]).score[0] == 0.0  # the cell is not on slice 0


def test_summarize_per_plate_and_perturbation() -> None:
    cells = pl.DataFrame({
        "plate": ["P1"] * 4 + ["P2"] * 3,
        "perturbation": ["DMSO", "DMSO", "CPD", "CPD", "DMSO", "CPD", "CPD"],
        "score": [0.2, 0.6, 0.9, np.nan, 0.5, 0.51, 0.1],
        "chance": [0.1, 0.2, 0.3, 0.3, 0.25, 0.1, 0.2],
        "neighbour_fraction": [0.3, 0.1, 0.0, np.nan, 0.2, 0.2, 0.6],
    }).with_columns((pl.col("score") / pl.col("chance")).alias("enrichment"))
    per_plate = summarize(cells)
    p1, p2 = per_plate.rows(named=True)
    assert (p1["plate"], p1["n_cells"], p1["n_scored"]) == ("P1", 4, 3)
    assert p1["fraction_above"] == pytest.approx(2 / 3)  # 0.6 and 0.9 > 0.5
    assert p1["mean_score"] == pytest.approx((0.2 + 0.6 + 0.9) / 3)
    assert p1["mean_chance"] == pytest.approx(0.2)  # scored cells only: (0.1 + 0.2 + 0.3) / 3
    assert p1["mean_enrichment"] == pytest.approx((2 + 3 + 3) / 3)
    assert p1["mean_neighbour_fraction"] == pytest.approx(0.4 / 3)
    assert p2["fraction_above"] == pytest.approx(1 / 3)  # 0.5 is not above 0.5
    per_pert = summarize(cells, by=("plate", "perturbation"))
    got = {(r["plate"], r["perturbation"]): (r["n_scored"], r["fraction_above"], r["mean_score"])
           for r in per_pert.rows(named=True)}
    assert got[("P1", "CPD")] == (1, 1.0, pytest.approx(0.9))
    assert got[("P2", "CPD")] == (2, 0.5, pytest.approx(0.305))
    assert got[("P1", "DMSO")] == (2, 0.5, pytest.approx(0.4))
    with pytest.raises(ValueError, match=r"needs columns \['moa'\]"):
        summarize(cells, by=("moa",))
