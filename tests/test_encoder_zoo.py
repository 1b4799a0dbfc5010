"""The encoder zoo through real Dagster runs: the bioimage_embed family, SubCell, ShapeEmbed and a timm
backbone registered in MLflow, embedded per plate, normalized, evaluated and compared in one table, with
their side outputs (SubCell localization, VQ codes) queryable in SQL."""

from __future__ import annotations

import numpy as np
import pytest

from bioembed_assets.config import RunConfig
from bioembed_assets.encoder_comparison import compare_encoders
from bioembed_assets.pipeline import default_run_config, save_run_config
from bioembed_assets.registry import EncoderRegistry
from bioembed_assets.sources.synthetic import SyntheticScreenConfig, generate_screen
from bioembed_assets.store.catalog import connect
from bioembed_assets.store.lake import Lake

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ZOO = ["vqvae", "mae", "subcell", "shape_embed", "timm:resnet10t", "supervised_cnn"]
REGISTERED = {"vqvae", "mae", "subcell", "shape_embed", "timm_resnet10t", "supervised_cnn"}
OPTIONS = {
    "vqvae": {"latent_dim": 16, "num_embeddings": 32},
    "subcell": {"preset": "tiny", "num_classifiers": 2, "protein": ["Mito", "RNA"]},
    "timm:resnet10t": {"input_size": 64},
    "supervised_cnn": {"backbone": "resnet10t"},
}
SCREEN = SyntheticScreenConfig(
    n_plates=2, n_rows=4, n_cols=6, sites_per_well=1, image_size=256, n_moas=2,
    compounds_per_moa=2, n_inactive=2, replicates_per_plate=2, n_dmso_wells=6, seed=11,
)


@pytest.fixture(scope="module")
def zoo_home(tmp_path_factory: pytest.TempPathFactory):
    import os

    from dagster_project.demo import materialize_home, use_home
    from dagster_project.resources import BioembedHome

    saved = {k: os.environ.get(k) for k in ("DAGSTER_HOME", "BIOEMBED_HOME")}
    home = use_home(tmp_path_factory.mktemp("zoo"))
    plates = generate_screen(home.raw_root, SCREEN)
    config = default_run_config(home).model_copy(update={"encoders": ZOO, "encoder_options": OPTIONS})
    save_run_config(home, RunConfig.model_validate(config.model_dump()))
    outcome = materialize_home(home, plates, BioembedHome(root=str(home.root), encoders=ZOO, null_size=200),
                               log=lambda *_: None)
    yield home, plates, outcome
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_every_family_is_registered_embedded_and_compared(zoo_home) -> None:
    home, plates, outcome = zoo_home
    assert not outcome.failures, outcome.failures
    registry = EncoderRegistry(home.mlflow_tracking_uri, home.mlflow_artifacts)
    table = compare_encoders(home, registry)
    assert set(table["encoder"]) == REGISTERED
    card = table.filter(table["recipe"] == "card")
    assert set(card["encoder"]) == REGISTERED
    for row in card.iter_rows(named=True):
        assert row["plates"] == len(plates) and row["crops_per_s"] > 0, row
        assert 0 <= row["replicate_map"] <= 1, row
    dims = dict(table.select("encoder", "dim").unique().iter_rows())
    assert dims["vqvae"] == 16 and dims["subcell"] == 2 * (2 * 64)  # 2 passes x pool_op (2 heads x 64 wide)


def test_side_outputs_are_queryable_in_sql(zoo_home) -> None:
    home, plates, _ = zoo_home
    with connect(home.catalog_path) as con:
        n_cells = con.execute("SELECT count(*) FROM embeddings WHERE encoder = 'subcell'").fetchone()[0]
        probs = con.execute("SELECT pass, location, probability FROM localization WHERE encoder = 'subcell'").pl()
        per_cell = con.execute("SELECT count(DISTINCT (plate, well, site, cell_id)) FROM localization").fetchone()[0]
        codes = con.execute("SELECT output, count(DISTINCT (plate, well, site, cell_id)) FROM cell_outputs "
                            "WHERE encoder = 'vqvae' GROUP BY 1").fetchall()
    assert n_cells > 0 and per_cell == n_cells
    assert set(probs["pass"]) == {"localization_Mito", "localization_RNA"}
    assert probs["location"].n_unique() == 31  # SubCell's localization classes
    values = probs["probability"].to_numpy()
    assert np.isfinite(values).all() and ((values >= 0) & (values <= 1)).all()
    assert codes == [("vq_codes", n_cells)]


