"""The Dagster code location of bioembed: assets for the home's encoders, sensors, jobs, resources.

The encoders come from the home's run configuration (`$BIOEMBED_HOME/run_config.json`, written by
`bioembed run`), else the default ones; each gets its own `encoder/`, `embeddings/` (and, when
trainable, `challenger/`) assets.
"""

import dagster as dg

from bioembed_assets.config import Home
from bioembed_assets.pipeline import load_run_config
from dagster_project.graph import AssetGraph, build_graph
from dagster_project.resources import BioembedHome
from dagster_project.sensors import automation_sensor, build_plate_sensor, build_registry_sensor


def build_definitions(graph: AssetGraph) -> dg.Definitions:
    train_jobs = [dg.define_asset_job(f"train_{name}", selection=dg.AssetSelection.assets(asset),
                                      description=f"Train a {name} challenger, evaluate it and apply the promotion rule")
                  for name, asset in graph.challengers.items()]
    return dg.Definitions(
        assets=graph.all,
        jobs=train_jobs,
        sensors=[build_plate_sensor(graph), build_registry_sensor(graph), automation_sensor()],
        resources={"bioembed": BioembedHome(encoders=list(graph.encoders))},
        # One process per run: on small machines the multiprocess executor spends ~10 s importing per step.
        executor=dg.in_process_executor,
    )


GRAPH = build_graph(load_run_config(Home.from_env()).encoders)
defs = build_definitions(GRAPH)
