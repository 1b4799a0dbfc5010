"""The Dagster code location of bioembed: assets for the home's encoders, sensors, jobs, resources.

The encoders come from the home's run configuration (`$BIOEMBED_HOME/run_config.json`, written by
`bioembed run`), else the default ones; each gets its own `encoder/`, `embeddings/` (and, when
trainable, `challenger/`) assets.
"""

import dagster as dg

from bioembed_assets.config import Home
from bioembed_assets.run_config import load_run_config
from dagster_project.assets import INGEST_ASSETS
from dagster_project.encoder_assets import embeddings_key
from dagster_project.graph import AssetGraph, build_graph
from dagster_project.partitions import plates
from dagster_project.resources import BioembedHome
from dagster_project.sensors import automation_sensor, build_plate_sensor, build_registry_sensor


def build_jobs(graph: AssetGraph) -> list:
    """Named jobs: `ingest` and `embed` per plate, `refit_normalizer` on demand, `train_<name>` per
    trainable encoder. (Automation runs the same assets without them; these are for the Launchpad,
    schedules and `dagster job launch`.)"""
    return [
        dg.define_asset_job("ingest", selection=dg.AssetSelection.assets(*INGEST_ASSETS), partitions_def=plates,
                            description="Ingest a plate: images + QC, platemap, illumination, segmentation, crops"),
        # embeddings alone: they share one backfill policy (many plates per run, the model loaded once);
        # well profiles and what follows them come by automation
        dg.define_asset_job("embed", selection=dg.AssetSelection.assets(*map(embeddings_key, graph.registered)),
                            partitions_def=plates, description="Embed plates' crops with each encoder's champion"),
        dg.define_asset_job("refit_normalizer", selection=dg.AssetSelection.assets(graph.normalizer),
                            description="Refit the normalization recipes on every profiled plate; automation then "
                                        "re-normalizes each plate and re-evaluates"),
        *(dg.define_asset_job(f"train_{name}", selection=dg.AssetSelection.assets(asset),
                              description=f"Train a {name} challenger, evaluate it and apply the promotion rule")
          for name, asset in graph.challengers.items()),
    ]


def build_definitions(graph: AssetGraph) -> dg.Definitions:
    return dg.Definitions(
        assets=graph.all,
        jobs=build_jobs(graph),
        sensors=[build_plate_sensor(graph), build_registry_sensor(graph), automation_sensor()],
        resources={"bioembed": BioembedHome(encoders=list(graph.encoders))},
        # One process per run: on small machines the multiprocess executor spends ~10 s importing per step.
        executor=dg.in_process_executor,
    )


GRAPH = build_graph(load_run_config(Home.from_env()).encoders)
defs = build_definitions(GRAPH)
