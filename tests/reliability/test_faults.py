"""Fault tests: kill -9 at every stage (and inside a folder swap), parallel plates with SQL readers,
and a killed run holding the `gpu` pool slot. Real processes, a real Dagster instance and lake."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest

from bioembed_assets.config import Home
from bioembed_assets.sources.synthetic import SyntheticScreenConfig, generate_screen
from bioembed_assets.store.catalog import connect
from bioembed_assets.store.lake import LAKE_TABLES, Lake
from dagster_project.demo import write_instance_config
from tests.conftest import TINY_SCREEN

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PLATE = "SYN-P01"
# Every step of one plate's run, and the cross-plate steps after it (Dagster op names).
STAGES = ["encoder__ca_mae", "raw_plate", "platemap", "illumination", "segmentation", "crops",
          "embeddings__classical", "embeddings__ca_mae", "well_profiles", "normalizer", "normalized_profiles",
          "evaluation"]


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "DAGSTER_HOME": str(home / "dagster"), "BIOEMBED_HOME": str(home),
            "PYTHONPATH": str(REPO)}


def start_worker(home: Path, *plates: str) -> subprocess.Popen:
    """`tests.reliability.worker` materializing `plates` of `home` in a new process (stderr to a log
    beside the home)."""
    log = home.parent / f"worker-{home.name}-{'-'.join(plates)}-{time.monotonic_ns()}.log"
    proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.worker", str(home), *plates], cwd=REPO,
                            env=_env(home), stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float = 600) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker exited {proc.returncode}: {out[-2000:]}\n{proc.log.read_text()[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def instance_of(home: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(home / "dagster"))


def gpu_slot_holders(home: Path) -> set[str]:
    """Run ids holding a slot of the `gpu` pool."""
    instance = instance_of(home)
    return instance.event_log_storage.get_concurrency_info("gpu").active_run_ids


def started_steps(instance: dg.DagsterInstance) -> set[str]:
    records = instance.get_event_records(dg.EventRecordsFilter(event_type=dg.DagsterEventType.STEP_START))
    return {r.event_log_entry.dagster_event.step_key for r in records}


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as `ready()` is true (fails if the worker ends first)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"worker ended (rc {proc.returncode}) before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def lake_digest(home: Path) -> dict[str, tuple[int, float]]:
    """(rows, feature checksum) of every lake table: what a clean run and a killed-then-rerun one must share."""
    lake, out = Lake(home / "lake"), {}
    for table in LAKE_TABLES:
        df = lake.read(table)
        checksum = 0.0
        if "features" in df.columns and df.height:  # encoders differ in width: sum the lists row by row
            checksum = float(df["features"].list.eval(pl.element().cast(pl.Float64).fill_nan(0.0)).list.sum().sum())
        if table == "metrics":
            checksum = float(np.nansum(df["value"].to_numpy()))
        out[table] = (df.height, checksum)
    return out


def leftovers(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.name.startswith((".tmp-", ".old-")))


@pytest.fixture(scope="module")
def raw_screen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("screen") / "raw"
    generate_screen(raw, TINY_SCREEN)
    return raw


def fresh_home(tmp_path: Path, raw: Path, name: str) -> Path:
    """A home with `raw` copied in and its Dagster instance created (so this process and the workers
    never race to create the instance's databases)."""
    home = tmp_path / name
    shutil.copytree(raw, home / "raw")
    Home(root=home).ensure()
    write_instance_config(home / "dagster" / "dagster.yaml")
    instance_of(home).get_runs(limit=1)
    return home


@pytest.fixture(scope="module")
def clean_digest(raw_screen: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = fresh_home(tmp_path_factory.mktemp("clean"), raw_screen, "home")
    assert finish(start_worker(home, PLATE))["ok"] == [PLATE]
    return lake_digest(home)


@pytest.mark.parametrize("stage", STAGES)
def test_kill_at_a_stage_then_rerun_equals_a_clean_run(stage: str, raw_screen: Path, clean_digest: dict,
                                                       tmp_path: Path) -> None:
    """kill -9 the moment `stage` starts; the rerun leaves the same rows and features as a run never
    killed, and no temporaries."""
    home = fresh_home(tmp_path, raw_screen, "home")
    proc = start_worker(home, PLATE)
    kill_when(proc, lambda: stage in started_steps(instance_of(home)))
    assert finish(start_worker(home, PLATE))["ok"] == [PLATE]
    digest = lake_digest(home)
    assert {t: rows for t, (rows, _) in digest.items()} == {t: rows for t, (rows, _) in clean_digest.items()}
    for table, (_, checksum) in digest.items():
        assert checksum == pytest.approx(clean_digest[table][1], rel=1e-6), table
    assert leftovers(home) == []


def test_killed_run_holding_the_gpu_slot_does_not_block_the_next_plate(raw_screen: Path, tmp_path: Path) -> None:
    """A run killed inside `embeddings/ca_mae` (the `gpu` pool's one slot claimed) is failed and its
    slot freed; the next plate's run completes (bounded: the worker's timeout)."""
    home = fresh_home(tmp_path, raw_screen, "home")
    proc = start_worker(home, PLATE)

    kill_when(proc, lambda: bool(gpu_slot_holders(home)))
    dead = instance_of(home).get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    assert len(dead) == 1 and gpu_slot_holders(home) == {dead[0].run_id}
    t0 = time.monotonic()
    assert finish(start_worker(home, "SYN-P02"), timeout=300)["ok"] == ["SYN-P02"]
    print(f"second plate done {time.monotonic() - t0:.0f} s after the kill")
    assert instance_of(home).get_run_by_id(dead[0].run_id).status == dg.DagsterRunStatus.FAILURE
    assert not gpu_slot_holders(home)


def test_daemon_fails_the_dead_run_and_frees_its_slot(raw_screen: Path, tmp_path: Path) -> None:
    """The same kill with only the Dagster daemon watching: run monitoring (bioembed's launcher health
    check) fails the run and frees the slot without any bioembed process running."""
    home = fresh_home(tmp_path, raw_screen, "home")
    proc = start_worker(home, PLATE)
    kill_when(proc, lambda: bool(gpu_slot_holders(home)))
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text("load_from:\n  - python_module: dagster_project.definitions\n")
    log = tmp_path / "daemon.log"
    daemon = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(workspace)],
                              cwd=REPO, env=_env(home), stdout=log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline, freed = time.monotonic() + 240, False
        while time.monotonic() < deadline and not freed:
            time.sleep(2)
            freed = not gpu_slot_holders(home)
        assert freed, f"the daemon did not free the dead run's slot within 240 s:\n{log.read_text()[-3000:]}"
        runs = instance_of(home).get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
        assert len(runs) == 1
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=60)


