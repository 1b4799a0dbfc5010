"""Atomic writes: a reader sees the previous file/folder or the new one, never a torn one, never neither.

Every write of a target holds that target's lock (`.lock-<name>` beside it), so writers of one
target are serialized across processes. Under the lock no other live process can own a temporary
of that target, so leftovers of killed writers (`.tmp-*`, `.old-*`) are removed on the next write.
New content is fsynced (files, then their folder) before it is renamed into place, unless
`BIOEMBED_FSYNC=0` (for throw-away homes, e.g. tests on slow disks).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl

from bioembed_assets.store.locks import file_lock

_KINDS = ("tmp", "old")


def _fsync_enabled() -> bool:
    return os.environ.get("BIOEMBED_FSYNC", "1") != "0"


def _temp_prefix(target: Path, kind: str) -> str:
    """`.<kind>-<name>-<hash of the full target path>-`: temporaries of different targets with the same
    name (e.g. `version=1` of two encoders in one staging folder) never match each other's prefix."""
    digest = hashlib.sha1(str(target.absolute()).encode()).hexdigest()[:8]
    return f".{kind}-{target.name}-{digest}-"


def _temp_sibling(target: Path, folder: Path, kind: str = "tmp") -> Path:
    return folder / f"{_temp_prefix(target, kind)}{uuid.uuid4().hex[:12]}"


def target_lock(target: Path):
    """The lock every writer of `target` holds (a `.lock-<name>` file beside it)."""
    return file_lock(target.parent / f".lock-{target.name}", f"another writer of {target}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _recover_and_clean(target: Path, folder: Path) -> None:
    """Under the target's lock: put back an old copy a writer killed mid-swap left aside (target
    missing), then delete every stale temporary of `target` in `folder`."""
    if folder.is_dir():
        old = sorted(folder.glob(_temp_prefix(target, "old") + "*"), key=lambda p: p.stat().st_mtime)
        if old and not target.exists():
            os.replace(old.pop(), target)
        for kind in _KINDS:
            for stale in folder.glob(_temp_prefix(target, kind) + "*"):
                _remove(stale)


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (bottom-up), then `root` itself."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath), directory=True)


# Linux renameat2(RENAME_EXCHANGE) swaps two paths in one step, so a folder's old and new copies
# are never both absent; the Python standard library does not expose it, hence ctypes.
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_renameat2 = None
if sys.platform.startswith("linux"):
    _renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if _renameat2 is not None:
        _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap `a` and `b` (both must exist); False if this OS or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTTY):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@contextlib.contextmanager
def _file_swap(target: Path, only_if_missing: bool) -> Iterator[Path | None]:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target_lock(target):
        _recover_and_clean(target, target.parent)
        if only_if_missing and target.exists():
            yield None
            return
        tmp = _temp_sibling(target, target.parent)
        try:
            yield tmp
            if _fsync_enabled():
                _fsync_path(tmp)
            os.replace(tmp, target)
            if _fsync_enabled():
                _fsync_path(target.parent, directory=True)
        finally:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is fsynced and renamed onto `target`."""
    with _file_swap(Path(target), only_if_missing=False) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_create(target: str | Path) -> Iterator[Path | None]:
    """`atomic_file` for a file made once: yields None (and writes nothing) if `target` already exists,
    checked under its lock, so processes creating it at once make it exactly once."""
    with _file_swap(Path(target), only_if_missing=True) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_dir(target: str | Path, staging: str | Path | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target` (or in `staging`, on the same file system,
    to keep it out of globs over target's parent); on success it replaces `target` whole.

    On Linux the new folder and the old one are exchanged in one `renameat2` call, so `target` is
    always the complete old or the complete new folder. Elsewhere (or on a file system without
    RENAME_EXCHANGE) the old folder is renamed aside first; if a writer dies between the two
    renames, the next write of `target` puts the old copy back before doing anything else.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = target.parent if staging is None else Path(staging)
    folder.mkdir(parents=True, exist_ok=True)
    with target_lock(target):
        _recover_and_clean(target, folder)
        tmp = _temp_sibling(target, folder)
        tmp.mkdir()
        try:
            yield tmp
            if _fsync_enabled():
                _fsync_tree(tmp)
            if target.exists() and exchange_paths(tmp, target):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
            else:
                old = None
                if target.exists():
                    old = _temp_sibling(target, folder, "old")
                    os.replace(target, old)
                os.replace(tmp, target)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
            if _fsync_enabled():
                _fsync_path(target.parent, directory=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def remove_atomic(target: str | Path, staging: str | Path | None = None) -> bool:
    """Remove file or folder `target` in one rename (readers see it whole or not at all), under its
    writers' lock; the renamed copy is deleted afterwards. False if there was nothing to remove."""
    target = Path(target)
    if not target.exists():
        return False
    folder = target.parent if staging is None else Path(staging)
    folder.mkdir(parents=True, exist_ok=True)
    with target_lock(target):
        _recover_and_clean(target, folder)
        if not target.exists():
            return False
        gone = _temp_sibling(target, folder, "old")
        os.replace(target, gone)
        _remove(gone)
    return True


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
