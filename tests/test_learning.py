"""The learning loop with real MLflow (sqlite) and real Dagster: train a tiny challenger, evaluate it
against the champion, promote it by the rule, and let the registry sensor + declarative automation
re-embed exactly that encoder's plates; roll back; resume after a crash; bad input."""

from __future__ import annotations

import dataclasses
import json
import os

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch

from bioembed_assets.config import Home
from bioembed_assets.encoders import build_encoder
from bioembed_assets.pipeline import default_run_config, save_run_config
from bioembed_assets.promotion import decide, rollback
from bioembed_assets.promotion_rule import PromotionRule
from bioembed_assets.registry import CHALLENGER, CHAMPION, PREVIOUS, EncoderRegistry
from bioembed_assets.schema import BioembedInputError
from bioembed_assets.sources.synthetic import generate_screen
from bioembed_assets.store.catalog import connect
from bioembed_assets.training.data import chunk_window_batches, load_crop_set
from bioembed_assets.training.loop import Callbacks, TrainConfig, fit
from bioembed_assets.training.run import RUN_FILE, train_challenger, training_dir
from dagster_project.automation import report_champion_changes, settle
from dagster_project.definitions import build_definitions
from dagster_project.graph import build_graph
from dagster_project.resources import BioembedHome

from .conftest import TINY_SCREEN

pytestmark = pytest.mark.integration

ALWAYS_PROMOTE = PromotionRule(metric="replicate_map", recipe="card", min_margin=-1.0, guards={})
TINY_TRAINING = {"epochs": 2, "batch_size": 32, "lr": 1e-3, "max_steps_per_epoch": 3, "num_workers": 0,
                 "promote": True, "warmup_epochs": 0}


@dataclasses.dataclass
class LearningHome:
    home: Home
    plates: list[str]
    resource: BioembedHome
    graph: object
    defs: dg.Definitions
    instance: dg.DagsterInstance

    @property
    def registry(self) -> EncoderRegistry:
        return self.resource.registry()


