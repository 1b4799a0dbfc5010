"""The classical encoder's CellProfiler names end to end: lake `feature_names`, the DuckDB views
`feature_names` and `cell_features`, and a pycytominer-style export, on the demo home that the real
Dagster graph materialized (`materialized_home`: synthetic Phenix plates, five stains).

Each check recomputes what a name promises from an independent path (the crop store's pixels and
masks with numpy; DuckDB's median of the per-cell SQL values), so a column that carried the wrong
name would fail, not just a missing name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import zarr

from bioembed_assets import schema as s
from bioembed_assets.encoders.classical import classical
from bioembed_assets.export import export_profiles
from bioembed_assets.inference import resize_crops
from bioembed_assets.store.catalog import connect
from bioembed_assets.store.lake import Lake

pytestmark = pytest.mark.integration

NAME = "Intensity_MeanIntensity_DNA"


@pytest.fixture(scope="module")
def names(materialized_home) -> pl.DataFrame:
    """The lake's feature names of the classical encoder (one version), in column order."""
    table = Lake(materialized_home.home.lake).read("feature_names", encoder="classical")
    assert table.height > 0, "the pipeline wrote no feature_names for the classical encoder"
    assert table[s.ENCODER_VERSION].n_unique() == 1
    return table.filter(pl.col("output") == "features").sort("feature_index")


def test_lake_feature_names_are_the_encoders_cellprofiler_names(materialized_home, names) -> None:
    home = materialized_home.home
    channels = zarr.open_group(str(home.crop_store(materialized_home.good_plates[0])), mode="r").attrs["channels"]
    expected = classical(channels).feature_names  # what the pipeline's default classical setup builds
    assert names["feature"].to_list() == expected
    assert names["feature_index"].to_list() == list(range(len(expected)))
    emb = Lake(home.lake).read("embeddings", encoder="classical")
    assert {len(f) for f in emb[s.FEATURES].to_list()} == {len(expected)}
    assert {NAME, "AreaShape_Area", "Correlation_Correlation_DNA_ER"} <= set(expected)
    assert not any(n.startswith("classical_") for n in expected)
    with connect(home.catalog_path) as con:
        sql = con.sql("SELECT feature FROM feature_names WHERE encoder = 'classical' AND output = 'features' "
                      "ORDER BY feature_index").fetchall()
    assert [r[0] for r in sql] == expected


def test_cell_features_view_by_name_matches_the_crops(materialized_home, names) -> None:
    """`WHERE feature = 'Intensity_MeanIntensity_DNA'` gives each cell's mean DNA intensity inside its
    mask, recomputed here from the crop store with numpy."""
    home = materialized_home.home
    with connect(home.catalog_path) as con:
        cells = con.sql(f"SELECT plate, cell_id, value FROM cell_features WHERE encoder = 'classical' "
                        f"AND feature = '{NAME}'").pl()
        n_cells = con.sql("SELECT count(*) FROM embeddings WHERE encoder = 'classical'").fetchone()[0]
        area = con.sql("SELECT count(*), min(value) FROM cell_features WHERE encoder = 'classical' "
                       "AND feature = 'AreaShape_Area'").fetchone()
    assert cells.height == n_cells > 0 and cells.select(s.PLATE, s.CELL_ID).n_unique() == n_cells
    assert area[0] == n_cells and area[1] >= 1  # every cell has a non-empty mask
    plate = materialized_home.good_plates[0]
    table = Lake(home.lake).read("cells", plate=plate).sort("crop_index").head(40)
    group = zarr.open_group(str(home.crop_store(plate)), mode="r")
    idx = table["crop_index"].to_numpy()
    images, masks = resize_crops(group["images"][idx], group["masks"][idx], 64)  # as the engine feeds them
    dna = list(group.attrs["channels"]).index("DNA")
    expected = [float(img[dna][m].astype(np.float64).mean() / np.iinfo(img.dtype).max)
                for img, m in zip(images, masks)]
    by_cell = dict(cells.filter(pl.col(s.PLATE) == plate).select(s.CELL_ID, "value").iter_rows())
    got = [by_cell[c] for c in table[s.CELL_ID].to_list()]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_export_columns_carry_the_names_and_the_well_medians(materialized_home, names, tmp_path: Path) -> None:
    """The raw wide export has one column per CellProfiler name; its `Intensity_MeanIntensity_DNA` is
    the well median of the per-cell SQL values (the pipeline's aggregation), computed by DuckDB."""
    home = materialized_home.home
    out = export_profiles(home, "classical", None, "raw", "parquet", tmp_path / "classical.parquet")
    wide = pl.read_parquet(out)
    features = [c for c in wide.columns if not c.startswith("Metadata_")]
    assert features == names["feature"].to_list()
    with connect(home.catalog_path) as con:
        medians = con.sql(f"SELECT plate, well, median(value) AS m FROM cell_features WHERE encoder = 'classical' "
                          f"AND feature = '{NAME}' GROUP BY ALL").pl()
    joined = wide.join(medians, left_on=["Metadata_Plate", "Metadata_Well"], right_on=[s.PLATE, s.WELL])
    assert joined.height == wide.height > 0
    np.testing.assert_allclose(joined[NAME].to_numpy(), joined["m"].to_numpy(), rtol=1e-5)
