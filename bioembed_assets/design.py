"""Design columns of a profile table with their defaults: batch (else plate) and compound (else perturbation).

Screens group plates into batches (weeks, runs) and test a compound at several doses; the
standard benchmarks (NSC, NSCB) and batch-aware normalizers need both. Tables that lack the
columns, or rows where they are null, fall back to the plate and the perturbation.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from bioembed_assets import schema as s


def batch_expr() -> pl.Expr:
    """The effective batch of each row: `batch`, else its plate."""
    return pl.coalesce(pl.col(s.BATCH).cast(pl.String), pl.col(s.PLATE).cast(pl.String)).alias(s.BATCH)


def compound_expr() -> pl.Expr:
    """The effective compound of each row: `compound`, else its perturbation."""
    return pl.coalesce(pl.col(s.COMPOUND).cast(pl.String), pl.col(s.PERTURBATION).cast(pl.String)).alias(s.COMPOUND)


def with_design(meta: pl.DataFrame) -> pl.DataFrame:
    """`meta` with `batch` and `compound` present and filled by their defaults."""
    missing = [pl.lit(None, pl.String).alias(c) for c in (s.BATCH, s.COMPOUND) if c not in meta.columns]
    return meta.with_columns(missing).with_columns(batch_expr(), compound_expr())


def batches(meta: pl.DataFrame) -> np.ndarray:
    """The effective batch label of each row (strings)."""
    return with_design(meta)[s.BATCH].to_numpy()


def has_batches(meta: pl.DataFrame) -> bool:
    """Whether some row has a batch label other than its plate (a real batch column)."""
    return s.BATCH in meta.columns and bool((meta[s.BATCH].is_not_null() & (meta[s.BATCH] != meta[s.PLATE])).any())
