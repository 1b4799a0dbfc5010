"""Folder swaps under kill -9 and concurrency: old or new is always visible, leftovers are cleaned,
and two runs of one plate's stage take turns."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bioembed_assets.store import atomic
from bioembed_assets.store.atomic import atomic_dir, atomic_file, exchange_paths
from tests.conftest import entries

pytestmark = pytest.mark.reliability
REPO = Path(__file__).resolve().parents[2]


def _write(target: Path, text: str) -> None:
    with atomic_dir(target) as tmp:
        (tmp / "content").write_text(text)


def _killed_writer(target: Path, exchange: bool) -> int:
    """A process that starts replacing `target` and is SIGKILLed in the middle of the swap: right after
    the exchange (Linux) or between the two renames (the portable fallback)."""
    script = f"""
import os, signal
from pathlib import Path
from bioembed_assets.store import atomic
real_replace, real_exchange = os.replace, atomic.exchange_paths
def die_after_exchange(a, b):
    real_exchange(a, b); os.kill(os.getpid(), signal.SIGKILL)
def die_after_aside(a, b):
    real_replace(a, b)
    if ".old-" in str(b): os.kill(os.getpid(), signal.SIGKILL)
if {exchange}:
    atomic.exchange_paths = die_after_exchange
else:
    atomic.exchange_paths = lambda a, b: False
    atomic.os.replace = die_after_aside
with atomic.atomic_dir(Path({str(target)!r})) as tmp:
    (tmp / "content").write_text("new")
"""
    return subprocess.run([sys.executable, "-c", script], cwd=REPO).returncode


def test_exchange_is_available_here(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").write_text("b")
    assert exchange_paths(tmp_path / "a", tmp_path / "b")  # CI's Linux file systems support RENAME_EXCHANGE
    assert (tmp_path / "a").is_file() and (tmp_path / "b").is_dir()


def test_kill_right_after_the_exchange_leaves_the_new_folder_and_a_cleaned_leftover(tmp_path: Path) -> None:
    target = tmp_path / "P1.zarr"
    _write(target, "old")
    assert _killed_writer(target, exchange=True) == -9
    assert (target / "content").read_text() == "new"
    assert any(n.startswith(".tmp-") for n in entries(tmp_path))  # the old copy, left by the dead writer
    _write(target, "newer")
    assert entries(tmp_path) == ["P1.zarr"] and (target / "content").read_text() == "newer"


def test_kill_between_the_two_renames_puts_the_old_folder_back(tmp_path: Path) -> None:
    target = tmp_path / "P1.zarr"
    _write(target, "old")
    assert _killed_writer(target, exchange=False) == -9
    assert not target.exists() and any(n.startswith(".old-") for n in entries(tmp_path))
    with pytest.raises(RuntimeError), atomic_dir(target):  # the next writer restores before anything else
        assert (target / "content").read_text() == "old"
        raise RuntimeError("writer fails after recovery")
    assert entries(tmp_path) == ["P1.zarr"] and (target / "content").read_text() == "old"


def test_readers_never_see_neither_during_swaps(tmp_path: Path) -> None:
    target = tmp_path / "P1.zarr"
    _write(target, "0")
    missing, stop = [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            if not (target / "content").exists():
                missing.append(1)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(300):
        _write(target, str(i))
    stop.set()
    reader.join()
    assert missing == []


def test_stale_temporaries_of_this_target_only_are_cleaned(tmp_path: Path) -> None:
    target, other = tmp_path / "a" / "version=1", tmp_path / "b" / "version=1"
    staging = tmp_path / "staging"
    stale = [atomic._temp_sibling(target, staging, kind) for kind in ("tmp", "old", "tmp")]
    foreign = atomic._temp_sibling(other, staging)  # same name, another target: not ours to delete
    for p in [*stale, foreign]:
        p.mkdir(parents=True)
    with atomic_dir(target, staging=staging) as tmp:
        (tmp / "x").write_text("1")
    assert entries(staging) == [foreign.name]
    file_target = tmp_path / "t.parquet"
    leftover = atomic._temp_sibling(file_target, tmp_path)
    leftover.write_text("torn")
    with atomic_file(file_target) as tmp:
        tmp.write_text("whole")
    assert not leftover.exists() and file_target.read_text() == "whole"


def test_two_runs_of_one_plate_stage_take_turns(tmp_path: Path) -> None:
    """Two processes ingest the same plate at once: the second waits for the first (and says so);
    both succeed and the store is whole, with no `.old-*`/`.tmp-*` left."""
    from bioembed_assets.sources.synthetic import generate_screen
    from tests.conftest import TINY_SCREEN

    home = tmp_path / "home"
    plate = generate_screen(home / "raw", TINY_SCREEN)[0]
    script = f"""
import logging, sys, time
from bioembed_assets import pipeline
from bioembed_assets.config import Home
from bioembed_assets.images import store
logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
slow = store.ingest_plate
def ingest(*a, **k):
    time.sleep(2)  # widen the window so the two runs overlap
    return slow(*a, **k)
pipeline.ingest_plate = ingest
print(pipeline.ingest_raw_plate(Home(root={str(home)!r}).ensure(), {plate!r})["fields"])
"""
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("waiting for raw_plate of plate" in o for o in outs) == 1, outs
    stores = home / "zarr" / "images"
    assert entries(stores) == [f"{plate}.zarr"]


def test_new_content_is_fsynced_before_the_rename_and_its_folder_after(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace, real_exchange = atomic.os.fsync, atomic.os.replace, atomic.exchange_paths

    def fsync(fd: int) -> None:
        events.append("fsync " + Path(f"/proc/self/fd/{fd}").resolve().name)
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b))[1])
    monkeypatch.setattr(atomic, "exchange_paths", lambda a, b: (events.append("rename"), real_exchange(a, b))[1])
    with atomic_file(tmp_path / "f.parquet") as tmp:
        tmp.write_text("x")
    assert events[-3] == f"fsync {tmp.name}" and events[-2:] == ["rename", f"fsync {tmp_path.name}"]
    events.clear()
    _write(tmp_path / "d.zarr", "a")
    first_rename = events.index("rename")
    assert "fsync content" in events[:first_rename] and events[-1] == f"fsync {tmp_path.name}"
