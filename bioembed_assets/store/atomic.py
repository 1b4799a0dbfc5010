"""Atomic writes: a reader sees the previous file/folder or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl


def _temp_sibling(target: Path, staging: Path | None = None, kind: str = "tmp") -> Path:
    folder = target.parent if staging is None else staging
    return folder / f".{kind}-{target.name}-{uuid.uuid4().hex[:12]}"


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
def atomic_dir(target: str | Path, staging: str | Path | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target` (or in `staging`, on the same file system,
    to keep it out of globs over target's parent); on success it replaces `target` whole.

    The old folder is first renamed aside, the new one renamed in, then the old one deleted,
    so at every instant `target` is either the complete old or the complete new folder
    (except for the instant between the two renames, when it is absent).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = None if staging is None else Path(staging)
    if staging is not None:
        staging.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target, staging)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if target.exists():
            old = _temp_sibling(target, staging, "old")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_arrays_and_json(target: str | Path, npz_name: str, arrays: dict[str, np.ndarray], json_name: str,
                          info: dict) -> Path:
    """Replace folder `target` atomically with `npz_name` (the arrays, no pickles) and `json_name` (info)."""
    target = Path(target)
    with atomic_dir(target) as tmp:
        np.savez(tmp / npz_name, **arrays)
        (tmp / json_name).write_text(json.dumps(info, indent=1))
    return target


def write_parquet_atomic(df: pl.DataFrame, target: str | Path) -> Path:
    """Write `df` to `target` (parquet, zstd) via a temp file and an atomic rename."""
    target = Path(target)
    with atomic_file(target) as tmp:
        df.write_parquet(tmp, compression="zstd")
    return target
