"""One automation tick in-process, as the daemon would do it: registry sensor, then declarative
automation, then the requested runs. Used by the demo (no daemon there) and the tests.
"""

import dagster as dg

from bioembed_assets.registry import EncoderRegistry
from dagster_project.sensors import champion_changes

_QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def report_champion_changes(instance: dg.DagsterInstance, registry: EncoderRegistry, names) -> list[str]:
    """What `encoder_registry_sensor` reports, stored in the instance as the daemon stores it."""
    events = champion_changes(instance, registry, names)
    for event in events:
        instance.report_runless_asset_event(event)
    return [e.asset_key.to_user_string() for e in events]


def requested_partitions(result: dg.EvaluateAutomationConditionsResult,
                         assets: list[dg.AssetsDefinition]) -> dict[dg.AssetKey, set[str | None]]:
    """asset key -> partitions the automation evaluation requested (assets with none left out)."""
    keys = [k for a in assets for k in a.keys]
    return {k: set(result.get_requested_partitions(k)) for k in keys if result.get_num_requested(k)}


def run_requested(requested: dict[dg.AssetKey, set[str | None]], assets: list[dg.AssetsDefinition],
                  instance: dg.DagsterInstance, resources: dict) -> list[dg.ExecuteInProcessResult]:
    """Materialize the requested asset partitions in dependency order: consecutive partitioned
    assets together, one run per plate; each unpartitioned asset in its own run."""
    graph = dg.Definitions(assets=assets, resources=resources).resolve_asset_graph()
    order = [k for k in graph.toposorted_asset_keys if k in requested]
    segments: list[list[dg.AssetKey]] = []
    for key in order:
        partitioned = None not in requested[key]
        if segments and partitioned and None not in requested[segments[-1][0]]:
            segments[-1].append(key)
        else:
            segments.append([key])
    results = []
    for segment in segments:
        partitions = sorted(set().union(*(requested[k] for k in segment)), key=str)
        for partition in partitions:
            selection = [k for k in segment if partition in requested[k]]
            results.append(dg.materialize(assets, selection=selection, partition_key=partition, instance=instance,
                                          resources=resources, raise_on_error=False, run_config=_QUIET))
    return results


def settle(defs: dg.Definitions, assets: list[dg.AssetsDefinition], instance: dg.DagsterInstance, resources: dict,
           cursor, max_ticks: int = 8) -> tuple[list[dict[dg.AssetKey, set[str | None]]], object]:
    """Automation ticks, each followed by its requested runs, until a tick requests nothing.

    Returns what each tick requested and the last cursor. Raises RuntimeError if a run fails.
    """
    ticks = []
    for _ in range(max_ticks):
        result = dg.evaluate_automation_conditions(defs, instance, cursor=cursor)
        cursor = result.cursor
        requested = requested_partitions(result, assets)
        if not requested:
            return ticks, cursor
        ticks.append(requested)
        for run in run_requested(requested, assets, instance, resources):
            if not run.success:
                raise RuntimeError(f"automation run of {sorted(k.to_user_string() for k in requested)} failed")
    raise RuntimeError(f"automation did not settle within {max_ticks} ticks")