@pytest.fixture(scope="module")
def learning(tmp_path_factory: pytest.TempPathFactory) -> LearningHome:
    from dagster_project.demo import materialize_home, use_home

    saved = {k: os.environ.get(k) for k in ("DAGSTER_HOME", "BIOEMBED_HOME", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")}
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    home = use_home(tmp_path_factory.mktemp("learning-home"))
    plates = generate_screen(home.raw_root, TINY_SCREEN)
    save_run_config(home, default_run_config(home).model_copy(update={"promotion": ALWAYS_PROMOTE}))
    resource = BioembedHome(root=str(home.root), null_size=200)
    graph = build_graph(resource.encoders)
    outcome = materialize_home(home, plates, resource, log=lambda *_: None, graph=graph)
    assert outcome.plates_ok == plates, outcome.failures
    yield LearningHome(home, plates, resource, graph, build_definitions(graph), dg.DagsterInstance.get())
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _materialization_count(instance: dg.DagsterInstance, key: str) -> int:
    return len(instance.fetch_materializations(dg.AssetKey.from_user_string(key), limit=1000).records)


def test_promotion_reembeds_exactly_that_encoder_then_rollback_reuses_rows(learning: LearningHome) -> None:
    instance, defs, graph = learning.instance, learning.defs, learning.graph
    baseline = dg.evaluate_automation_conditions(defs, instance)
    assert baseline.total_requested == 0  # nothing changed yet: automation requests nothing
    classical_before = _materialization_count(instance, "embeddings/classical")

    run_config = {"ops": {"challenger__ca_mae": {"config": TINY_TRAINING}}}
    result = dg.materialize(graph.all, selection=[graph.challengers["ca_mae"]], instance=instance,
                            resources={"bioembed": learning.resource}, run_config=run_config)
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == "promotion_rule" and check.passed
    aliases = learning.registry.aliases("ca_mae")
    assert aliases == {CHAMPION: "2", PREVIOUS: "1"}  # promoted by the rule, challenger alias consumed
    champion = learning.registry.get("ca_mae")
    assert champion.trained and champion.tags["promoted_by"] == "rule"
    # the asset page links the MLflow training and evaluation runs, and they name this Dagster run
    meta = instance.get_latest_materialization_event(dg.AssetKey(["challenger", "ca_mae"])).asset_materialization.metadata
    assert meta["challenger_mlflow_version"].url.endswith("/#/models/ca_mae/versions/2")
    links = [meta["training_run"], *(v for k, v in meta.items() if k.endswith("/mlflow_run"))]
    assert len(links) > 1 and all(isinstance(link, dg.UrlMetadataValue) for link in links)
    for link in links:
        tags = learning.registry.client.get_run(link.url.rsplit("/runs/", 1)[1]).data.tags
        assert tags["dagster_run_id"] == result.run_id, link.url

    # Nothing re-embeds until the registry sensor reports the new champion to Dagster.
    assert dg.evaluate_automation_conditions(defs, instance, cursor=baseline.cursor).total_requested == 0
    assert report_champion_changes(instance, learning.registry, graph.encoders) == ["encoder/ca_mae"]
    resources = {"bioembed": learning.resource}
    ticks, cursor = settle(defs, graph.all, instance, resources, baseline.cursor)
    requested = [{k.to_user_string(): v for k, v in t.items()} for t in ticks]
    plates = set(learning.plates)
    assert requested[0] == {"embeddings/ca_mae": plates, "well_profiles": plates}  # only this encoder re-embeds
    assert requested[1:] == [{"normalizer": {None}}, {"normalized_profiles": plates},
                             {"evaluation": {None}, "encoder_comparison": {None}}]  # in the same run
    assert _materialization_count(instance, "embeddings/classical") == classical_before
    latest = instance.get_latest_materialization_event(dg.AssetKey(["embeddings", "ca_mae"]))
    assert latest.asset_materialization.metadata["encoder_version"].value == "2"
    with connect(learning.home.catalog_path) as con:
        n_cells = con.sql("SELECT sum(n_cells) FROM plates").fetchone()[0]
        assert con.sql("SELECT count(*) FROM embeddings WHERE encoder='ca_mae' AND encoder_version='2'"
                       ).fetchone()[0] == n_cells
        assert con.sql("SELECT count(*) FROM embeddings WHERE encoder='ca_mae' AND encoder_version='1'"
                       ).fetchone()[0] == n_cells  # the old champion's rows stay
        versions = {r[0] for r in con.sql("SELECT DISTINCT encoder_version FROM normalized_profiles "
                                          "WHERE encoder='ca_mae'").fetchall()}
    assert versions == {"1", "2"}
    assert dg.evaluate_automation_conditions(defs, instance, cursor=cursor).total_requested == 0

    # Rollback: move the alias back; the graph re-materializes from the stored v1 rows (no re-embedding).
    assert rollback(learning.registry, "ca_mae").version == "1"
    assert report_champion_changes(instance, learning.registry, graph.encoders) == ["encoder/ca_mae"]
    ticks, _ = settle(defs, graph.all, instance, resources, cursor)
    assert {k.to_user_string() for k in ticks[0]} == {"embeddings/ca_mae", "well_profiles"}
    latest = instance.get_latest_materialization_event(dg.AssetKey(["embeddings", "ca_mae"]))
    meta = latest.asset_materialization.metadata
    assert meta["encoder_version"].value == "1" and meta["plates_reused"].value == 1  # one plate per run
    assert _materialization_count(instance, "embeddings/classical") == classical_before


def test_training_and_evaluation_runs_in_mlflow(learning: LearningHome) -> None:
    registry = learning.registry
    v2 = registry.version("ca_mae", "2")
    client = registry.client
    run = client.get_run(v2.run_id)
    assert run.info.experiment_id == registry.experiment_id("bioembed-training")
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # classic ML, not GenAI
    assert {"epochs", "batch_size", "lr", "plates", "train_crops", "family"} <= set(run.data.params)
    assert len(client.get_metric_history(v2.run_id, "train_loss")) == TINY_TRAINING["epochs"]
    assert len(client.get_metric_history(v2.run_id, "val_loss")) == TINY_TRAINING["epochs"]
    assert any(k.startswith("system/") for k in run.data.metrics)
    (dataset_input,) = run.inputs.dataset_inputs
    assert {t.value for t in dataset_input.tags} >= {"training"}
    schema = dataset_input.dataset.schema
    assert "plate" in schema and "crops" in schema
    assert any(a.path.startswith("images") for a in client.list_artifacts(v2.run_id)), "no reconstructions logged"
    logged = client.get_logged_model(v2.model_id)
    assert logged.source_run_id == v2.run_id and str(logged.status).endswith("READY")
    from mlflow.models import Model

    mlmodel = Model.load(logged.artifact_location.removeprefix("file://") + "/MLmodel")
    (inp,) = mlmodel.signature.inputs.inputs
    (out,) = mlmodel.signature.outputs.inputs
    assert inp.type == np.dtype("uint16") and inp.shape == (-1, 5, 64, 64)
    assert out.type == np.dtype("float32") and out.shape == (-1, 128)
    assert "python_function" not in mlmodel.flavors  # nothing MLflow would execute on load
    evals = client.search_runs([registry.experiment_id("bioembed-evaluation")], "tags.encoder = 'ca_mae'")
    pairs = {(r.data.tags["encoder_version"], r.data.tags["recipe"]) for r in evals}
    assert {("1", "card"), ("2", "card"), ("1", "raw"), ("2", "raw")} <= pairs
    card2 = next(r for r in evals if r.data.tags["encoder_version"] == "2" and r.data.tags["recipe"] == "card")
    assert "replicate_map" in card2.data.metrics and card2.data.tags["model_id"] == v2.model_id
    assert any(a.path.startswith("plots") for a in client.list_artifacts(card2.info.run_id))


def test_loading_never_executes_artifact_code(learning: LearningHome, tmp_path) -> None:
    import pickle

    registry = learning.registry
    marker = tmp_path / "pwned"

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    version = registry.register("trap", build_encoder("ca_mae", preset="demo", seed=3), trained=False)
    location = registry.client.get_logged_model(version.model_id).artifact_location.removeprefix("file://")
    with open(f"{location}/python_model.pkl", "wb") as f:  # a pyfunc-style pickle beside the real files
        pickle.dump(Trap(), f)
    registry.load_version(version)  # reads spec.json + weights.safetensors only
    assert not marker.exists()
    with open(f"{location}/weights.safetensors", "wb") as f:  # weights replaced by a pickle
        pickle.dump(Trap(), f)
    with pytest.raises(BioembedInputError, match="not a valid safetensors"):
        registry.load_version(version)
    assert not marker.exists()


class _Crash(Callbacks):
    def __init__(self, epoch: int, step: int) -> None:
        self.epoch, self.step = epoch, step

    def on_step(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        if epoch == self.epoch and step >= self.step:
            raise KeyboardInterrupt("killed mid-epoch")


def _tiny_vae():
    return build_encoder("vae", latent_dim=8, input_size=32, base_width=8, seed=1)


def test_resume_after_a_kill_mid_epoch_gives_the_same_weights(learning: LearningHome, tmp_path) -> None:
    crop_set = load_crop_set(learning.home, learning.plates, seed=0)
    config = TrainConfig(epochs=3, batch_size=32, lr=1e-3, warmup_epochs=1, max_steps_per_epoch=4, num_workers=1,
                         patience=0)
    straight = _tiny_vae()
    fit(straight, crop_set, config, tmp_path / "straight")
    killed = _tiny_vae()
    with pytest.raises(KeyboardInterrupt):
        fit(killed, crop_set, config, tmp_path / "killed", callbacks=_Crash(epoch=1, step=6))
    resumed = _tiny_vae()  # a fresh process would rebuild the encoder from the champion
    result = fit(resumed, crop_set, config, tmp_path / "killed", resume=True)
    assert result.resumed_from_epoch == 1 and len(result.history) == 3
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(BioembedInputError, match="different training"):
        fit(_tiny_vae(), crop_set, dataclasses.replace(config, lr=2e-3), tmp_path / "killed", resume=True)
    (tmp_path / "killed" / "last.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(BioembedInputError, match="corrupt"):
        fit(_tiny_vae(), crop_set, config, tmp_path / "killed", resume=True)


def test_validation_is_split_by_well_and_batches_cover_each_crop_once(learning: LearningHome) -> None:
    crop_set = load_crop_set(learning.home, learning.plates, val_fraction=0.25, seed=0)
    per_well = crop_set.cells.group_by("plate", "well").agg(pl.col("split").n_unique())
    assert (per_well["split"] == 1).all()  # no well in both splits
    assert 0 < crop_set.split("val").height < crop_set.cells.height
    train = crop_set.split("train")
    batches = chunk_window_batches(train, crop_set.chunk, 16, seed=0, epoch=0)
    order = np.concatenate(batches)
    assert sorted(order.tolist()) == list(range(train.height))
    assert not np.array_equal(order, np.concatenate(chunk_window_batches(train, crop_set.chunk, 16, seed=0, epoch=1)))


def test_bad_training_input_is_refused_and_registers_nothing(learning: LearningHome) -> None:
    home, registry, plates = learning.home, learning.registry, learning.plates
    champion = registry.get("ca_mae")
    versions_before = len(registry.client.search_model_versions("name='ca_mae'"))
    base = registry.load_version(champion)
    config = TrainConfig(epochs=1, max_steps_per_epoch=1, num_workers=0)
    with pytest.raises(BioembedInputError, match="at least 2 plates"):
        train_challenger(home, registry, "ca_mae", base, champion, plates[:1], config, log=lambda *_: None)
    with pytest.raises(BioembedInputError, match="no crops"):
        train_challenger(home, registry, "ca_mae", base, champion, [plates[0], "NOPE-P9"], config, log=lambda *_: None)
    three = build_encoder("vae", num_channels=3, latent_dim=8, input_size=32, base_width=8)
    with pytest.raises(BioembedInputError, match="built for 3 channels"):
        train_challenger(home, registry, "ca_mae", three, champion, plates, config, log=lambda *_: None)
    folder = training_dir(home, "ca_mae")
    folder.mkdir(parents=True, exist_ok=True)
    stale_run = registry.client.create_run(registry.experiment_id("bioembed-training")).info.run_id
    (folder / RUN_FILE).write_text(json.dumps({"run_id": stale_run}))
    (folder / "last.pt").write_bytes(b"garbage")
    with pytest.raises(BioembedInputError, match="corrupt"):
        train_challenger(home, registry, "ca_mae", base, champion, plates, config, resume=True, log=lambda *_: None)
    supervised = build_encoder("supervised_cnn", backbone="test_resnet", input_size=32)
    crop_set = load_crop_set(home, plates)
    one_class = dataclasses.replace(crop_set, cells=crop_set.cells.filter(pl.col("perturbation") == "DMSO"),
                                    classes=("DMSO",))
    with pytest.raises(ValueError, match="2 classes|two classes|at least 2"):
        fit(supervised, one_class, config, folder / "one-class")
    assert len(registry.client.search_model_versions("name='ca_mae'")) == versions_before
    assert registry.get("ca_mae", CHALLENGER) is None


def test_promotion_rule_errors(learning: LearningHome) -> None:
    home, registry = learning.home, learning.registry
    with pytest.raises(ValueError, match="unknown metric"):
        decide(home, registry, "ca_mae", PromotionRule(metric="accuracy"), ["card"])
    with pytest.raises(ValueError, match="recipe 'tvn'"):
        decide(home, registry, "ca_mae", PromotionRule(recipe="tvn"), ["card"])
    with pytest.raises(LookupError, match="no version with alias 'challenger'"):
        decide(home, registry, "classical", PromotionRule(), ["card"])


def test_forced_promotion_needs_a_reason_and_is_recorded(learning: LearningHome, capsys) -> None:
    from bioembed_assets.challenger import evaluate_version
    from bioembed_assets.promotion import apply_promotion
    from dagster_project.cli import main

    home, registry = learning.home, learning.registry
    champion = registry.get("ca_mae")
    candidate = registry.register("ca_mae", build_encoder("ca_mae", preset="demo", seed=11, decoder="demo"),
                                  trained=False, alias=CHALLENGER)
    evaluate_version(home, registry, candidate, learning.plates, {"card": "card"}, null_size=100, log=lambda *_: None)
    assert main(["compare", "--home", str(home.root), "--encoder", "ca_mae"]) == 0
    out = capsys.readouterr().out
    assert f"champion v{champion.version}" in out and f"challenger v{candidate.version}" in out
    refuse = PromotionRule(min_margin=1.0, guards={})  # no challenger can win by a whole mAP unit
    decision = decide(home, registry, "ca_mae", refuse, ["card"])
    assert not decision.promote and decision.table()["passed"].to_list() == [False]
    with pytest.raises(ValueError, match="does not promote"):
        apply_promotion(registry, decision)
    assert registry.aliases("ca_mae")[CHAMPION] == champion.version  # nothing moved
    apply_promotion(registry, decision, force_reason="validated on an external plate set")
    promoted = registry.get("ca_mae")
    assert promoted.version == candidate.version and promoted.tags["promoted_by"] == "forced"
    assert "external plate set" in promoted.tags["promotion_reason"]
    assert registry.aliases("ca_mae")[PREVIOUS] == champion.version
    assert main(["promote", "--home", str(home.root), "--encoder", "ca_mae"]) == 2  # no challenger left
    assert "no version with alias 'challenger'" in capsys.readouterr().err
    rollback(registry, "ca_mae")
    report_champion_changes(learning.instance, registry, learning.graph.encoders)  # keep Dagster in step


def test_supervised_vae_and_shape_embed_train_through_the_same_loop(learning: LearningHome, tmp_path) -> None:
    crop_set = load_crop_set(learning.home, learning.plates, seed=0)
    config = TrainConfig(epochs=1, batch_size=32, lr=1e-3, warmup_epochs=0, max_steps_per_epoch=2, num_workers=0)
    supervised = build_encoder("supervised_cnn", backbone="test_resnet", input_size=32, seed=0)
    result = fit(supervised, crop_set, config, tmp_path / "sup")
    assert {"loss", "accuracy"} <= set(result.history[0].train) and "loss" in result.history[0].val
    assert supervised.spec.config["classes"] == list(crop_set.classes)
    vae = _tiny_vae()
    result = fit(vae, crop_set, config, tmp_path / "vae")
    assert {"loss", "recon", "kl"} <= set(result.history[0].train)
    shape = build_encoder("shape_embed", n_points=32, latent_dim=8, base_width=8, seed=0)  # trains on the masks
    result = fit(shape, crop_set, config, tmp_path / "shape")
    assert {"loss", "recon", "empty_masks"} <= set(result.history[0].train)
    assert result.history[0].train["empty_masks"] == 0 and result.history[0].val["loss"] > 0


def test_promotion_rule_in_a_run_config_is_validated(tmp_path) -> None:
    from bioembed_assets.config import RunConfig

    good = tmp_path / "run.toml"
    good.write_text('channels = ["DNA"]\n[channel_map]\nch1 = "DNA"\n[promotion]\nmetric = "moa_map"\n'
                    'min_margin = 0.02\n[promotion.guards]\nbatch_knn_accuracy = 0.1\n')
    rule = RunConfig.load(good).promotion
    assert rule.metric == "moa_map" and rule.guards == {"batch_knn_accuracy": 0.1}
    bad = tmp_path / "bad.toml"
    bad.write_text('channels = ["DNA"]\n[channel_map]\nch1 = "DNA"\n[promotion]\nmetric = "map_score"\n')
    with pytest.raises(ValueError, match="unknown metric"):
        RunConfig.load(bad)


def test_train_cli_registers_and_evaluates_a_challenger(learning: LearningHome, capsys) -> None:
    from dagster_project.cli import main

    before = len(learning.registry.client.search_model_versions("name='ca_mae'"))
    argv = ["train", "--home", str(learning.home.root), "--encoder", "ca_mae", "--epochs", "1", "--max-steps", "2",
            "--batch-size", "32", "--workers", "0", "--null-size", "100"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    challenger = learning.registry.get("ca_mae", CHALLENGER)
    assert challenger is not None and challenger.trained
    assert len(learning.registry.client.search_model_versions("name='ca_mae'")) == before + 1
    assert f"challenger v{challenger.version}" in out and "replicate_map" in out
    assert main(["train", "--home", str(learning.home.root), "--encoder", "classical"]) == 2
    assert "no learned weights" in capsys.readouterr().err
