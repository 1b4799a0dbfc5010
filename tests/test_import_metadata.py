"""Importing profile tables the way labs' files are: CellProfiler `Image_Metadata_*` columns, numeric
metadata that must never become features, a separate platemap joined on key columns, a feature
selector with globs, and batch / compound columns."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from bioembed_assets import schema as s
from bioembed_assets.design import with_design
from bioembed_assets.schema import BioembedInputError
from bioembed_assets.sources.profile_table import (
    ProfileImportSpec,
    SavedImport,
    import_profiles,
    load_manifest,
    read_profile_tables,
)
from bioembed_assets.store.lake import Lake, features_to_numpy

from .conftest import SHARED_DATA
from .test_profile_import import LINCS, _table

LINCS_PLATEMAP = (SHARED_DATA / "lincs-cp-SQ00015054/metadata/platemaps/2016_04_01_a549_48hr_batch1/platemap"
                  / "C-7161-01-LM6-027.txt")
WELLS = [f"A{i + 1:02d}" for i in range(8)]
DOSES = ["0", "0", "0.123456790123076923", "0.370370370369230769", "0.123456790123076923",
         "0.370370370369230769", "10", "10"]


def _cellprofiler_csv(path: Path) -> Path:
    """A per-well table as CellProfiler's image table has it: `Image_Metadata_*` (plate, well, compound,
    a numeric concentration and replicate), numeric image columns, a file name, and object features."""
    rng = np.random.default_rng(3)
    n = len(WELLS)
    pl.DataFrame({
        "ImageNumber": np.arange(1, n + 1), "Image_Metadata_Plate": ["BR00117010"] * n, "Image_Metadata_Well": WELLS,
        "Image_Metadata_Compound": ["DMSO", "DMSO", "taxol", "taxol", "brefeldin", "brefeldin", "taxol", "brefeldin"],
        "Image_Metadata_Concentration": DOSES, "Image_Metadata_Replicate": [1, 2, 1, 1, 1, 1, 2, 2],
        "Image_Count_Cells": rng.integers(200, 400, n), "Image_FileName_DNA": [f"r01c0{i}f01p01-ch1.tiff" for i in range(n)],
        "Cells_AreaShape_Area": rng.random(n), "Cells_Intensity_MeanIntensity_DNA": rng.random(n),
        "Nuclei_AreaShape_Area": rng.random(n), "Nuclei_Texture_Contrast_DNA": rng.random(n),
    }).write_csv(path)  # a CSV has no types: the concentration is the numbers a lab's file has
    return path


CP_SPEC = ProfileImportSpec(name="cp", plate_col="Image_Metadata_Plate", well_col="Image_Metadata_Well",
                            metadata_prefixes=["Metadata_", "Image_Metadata_"], compound_col="Image_Metadata_Compound",
                            negative={"Image_Metadata_Compound": ["DMSO"]})


def test_image_metadata_columns_are_metadata_and_numeric_ones_never_features(tmp_path: Path) -> None:
    table = _cellprofiler_csv(tmp_path / "image.csv")
    result = import_profiles(tmp_path / "h", [table], CP_SPEC)
    assert "Image_Metadata_Concentration" not in result.features and "Image_Metadata_Replicate" not in result.features
    assert result.features == ["ImageNumber", "Image_Count_Cells", "Cells_AreaShape_Area",
                               "Cells_Intensity_MeanIntensity_DNA", "Nuclei_AreaShape_Area", "Nuclei_Texture_Contrast_DNA"]
    assert result.ignored_columns == ["Image_FileName_DNA"]
    df = Lake(tmp_path / "h" / "lake").read("well_profiles", encoder="cp").sort("well")
    assert df["Image_Metadata_Concentration"].dtype == pl.String
    assert df["Image_Metadata_Concentration"].to_list()[2] == "0.123456790123076923"  # the file's text, not a float
    assert df["Image_Metadata_Replicate"].to_list() == ["1", "2", "1", "1", "1", "1", "2", "2"]
    # no --perturbation: the compound column is the perturbation; Metadata_broad_sample is not demanded
    assert df[s.PERTURBATION].to_list() == df["Image_Metadata_Compound"].to_list() == df[s.COMPOUND].to_list()
    assert (df[s.CONTROL_TYPE] == "negative").sum() == 2
    # listed metadata columns are metadata too, numeric or not; the selector keeps only object features
    listed = import_profiles(tmp_path / "h2", [table], CP_SPEC.model_copy(
        update={"metadata_cols": ["ImageNumber", "Image_Count_Cells"]}))
    assert listed.features == result.features[2:]
    picked = import_profiles(tmp_path / "h3", [table], CP_SPEC.model_copy(update={"features": ["Cells_*", "Nuclei_*"]}))
    assert picked.features == result.features[2:]
    assert Lake(tmp_path / "h2" / "lake").read("well_profiles", encoder="cp")["ImageNumber"].dtype == pl.String


def test_the_dose_of_the_default_table_is_metadata_even_when_numeric(tmp_path: Path) -> None:
    table = _table(tmp_path / "t.parquet", Metadata_mmoles_per_liter=[0.0, 0.0, 1.0, 3.0, 1.0, 3.0],
                   Metadata_replicate=[1, 2, 1, 1, 2, 2])
    result = import_profiles(tmp_path / "h", [table], ProfileImportSpec(name="t"))
    assert result.features == ["Cells_a", "Nuclei_b"]
    df = Lake(tmp_path / "h" / "lake").read("well_profiles", encoder="t").sort("well")
    assert df["Metadata_mmoles_per_liter"].to_list() == ["0.0", "0.0", "1.0", "3.0", "1.0", "3.0"]


def test_features_selector_takes_names_and_globs_in_order(tmp_path: Path) -> None:
    table = _cellprofiler_csv(tmp_path / "image.csv")

    def features(*selector: str) -> list[str]:
        return read_profile_tables([table], CP_SPEC.model_copy(update={"features": list(selector)})).features

    assert features("Nuclei_AreaShape_*", "Cells_*") == ["Nuclei_AreaShape_Area", "Cells_AreaShape_Area",
                                                         "Cells_Intensity_MeanIntensity_DNA"]
    assert features("*_DNA", "Cells_AreaShape_Area") == ["Cells_Intensity_MeanIntensity_DNA", "Nuclei_Texture_Contrast_DNA",
                                                         "Cells_AreaShape_Area"]
    assert "Image_FileName_DNA" not in features("Image_*")  # a glob skips text and never matches metadata
    assert features("Image_*") == ["Image_Count_Cells"]
    with pytest.raises(BioembedInputError, match=r"image\.csv\] feature pattern 'Cytoplasm_\*' matches no non-metadata"):
        features("Cells_*", "Cytoplasm_*")
    with pytest.raises(BioembedInputError, match=r"\['Image_Metadata_Compound'\] are metadata"):
        features("Cells_*", "Image_Metadata_Compound")
    with pytest.raises(BioembedInputError, match="'Image_FileName_DNA' is String, expected numbers"):
        features("Image_FileName_DNA")
    # a column named explicitly is taken even with a metadata prefix (it is then not kept as metadata)
    spec = CP_SPEC.model_copy(update={"features": ["Cells_*", "Image_Metadata_Replicate"]})
    tables = read_profile_tables([table], spec)
    assert tables.features[-1] == "Image_Metadata_Replicate" and "Image_Metadata_Replicate" not in tables.meta.columns


def _profiles_and_platemap(tmp_path: Path) -> tuple[Path, Path]:
    """Profiles holding only plate, well and features, and their platemap (other well names, numeric doses,
    none for the DMSO wells)."""
    rng = np.random.default_rng(4)
    profiles = tmp_path / "profiles.parquet"
    pl.DataFrame({"Metadata_Plate": ["P1"] * 8 + ["P2"] * 8, "Metadata_Well": WELLS * 2,
                  "Metadata_Plate_Map_Name": ["map-1"] * 16,
                  "Cells_a": rng.random(16), "Nuclei_b": rng.random(16)}).write_parquet(profiles)
    platemap = tmp_path / "platemap.txt"
    pl.DataFrame({"plate_map_name": ["map-1"] * 8, "well_position": WELLS,
                  "broad_sample": ["DMSO", "DMSO", "BRD-1", "BRD-1", "BRD-2", "BRD-2", "BRD-1", "BRD-2"],
                  "mmoles_per_liter": [None, None, *DOSES[2:]], "batch": ["week1"] * 8}).write_csv(platemap, separator="\t")
    return profiles, platemap


JOIN = ProfileImportSpec(name="joined", metadata_files=["PLATEMAP"],
                         metadata_on=["Metadata_Plate_Map_Name=plate_map_name", "Metadata_Well=well_position"],
                         perturbation_cols=["broad_sample", "mmoles_per_liter"], compound_col="broad_sample",
                         batch_col="batch", negative={"broad_sample": ["DMSO"]})


def _join_spec(platemap: Path, **update) -> ProfileImportSpec:
    return JOIN.model_copy(update={"metadata_files": [str(platemap)], **update})


def test_a_platemap_is_joined_and_its_columns_are_metadata(tmp_path: Path) -> None:
    profiles, platemap = _profiles_and_platemap(tmp_path)
    result = import_profiles(tmp_path / "h", [profiles], _join_spec(platemap))
    assert result.features == ["Cells_a", "Nuclei_b"] and result.rows == 16
    df = Lake(tmp_path / "h" / "lake").read("well_profiles", encoder="joined").sort("plate", "well")
    assert df["mmoles_per_liter"].to_list()[:8] == [None, None, *DOSES[2:]]  # the platemap's text, kept as metadata
    assert df[s.PERTURBATION].to_list()[:3] == ["DMSO", "DMSO", "BRD-1 @ 0.123456790123076923"]  # no dose: left out
    assert df[s.COMPOUND].to_list()[:8] == ["DMSO", "DMSO", "BRD-1", "BRD-1", "BRD-2", "BRD-2", "BRD-1", "BRD-2"]
    assert set(df[s.BATCH]) == {"week1"} and "Metadata_batch" not in df.columns  # the mapped column is `batch` itself
    assert (df[s.CONTROL_TYPE] == "negative").sum() == 4
    src = pl.read_parquet(profiles).sort("Metadata_Plate", "Metadata_Well")
    np.testing.assert_array_equal(features_to_numpy(df), src.select("Cells_a", "Nuclei_b").to_numpy().astype(np.float32))
    manifest = load_manifest(tmp_path / "h", "joined", result.version)
    assert manifest["metadata_sources"][0]["path"] == str(platemap.resolve())
    assert "mmoles_per_liter" in manifest["metadata_columns"]
    assert with_design(df)[s.BATCH].unique().to_list() == ["week1"]
    # every part empty: no perturbation
    empty = tmp_path / "empty.csv"
    pl.read_csv(platemap, separator="\t", infer_schema=False).with_columns(
        pl.when(pl.col("well_position") == "A01").then(None).otherwise(pl.col("broad_sample")).alias("broad_sample")
    ).write_csv(empty)
    with pytest.raises(BioembedInputError, match=r"profiles\.parquet\] 2 row\(s\) have no perturbation value"):
        import_profiles(tmp_path / "h", [profiles], _join_spec(empty))
    # the platemap is part of the content: editing it makes a new version
    platemap.write_text(platemap.read_text().replace("week1", "week2"))
    assert import_profiles(tmp_path / "h", [profiles], _join_spec(platemap)).version == "2"


def test_a_metadata_column_named_like_a_bioembed_column_is_kept_under_a_prefix(tmp_path: Path) -> None:
    profiles, platemap = _profiles_and_platemap(tmp_path)
    tables = read_profile_tables([profiles], _join_spec(platemap, batch_col=None))
    assert s.BATCH not in tables.meta.columns and tables.meta["Metadata_batch"].unique().to_list() == ["week1"]


def test_bad_joins_fail_naming_files_keys_and_counts(tmp_path: Path) -> None:
    profiles, platemap = _profiles_and_platemap(tmp_path)
    pm = pl.read_csv(platemap, separator="\t", infer_schema=False)
    short = tmp_path / "short.csv"
    pm.filter(pl.col("well_position") != "A05").write_csv(short)
    with pytest.raises(BioembedInputError, match=r"profiles\.parquet\] 2 of 16 profile row\(s\) match no row of the "
                                                 r"metadata table\(s\) \['.*short\.csv'\].*first: Metadata_Plate_Map_Name="
                                                 r"'map-1', Metadata_Well='A05'"):
        import_profiles(tmp_path / "h", [profiles], _join_spec(short))
    twice = tmp_path / "twice.csv"
    pl.concat([pm, pm.filter(pl.col("well_position") == "A03")]).write_csv(twice)
    with pytest.raises(BioembedInputError, match=r"2 profile row\(s\) match several metadata rows: Metadata_Plate_Map_Name="
                                                 r"'map-1', Metadata_Well='A03' is in 2 rows of \['.*twice\.csv'\]"):
        import_profiles(tmp_path / "h", [profiles], _join_spec(twice))
    with pytest.raises(BioembedInputError, match=r"platemap\.txt\] metadata table has no key column\(s\) \['Well'\]"):
        import_profiles(tmp_path / "h", [profiles], _join_spec(platemap, metadata_on=["Metadata_Well=Well"]))
    with pytest.raises(BioembedInputError, match=r"profile table has no join key column\(s\) \['plate_map_name'\]"):
        import_profiles(tmp_path / "h", [profiles], _join_spec(platemap, metadata_on=["plate_map_name"]))
    clash = tmp_path / "clash.csv"
    pm.with_columns(pl.lit("x").alias("Cells_a")).write_csv(clash)
    with pytest.raises(BioembedInputError, match=r"column\(s\) \['Cells_a'\] are in both the profile table and the "
                                                 r"metadata table"):
        import_profiles(tmp_path / "h", [profiles], _join_spec(clash))
    with pytest.raises(BioembedInputError, match=r"nowhere\.csv\] metadata table not found"):
        import_profiles(tmp_path / "h", [profiles], _join_spec(tmp_path / "nowhere.csv"))
    with pytest.raises(ValueError, match="metadata_files and metadata_on go together"):
        ProfileImportSpec(name="t", metadata_files=[str(platemap)])
    assert not (tmp_path / "h" / "lake").exists() and not (tmp_path / "h" / "feature_sets").exists()


def test_several_platemaps_are_stacked(tmp_path: Path) -> None:
    profiles, platemap = _profiles_and_platemap(tmp_path)
    pm = pl.read_csv(platemap, separator="\t", infer_schema=False)
    first, second = tmp_path / "first.csv", tmp_path / "second.parquet"
    pm.head(4).write_csv(first)
    pm.tail(4).write_parquet(second)
    spec = JOIN.model_copy(update={"metadata_files": [str(first), str(second)]})
    assert read_profile_tables([profiles], spec).meta["broad_sample"].null_count() == 0


def test_older_saved_imports_load_and_keep_their_version(tmp_path: Path) -> None:
    """A spec saved before the new fields: it loads with their defaults and its content digest is unchanged."""
    old = {"name": "t", "plate_col": "Metadata_Plate", "well_col": "Metadata_Well",
           "perturbation_cols": ["Metadata_broad_sample"], "canonical_perturbation": False, "negative": {},
           "positive": {}, "moa_col": None, "features": None, "feature_join": "intersect", "non_numeric": "error"}
    saved = SavedImport.model_validate_json(json.dumps({"spec": old, "files": ["/x.csv"]}))
    assert saved.spec.metadata_prefixes == ["Metadata_"] and saved.spec.metadata_files == []
    result = import_profiles(tmp_path, [_table(tmp_path / "a.csv")], saved.spec)
    sources = result.manifest["sources"]
    mapping = {k: v for k, v in old.items() if k != "non_numeric"}
    assert result.manifest["digest"] == hashlib.sha256(
        json.dumps([sources, mapping, result.features], sort_keys=True).encode()).hexdigest()


@pytest.mark.realdata
@pytest.mark.skipif(not (LINCS.exists() and LINCS_PLATEMAP.exists()), reason="shared LINCS profiles absent")
def test_real_lincs_plate_with_compound_batch_dose_and_its_platemap_joined(tmp_path: Path) -> None:
    spec = ProfileImportSpec(name="lincs", compound_col="Metadata_broad_sample", batch_col="Metadata_Batch_Number",
                             perturbation_cols=["Metadata_broad_sample", "mmoles_per_liter"],
                             negative={"Metadata_broad_sample": ["DMSO"]}, moa_col="Metadata_moa",
                             metadata_files=[str(LINCS_PLATEMAP)],
                             metadata_on=["Metadata_Plate_Map_Name=plate_map_name", "Metadata_Well=well_position"])
    result = import_profiles(tmp_path, [LINCS], spec.model_copy(update={"features": ["Cells_*", "Cytoplasm_*", "Nuclei_*"]}))
    assert result.rows == 384 and len(result.features) == 454
    assert not any("mmoles" in f or "mg_per_ml" in f or f.startswith("Metadata_") for f in result.features)
    df = Lake(tmp_path / "lake").read("well_profiles", encoder="lincs")
    assert df[s.COMPOUND].n_unique() == 59 and df[s.PERTURBATION].n_unique() == 339  # 58 compounds + DMSO; x doses
    assert df[s.BATCH].unique().to_list() == ["4"] and (df[s.CONTROL_TYPE] == "negative").sum() == 24
    assert df.filter(pl.col(s.CONTROL_TYPE) == "negative")[s.PERTURBATION].unique().to_list() == ["DMSO"]  # no dose
    platemap = pl.read_csv(LINCS_PLATEMAP, separator="\t", infer_schema=False)
    both = df.join(platemap, left_on="well", right_on="well_position", suffix="_map")
    assert (both["mmoles_per_liter"] == both["mmoles_per_liter_map"]).all()  # the platemap's exact text
    treated = both.filter(pl.col(s.CONTROL_TYPE) == "treatment")
    assert (treated["broad_sample"] == treated["Metadata_broad_sample"]).all()
