"""Importing external well-level profile tables (pycytominer / JUMP style) as feature sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from bioembed_assets.schema import BioembedInputError
from bioembed_assets.sources.profile_table import ProfileImportSpec, import_profiles, latest_version, load_manifest
from bioembed_assets.store.lake import Lake, features_to_numpy
from tests.conftest import entries

from .conftest import SHARED_DATA

LINCS = SHARED_DATA / "lincs-cp-SQ00015054/cytominer_eval/example_data/compound/SQ00015054_normalized_feature_select.csv.gz"
PEDIATRIC = SHARED_DATA / "pediatric-cancer-atlas-profiles/3.preprocessing_features/data/bulk_profiles"
LINCS_SPEC = ProfileImportSpec(name="lincs", negative={"Metadata_broad_sample": ["DMSO"]}, moa_col="Metadata_moa")

needs_lincs = pytest.mark.skipif(not LINCS.exists(), reason="shared LINCS profiles absent")
needs_pediatric = pytest.mark.skipif(not PEDIATRIC.is_dir(), reason="shared pediatric atlas profiles absent")


def _table(path: Path, plate: str = "P1", n: int = 6, **extra) -> Path:
    rng = np.random.default_rng(0)
    df = pl.DataFrame({"Metadata_Plate": [plate] * n, "Metadata_Well": [f"A{i + 1:02d}" for i in range(n)],
                       "Metadata_broad_sample": ["DMSO", "DMSO", "c1", "c1", "c2", "c2"][:n],
                       "Cells_a": rng.random(n), "Nuclei_b": rng.random(n), **extra})
    if path.suffix == ".parquet":
        df.write_parquet(path)
    else:
        df.write_csv(path)
    return path


@needs_lincs
def test_real_lincs_plate_imports_with_controls_moa_and_exact_values(tmp_path: Path) -> None:
    result = import_profiles(tmp_path, [LINCS], LINCS_SPEC)
    assert (result.name, result.version, result.rows, result.plates) == ("lincs", "1", 384, ["SQ00015054"])
    assert len(result.features) == 454 and result.features[0].startswith("Cells_")
    df = Lake(tmp_path / "lake").read("well_profiles", encoder="lincs", version="1")
    assert df.height == 384 and (df["control_type"] == "negative").sum() == 24
    assert df.filter(pl.col("control_type") == "negative")["moa"].null_count() == 24
    assert df["Metadata_pert_type"].n_unique() == 2  # other metadata kept
    src = pl.read_csv(LINCS, infer_schema_length=None).sort("Metadata_Well")
    X = features_to_numpy(df.sort("well"))
    np.testing.assert_array_equal(X, src.select(result.features).to_numpy().astype(np.float32))
    # same files + mapping -> same version; another mapping -> version 2
    assert import_profiles(tmp_path, [LINCS], LINCS_SPEC).version == "1"
    other = import_profiles(tmp_path, [LINCS], LINCS_SPEC.model_copy(update={"moa_col": "Metadata_target"}))
    assert other.version == "2" and latest_version(tmp_path, "lincs") == "2"
    assert load_manifest(tmp_path, "lincs", "1")["sources"][0]["sha256"]


@needs_pediatric
def test_real_pediatric_plates_intersect_features_and_harmonize_names(tmp_path: Path) -> None:
    files = sorted(PEDIATRIC.glob("*/*_feature_selected.parquet"))
    spec = ProfileImportSpec(name="pediatric", perturbation_cols=["Metadata_cell_line"], canonical_perturbation=True,
                             negative={"Metadata_cell_line": ["U2-OS"]})
    result = import_profiles(tmp_path, files, spec)
    assert len(result.plates) == 18 and len(result.features) == 46  # the 46 features common to all files
    df = Lake(tmp_path / "lake").read("well_profiles", encoder="pediatric")
    assert df["perturbation"].n_unique() == 28  # spellings like U2-OS / U-2OS merged
    assert set(df.filter(pl.col("control_type") == "negative")["perturbation"]) == {"U2OS"}
    assert df.filter(pl.col("control_type") == "negative")["plate"].n_unique() == 18  # anchor on every plate


def test_bad_tables_fail_with_clear_errors_and_write_nothing(tmp_path: Path) -> None:
    good = _table(tmp_path / "good.csv")
    spec = ProfileImportSpec(name="t", negative={"Metadata_broad_sample": ["DMSO"]})
    no_col = tmp_path / "nocol.csv"
    pl.read_csv(good).drop("Metadata_Well").write_csv(no_col)
    with pytest.raises(BioembedInputError, match=r"nocol\.csv.*missing metadata column\(s\) \['Metadata_Well'\]"):
        import_profiles(tmp_path / "h", [good, no_col], spec)
    assert not (tmp_path / "h" / "lake" / "well_profiles").exists()  # the good file was not half-imported
    dup = tmp_path / "dup.csv"
    pl.concat([pl.read_csv(good), pl.read_csv(good).head(1)]).write_csv(dup)
    with pytest.raises(BioembedInputError, match=r"plate=P1, well=A01.*dup\.csv.*duplicate rows"):
        import_profiles(tmp_path / "h", [dup], spec)
    with pytest.raises(BioembedInputError, match="same well appears in several files"):
        import_profiles(tmp_path / "h", [good, _table(tmp_path / "again.parquet")], spec)
    with pytest.raises(BioembedInputError, match=r"invalid plate name '\.\./x'"):
        import_profiles(tmp_path / "h", [_table(tmp_path / "esc.csv", plate="../x")], spec)
    with pytest.raises(BioembedInputError, match="unsupported file type"):
        import_profiles(tmp_path / "h", [tmp_path / "x.xlsx"], spec)
    with pytest.raises(BioembedInputError, match="Cells_a' is String, expected numbers"):
        import_profiles(tmp_path / "h", [good, _table(tmp_path / "txt.csv", plate="P2", Cells_a=["x"] * 6)],
                        spec.model_copy(update={"features": ["Cells_a", "Nuclei_b"]}))
    assert not (tmp_path / "h" / "lake" / "well_profiles").exists()


def test_files_with_different_features_intersect_or_fail(tmp_path: Path) -> None:
    a = _table(tmp_path / "a.csv")
    b = _table(tmp_path / "b.csv", plate="P2", Cytoplasm_c=np.arange(6.0))
    spec = ProfileImportSpec(name="t")
    assert import_profiles(tmp_path / "h", [a, b], spec).features == ["Cells_a", "Nuclei_b"]
    with pytest.raises(BioembedInputError, match=r"b\.csv.*different feature columns \(2 common of 3\)"):
        import_profiles(tmp_path / "h", [a, b], spec.model_copy(update={"feature_join": "exact"}))


def test_reimport_replaces_the_version_atomically(tmp_path: Path) -> None:
    a = _table(tmp_path / "a.csv")
    spec = ProfileImportSpec(name="t")
    import_profiles(tmp_path, [a], spec)
    lake = tmp_path / "lake"
    before = sorted(p.relative_to(lake) for p in lake.rglob("*.parquet"))
    import_profiles(tmp_path, [a], spec)
    assert sorted(p.relative_to(lake) for p in lake.rglob("*.parquet")) == before
    assert not entries(lake / ".staging")  # no temporary folders left behind


def test_registered_imports_round_trip(tmp_path: Path) -> None:
    from bioembed_assets.sources.profile_table import SavedImport, save_import, saved_imports

    assert saved_imports(tmp_path) == []
    saved = SavedImport(spec=ProfileImportSpec(name="t", moa_col="Metadata_moa"), files=["/data/a.csv"],
                        recipes={"card": "card", "jump": "jump"})
    save_import(tmp_path, saved)
    assert saved_imports(tmp_path) == [saved]