def test_shape_embed_names_its_features(zoo_home) -> None:
    home, _, _ = zoo_home
    lake = Lake(home.lake)
    names = lake.read("feature_names", encoder="shape_embed").filter(output="features")
    assert names.height > 0 and names["feature"].n_unique() == names.height


def test_gradcamo_per_cell_per_plate_in_sql_metrics_and_mlflow(zoo_home) -> None:
    home, plates, _ = zoo_home
    with connect(home.catalog_path) as con:
        cells = con.execute("SELECT encoder, count(*), avg(score) FILTER (isfinite(score)), min(chance), max(chance), "
                            "count(*) FILTER (isfinite(score) OR reason = 'zero_map') FROM gradcamo_cells GROUP BY 1 ORDER BY 1"
                            ).fetchall()
        n_cells = con.execute("SELECT count(*) FROM cells").fetchone()[0]
        summary = con.execute("SELECT level, count(*) FROM gradcamo_summary WHERE encoder = 'supervised_cnn' "
                              "GROUP BY 1 ORDER BY 1").fetchall()
        metrics = dict(con.execute("SELECT metric, value FROM metrics WHERE encoder = 'supervised_cnn' "
                                   "AND metric LIKE 'gradcamo%'").fetchall())
        platemap = con.execute("SELECT count(DISTINCT (plate, perturbation)) FROM lake_platemap").fetchone()[0]
    # Both CNN classifiers (the supervised CNN and the timm backbone), every cell, scores in [0, 1].
    assert [c[0] for c in cells] == ["supervised_cnn", "timm_resnet10t"]
    for _, n, mean_score, lo, hi, accounted in cells:  # a cell is scored, or its map was all zero (NaN)
        assert n == n_cells and accounted == n and 0 <= mean_score <= 1 and 0 < lo <= hi < 1
    assert dict(summary) == {"perturbation": platemap, "plate": len(plates)}
    assert set(metrics) == {"gradcamo_fraction_above", "gradcamo_mean_score", "gradcamo_mean_enrichment",
                            "gradcamo_mean_neighbour_fraction"}
    assert 0 <= metrics["gradcamo_fraction_above"] <= 1
    registry = EncoderRegistry(home.mlflow_tracking_uri, home.mlflow_artifacts)
    version = registry.get("supervised_cnn")
    artifacts = [a.path for a in registry.client.list_artifacts(version.run_id, "gradcamo")]
    assert artifacts == [f"gradcamo/{p}.png" for p in plates]
    logged = registry.client.get_run(version.run_id).data.metrics
    assert logged[f"gradcamo_mean_score/{plates[0]}"] == pytest.approx(
        np.nanmean(Lake(home.lake).read("gradcamo_cells", encoder="supervised_cnn", plate=plates[0])["score"].to_numpy()))


TRAINABLE = ["vqvae", "mae", "shape_embed", "timm_resnet10t", "supervised_cnn"]


def test_every_trainable_family_trains_and_is_judged_as_a_challenger(zoo_home) -> None:
    import dagster as dg

    from bioembed_assets.registry import CHALLENGER
    from dagster_project.graph import build_graph
    from dagster_project.resources import BioembedHome

    home, _, _ = zoo_home
    graph = build_graph(ZOO)
    registry = EncoderRegistry(home.mlflow_tracking_uri, home.mlflow_artifacts)
    training = {"epochs": 1, "batch_size": 32, "lr": 1e-3, "max_steps_per_epoch": 2, "num_workers": 0,
                "warmup_epochs": 0}
    for name in TRAINABLE:
        result = dg.materialize(graph.all, selection=[graph.challengers[name]], instance=dg.DagsterInstance.get(),
                                resources={"bioembed": BioembedHome(root=str(home.root), encoders=ZOO,
                                                                    null_size=200)},
                                run_config={"ops": {f"challenger__{name}": {"config": training}}})
        (check,) = result.get_asset_check_evaluations()
        assert check.check_name == "promotion_rule", name
        challenger = registry.get(name, CHALLENGER)
        assert challenger is not None and challenger.trained, name
        metrics = Lake(home.lake).read("metrics", encoder=name, version=challenger.version)
        assert "replicate_map" in set(metrics["metric"]), name  # evaluated on the champion's plates
