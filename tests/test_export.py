"""Exports (`bioembed export`: h5ad, parquet, csv) read by anndata, pycytominer and copairs; `bioembed sql`."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import polars as pl
import pytest

from bioembed_assets import schema as s
from bioembed_assets.config import Home
from bioembed_assets.evaluate.retrieval import average_precision_vs_controls, replicate_map
from bioembed_assets.export import WIDE_NAMES, export_profiles, load_export, wide_table
from bioembed_assets.feature_sets import FeatureSetRef, load_profiles, normalize_feature_set, normalizer_path
from bioembed_assets.profiles.recipe import Recipe
from bioembed_assets.sources.profile_table import ProfileImportSpec, import_profiles
from bioembed_assets.sources.synthetic_profiles import SyntheticProfilesConfig, generate_profiles
from bioembed_assets.store.catalog import build_catalog
from bioembed_assets.store.lake import Lake, with_features
from dagster_project.cli import main

N_FEATURES = 12
FEATURES = [f"Cells_f{i}" for i in range(N_FEATURES // 2)] + [f"Nuclei_f{i}" for i in range(N_FEATURES // 2)]
CONFIG = SyntheticProfilesConfig(n_rows=384, n_features=N_FEATURES, wells_per_plate=96, controls_per_plate=16,
                                 replicates=4, n_moas=3, seed=3)


@dataclass(frozen=True)
class ExportHome:
    home: Home
    csv: Path
    source: pl.DataFrame
    """The imported table, sorted by plate and well."""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> ExportHome:
    """An imported CellProfiler-style table `cp` v1 and an encoder `classical` (v2, v10), raw + card."""
    root = tmp_path_factory.mktemp("export-home")
    home = Home(root=root)
    meta, X = generate_profiles(CONFIG)
    negative = (meta[s.CONTROL_TYPE] == s.ControlType.NEGATIVE).to_numpy()
    table = pl.DataFrame({
        "Metadata_Plate": meta[s.PLATE], "Metadata_Well": meta[s.WELL],
        "Metadata_broad_sample": meta[s.PERTURBATION], "Metadata_moa": meta[s.MOA],
        "Metadata_pert_type": np.where(negative, "control", "trt"),
        "Metadata_control_type": np.where(negative, "negcon", "trt"),  # JUMP-style: not bioembed's values
    }).hstack(pl.from_numpy(X, schema=FEATURES, orient="row"))
    path = root / "profiles.csv"
    table.write_csv(path)
    spec = ProfileImportSpec(name="cp", negative={"Metadata_broad_sample": ["DMSO"]}, moa_col="Metadata_moa")
    assert import_profiles(root, [path], spec).version == "1"
    normalize_feature_set(home, FeatureSetRef("cp", "1"), {"card": "card"})
    # an encoder's well profiles, written as `profile_plate` writes them (plus a batch column)
    lake = Lake(home.lake)
    for version, shift in (("2", 0.0), ("10", 1.0)):
        rows = meta.select(s.PLATE, s.WELL, s.PERTURBATION, s.CONTROL_TYPE, s.MOA).with_columns(
            pl.lit("classical").alias(s.ENCODER), pl.lit(version).alias(s.ENCODER_VERSION),
            (pl.int_range(pl.len()) % 7 + 20).cast(pl.Int64).alias("n_cells"),
            pl.when(pl.col(s.PLATE) < "SP0002").then(pl.lit("week1")).otherwise(pl.lit("week2")).alias(s.BATCH),
            pl.lit("PM-1").alias("plate_map_name"), pl.col(s.PLATE).alias("Metadata_plate_map_name"))
        rows = with_features(rows, X[:, :8] + np.float32(shift))
        for plate in rows[s.PLATE].unique().to_list():
            lake.write("well_profiles", rows.filter(pl.col(s.PLATE) == plate), encoder="classical", version=version,
                       plate=plate)
    normalize_feature_set(home, FeatureSetRef("classical", "10"), {"card": "card"})
    build_catalog(home.catalog_path, home.lake)
    return ExportHome(home, path, table.sort("Metadata_Plate", "Metadata_Well"))


def _lake(built: ExportHome, name: str, version: str, recipe: str = "raw") -> tuple[pl.DataFrame, np.ndarray]:
    fs = FeatureSetRef(name, version)
    if recipe == "raw":
        return load_profiles(built.home, "well_profiles", fs)
    return load_profiles(built.home, "normalized_profiles", fs, recipe=recipe)


def test_h5ad_holds_obs_var_x_and_lineage_of_an_import(built: ExportHome, tmp_path: Path) -> None:
    meta, X = _lake(built, "cp", "1")
    out = export_profiles(built.home, "cp", None, "raw", "h5ad", tmp_path / "cp.h5ad")
    a = ad.read_h5ad(out)
    assert a.shape == (meta.height, N_FEATURES) and a.X.dtype == np.float32
    np.testing.assert_array_equal(a.X, X)
    assert list(a.var_names) == FEATURES
    assert list(a.obs_names[:3]) == ["0", "1", "2"]
    assert list(a.obs.columns) == [s.PLATE, s.WELL, s.PERTURBATION, s.CONTROL_TYPE, s.MOA, "Metadata_Plate",
                                   "Metadata_Well", "Metadata_broad_sample", "Metadata_moa", "Metadata_pert_type",
                                   "Metadata_control_type"]
    for col in (s.PLATE, s.WELL, s.PERTURBATION, s.CONTROL_TYPE, s.MOA, "Metadata_control_type"):
        assert a.obs[col].astype(object).where(a.obs[col].notna(), None).tolist() == meta[col].to_list(), col
    assert a.obs[s.MOA].isna().sum() == (meta[s.CONTROL_TYPE] == "negative").sum()  # nulls stay nulls
    uns = a.uns
    assert (uns["feature_set"], uns["version"], uns["recipe"], uns["recipe_steps"]) == ("cp", "1", "raw", "")
    assert uns["exported_at"] and uns["bioembed_version"]
    lineage = uns["lineage"]
    assert lineage["kind"] == "profile_import" and lineage["wells"] == meta.height
    assert list(lineage["sources"]["path"]) == [str(built.csv.resolve())]
    assert list(lineage["sources"]["sha256"]) == [hashlib.sha256(built.csv.read_bytes()).hexdigest()]
    assert json.loads(lineage["mapping"])["moa_col"] == "Metadata_moa"
    from pycytominer.cyto_utils import infer_cp_features
    from pycytominer.cyto_utils.load import load_profiles as pycytominer_load

    df = pycytominer_load(str(out))  # pycytominer reads the h5ad too: obs columns + one column per feature
    assert infer_cp_features(df) == FEATURES and df[s.PERTURBATION].tolist() == meta[s.PERTURBATION].to_list()
    np.testing.assert_array_equal(df[FEATURES].to_numpy(), X)


def test_h5ad_of_a_recipe_has_its_output_features_and_steps(built: ExportHome, tmp_path: Path) -> None:
    meta, X = _lake(built, "cp", "1", "card")
    fitted = Recipe.load(normalizer_path(built.home, FeatureSetRef("cp", "1"), "card"))
    a = ad.read_h5ad(export_profiles(built.home, "cp", "1", "card", "h5ad", tmp_path / "card.h5ad"))
    np.testing.assert_array_equal(a.X, X)
    assert list(a.var_names) == fitted.output_features and a.var_names[0] == "PC1"
    assert a.uns["recipe"] == "card" and a.uns["recipe_steps"] == fitted.spec == meta["recipe_steps"][0]
    rec = a.uns["lineage"]["recipe"]
    assert rec["features_in"] == N_FEATURES and rec["features_out"] == X.shape[1]
    assert rec["fitted_on"]["n_controls"] == (meta[s.CONTROL_TYPE] == "negative").sum()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # scanpy's log fold changes of signed profile features
def test_scanpy_reads_the_h5ad_and_runs_its_standard_steps(built: ExportHome, tmp_path: Path) -> None:
    """scanpy itself (not only anndata): read, PCA, neighbours and a per-perturbation rank test."""
    import scanpy as sc

    a = sc.read_h5ad(export_profiles(built.home, "cp", "1", "raw", "h5ad", tmp_path / "raw.h5ad"))
    meta, X = _lake(built, "cp", "1", "raw")
    np.testing.assert_array_equal(a.X, X)
    sc.pp.pca(a, n_comps=10)
    sc.pp.neighbors(a, n_neighbors=5, use_rep="X_pca")
    assert a.obsm["X_pca"].shape == (meta.height, 10) and a.obsp["connectivities"].shape == (meta.height, meta.height)
    sc.tl.rank_genes_groups(a, groupby="control_type", method="t-test")
    assert set(a.uns["rank_genes_groups"]["names"].dtype.names) == set(meta[s.CONTROL_TYPE].unique().to_list())


def test_parquet_is_a_pycytominer_profile_table(built: ExportHome, tmp_path: Path) -> None:
    from pycytominer import aggregate, feature_select
    from pycytominer.cyto_utils import infer_cp_features

    meta, X = _lake(built, "cp", "1")
    out = export_profiles(built.home, "cp", "1", "raw", "parquet", tmp_path / "cp.parquet")
    df = pd.read_parquet(out)
    assert infer_cp_features(df) == FEATURES
    assert infer_cp_features(df, metadata=True) == [
        "Metadata_Plate", "Metadata_Well", "Metadata_perturbation", "Metadata_control_type", "Metadata_moa",
        "Metadata_broad_sample", "Metadata_pert_type", "Metadata_source_control_type"]
    # the import's Metadata_Plate/Well/moa equal bioembed's: one column each; its JUMP-style control_type differs
    assert df["Metadata_control_type"].tolist() == meta[s.CONTROL_TYPE].to_list()
    assert set(df["Metadata_source_control_type"]) == {"negcon", "trt"}
    assert df["Metadata_perturbation"].tolist() == built.source["Metadata_broad_sample"].to_list()
    np.testing.assert_array_equal(df[FEATURES].to_numpy(), X)
    assert df[FEATURES].dtypes.eq(np.float32).all()
    selected = feature_select(df, operation=["variance_threshold", "correlation_threshold"])
    assert set(infer_cp_features(selected)) <= set(FEATURES) and len(selected) == len(df)
    agg = aggregate(df, strata=["Metadata_Plate", "Metadata_perturbation"])
    assert len(agg) == df.groupby(["Metadata_Plate", "Metadata_perturbation"]).ngroups
    info = json.loads(pl.read_parquet_metadata(out)["bioembed"])
    assert info["feature_set"] == "cp" and info["columns"]["perturbation"] == "Metadata_perturbation"
    assert info["lineage"]["sources"]["sha256"] == [hashlib.sha256(built.csv.read_bytes()).hexdigest()]


def test_csv_gives_copairs_the_same_replicate_ap_as_bioembed(built: ExportHome, tmp_path: Path) -> None:
    from copairs import map as cmap
    from copairs.matching import assign_reference_index

    meta, X = _lake(built, "cp", "1", "card")
    df = pd.read_csv(export_profiles(built.home, "cp", "1", "card", "csv", tmp_path / "cp_card.csv"))
    features = [c for c in df.columns if not c.startswith("Metadata_")]
    feats = df[features].to_numpy().astype(np.float32)
    np.testing.assert_array_equal(feats, X)  # the CSV text round-trips the float32 values
    m = assign_reference_index(df, "Metadata_control_type == 'negative'", reference_col="Metadata_ref",
                               default_value=-1)
    ref = cmap.average_precision(m, feats, ["Metadata_perturbation", "Metadata_ref"], [], [],
                                 ["Metadata_perturbation", "Metadata_ref"], progress_bar=False)
    ap, n_pos, _ = average_precision_vs_controls(X, meta[s.PERTURBATION].to_numpy(),
                                                 (meta[s.CONTROL_TYPE] == "negative").to_numpy())
    np.testing.assert_array_equal(np.isnan(ap), ref["average_precision"].isna().to_numpy())
    np.testing.assert_array_equal(n_pos, ref["n_pos_pairs"].to_numpy())
    np.testing.assert_allclose(ap, ref["average_precision"].to_numpy(), atol=1e-5, equal_nan=True)
    copairs_map = ref.dropna(subset=["average_precision"]).groupby("Metadata_perturbation")["average_precision"].mean()
    ours = replicate_map(meta, X, null_size=10).sort(s.PERTURBATION)
    assert ours[s.PERTURBATION].to_list() == sorted(copairs_map.index)
    np.testing.assert_allclose(ours["mean_average_precision"].to_numpy(), copairs_map.sort_index().to_numpy(),
                               atol=1e-5)


def test_embedding_sets_export_their_latest_version_with_encoder_lineage(built: ExportHome, tmp_path: Path) -> None:
    meta, X = _lake(built, "classical", "10")
    data = load_export(built.home, "classical")  # "10" > "2": versions compare as numbers
    assert data.version == "10"
    a = ad.read_h5ad(export_profiles(built.home, "classical", None, "raw", "h5ad", tmp_path / "c.h5ad"))
    np.testing.assert_array_equal(a.X, X)
    assert list(a.var_names) == [f"classical_{i}" for i in range(8)]
    assert list(a.obs.columns) == [s.PLATE, s.WELL, "batch", s.PERTURBATION, s.CONTROL_TYPE, s.MOA, "n_cells",
                                   "plate_map_name", "Metadata_plate_map_name"]  # extra metadata the rows carry
    assert a.obs["n_cells"].tolist() == meta["n_cells"].to_list()
    lineage = a.uns["lineage"]
    assert (lineage["kind"], lineage["encoder"], lineage["encoder_version"]) == ("encoder", "classical", "10")
    assert lineage["model_uri"] == "models:/classical/10" and lineage["cells"] == meta["n_cells"].sum()
    assert list(lineage["plates"]) == sorted(meta[s.PLATE].unique())
    wide = wide_table(load_export(built.home, "classical", "v10", "card"))  # "v10" is read as "10"
    assert wide.columns[:7] == [WIDE_NAMES[c] for c in (s.PLATE, s.WELL, "batch", s.PERTURBATION, s.CONTROL_TYPE,
                                                        s.MOA, "n_cells")]
    # every non-feature column starts with Metadata_; a name taken by a different column gets Metadata_source_
    assert wide.columns[7:10] == ["Metadata_plate_map_name", "Metadata_source_plate_map_name", "PC1"]
    assert wide["Metadata_source_plate_map_name"].unique().to_list() == ["PM-1"]
    assert wide["Metadata_Batch"].n_unique() == 2
    assert load_export(built.home, "classical", "2").X[0, 0] == pytest.approx(X[0, 0] - 1.0)


def test_unknown_set_version_recipe_and_format_list_what_exists(built: ExportHome, tmp_path: Path) -> None:
    with pytest.raises(LookupError, match=r"no feature set named 'nope'.*classical \(versions 2, 10\); cp \(versions 1\)"):
        load_export(built.home, "nope")
    with pytest.raises(LookupError, match=r"'cp' has no version '7'; versions: 1"):
        load_export(built.home, "cp", "7")
    with pytest.raises(LookupError, match=r"'classical' v10 has no profiles for recipe 'tvn'; recipes: raw, card$"):
        load_export(built.home, "classical", None, "tvn")
    with pytest.raises(LookupError, match=r"recipe 'card'; recipes: raw$"):
        load_export(built.home, "classical", "2", "card")  # v2 was never normalized
    with pytest.raises(ValueError, match=r"unknown export format 'xlsx'; formats: h5ad, parquet, csv"):
        export_profiles(built.home, "cp", "1", "raw", "xlsx", tmp_path / "x.xlsx")
    assert not list(tmp_path.iterdir())


def test_cli_export_formats_default_name_and_errors(built: ExportHome, tmp_path: Path, capsys,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    home = str(built.home.root)
    assert main(["export", "--home", home, "--feature-set", "cp", "--recipe", "card", "--out",
                 str(tmp_path / "x.csv")]) == 0  # format from the suffix
    assert "x.csv" in capsys.readouterr().out and pd.read_csv(tmp_path / "x.csv").columns[0] == "Metadata_Plate"
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--home", home, "--feature-set", "cp", "--version", "1", "--format", "h5ad"]) == 0
    out = capsys.readouterr().out
    assert "cp_v1_raw.h5ad" in out and "wells x 12 features" in out
    assert ad.read_h5ad(tmp_path / "cp_v1_raw.h5ad").n_vars == N_FEATURES
    assert main(["export", "--home", home, "--feature-set", "classical"]) == 0  # parquet by default
    assert (tmp_path / "classical_v10_raw.parquet").exists()
    capsys.readouterr()
    assert main(["export", "--home", home, "--feature-set", "cp", "--recipe", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bioembed export: feature set 'cp' v1 has no profiles for recipe 'nope'; recipes: raw, card")
    assert "Traceback" not in err and err.count("\n") == 1


def _sql(capsys, home: Home, *args: str) -> tuple[int, str, str]:
    rc = main(["sql", "--home", str(home.root), *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_sql_prints_every_row_limit_and_csv(built: ExportHome, capsys) -> None:
    home = built.home
    query = "SELECT plate, well, recipe_steps, features FROM normalized_profiles WHERE encoder = 'cp' ORDER BY plate, well"
    meta, _ = _lake(built, "cp", "1", "card")
    rc, out, err = _sql(capsys, home, query)
    assert rc == 0 and not err and meta.height > 100  # far more than polars' or DuckDB's default rows
    assert f"shape: ({meta.height}, 4)" in out
    for plate, well in meta.select(s.PLATE, s.WELL).iter_rows():
        assert f"│ {plate} ┆ {well} " in out
    assert meta["recipe_steps"][0] in out  # long strings are not cut
    rc, out, _ = _sql(capsys, home, query, "--limit", "3")
    assert rc == 0 and "shape: (3, 4)" in out
    rc, out, _ = _sql(capsys, home, query, "--csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert rc == 0 and rows[0] == ["plate", "well", "recipe_steps", "features"] and len(rows) == meta.height + 1
    assert [tuple(r[:2]) for r in rows[1:]] == list(meta.select(s.PLATE, s.WELL).iter_rows())
    assert rows[1][3].startswith("[") and len(rows[1][3].split(",")) == len(_lake(built, "cp", "1", "card")[1][0])
    rc, out, _ = _sql(capsys, home, "SELECT feature_set, version FROM feature_sets ORDER BY ALL", "--csv", "--limit", "2")
    assert rc == 0 and out.splitlines() == ["feature_set,version", "classical,10", "classical,2"]
    rc, out, _ = _sql(capsys, home, "SELECT INTERVAL 1 DAY AS gap")  # a type polars cannot hold: printed as text
    assert rc == 0 and "1 day" in out


@pytest.mark.parametrize(("query", "message"), [
    ("SELEC * FROM plates", "bioembed sql: Parser Error: syntax error at or near \"SELEC\""),
    ("SELECT * FROM no_such_view", "bioembed sql: Catalog Error: Table with name no_such_view does not exist!"),
    ("SELECT no_such_column FROM profiles", "bioembed sql: Binder Error: Referenced column \"no_such_column\" not found"),
    ("SELECT 'abc'::INTEGER", "bioembed sql: Conversion Error: Could not convert string 'abc' to INT32"),
])
def test_cli_sql_bad_queries_are_one_line_errors(built: ExportHome, capsys, query: str, message: str) -> None:
    rc, out, err = _sql(capsys, built.home, query)
    assert rc == 2 and not out and err.startswith(message)
    assert err.count("\n") == 1 and "Traceback" not in err and "LINE 1" not in err
    assert _sql(capsys, built.home, "SELECT 1", "--limit", "-1")[0] == 2
