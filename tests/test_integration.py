"""The whole asset graph materialized by Dagster on a tiny synthetic screen, then queried."""

from __future__ import annotations

import dagster as dg
import numpy as np
import polars as pl
import pytest

from bioembed_assets.registry import CHAMPION, EncoderRegistry
from bioembed_assets.store.catalog import connect, example_queries
from bioembed_assets.store.lake import Lake
from dagster_project.definitions import GRAPH, defs
from dagster_project.resources import BioembedHome

pytestmark = pytest.mark.integration

REQUIRED_VIEWS = ("plates", "wells", "cells", "embeddings", "profiles", "normalized_profiles", "metrics")


def test_definitions_load_with_full_lineage() -> None:
    graph = defs.resolve_asset_graph()
    upstream = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
                for k in graph.get_all_asset_keys()}
    assert upstream["illumination"] == {"raw_plate"}
    assert upstream["segmentation"] == {"illumination"}
    assert upstream["crops"] == {"segmentation"}
    for name in ("classical", "ca_mae"):  # one lineage per encoder
        assert upstream[f"embeddings/{name}"] == {"crops", f"encoder/{name}"}
    assert upstream["challenger/ca_mae"] == {"crops", "encoder/ca_mae"}
    assert upstream["well_profiles"] == {"embeddings/classical", "embeddings/ca_mae", "platemap"}
    assert upstream["normalizer"] == {"well_profiles"}
    assert upstream["normalized_profiles"] == {"normalizer", "well_profiles"}
    assert upstream["evaluation"] == {"normalized_profiles"}


def test_good_plates_materialize_and_bad_plates_fail_alone(materialized_home) -> None:
    out = materialized_home.outcome
    assert out.plates_ok == materialized_home.good_plates
    assert set(out.failures) == {"BAD-MISSING", "BAD-CORRUPT", "BAD-NOCONTROLS"}
    assert "BAD-MISSING" in out.failures["BAD-MISSING"] and "r01c02f01p01-ch3" in out.failures["BAD-MISSING"]
    assert "BAD-CORRUPT" in out.failures["BAD-CORRUPT"] and "r02c03f01p01-ch2" in out.failures["BAD-CORRUPT"]
    assert "negative control" in out.failures["BAD-NOCONTROLS"] and "platemap.csv" in out.failures["BAD-NOCONTROLS"]
    home = materialized_home.home
    # nothing partial is visible for the failed plates
    assert not home.image_store("BAD-CORRUPT").exists()
    assert not list(home.root.rglob(".tmp-*"))
    with connect(home.catalog_path) as con:
        for view in ("profiles", "normalized_profiles"):
            plates = {r[0] for r in con.sql(f"SELECT DISTINCT plate FROM {view}").fetchall()}
            assert plates == set(materialized_home.good_plates), view
        # a plate whose images are fine but whose platemap is invalid still gets cell embeddings
        embedded = {r[0] for r in con.sql("SELECT DISTINCT plate FROM embeddings").fetchall()}
    assert embedded == {*materialized_home.good_plates, "BAD-NOCONTROLS"}


def test_views_and_lineage_columns(materialized_home) -> None:
    with connect(materialized_home.home.catalog_path) as con:
        for view in REQUIRED_VIEWS:
            assert con.sql(f"SELECT count(*) FROM {view}").fetchone()[0] > 0, view
        for view in ("embeddings", "profiles", "normalized_profiles"):
            nulls = con.sql(f"SELECT count(*) FROM {view} WHERE plate IS NULL OR well IS NULL "
                            "OR encoder IS NULL OR encoder_version IS NULL").fetchone()[0]
            assert nulls == 0, view
        assert con.sql("SELECT count(*) FROM normalized_profiles WHERE recipe IS NULL").fetchone()[0] == 0
        assert set(con.sql("SELECT * FROM metrics LIMIT 0").columns) >= {
            "encoder", "encoder_version", "recipe", "metric", "value"}
        encoders = {r[0] for r in con.sql("SELECT DISTINCT encoder FROM metrics").fetchall()}
        assert encoders == {"classical", "ca_mae"}
        n_cells = con.sql("SELECT sum(n_cells) FROM plates").fetchone()[0]
        assert n_cells == con.sql("SELECT count(*) FROM embeddings WHERE encoder = 'ca_mae'").fetchone()[0]


