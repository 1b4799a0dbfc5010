"""Atomic writes: a reader sees the previous file/folder or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import polars as pl


def _temp_sibling(target: Path) -> Path:
    return target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success it replaces `target` whole.

    The old folder is first renamed aside, the new one renamed in, then the old one deleted,
    so at every instant `target` is either the complete old or the complete new folder
    (except for the instant between the two renames, when it is absent).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".old-{target.name}-{uuid.uuid4().hex[:12]}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_parquet_atomic(df: pl.DataFrame, target: str | Path) -> Path:
    """Write `df` to `target` (parquet, zstd) via a temp file and an atomic rename."""
    target = Path(target)
    with atomic_file(target) as tmp:
        df.write_parquet(tmp, compression="zstd")
    return target
