"""Sensors: new plate folders become partitions; champion moves in the MLflow registry become new
materializations of `encoder/<name>` (which declarative automation turns into re-embedding)."""


from collections.abc import Sequence
from pathlib import Path

import dagster as dg

from bioembed_assets.registry import EncoderRegistry
from bioembed_assets.schema import printable
from bioembed_assets.sources.layouts import display_path
from bioembed_assets.sources.validate import check_plate_folder
from dagster_project.encoder_assets import CHAMPION_VERSION, encoder_key
from dagster_project.graph import AssetGraph
from dagster_project.partitions import plates
from dagster_project.resources import BioembedHome


def build_plate_sensor(graph: AssetGraph) -> dg.SensorDefinition:
    @dg.sensor(name="new_plate_sensor", minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
               asset_selection=dg.AssetSelection.assets(*graph.per_plate))
    def new_plate_sensor(context: dg.SensorEvaluationContext, bioembed: BioembedHome) -> dg.SensorResult:
        """Registers each valid new plate folder under the raw-data root and runs its per-plate assets;
        invalid folders are reported (with the reason) and not registered. One bad folder never stops
        the others: any error while looking at a folder is logged as a warning and the folder skipped."""
        config = bioembed.run_config()
        raw_root = Path(config.raw_root)
        known = set(context.instance.get_dynamic_partitions(plates.name))
        config_dir = Path(config.config_dir) if config.config_dir else None
        new, runs = [], []
        for folder in sorted(raw_root.iterdir()) if raw_root.is_dir() else []:
            if folder.name in known or (config.plates is not None and folder.name not in config.plates):
                continue
            shown = display_path(folder)
            try:
                if not folder.is_dir():
                    continue
                problem = check_plate_folder(folder, config, config_dir=config_dir)
            except Exception as err:  # noqa: BLE001 - one unreadable folder must not fail the whole tick
                problem = printable(f"unexpected {type(err).__name__}: {err}")
            if problem:
                context.log.warning(f"not registering plate folder {shown}: {problem}")
                continue
            new.append(folder.name)
            runs.append(dg.RunRequest(partition_key=folder.name, run_key=f"new-plate-{folder.name}"))
        if not new:
            return dg.SensorResult(skip_reason="no new valid plate folders")
        context.log.info(f"registering plates {new}")
        return dg.SensorResult(run_requests=runs, dynamic_partitions_requests=[plates.build_add_request(new)])

    return new_plate_sensor


def champion_changes(instance: dg.DagsterInstance, registry: EncoderRegistry,
                     names: Sequence[str]) -> list[dg.AssetMaterialization]:
    """A materialization of `encoder/<name>` for each encoder whose champion differs from the one
    last recorded (encoders never materialized yet are left to their asset)."""
    events = []
    for name in names:
        key = encoder_key(name)
        last = instance.get_latest_materialization_event(key)
        champion = registry.get(name)
        if last is None or champion is None or last.asset_materialization is None:
            continue
        recorded = last.asset_materialization.metadata.get(CHAMPION_VERSION)
        recorded = getattr(recorded, "value", recorded)
        if str(recorded) != champion.version:
            events.append(dg.AssetMaterialization(
                asset_key=key, description=f"champion moved in the MLflow registry: v{recorded} -> v{champion.version}",
                metadata={CHAMPION_VERSION: champion.version, "previous_champion": str(recorded),
                          "state": champion.describe(), "promoted_by": champion.tags.get("promoted_by", "")},
                tags={"dagster/data_version": champion.version}))
    return events


def build_registry_sensor(graph: AssetGraph) -> dg.SensorDefinition:
    @dg.sensor(name="encoder_registry_sensor", minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING)
    def encoder_registry_sensor(context: dg.SensorEvaluationContext, bioembed: BioembedHome) -> dg.SensorResult:
        """Reports each promotion (or rollback) in the MLflow registry as a new materialization of
        `encoder/<name>`; declarative automation then re-embeds that encoder's plates."""
        events = champion_changes(context.instance, bioembed.registry(), graph.registered)
        if not events:
            return dg.SensorResult(skip_reason="no champion changed")
        for e in events:
            context.log.info(f"{e.asset_key.to_user_string()}: {e.description}")
        return dg.SensorResult(asset_events=events)

    return encoder_registry_sensor


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    """Dagster's declarative-automation sensor, running by default (Dagster ships it stopped)."""
    return dg.AutomationConditionSensorDefinition("bioembed_automation", target=dg.AssetSelection.all(),
                                                  default_status=dg.DefaultSensorStatus.RUNNING,
                                                  minimum_interval_seconds=30)