def test_eight_plates_in_parallel_with_sql_readers(tmp_path: Path) -> None:
    """8 plates, one process each, while readers query the catalog: every plate complete and
    duplicate-free, no reader or writer error (no lock errors)."""
    raw = tmp_path / "raw8"
    screen = SyntheticScreenConfig(**{**TINY_SCREEN.__dict__, "n_plates": 8})
    plates = generate_screen(raw, screen)
    home = fresh_home(tmp_path, raw, "home")
    errors, reads, stop = [], [0], threading.Event()

    def read() -> None:
        while not stop.is_set():
            if (home / "bioembed.duckdb").exists():  # built by the first plate's profiles
                try:
                    with connect(home / "bioembed.duckdb") as con:
                        con.execute("SELECT count(*) FROM cells").fetchone()
                        con.execute("SELECT count(*), count(DISTINCT plate) FROM profiles").fetchone()
                    reads[0] += 1
                except duckdb.Error as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.1)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for r in readers:
        r.start()
    try:
        procs = [start_worker(home, p) for p in plates]
        results = [finish(p, timeout=1200) for p in procs]
    finally:
        stop.set()
        for r in readers:
            r.join()
    assert [r["ok"] for r in results] == [[p] for p in plates], results
    assert errors == [] and reads[0] > 0
    lake = Lake(home / "lake")
    cells, emb = lake.read("cells"), lake.read("embeddings", encoder="ca_mae")
    assert cells["plate"].n_unique() == 8 and cells.select("plate", "cell_id").is_unique().all()
    assert emb.height == cells.height and emb.select("plate", "cell_id").is_unique().all()
    assert lake.read("well_profiles", encoder="classical")["plate"].n_unique() == 8
    assert leftovers(home) == []
