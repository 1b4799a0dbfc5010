"""A sensor that registers new plate folders under the raw-data root as partitions."""


from pathlib import Path

import dagster as dg

from bioembed_assets.sources.validate import check_plate_folder
from dagster_project.assets import PER_PLATE_ASSETS
from dagster_project.partitions import plates
from dagster_project.resources import BioembedHome


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           asset_selection=dg.AssetSelection.assets(*PER_PLATE_ASSETS))
def new_plate_sensor(context: dg.SensorEvaluationContext, bioembed: BioembedHome) -> dg.SensorResult:
    """Registers each valid new plate folder under the raw-data root and runs its per-plate assets;
    invalid folders are reported (with the reason) and not registered."""
    config = bioembed.run_config()
    raw_root = Path(config.raw_root)
    known = set(context.instance.get_dynamic_partitions(plates.name))
    new, runs = [], []
    folders = sorted(p for p in raw_root.iterdir() if p.is_dir() and p.name not in known) if raw_root.is_dir() else []
    for folder in folders:
        if config.plates is not None and folder.name not in config.plates:
            continue
        problem = check_plate_folder(folder, config, config_dir=Path(config.config_dir) if config.config_dir else None)
        if problem:
            context.log.warning(f"not registering plate folder {folder}: {problem}")
            continue
        new.append(folder.name)
        runs.append(dg.RunRequest(partition_key=folder.name, run_key=f"new-plate-{folder.name}"))
    if not new:
        return dg.SensorResult(skip_reason="no new valid plate folders")
    context.log.info(f"registering plates {new}")
    return dg.SensorResult(run_requests=runs, dynamic_partitions_requests=[plates.build_add_request(new)])
