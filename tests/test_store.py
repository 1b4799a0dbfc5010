"""The lake (atomic per-partition parquet) and the DuckDB catalog over it."""

from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from bioembed_assets.store.atomic import atomic_dir, write_parquet_atomic
from bioembed_assets.store.catalog import build_catalog, connect
from bioembed_assets.store.lake import Lake, features_to_numpy, with_features


def _embeddings(plate: str, n: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    meta = pl.DataFrame({"plate": [plate] * n, "well": [f"A{i:02d}" for i in range(1, n + 1)],
                         "site": [1] * n, "cell_id": [f"c{i}" for i in range(n)],
                         "encoder": ["e"] * n, "encoder_version": ["1"] * n})
    return with_features(meta, rng.normal(size=(n, 8)).astype(np.float32))


def test_partition_write_replaces_exactly_that_partition(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    lake.write("embeddings", _embeddings("P1", 3, 0), encoder="e", version="1", plate="P1")
    lake.write("embeddings", _embeddings("P2", 4, 1), encoder="e", version="1", plate="P2")
    lake.write("embeddings", _embeddings("P1", 2, 2), encoder="e", version="1", plate="P1")
    df = lake.read("embeddings", encoder="e")
    assert df.group_by("plate").len().sort("plate")["len"].to_list() == [2, 4]
    assert not list(tmp_path.rglob(".tmp-*"))
    X = features_to_numpy(lake.read("embeddings", plate="P2"))
    assert X.shape == (4, 8) and X.dtype == np.float32


def test_write_checks_columns_and_keys(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    with pytest.raises(ValueError, match="needs columns"):
        lake.write("embeddings", pl.DataFrame({"plate": ["P"]}), encoder="e", version="1", plate="P")
    with pytest.raises(ValueError, match="partitioned by"):
        lake.write("embeddings", _embeddings("P", 1, 0), plate="P")
    with pytest.raises(ValueError, match="invalid partition value"):
        lake.write("embeddings", _embeddings("P", 1, 0), encoder="e", version="1", plate="../x")


def test_failed_write_leaves_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "t.parquet"
    write_parquet_atomic(pl.DataFrame({"a": [1]}), target)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with atomic_dir(tmp_path / "store") as tmp:
            (tmp / "half").write_text("x")
            raise Boom
    assert not (tmp_path / "store").exists()
    assert not list(tmp_path.glob(".tmp-*"))
    assert pl.read_parquet(target)["a"].to_list() == [1]


def test_catalog_views_over_lake_read_only(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    lake.write("embeddings", _embeddings("P1", 3, 0), encoder="e", version="1", plate="P1")
    catalog = build_catalog(tmp_path / "bioembed.duckdb", lake.root)
    with connect(catalog) as con:
        assert con.sql("SELECT count(*) FROM embeddings").fetchone()[0] == 3
        assert con.sql("SELECT count(*) FROM metrics").fetchone()[0] == 0  # empty, but typed
        with pytest.raises(duckdb.Error):
            con.execute("CREATE TABLE x (a INT)")
    # new partitions are visible without rebuilding: views read the lake at query time
    lake.write("embeddings", _embeddings("P2", 5, 1), encoder="e", version="1", plate="P2")
    with connect(catalog) as con:
        assert con.sql("SELECT count(*) FROM embeddings").fetchone()[0] == 8
    build_catalog(catalog, lake.root)  # idempotent rebuild
    with connect(catalog) as con:
        names = {r[0] for r in con.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert {"plates", "wells", "cells", "embeddings", "profiles", "normalized_profiles", "metrics"} <= names


def test_connect_missing_catalog(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="materialize"):
        connect(tmp_path / "nope.duckdb")
