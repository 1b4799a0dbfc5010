"""The DuckDB catalog: a database file holding only views and macros over the lake.

Writers never hold it open; it is rebuilt idempotently (a few ms) under a file lock. The views name
the lake's files relative to the catalog's folder, so a home can be moved or mounted elsewhere:
`connect()` points DuckDB's `file_search_path` at that folder (from the DuckDB CLI: run it in the
home, or `SET file_search_path = '<home>'`). No path or name is ever spliced into SQL text.
"""

from __future__ import annotations

import os
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


def _base_view_sql(lake: Lake, table: str, folder: Path) -> str:
    t = LAKE_TABLES[table]
    if lake.files(table):
        # The glob, relative to the catalog folder, holds only our table and key names and `*`,
        # never the home path; quote it anyway as a proper SQL literal.
        pattern = os.path.relpath(lake.glob(table), folder).replace("'", "''")
        return (f"CREATE OR REPLACE VIEW lake_{table} AS SELECT * FROM read_parquet("
                f"'{pattern}', hive_partitioning = false, union_by_name = true)")
    cols = ", ".join(f"CAST(NULL AS {_duckdb_type(dt)}) AS \"{c}\"" for c, dt in t.columns.items())
    return f"CREATE OR REPLACE VIEW lake_{table} AS SELECT {cols} WHERE false"


def build_catalog(catalog_path: str | Path, lake_root: str | Path) -> Path:
    """(Re)build the catalog file at `catalog_path` over the lake at `lake_root`.

    Built in a temporary file and renamed into place, so readers never see a half-built one.
    """
    catalog_path, lake = Path(catalog_path).absolute(), Lake(Path(lake_root).absolute())
    _check_catalog_path(catalog_path)
    with atomic_file(catalog_path) as tmp:  # holds the catalog's writer lock while building
        con = duckdb.connect(str(tmp))
        try:
            _search_catalog_folder(con, catalog_path)  # views bind their relative globs on creation
            for table in LAKE_TABLES:
                con.execute(_base_view_sql(lake, table, catalog_path.parent))
            con.execute((sql_dir() / "views.sql").read_text())
        finally:
            con.close()
    return catalog_path


def _search_catalog_folder(con: duckdb.DuckDBPyConnection, catalog_path: Path) -> None:
    """Resolve the views' relative file names against the catalog's folder (a bound parameter)."""
    folder = str(catalog_path.absolute().parent)
    con.execute("SET file_search_path = ?", [folder])


def _check_catalog_path(path: Path) -> None:
    """DuckDB cannot hold two characters in these paths: ',' in file_search_path (a comma-separated list,
    no escape) and '?' in a database path (read as the start of connection options)."""
    for char, why in ((",", "DuckDB's file_search_path is a comma-separated list"),
                      ("?", "DuckDB reads '?' in a database path as the start of options")):
        if char in str(path.absolute()):
            raise ValueError(f"the catalog path {str(path)!r} contains {char!r} ({why}); use a home path without it")


def connect(catalog_path: str | Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the catalog, wherever its home now is."""
    path = Path(catalog_path)
    if not path.exists():
        raise FileNotFoundError(f"no catalog at {path}: materialize some plates first")
    _check_catalog_path(path)
    con = duckdb.connect(str(path), read_only=True)
    _search_catalog_folder(con, path)
    return con


def example_queries() -> dict[str, str]:
    """The named example queries of `sql/examples.sql` (`-- name: <name>` headers)."""
    text = (sql_dir() / "examples.sql").read_text()
    parts = re.split(r"^-- name: (\w+)\s*$", text, flags=re.M)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2])}
