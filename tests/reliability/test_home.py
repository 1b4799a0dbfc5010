"""A home is self-contained: nothing written outside it, no telemetry, and it still works when moved."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bioembed_assets.config import Home
from bioembed_assets.registry import EncoderRegistry
from bioembed_assets.sources.synthetic import generate_screen
from bioembed_assets.store.catalog import connect
from tests.conftest import TINY_SCREEN, bare_env
from tests.reliability.test_faults import finish, start_worker

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def test_demo_writes_only_inside_its_home_and_sends_no_telemetry(tmp_path: Path) -> None:
    user_home, cwd, home = tmp_path / "user", tmp_path / "cwd", tmp_path / "home"
    user_home.mkdir()
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-m", "dagster_project.cli", "demo", "--home", str(home), "--plates", "1",
                           "--no-train"], cwd=cwd, env=bare_env(user_home), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.relative_to(user_home).as_posix() for p in user_home.rglob("*")) == []  # no telemetry.json, caches
    assert sorted(p.name for p in cwd.iterdir()) == []  # no ./mlruns
    with sqlite3.connect(Home(root=home).mlflow_db) as con:
        locations = [r[0] for r in con.execute("SELECT artifact_location FROM experiments")]
    assert locations and all(loc.startswith(Home(root=home).mlflow_artifacts.as_uri()) for loc in locations), locations
    assert "MLFLOW_DISABLE_TELEMETRY=true" in proc.stdout  # the printed `mlflow ui` command keeps it off too


def test_a_moved_home_opens_loads_models_and_runs_new_plates(tmp_path: Path) -> None:
    old, new = tmp_path / "old-home", tmp_path / "elsewhere" / "home with 'quote'"
    generate_screen(old / "raw", TINY_SCREEN)
    assert finish(start_worker(old, "SYN-P01"))["ok"] == ["SYN-P01"]
    with connect(Home(root=old).catalog_path) as con:
        before = {v: con.sql(f"SELECT count(*) FROM {v}").fetchone()[0] for v in ("cells", "embeddings", "profiles")}

    new.parent.mkdir()
    shutil.move(old, new)
    catalog_bytes = Home(root=new).catalog_path.read_bytes()
    assert str(old).encode() not in catalog_bytes  # the views name the lake relative to the catalog
    with connect(Home(root=new).catalog_path) as con:
        assert {v: con.sql(f"SELECT count(*) FROM {v}").fetchone()[0] for v in before} == before

    home = Home(root=new)
    encoder, version = EncoderRegistry(home.mlflow_tracking_uri, home.mlflow_artifacts).load("ca_mae")
    assert version.version == "1" and encoder.spec.embedding_dim > 0
    assert str(old).encode() not in home.mlflow_db.read_bytes()  # every recorded location was moved

    assert finish(start_worker(new, "SYN-P02"))["ok"] == ["SYN-P02"]
    assert not old.exists()  # nothing was written at the old location
    with connect(home.catalog_path) as con:
        assert con.sql("SELECT count(DISTINCT plate) FROM profiles").fetchone()[0] == 2
