"""`bioembed import-profiles`: a real profile table through Dagster into the feature store, normalized
and evaluated, with nothing written outside the bioembed home."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bioembed_assets.store.catalog import connect

from .conftest import bare_env
from .test_profile_import import LINCS, needs_lincs


@needs_lincs
@pytest.mark.integration
def test_import_profiles_cli_normalizes_evaluates_and_writes_only_under_home(tmp_path: Path) -> None:
    user_home, bioembed_home = tmp_path / "user", tmp_path / "bioembed"
    user_home.mkdir()
    env = bare_env(user_home)  # none of pytest's variables: MLflow would skip its telemetry by itself under them
    cmd = [sys.executable, "-m", "dagster_project.cli", "import-profiles", str(LINCS), "--home", str(bioembed_home),
           "--name", "lincs", "--negative", "Metadata_broad_sample=DMSO", "--moa", "Metadata_moa",
           "--recipe", "card", "--recipe", "mad=mad", "--null-size", "2000"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Imported feature set lincs v1" in out.stdout
    assert sorted(p.name for p in user_home.rglob("*")) == []  # no caches in the user's home
    con = connect(bioembed_home / "bioembed.duckdb")
    sets = con.sql("SELECT feature_set, version, n_plates, n_wells, n_features FROM feature_sets").fetchall()
    assert sets == [("lincs", "1", 1, 384, 454)]
    recipes = con.sql("SELECT DISTINCT recipe, recipe_steps FROM normalized_profiles ORDER BY recipe").fetchall()
    assert [r[0] for r in recipes] == ["card", "mad"] and all(r[1] for r in recipes)
    metrics = dict(((r, m), v) for r, m, v in con.sql(
        "SELECT recipe, metric, value FROM metrics WHERE encoder = 'lincs'").fetchall())
    for recipe in ("raw", "card", "mad"):
        assert 0 < metrics[(recipe, "replicate_map")] <= 1
        assert 0 <= metrics[(recipe, "moa_map")] <= 1
    assert con.sql("SELECT count(*) FROM replicate_map WHERE encoder = 'lincs' AND kind = 'replicate'").fetchone()[0] > 0
