"""The full graph on the real BBBC013 96-well plate via its documented config (skipped without data)."""

import os
from pathlib import Path

import polars as pl
import pytest

from bioembed_assets.config import RunConfig
from bioembed_assets.store.catalog import connect

from .conftest import SHARED_DATA

pytestmark = [pytest.mark.slow, pytest.mark.realdata]
CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "configs" / "bbbc013.toml"


@pytest.fixture(scope="module")
def bbbc013_home(tmp_path_factory: pytest.TempPathFactory):
    if not (SHARED_DATA / "cellprofiler-examplesbs-bbbc013").is_dir():
        pytest.skip("../shared/data/cellprofiler-examplesbs-bbbc013 is absent")
    from dagster_project.demo import run_with_config

    saved = {k: os.environ.get(k) for k in ("DAGSTER_HOME", "BIOEMBED_HOME")}
    outcome = run_with_config(tmp_path_factory.mktemp("bbbc013"), RunConfig.load(CONFIG), null_size=2000,
                              log=lambda *_: None)
    yield outcome
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_every_well_has_cells_and_profiles(bbbc013_home) -> None:
    assert bbbc013_home.plates_ok == ["ExampleSBSImages"] and not bbbc013_home.failures
    with connect(bbbc013_home.home.catalog_path) as con:
        wells = con.sql("SELECT * FROM wells").pl()
        assert wells.height == 96
        assert (wells["n_cells"] > 20).all()
        counts = con.sql("SELECT encoder, count(*) n FROM normalized_profiles GROUP BY ALL").fetchall()
    assert dict(counts) == {"classical": 96, "ca_mae": 96}
    assert set(wells["control_type"]) == {"negative", "positive", "treatment"}


def test_high_doses_are_retrieved_and_controls_separate(bbbc013_home) -> None:
    with connect(bbbc013_home.home.catalog_path) as con:
        rep = con.sql("SELECT * FROM replicate_map WHERE kind = 'replicate' AND encoder = 'classical' "
                      "AND recipe = 'card'").pl()
        z = con.sql("SELECT value FROM metrics WHERE encoder = 'classical' AND recipe = 'card' "
                    "AND metric = 'control_z_prime'").fetchone()[0]
    by_dose = {int(r["group"]): r for r in rep.iter_rows(named=True)}
    assert all(by_dose[d]["below_corrected_p"] for d in (8, 9, 10))  # strong PI3K inhibition translocates GFP
    assert by_dose[10]["mean_average_precision"] > by_dose[1]["mean_average_precision"]
    assert z > 0.3
    assert pl.Series([by_dose[d]["mean_average_precision"] for d in range(1, 11)]).is_not_nan().all()
