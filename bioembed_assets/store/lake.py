"""The parquet lake: one file per partition, written atomically, read back by table + keys.

Layout: `<home>/lake/<table>/<key>=<value>/.../part-0.parquet`. Every file also carries its
key columns, so readers never depend on hive-partition parsing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from bioembed_assets import schema as s
from bioembed_assets.store.atomic import atomic_dir, atomic_file, remove_atomic, write_parquet_atomic

PART_FILE = "part-0.parquet"
_FEATURES_DTYPE = pl.List(pl.Float32)


@dataclass(frozen=True)
class LakeTable:
    """A lake table: its partition keys (folder levels, in order) and its column contract."""

    name: str
    partition_keys: tuple[str, ...]
    columns: Mapping[str, pl.DataType]


def _t(name: str, keys: tuple[str, ...], **columns: pl.DataType) -> LakeTable:
    return LakeTable(name, keys, columns)


_VERSIONED = ("encoder", "version")
LAKE_TABLES: dict[str, LakeTable] = {
    t.name: t
    for t in (
        _t("images", ("plate",), plate=pl.Utf8, well=pl.Utf8, site=pl.Int32, field=pl.Int32,
           qc_saturated_fraction=pl.Float64),
        _t("platemap", ("plate",), plate=pl.Utf8, well=pl.Utf8, perturbation=pl.Utf8,
           control_type=pl.Utf8, moa=pl.Utf8),
        _t("nuclei", ("plate",), plate=pl.Utf8, well=pl.Utf8, site=pl.Int32, field=pl.Int32,
           cell_id=pl.Utf8, label=pl.Int32, centroid_y=pl.Float64, centroid_x=pl.Float64,
           area=pl.Int64),
        _t("cells", ("plate",), plate=pl.Utf8, well=pl.Utf8, site=pl.Int32, field=pl.Int32,
           cell_id=pl.Utf8, label=pl.Int32, centroid_y=pl.Float64, centroid_x=pl.Float64,
           area=pl.Int64, crop_index=pl.Int64),
        _t("embeddings", (*_VERSIONED, "plate"), plate=pl.Utf8, well=pl.Utf8, site=pl.Int32,
           cell_id=pl.Utf8, encoder=pl.Utf8, encoder_version=pl.Utf8, features=_FEATURES_DTYPE),
        _t("cell_outputs", (*_VERSIONED, "plate"), plate=pl.Utf8, well=pl.Utf8, site=pl.Int32,
           cell_id=pl.Utf8, encoder=pl.Utf8, encoder_version=pl.Utf8, output=pl.Utf8, values=_FEATURES_DTYPE),
        _t("feature_names", _VERSIONED, encoder=pl.Utf8, encoder_version=pl.Utf8, output=pl.Utf8,
           feature_index=pl.Int32, feature=pl.Utf8),
        _t("embedding_stats", (*_VERSIONED, "plate"), plate=pl.Utf8, encoder=pl.Utf8, encoder_version=pl.Utf8,
           cells=pl.Int64, seconds=pl.Float64, crops_per_second=pl.Float64, device=pl.Utf8, batch_size=pl.Int64),
        _t("gradcamo_cells", (*_VERSIONED, "plate"), plate=pl.Utf8, well=pl.Utf8, site=pl.Int32, field=pl.Int32,
           cell_id=pl.Utf8, crop_index=pl.Int64, perturbation=pl.Utf8, target_class=pl.Utf8,
           target_source=pl.Utf8, predicted_class=pl.Utf8, layer=pl.Utf8, score=pl.Float64, chance=pl.Float64,
           enrichment=pl.Float64, neighbour_fraction=pl.Float64, reason=pl.Utf8, encoder=pl.Utf8,
           encoder_version=pl.Utf8),
        _t("gradcamo_summary", (*_VERSIONED, "plate"), level=pl.Utf8, encoder=pl.Utf8, encoder_version=pl.Utf8,
           plate=pl.Utf8, perturbation=pl.Utf8, n_cells=pl.Int64, n_scored=pl.Int64, fraction_above=pl.Float64,
           mean_score=pl.Float64, mean_chance=pl.Float64, mean_enrichment=pl.Float64,
           mean_neighbour_fraction=pl.Float64),
        _t("well_profiles", (*_VERSIONED, "plate"), plate=pl.Utf8, well=pl.Utf8,
           perturbation=pl.Utf8, control_type=pl.Utf8, moa=pl.Utf8, encoder=pl.Utf8,
           encoder_version=pl.Utf8, n_cells=pl.Int64, features=_FEATURES_DTYPE),
        _t("normalized_profiles", (*_VERSIONED, "recipe", "plate"), plate=pl.Utf8, well=pl.Utf8,
           perturbation=pl.Utf8, control_type=pl.Utf8, moa=pl.Utf8, encoder=pl.Utf8,
           encoder_version=pl.Utf8, recipe=pl.Utf8, recipe_steps=pl.Utf8, n_cells=pl.Int64,
           features=_FEATURES_DTYPE),
        _t("metrics", _VERSIONED, encoder=pl.Utf8, encoder_version=pl.Utf8, recipe=pl.Utf8,
           metric=pl.Utf8, value=pl.Float64),
        _t("replicate_map", _VERSIONED, encoder=pl.Utf8, encoder_version=pl.Utf8, recipe=pl.Utf8,
           kind=pl.Utf8, group=pl.Utf8, mean_average_precision=pl.Float64, p_value=pl.Float64,
           corrected_p_value=pl.Float64, below_corrected_p=pl.Boolean),
        _t("recipe_status", _VERSIONED, encoder=pl.Utf8, encoder_version=pl.Utf8, recipe=pl.Utf8,
           recipe_steps=pl.Utf8, status=pl.Utf8, stage=pl.Utf8, error=pl.Utf8, crossfit=pl.Utf8,
           settings=pl.Utf8),
    )
}


class Lake:
    """Read/write access to the lake under one root folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def table(self, name: str) -> LakeTable:
        if name not in LAKE_TABLES:
            raise KeyError(f"unknown lake table {name!r}; known: {sorted(LAKE_TABLES)}")
        return LAKE_TABLES[name]

    def partition_path(self, table: str, **keys: str) -> Path:
        t = self.table(table)
        missing = set(t.partition_keys) - set(keys)
        extra = set(keys) - set(t.partition_keys)
        if missing or extra:
            raise ValueError(f"table {table!r} is partitioned by {t.partition_keys}; got {sorted(keys)}")
        path = self.root / table
        for k in t.partition_keys:
            value = str(keys[k])
            if not value or "/" in value or value.startswith("."):
                raise ValueError(f"invalid partition value {k}={value!r} for table {table!r}")
            path = path / f"{k}={value}"
        return path / PART_FILE

    def glob(self, table: str) -> str:
        """A glob matching every file of `table` (for DuckDB's read_parquet)."""
        depth = len(self.table(table).partition_keys)
        return str(self.root / table / "/".join(["*"] * depth) / PART_FILE)

    def files(self, table: str) -> list[Path]:
        depth = len(self.table(table).partition_keys)
        return sorted((self.root / table).glob("/".join(["*"] * depth) + "/" + PART_FILE))

    def write(self, table: str, df: pl.DataFrame, **keys: str) -> Path:
        """Replace exactly one partition of `table` with `df` (columns cast to the contract)."""
        return write_parquet_atomic(self._conform(table, df), self.partition_path(table, **keys))

    @contextlib.contextmanager
    def writer(self, table: str, **keys: str) -> Iterator[Callable[[pl.DataFrame], None]]:
        """Write one partition of `table` in pieces: yields `append(df)`; each piece becomes a parquet
        row group of a temporary file that replaces the partition when the block ends without error
        (readers see the old partition or the whole new one, never a part; an error leaves no file)."""
        target = self.partition_path(table, **keys)
        with atomic_file(target) as tmp:
            out: pq.ParquetWriter | None = None

            def append(df: pl.DataFrame) -> None:
                nonlocal out
                arrow = self._conform(table, df).to_arrow()
                if out is None:
                    out = pq.ParquetWriter(tmp, arrow.schema, compression="zstd")
                out.write_table(arrow)

            try:
                yield append
                if out is None:
                    append(pl.DataFrame(schema=dict(self.table(table).columns)))
            finally:
                if out is not None:
                    out.close()

    def _conform(self, table: str, df: pl.DataFrame) -> pl.DataFrame:
        """`df` with the contract's columns first, cast to their types (extra columns kept after)."""
        t = self.table(table)
        missing = [c for c in t.columns if c not in df.columns]
        if missing:
            raise ValueError(f"table {table!r} needs columns {missing} (got {df.columns})")
        extra = [c for c in df.columns if c not in t.columns]
        return df.select([pl.col(c).cast(dt) for c, dt in t.columns.items()] + extra)

    def replace_partitions(self, table: str, frames: Mapping[str, pl.DataFrame], **prefix: str) -> Path:
        """Replace the whole folder `prefix` of `table` (all keys but the last) by one partition per
        entry of `frames` (last-key value -> rows), in one swap: readers see the old set or the new."""
        t = self.table(table)
        if tuple(prefix) != t.partition_keys[:-1]:
            raise ValueError(f"table {table!r} needs prefix keys {t.partition_keys[:-1]}, got {tuple(prefix)}")
        target = self.partition_path(table, **prefix, **{t.partition_keys[-1]: "x"}).parent.parent
        staging = self.root / ".staging"
        with atomic_dir(target, staging=staging) as tmp:
            for value, df in frames.items():
                part = self.partition_path(table, **prefix, **{t.partition_keys[-1]: value})
                dest = tmp / part.parent.name / PART_FILE
                dest.parent.mkdir(parents=True)
                self._conform(table, df).write_parquet(dest, compression="zstd")
        return target

    def drop(self, table: str, **prefix: str) -> bool:
        """Remove the folder of `table` under the leading partition keys `prefix` (e.g. one recipe of
        a feature set's normalized profiles) in one rename; False if it did not exist."""
        t = self.table(table)
        if not prefix or tuple(prefix) != t.partition_keys[: len(prefix)] or len(prefix) == len(t.partition_keys):
            raise ValueError(f"table {table!r} folders are keyed by leading keys of {t.partition_keys}, got {tuple(prefix)}")
        rest = {k: "x" for k in t.partition_keys[len(prefix):]}
        folder = self.partition_path(table, **prefix, **rest).parents[len(rest)]
        return remove_atomic(folder, staging=self.root / ".staging")

    def read(self, table: str, **filters: str) -> pl.DataFrame:
        """All rows of `table` whose partition keys equal `filters` (empty frame if none)."""
        t = self.table(table)
        files = [f for f in self.files(table) if _matches(f, filters)]
        if not files:
            return pl.DataFrame(schema=dict(t.columns))
        return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")

    def footer(self, table: str, **keys: str) -> tuple[int, list[tuple[str, str]]]:
        """Row count and (column, arrow type) of one partition, from its parquet footer (no rows read)."""
        meta = pq.ParquetFile(self.partition_path(table, **keys))
        return meta.metadata.num_rows, [(field.name, str(field.type)) for field in meta.schema_arrow]

    def partitions(self, table: str, **filters: str) -> list[dict[str, str]]:
        """The key dicts of the partitions of `table` that match `filters`."""
        return [_keys_of(f) for f in self.files(table) if _matches(f, filters)]


def _keys_of(path: Path) -> dict[str, str]:
    return dict(p.split("=", 1) for p in path.parent.parts if "=" in p)


def _matches(path: Path, filters: Mapping[str, str]) -> bool:
    keys = _keys_of(path)
    return all(keys.get(k) == str(v) for k, v in filters.items())


def features_to_numpy(df: pl.DataFrame, column: str = s.FEATURES) -> np.ndarray:
    """The list-of-float `features` column as a float32 (n, d) matrix."""
    if df.height == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return np.asarray(df[column].list.to_array(len(df[column][0])).to_numpy(), dtype=np.float32)


def with_features(df: pl.DataFrame, X: np.ndarray, column: str = s.FEATURES) -> pl.DataFrame:
    """`df` plus a list-of-float32 column built from the rows of `X`."""
    if X.shape[0] != df.height:
        raise ValueError(f"{X.shape[0]} feature rows for {df.height} metadata rows")
    series = pl.Series(column, np.ascontiguousarray(X, dtype=np.float32)).cast(_FEATURES_DTYPE)
    return df.with_columns(series)
