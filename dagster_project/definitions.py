"""The Dagster code location of bioembed: assets, sensor, resources, in-process executor."""

import dagster as dg

from dagster_project.assets import ALL_ASSETS
from dagster_project.resources import BioembedHome
from dagster_project.sensors import new_plate_sensor

defs = dg.Definitions(
    assets=ALL_ASSETS,
    sensors=[new_plate_sensor],
    resources={"bioembed": BioembedHome()},
    # One process per run: on small machines the multiprocess executor spends ~10 s importing per step.
    executor=dg.in_process_executor,
)
