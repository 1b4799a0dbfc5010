"""A new plate folder reaches `evaluation` with no manual launch: `new_plate_sensor` registers it and
requests its per-plate run (launched here as the daemon launches it), then declarative automation
refits the normalizer, re-normalizes every plate and re-evaluates, tick by tick."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import dagster as dg
import pytest

from bioembed_assets.config import Home
from bioembed_assets.sources.synthetic import generate_screen
from dagster_project.automation import settle
from dagster_project.definitions import build_definitions
from dagster_project.graph import REGRESSION_CHECK, build_graph
from dagster_project.partitions import plates
from dagster_project.resources import BioembedHome
from dagster_project.sensors import build_plate_sensor

from .conftest import TINY_SCREEN

pytestmark = pytest.mark.integration

ENCODERS = ["classical"]
DOWNSTREAM = {"normalizer", "normalized_profiles", "evaluation", "encoder_comparison"}


def _new_plate_arrives(instance: dg.DagsterInstance, sensor: dg.SensorDefinition, graph, resources: dict) -> list[str]:
    """One sensor tick; its partition requests applied and its run requests launched, as the daemon does."""
    result = sensor(dg.build_sensor_context(instance=instance, resources=resources))
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    for run in result.run_requests:
        assert dg.materialize(graph.all, selection=graph.per_plate, partition_key=run.partition_key,
                              instance=instance, resources=resources, tags=run.tags).success
    return [r.partition_key for r in result.run_requests]


def _materialized(ticks: list[dict]) -> dict[str, set]:
    done: dict[str, set] = {}
    for requested in ticks:
        for key, partitions in requested.items():
            done.setdefault(key.to_user_string(), set()).update(partitions)
    return done


def test_new_plate_folder_flows_to_evaluation_and_refits_the_normalizer(tmp_path: Path) -> None:
    home = Home(root=tmp_path / "home").ensure()
    graph = build_graph(ENCODERS)
    defs = build_definitions(graph)
    resources = {"bioembed": BioembedHome(root=str(home.root), encoders=ENCODERS, null_size=500)}
    sensor = build_plate_sensor(graph)
    incoming = tmp_path / "incoming"  # one screen, its plates arriving one by one
    first, second = generate_screen(incoming, dataclasses.replace(TINY_SCREEN, plate_prefix="AUTO-P"))
    with dg.DagsterInstance.ephemeral() as instance:
        assert dg.materialize(graph.all, selection=graph.encoder_assets, instance=instance, resources=resources).success
        cursor = dg.evaluate_automation_conditions(defs, instance).cursor  # the daemon's earlier ticks

        shutil.move(incoming / first, home.raw_root / first)
        assert _new_plate_arrives(instance, sensor, graph, resources) == [first]
        ticks, cursor = settle(defs, graph.all, instance, resources, cursor)
        done = _materialized(ticks)
        assert DOWNSTREAM <= set(done)
        assert done["normalized_profiles"] == {first}
        evaluation = instance.get_latest_materialization_event(dg.AssetKey("evaluation"))
        assert evaluation is not None and "classical_card/replicate_map" in evaluation.asset_materialization.metadata

        # README "Adding a plate": the normalizer refits with every new plate, and every plate is re-normalized
        shutil.move(incoming / second, home.raw_root / second)
        assert _new_plate_arrives(instance, sensor, graph, resources) == [second]
        ticks, _ = settle(defs, graph.all, instance, resources, cursor)
        done = _materialized(ticks)
        assert DOWNSTREAM <= set(done)
        assert done["normalized_profiles"] == {first, second}
        assert instance.get_dynamic_partitions(plates.name) == [first, second]
        history = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey("evaluation"), REGRESSION_CHECK), limit=5)
        assert len(history) == 2  # each evaluation ran its regression check (the second against the first)
        latest = history[0].event.dagster_event.event_specific_data  # the AssetCheckEvaluation
        assert "classical_card/replicate_map" in {r.data["metric"] for r in latest.metadata["changes"].records}
