"""`bioembed import-profiles`: a real profile table through Dagster into the feature store, normalized
and evaluated, with nothing written outside the bioembed home; a lab's image table joined to its platemap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from bioembed_assets.store.catalog import connect
from bioembed_assets.store.lake import Lake

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


@pytest.mark.usefixtures("cli_env")
def test_import_profiles_cli_joins_a_platemap_selects_features_and_maps_batch_and_compound(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A CellProfiler-style image table (Image_Metadata_* with a numeric concentration, numeric image
    columns) and its platemap, imported with --metadata/--on, --metadata-prefix, --features, --batch, --compound."""
    from dagster_project.cli import main

    rng = np.random.default_rng(5)
    wells = [f"B{i + 1:02d}" for i in range(12)]
    profiles, platemap, home = tmp_path / "image.csv", tmp_path / "platemap.tsv", tmp_path / "home"
    pl.DataFrame({"ImageNumber": np.arange(12), "Image_Metadata_Plate": ["BR1"] * 12, "Image_Metadata_Well": wells,
                  "Image_Metadata_Concentration": [0.0] * 4 + [0.1, 1.0] * 4, "Image_Count_Cells": rng.integers(50, 90, 12),
                  **{f"Cells_f{j}": rng.random(12) for j in range(3)},
                  **{f"Nuclei_AreaShape_f{j}": rng.random(12) for j in range(2)},
                  "Nuclei_Texture_g": rng.random(12)}).write_csv(profiles)
    pl.DataFrame({"well_position": wells, "pert_iname": ["DMSO"] * 4 + [f"cpd{i // 2}" for i in range(8)],
                  "week": ["2024-W01"] * 12}).write_csv(platemap, separator="\t")
    rc = main(["import-profiles", str(profiles), "--home", str(home), "--name", "cp", "--null-size", "100",
               "--plate-col", "Image_Metadata_Plate", "--well-col", "Image_Metadata_Well",
               "--metadata-prefix", "Image_Metadata_", "--metadata", str(platemap), "--on",
               "Image_Metadata_Well=well_position", "--compound", "pert_iname", "--batch", "week",
               "--negative", "pert_iname=DMSO", "--features", "Cells_*,Nuclei_AreaShape_*"])
    assert rc == 0, capsys.readouterr().err
    assert "Imported feature set cp v1" in capsys.readouterr().out
    manifest = json.loads((home / "feature_sets" / "cp" / "v1.json").read_text())
    assert manifest["features"] == ["Cells_f0", "Cells_f1", "Cells_f2", "Nuclei_AreaShape_f0", "Nuclei_AreaShape_f1"]
    df = Lake(home / "lake").read("well_profiles", encoder="cp").sort("well")
    assert df["compound"].to_list() == df["perturbation"].to_list() == ["DMSO"] * 4 + [f"cpd{i // 2}" for i in range(8)]
    assert set(df["batch"]) == {"2024-W01"} and df["Image_Metadata_Concentration"].dtype == pl.String
    saved = json.loads((home / "feature_sets" / "cp" / "import.json").read_text())["spec"]
    assert saved["metadata_prefixes"] == ["Metadata_", "Image_Metadata_"] and saved["metadata_files"] == [str(platemap)]
    con = connect(home / "bioembed.duckdb")
    assert con.sql("SELECT n_features FROM feature_sets WHERE feature_set = 'cp'").fetchone()[0] == 5