def test_readme_example_queries_run(materialized_home) -> None:
    queries = example_queries()
    assert {"cells_per_well", "metrics_by_encoder", "top_similar_wells"} <= set(queries)
    with connect(materialized_home.home.catalog_path) as con:
        for name, sql in queries.items():
            assert len(con.sql(sql).fetchall()) > 0, name
        top = con.sql(queries["top_similar_wells"]).pl()
    assert top.height == 5
    assert top["cosine_similarity"].is_sorted(descending=True)


def test_top_k_similarity_matches_numpy(materialized_home) -> None:
    home = materialized_home.home
    prof = Lake(home.lake).read("normalized_profiles", encoder="ca_mae").sort("plate", "well")
    X = np.stack(prof["features"].to_list())
    q = 0
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    sims = Xn @ Xn[q]
    sims[q] = -np.inf
    expected = prof[np.argsort(-sims)[:3].tolist()].select("plate", "well").rows()
    plate, well = prof.row(q, named=True)["plate"], prof.row(q, named=True)["well"]
    with connect(home.catalog_path) as con:
        got = con.sql(f"SELECT plate, well FROM similar_wells('{plate}', '{well}', 'ca_mae', 'card', 3)").fetchall()
    assert got == expected


def test_encoders_registered_with_champion_and_metrics_logged(materialized_home) -> None:
    home = materialized_home.home
    registry = EncoderRegistry(home.mlflow_tracking_uri, home.mlflow_artifacts)
    for name in ("classical", "ca_mae"):
        version = registry.get(name, CHAMPION)
        assert version is not None and version.version == "1" and not version.trained
        run = registry.client.get_run(version.run_id)
        assert "card/replicate_map" in run.data.metrics and "raw/batch_knn_accuracy" in run.data.metrics
    with connect(home.catalog_path) as con:
        versions = {r for r in con.sql("SELECT DISTINCT encoder, encoder_version FROM embeddings").fetchall()}
    assert versions == {("classical", "1"), ("ca_mae", "1")}


def test_rematerializing_a_plate_is_identical_and_adds_no_duplicates(materialized_home) -> None:
    home, plate = materialized_home.home, materialized_home.good_plates[0]
    lake = Lake(home.lake)

    def snapshot() -> dict[str, pl.DataFrame]:
        return {t: lake.read(t, plate=plate).sort(pl.all().exclude("features")) for t in
                ("images", "cells", "embeddings", "well_profiles", "normalized_profiles")}

    before = snapshot()
    resources = {"bioembed": BioembedHome(root=str(home.root), null_size=1000)}
    instance = dg.DagsterInstance.get()
    checks = []
    for selection in (GRAPH.per_plate, [GRAPH.normalized_profiles]):
        result = dg.materialize(GRAPH.all, selection=selection, partition_key=plate, instance=instance,
                                resources=resources)
        assert result.success
        checks += result.get_asset_check_evaluations()
    assert {(c.asset_key.to_user_string(), c.check_name) for c in checks} == {
        ("platemap", "negative_controls_present"), ("crops", "cells_per_well"), ("crops", "border_loss"),
        ("embeddings/classical", "embeddings_finite"), ("embeddings/ca_mae", "embeddings_finite")}
    assert all(c.passed for c in checks)
    after = snapshot()
    for table, df in before.items():
        assert df.height > 0
        assert after[table].equals(df), table
    with connect(home.catalog_path) as con:
        dup = con.sql("SELECT count(*) FROM (SELECT plate, well, encoder, encoder_version, recipe, count(*) n "
                      "FROM normalized_profiles GROUP BY ALL HAVING n > 1)").fetchone()[0]
    assert dup == 0
    registry = EncoderRegistry(home.mlflow_tracking_uri, home.mlflow_artifacts)
    assert len(registry.client.search_model_versions("name='ca_mae'")) == 1


