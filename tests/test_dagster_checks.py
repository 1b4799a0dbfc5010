"""Blocking per-plate checks stop a bad plate alone; the replicate-mAP regression check; every asset
has owners and a code version."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import dagster as dg
import pytest

from bioembed_assets.config import Home
from bioembed_assets.sources.synthetic import generate_screen
from dagster_project.definitions import defs
from dagster_project.graph import build_graph, regression_check
from dagster_project.resources import BioembedHome
from dagster_project.versions import OWNERS

from .conftest import TINY_SCREEN


def test_every_asset_has_owners_and_a_code_version() -> None:
    specs = [spec for assets in defs.assets for spec in assets.specs]
    assert len(specs) > 10
    for spec in specs:
        assert spec.owners == OWNERS, spec.key
        assert spec.code_version, spec.key
    graph = defs.resolve_asset_graph()  # as the UI sees them
    assert all(graph.get(k).owners == OWNERS and graph.get(k).code_version for k in graph.get_all_asset_keys())


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {c.check_name: c for c in result.get_asset_check_evaluations()}


@pytest.mark.integration
def test_a_plate_losing_too_many_cells_at_the_border_stops_alone(tmp_path: Path) -> None:
    """256 px sites lose ~45 % of cells to 64 px crops (under the synthetic limit 0.6), 128 px sites ~75 %:
    that plate fails `border_loss` and is not embedded, the other one is."""
    home = Home(root=tmp_path / "home").ensure()
    (good,) = generate_screen(home.raw_root, dataclasses.replace(TINY_SCREEN, n_plates=1, plate_prefix="GOOD-P"))
    (small,) = generate_screen(home.raw_root, dataclasses.replace(TINY_SCREEN, n_plates=1, image_size=128,
                                                                  plate_prefix="SMALL-P"))
    graph = build_graph(["classical"])
    resources = {"bioembed": BioembedHome(root=str(home.root), encoders=["classical"])}
    embeddings = dg.AssetKey(["embeddings", "classical"])
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("plates", [good, small])
        assert dg.materialize(graph.all, selection=graph.encoder_assets, instance=instance, resources=resources).success
        runs = {plate: dg.materialize(graph.all, selection=graph.per_plate, partition_key=plate, instance=instance,
                                      resources=resources, raise_on_error=False) for plate in (good, small)}
        assert runs[good].success
        assert _checks(runs[good])["border_loss"].passed
        assert not runs[small].success
        failed = _checks(runs[small])["border_loss"]
        assert not failed.passed and failed.partition == small and failed.blocking
        assert failed.metadata["border_loss_fraction"].value > 0.6
        for plate, materialized in ((good, True), (small, False)):
            done = {e.asset_key for e in runs[plate].get_asset_materialization_events()}
            assert dg.AssetKey("crops") in done
            assert (embeddings in done) is materialized, plate
            assert (dg.AssetKey("well_profiles") in done) is materialized, plate
        # nor does automation pick the blocked plate up later: nothing is requested for it
        requested = dg.evaluate_automation_conditions(dg.Definitions(assets=graph.all, resources=resources), instance)
        assert small not in requested.get_requested_partitions(dg.AssetKey("well_profiles"))


def _map(value: float) -> dict[str, dg.MetadataValue]:
    return {"ca_mae_card/replicate_map": dg.MetadataValue.float(value), "ca_mae_card/moa_map": dg.MetadataValue.float(0.2)}


def test_replicate_map_regression_warns_on_a_drop_beyond_the_tolerance() -> None:
    first = regression_check(None, _map(0.5), 0.05)
    assert first.passed and first.severity == dg.AssetCheckSeverity.WARN
    assert regression_check(_map(0.5), _map(0.47), 0.05).passed  # within the tolerance
    assert regression_check(_map(0.5), _map(0.9), 0.05).passed  # better is no regression
    dropped = regression_check(_map(0.5), _map(0.4), 0.05)
    assert not dropped.passed and dropped.severity == dg.AssetCheckSeverity.WARN
    assert "ca_mae_card/replicate_map 0.500 -> 0.400" in dropped.description
    (row,) = dropped.metadata["changes"].records  # moa_map is not compared
    assert row.data["drop"] == pytest.approx(0.1)
