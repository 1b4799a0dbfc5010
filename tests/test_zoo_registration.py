"""Bad encoder settings fail the `encoder/<name>` asset with an error naming the file, key or stain, and
register nothing; the other encoders of the same run register as usual."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pytest
from safetensors.torch import save_file

from bioembed_assets.encoders import build_encoder
from bioembed_assets.pipeline import default_run_config, save_run_config
from bioembed_assets.registry import EncoderRegistry

pytestmark = pytest.mark.integration


@pytest.fixture
def home(tmp_path: Path):
    from dagster_project.demo import use_home

    saved = {k: os.environ.get(k) for k in ("DAGSTER_HOME", "BIOEMBED_HOME")}
    yield use_home(tmp_path / "home")
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _register(home, encoders: list[str], options: dict) -> dict[str, str]:
    """Materialize the encoder assets; {encoder asset: failure message} of the steps that failed."""
    from dagster_project.graph import build_graph
    from dagster_project.resources import BioembedHome

    config = default_run_config(home).model_copy(update={"encoders": encoders, "encoder_options": options})
    save_run_config(home, config)
    graph = build_graph(encoders)
    result = dg.materialize(graph.all, selection=graph.encoder_assets, instance=dg.DagsterInstance.get(),
                            resources={"bioembed": BioembedHome(root=str(home.root), encoders=encoders)},
                            raise_on_error=False)
    return {e.step_key: e.step_failure_data.error.to_string() for e in result.all_events if e.is_step_failure}


def test_bad_settings_name_what_is_wrong_and_register_nothing(home, tmp_path: Path) -> None:
    vae_file = tmp_path / "vae.safetensors"
    save_file(build_encoder("vae", num_channels=3, latent_dim=8, input_size=32).state_dict(), str(vae_file))
    options = {
        "subcell": {"preset": "tiny", "stains": {"y": "Tubulin", "b": "DNA"}},  # the plate has no Tubulin
        "timm:resnet18": {"checkpoint": str(vae_file)},  # another family's keys
        "mae": {"preset": "tiny", "depth": "many"},
    }
    failures = _register(home, ["classical", "subcell", "timm:resnet18", "timm:no_such_net", "mae"], options)
    assert set(failures) == {"encoder__subcell", "encoder__timm_resnet18", "encoder__timm_no_such_net",
                             "encoder__mae"}, failures
    assert "Tubulin" in failures["encoder__subcell"] and "encoder_options.subcell" in failures["encoder__subcell"]
    assert str(vae_file) in failures["encoder__timm_resnet18"]
    assert "encoder.conv" in failures["encoder__timm_resnet18"] or "unexpected" in failures["encoder__timm_resnet18"]
    assert "no_such_net" in failures["encoder__timm_no_such_net"]
    registry = EncoderRegistry(home.mlflow_tracking_uri, home.mlflow_artifacts)
    assert registry.get("classical") is not None
    for name in ("subcell", "timm_resnet18", "timm_no_such_net", "mae"):
        assert registry.get(name) is None, name


def test_timm_weights_that_are_not_local_are_refused(home) -> None:
    failures = _register(home, ["timm:resnet18"], {"timm:resnet18": {"pretrained": True}})
    assert "never downloads" in failures["encoder__timm_resnet18"]
    assert EncoderRegistry(home.mlflow_tracking_uri, home.mlflow_artifacts).get("timm_resnet18") is None


def test_every_asset_check_says_what_it_checks() -> None:
    from dagster_project.graph import build_graph

    graph = build_graph(["classical", "ca_mae", "supervised_cnn"])
    specs = [spec for asset in graph.all for spec in asset.check_specs]
    assert {s.name for s in specs} >= {"negative_controls_present", "cells_per_well", "embeddings_finite",
                                       "promotion_rule"}
    assert all(s.description for s in specs), [s.name for s in specs if not s.description]
