"""Shared fixtures: a tiny synthetic screen materialized through real Dagster runs."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import tifffile

from bioembed_assets.config import HOME_ENV_VAR
from bioembed_assets.images.store import ingest_plate
from bioembed_assets.schema import well_name
from bioembed_assets.sources.layouts import FieldFiles
from bioembed_assets.sources.synthetic import SyntheticScreenConfig, generate_screen

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BBBC013_DIR = SHARED_DATA / "cellprofiler-examplesbs-bbbc013" / "tests" / "core" / "data" / "ExampleSBSImages"

TINY_SCREEN = SyntheticScreenConfig(
    n_plates=2, n_rows=4, n_cols=6, sites_per_well=1, image_size=256, n_moas=2,
    compounds_per_moa=2, n_inactive=2, replicates_per_plate=2, n_dmso_wells=6, seed=7,
)
BAD_PLATES = ("BAD-MISSING", "BAD-CORRUPT", "BAD-NOCONTROLS")


REPO = Path(__file__).resolve().parents[1]


def bare_env(user_home: Path) -> dict[str, str]:
    """What a user's shell has: PATH, a HOME, a locale. None of pytest's variables (MLflow skips its
    telemetry by itself under PYTEST_CURRENT_TEST), no CI, no XDG_*/MPLCONFIGDIR/DAGSTER_HOME."""
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TMPDIR") if k in os.environ}
    return env | {"HOME": str(user_home), "PYTHONPATH": str(REPO)}


def entries(folder: Path) -> list[str]:
    """The sorted names in `folder`, without writers' lock files (`.lock-*`, kept on purpose)."""
    return sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith(".lock-"))


def make_plate_store(root: Path, fields: np.ndarray, channels: list[str], plate: str = "P1") -> tuple[Path, pl.DataFrame]:
    """A plate store (through TIFFs and `ingest_plate`) from an array (n_fields, C, H, W), one site
    per well, and its image table."""
    files = []
    for i, stack in enumerate(fields):
        well = well_name(i // 12 + 1, i % 12 + 1)
        paths = {}
        for stain, plane in zip(channels, stack):
            paths[stain] = root / "tiff" / f"{well}-{stain}.tif"
            paths[stain].parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(paths[stain], plane)
        files.append(FieldFiles(plate=plate, well=well, site=1, paths=paths))
    store = root / f"{plate}.zarr"
    return store, ingest_plate(files, store, channels)


@dataclass
class MaterializedHome:
    home: object
    good_plates: list[str]
    outcome: object


def make_bad_plates(raw_root: Path, template_plate: str) -> None:
    """Copies of a good plate with one defect each: a missing channel file, a truncated TIFF,
    a platemap without negative controls."""
    for name in BAD_PLATES:
        shutil.copytree(raw_root / template_plate, raw_root / name, dirs_exist_ok=True)
    (raw_root / "BAD-MISSING" / "Images" / "r01c02f01p01-ch3sk1fk1fl1.tiff").unlink()
    corrupt = raw_root / "BAD-CORRUPT" / "Images" / "r02c03f01p01-ch2sk1fk1fl1.tiff"
    corrupt.write_bytes(corrupt.read_bytes()[:300])
    platemap = raw_root / "BAD-NOCONTROLS" / "platemap.csv"
    lines = platemap.read_text().splitlines()
    platemap.write_text("\n".join(lines[:1] + [l.replace(",negative,", ",treatment,") for l in lines[1:]]) + "\n")


@pytest.fixture(scope="session")
def materialized_home(tmp_path_factory: pytest.TempPathFactory) -> MaterializedHome:
    """Two good plates and three bad ones, run through the whole asset graph in-process."""
    from dagster_project.demo import materialize_home, use_home
    from dagster_project.resources import BioembedHome

    saved = {k: os.environ.get(k) for k in ("DAGSTER_HOME", "BIOEMBED_HOME")}
    home = use_home(tmp_path_factory.mktemp("home"))
    good = generate_screen(home.raw_root, TINY_SCREEN)
    make_bad_plates(home.raw_root, good[0])
    outcome = materialize_home(home, [*good, *BAD_PLATES],
                               BioembedHome(root=str(home.root), null_size=1000), log=lambda *_: None)
    yield MaterializedHome(home, good, outcome)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables `bioembed` points at its home, restored after the test."""
    for var in ("DAGSTER_HOME", HOME_ENV_VAR):
        monkeypatch.setenv(var, os.environ.get(var, str(tmp_path / "unset")))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "matplotlib"))
