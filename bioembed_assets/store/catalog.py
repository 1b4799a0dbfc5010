"""The DuckDB catalog: a database file holding only views and macros over the lake.

Writers never hold it open; it is rebuilt idempotently (a few ms) under a file lock, and
users open it with `duckdb.connect(path, read_only=True)`.
"""

from __future__ import annotations

import fcntl
import re
from importlib import resources
from pathlib import Path

import duckdb
import polars as pl

from bioembed_assets.store.atomic import atomic_file
from bioembed_assets.store.lake import LAKE_TABLES, Lake

_DUCKDB_TYPES = {pl.Utf8: "VARCHAR", pl.Int32: "INTEGER", pl.Int64: "BIGINT",
                 pl.Float64: "DOUBLE", pl.Float32: "FLOAT", pl.Boolean: "BOOLEAN"}


def sql_dir() -> Path:
    """The `sql/` folder: the repo's top level (editable install) or the packaged copy."""
    repo_sql = Path(__file__).resolve().parents[2] / "sql"
    if repo_sql.is_dir():
        return repo_sql
    return Path(str(resources.files("bioembed_assets") / "sql"))


def _duckdb_type(dtype: pl.DataType) -> str:
    if isinstance(dtype, pl.List):
        return f"{_duckdb_type(dtype.inner)}[]"
    return _DUCKDB_TYPES[dtype]


def _base_view_sql(lake: Lake, table: str) -> str:
    t = LAKE_TABLES[table]
    if lake.files(table):
        return (f"CREATE OR REPLACE VIEW lake_{table} AS SELECT * FROM read_parquet("
                f"'{lake.glob(table)}', hive_partitioning = false, union_by_name = true)")
    cols = ", ".join(f"CAST(NULL AS {_duckdb_type(dt)}) AS \"{c}\"" for c, dt in t.columns.items())
    return f"CREATE OR REPLACE VIEW lake_{table} AS SELECT {cols} WHERE false"


def build_catalog(catalog_path: str | Path, lake_root: str | Path) -> Path:
    """(Re)build the catalog file at `catalog_path` over the lake at `lake_root`.

    Built in a temporary file and renamed into place, so readers never see a half-built one.
    """
    catalog_path, lake = Path(catalog_path), Lake(lake_root)
    lock_path = catalog_path.with_suffix(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock, atomic_file(catalog_path) as tmp:
        fcntl.flock(lock, fcntl.LOCK_EX)
        con = duckdb.connect(str(tmp))
        try:
            for table in LAKE_TABLES:
                con.execute(_base_view_sql(lake, table))
            con.execute((sql_dir() / "views.sql").read_text())
        finally:
            con.close()
    return catalog_path


def connect(catalog_path: str | Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the catalog."""
    path = Path(catalog_path)
    if not path.exists():
        raise FileNotFoundError(f"no catalog at {path}: materialize some plates first")
    return duckdb.connect(str(path), read_only=True)


def example_queries() -> dict[str, str]:
    """The named example queries of `sql/examples.sql` (`-- name: <name>` headers)."""
    text = (sql_dir() / "examples.sql").read_text()
    parts = re.split(r"^-- name: (\w+)\s*$", text, flags=re.M)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2])}
