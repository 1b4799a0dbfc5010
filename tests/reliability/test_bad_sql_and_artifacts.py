"""Hostile paths and names never become SQL; malicious pickles and bogus weight files never load."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from bioembed_assets.encoders.checkpoints import load_state_dict_file
from bioembed_assets.profiles.recipe import Recipe
from bioembed_assets.schema import BioembedInputError
from bioembed_assets.sources.profile_table import ProfileImportSpec, import_profiles
from bioembed_assets.store.catalog import build_catalog, connect
from bioembed_assets.store.lake import Lake, with_features

pytestmark = pytest.mark.reliability

HOSTILE_FOLDERS = ["it's", "x'; COPY (SELECT 42) TO 'pwned.csv'; --", 'dq"uote', "glob [ab]*", "sp ace",
                   "ümlaut", "semi;colon", "back\\slash", "$(touch pwned)"]


def _lake_with_profiles(home: Path) -> None:
    lake = Lake(home / "lake")
    meta = pl.DataFrame({"plate": ["P1"] * 3, "well": ["A01", "A02", "A03"], "perturbation": ["a", "b", "DMSO"],
                         "control_type": ["treatment", "treatment", "negative"], "moa": [None, None, None],
                         "encoder": ["e"] * 3, "encoder_version": ["1"] * 3, "recipe": ["card"] * 3,
                         "recipe_steps": ["x"] * 3, "n_cells": [1, 1, 1]})
    X = np.eye(3, dtype=np.float32)
    lake.write("normalized_profiles", with_features(meta, X), encoder="e", version="1", recipe="card", plate="P1")
    lake.write("well_profiles", with_features(meta.drop("recipe", "recipe_steps"), X), encoder="e", version="1",
               plate="P1")


@pytest.mark.parametrize("folder", HOSTILE_FOLDERS)
def test_catalog_builds_and_opens_under_hostile_home_paths(folder: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    home = tmp_path / folder
    _lake_with_profiles(home)
    build_catalog(home / "bioembed.duckdb", home / "lake")
    with connect(home / "bioembed.duckdb") as con:
        assert con.sql("SELECT count(*) FROM normalized_profiles").fetchone()[0] == 3
        assert con.sql("SELECT n_plates, n_wells FROM feature_sets").fetchall() == [(1, 3)]
    assert not list(tmp_path.rglob("pwned*"))  # nothing executed


@pytest.mark.parametrize("folder", ["a,b", "what?"])
def test_home_paths_duckdb_cannot_hold_are_refused_clearly(folder: str, tmp_path: Path) -> None:
    home = tmp_path / folder
    _lake_with_profiles(home)
    with pytest.raises(ValueError, match="contains '[,?]'"):
        build_catalog(home / "bioembed.duckdb", home / "lake")


def test_macro_arguments_are_values_not_sql(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _lake_with_profiles(tmp_path)
    build_catalog(tmp_path / "bioembed.duckdb", tmp_path / "lake")
    hostile = "A01'); COPY (SELECT 1) TO 'pwned.csv'; --"
    with connect(tmp_path / "bioembed.duckdb") as con:
        rows = con.execute("SELECT * FROM similar_wells(?, ?, ?, ?, ?)", ["P1", hostile, "e", "card", 3]).fetchall()
        assert rows == []
        assert len(con.execute("SELECT * FROM similar_wells(?, ?, ?, ?, ?)", ["P1", "A01", "e", "card", 3]).fetchall()) == 2
    assert not list(tmp_path.rglob("pwned*"))


@pytest.mark.parametrize("name", ["x'; DROP VIEW cells; --", "../escape", "a/b", "", "name\n", ".hidden"])
def test_hostile_feature_set_names_are_refused(name: str, tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    pl.DataFrame({"Metadata_Plate": ["P1", "P1"], "Metadata_Well": ["A01", "A02"],
                  "Metadata_broad_sample": ["a", "DMSO"], "f1": [1.0, 2.0]}).write_csv(table)
    with pytest.raises(BioembedInputError, match="invalid plate name"):
        import_profiles(tmp_path / "home", [table], ProfileImportSpec(name=name))
    assert not (tmp_path / "home" / "lake").exists()


class _Trap:
    """Unpickling this creates a file: proof that a loader executed code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    ckpt = tmp_path / "model.pth"  # a torch zip checkpoint whose pickle runs a command
    torch.save({"w": torch.zeros(1), "trap": _Trap(marker)}, ckpt)
    with pytest.raises(Exception, match="(?i)weights only|unsupported|not allowed"):
        load_state_dict_file(ckpt)
    raw = tmp_path / "plain.pkl"  # a bare pickle under a checkpoint name
    raw.write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(Exception):  # noqa: B017 - whichever error: it must not load
        load_state_dict_file(raw)
    norm = tmp_path / "norm"  # a fitted recipe whose arrays file is an object (pickled) array
    fitted = Recipe.parse("card").fit(np.random.default_rng(0).normal(size=(20, 6)).astype(np.float32),
                                      np.array(["P1"] * 20), np.ones(20, bool))
    fitted.save(norm)
    np.savez(norm / "arrays.npz", trap=np.array([_Trap(marker)], dtype=object))
    with pytest.raises(Exception):  # noqa: B017
        Recipe.load(norm).transform(np.zeros((2, 6), np.float32), np.array(["P1", "P1"]), np.ones(2, bool))
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"not a safetensors header at all",
                                     (2**40).to_bytes(8, "little") + b"{}"])
def test_bogus_safetensors_are_clear_errors(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(content)
    with pytest.raises(BioembedInputError, match=str(path.name)):
        load_state_dict_file(path)


def test_a_zip_that_is_not_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(BioembedInputError, match=path.name):
        load_state_dict_file(path)