def _latest_metadata(instance: dg.DagsterInstance, key: str, partition: str | None = None) -> tuple[str, dict]:
    """The run id and metadata of `key`'s latest materialization (of `partition`, if given)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey.from_user_string(key),
                              asset_partitions=[partition] if partition else None), limit=1).records
    assert records, f"{key} {partition or ''} was never materialized"
    return records[0].run_id, records[0].asset_materialization.metadata


def _run_id_of(url: dg.UrlMetadataValue) -> str:
    assert isinstance(url, dg.UrlMetadataValue) and url.url.startswith("http://127.0.0.1:5000/#/experiments/")
    return url.url.rsplit("/runs/", 1)[1]


def test_asset_pages_show_tables_numbers_row_counts_and_mlflow_links(materialized_home) -> None:
    """Metrics as a Dagster table with a schema, headline metrics as numbers, lake row counts and column
    schemas read from what was written, and links to the MLflow runs, which are tagged with the Dagster run."""
    home, plate = materialized_home.home, materialized_home.good_plates[0]
    instance, lake = dg.DagsterInstance.get(), Lake(home.lake)
    registry = EncoderRegistry(home.mlflow_tracking_uri, home.mlflow_artifacts)

    for key, table, keys in (("crops", "cells", {}), ("segmentation", "nuclei", {}), ("raw_plate", "images", {}),
                             ("embeddings/ca_mae", "embeddings", {"encoder": "ca_mae", "version": "1"})):
        _, meta = _latest_metadata(instance, key, plate)
        rows = lake.read(table, plate=plate, **keys)
        assert meta["dagster/row_count"].value == rows.height, key
        schema = meta["dagster/column_schema"].schema
        assert [c.name for c in schema.columns] == rows.columns, key
    _, meta = _latest_metadata(instance, "embeddings/ca_mae", plate)
    assert meta["mlflow_model_version"].url == "http://127.0.0.1:5000/#/models/ca_mae/versions/1"

    run_id, meta = _latest_metadata(instance, "evaluation")
    stored = lake.read("metrics", encoder="ca_mae", version="1")
    table = meta["ca_mae_metrics"]
    assert isinstance(table, dg.TableMetadataValue)
    assert [c.name for c in table.schema.columns] == ["recipe", "metric", "value"]
    assert len(table.records) == stored.height
    card_map = stored.filter((pl.col("recipe") == "card") & (pl.col("metric") == "replicate_map"))["value"][0]
    assert isinstance(meta["ca_mae_card/replicate_map"], dg.FloatMetadataValue)
    assert meta["ca_mae_card/replicate_map"].value == pytest.approx(card_map)
    for recipe in stored["recipe"].unique():
        mlflow_run = registry.client.get_run(_run_id_of(meta[f"ca_mae_{recipe}/mlflow_run"]))
        assert mlflow_run.data.tags["recipe"] == recipe and mlflow_run.data.tags["encoder"] == "ca_mae"
        assert mlflow_run.data.tags["dagster_run_id"] == run_id  # and back to the Dagster run


def test_named_jobs_run_their_assets(materialized_home) -> None:
    """`ingest` and `embed` for one plate, as the Launchpad or `dagster job launch` runs them."""
    from dagster_project.definitions import build_jobs

    home, plate = materialized_home.home, materialized_home.good_plates[0]
    jobs = dg.Definitions(assets=GRAPH.all, jobs=build_jobs(GRAPH),
                          resources={"bioembed": BioembedHome(root=str(home.root), null_size=1000)})
    assert {"ingest", "embed", "refit_normalizer", "train_ca_mae"} <= {j.name for j in defs.resolve_all_job_defs()}
    expected = {"ingest": {"raw_plate", "platemap", "illumination", "segmentation", "crops"},
                "embed": {"embeddings/classical", "embeddings/ca_mae"}}
    for name, keys in expected.items():
        result = jobs.resolve_job_def(name).execute_in_process(partition_key=plate, instance=dg.DagsterInstance.get())
        assert result.success, name
        done = {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()
                if m.partition == plate}
        assert done == keys, name
