"""The encoder zoo's shared plumbing: `timm:<model>` names, per-encoder options, embedding throughput in
the lake and SQL, and `compare_encoders` / `bioembed compare --home` over every registered version."""

from __future__ import annotations

import pytest

from bioembed_assets.config import RunConfig
from bioembed_assets.encoder_comparison import compare_encoders
from bioembed_assets.pipeline import encoder_options, encoder_setups
from bioembed_assets.registry import EncoderRegistry
from bioembed_assets.store.catalog import connect

pytestmark = pytest.mark.integration


def test_timm_names_become_setups_with_safe_registered_names() -> None:
    (setup,) = encoder_setups(["timm:convnext_atto.d2_in1k"])
    assert (setup.name, setup.family, setup.config) == ("timm_convnext_atto_d2_in1k", "timm",
                                                        {"model_name": "convnext_atto.d2_in1k"})
    assert setup.trainable and setup.takes_channels
    with pytest.raises(KeyError, match="timm:<model_name>"):
        encoder_setups(["no_such_encoder"])
    with pytest.raises(KeyError, match="name a timm model"):
        encoder_setups(["timm:"])


def test_encoder_options_are_found_by_name_or_timm_spelling() -> None:
    config = RunConfig(channels=["DNA"], channel_map={},
                       encoder_options={"timm:resnet18": {"checkpoint": "/m/r18.safetensors"},
                                        "vae": {"latent_dim": 8}})
    timm_setup, vae = encoder_setups(["timm:resnet18", "vae"])
    assert encoder_options(config, timm_setup) == {"checkpoint": "/m/r18.safetensors"}
    assert encoder_options(config, vae) == {"latent_dim": 8}
    assert vae.build(["DNA"], encoder_options(config, vae)).spec.embedding_dim == 8
    assert encoder_options(config, encoder_setups(["classical"])[0]) == {}


def test_compare_lists_every_version_with_width_throughput_and_metrics(materialized_home) -> None:
    home = materialized_home.home
    registry = EncoderRegistry(home.mlflow_tracking_uri, home.mlflow_artifacts)
    table = compare_encoders(home, registry)
    assert set(table["encoder"]) >= {"classical", "ca_mae"}
    for row in table.filter(table["recipe"] == "card").iter_rows(named=True):
        assert row["aliases"] == "champion" and row["plates"] == len(materialized_home.good_plates)
        assert row["crops_per_s"] > 0 and 0 <= row["replicate_map"] <= 1
    widths = dict(table.select("encoder", "dim").unique().iter_rows())
    assert widths["classical"] == 79 and widths["ca_mae"] > 0
    with connect(home.catalog_path) as con:
        sql = dict(con.execute("SELECT encoder, crops_per_second FROM embedding_throughput").fetchall())
    classical = table.filter(table["encoder"] == "classical")["crops_per_s"][0]
    assert sql["classical"] == pytest.approx(classical, abs=0.06)


def test_compare_cli_without_encoder_prints_every_encoder(materialized_home, cli_env, capsys) -> None:
    from dagster_project.cli import main

    assert main(["compare", "--home", str(materialized_home.home.root)]) == 0
    out = capsys.readouterr().out
    assert "classical" in out and "ca_mae" in out and "crops_per_s" in out


def test_the_demo_zoo_config_builds_every_encoder_it_names(tmp_path) -> None:
    import tomllib
    from pathlib import Path

    from bioembed_assets.config import Home
    from bioembed_assets.pipeline import default_run_config

    overrides = tomllib.loads((Path(__file__).parents[1] / "deploy/configs/demo-zoo.toml").read_text())
    config = RunConfig.model_validate({**default_run_config(Home(root=tmp_path)).model_dump(), **overrides})
    setups = encoder_setups(config.encoders)
    assert len(setups) == len(config.encoders) == 9
    for setup in setups:  # what `encoder/<name>` registers as version 1 on the demo's stains
        encoder = setup.build(config.channels, encoder_options(config, setup))
        assert encoder.spec.embedding_dim > 0, setup.name


def test_embedding_steps_log_info_progress(materialized_home) -> None:
    import dagster as dg

    instance = dg.DagsterInstance.get()
    lines = [e.user_message for r in instance.get_run_records() for e in instance.all_logs(r.dagster_run.run_id)
             if e.level == 20 and "crops embedded:" in (e.user_message or "")]  # logging.INFO
    plate = materialized_home.good_plates[0]
    done = [line for line in lines if line.startswith(f"embeddings/classical {plate}: crops embedded:")]
    assert done and any("(100%)" in line and "/s" in line for line in done), lines[:5]
