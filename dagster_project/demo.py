"""`bioembed demo`: a synthetic screen materialized end to end through Dagster, in-process."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from bioembed_assets.config import HOME_ENV_VAR, Home, RunConfig
from bioembed_assets.pipeline import save_run_config
from bioembed_assets.sources.synthetic import SyntheticScreenConfig, generate_screen
from dagster_project.assets import (
    ALL_ASSETS,
    PER_PLATE_ASSETS,
    encoder,
    evaluation,
    imported_evaluation,
    imported_profiles,
    normalized_profiles,
    normalizer,
)
from dagster_project.partitions import plates
from dagster_project.resources import BioembedHome

DEMO_SCREEN = SyntheticScreenConfig(n_plates=4, n_rows=8, n_cols=8, n_dmso_wells=24)
"""The demo's screen: 4 plates of 64 wells (20 compounds x 2 replicates + 24 DMSO), 2 sites/well."""

_QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@dataclass
class DemoOutcome:
    """Which plates made it through, and the failures (plate -> error) of the others."""

    home: Home
    plates_ok: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def use_home(home_dir: str | Path) -> Home:
    """Point Dagster's local instance and bioembed at `home_dir` (created if needed)."""
    home = Home(root=Path(home_dir).expanduser().resolve()).ensure()
    os.environ["DAGSTER_HOME"] = str(home.dagster_home)
    os.environ[HOME_ENV_VAR] = str(home.root)
    os.environ.setdefault("MPLCONFIGDIR", str(home.matplotlib_config))
    config = home.dagster_home / "dagster.yaml"
    if not config.exists():
        config.write_text("concurrency:\n  pools:\n    default_limit: 1\ntelemetry:\n  enabled: false\n")
    return home


def _failure_message(result: dg.ExecuteInProcessResult) -> str:
    """The root cause of the first failed step, e.g. "raw_plate: BioembedInputError: [plate=…] …"."""
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            error = event.step_failure_data.error
            while error.cause is not None and error.cls_name.startswith("Dagster"):
                error = error.cause
            return f"{event.step_key}: {error.message.strip()}"
    return "run failed"


def materialize_home(home: Home, plate_names: list[str], resource: BioembedHome,
                     log=print) -> DemoOutcome:
    """Run the whole graph: each plate in its own run (a bad plate fails alone), then the
    cross-plate normalizer, each plate's normalized profiles, and the evaluation."""
    instance = dg.DagsterInstance.get()
    known = set(instance.get_dynamic_partitions(plates.name))
    instance.add_dynamic_partitions(plates.name, [p for p in plate_names if p not in known])
    resources = {"bioembed": resource}
    outcome = DemoOutcome(home)

    def run(selection, partition: str | None = None) -> dg.ExecuteInProcessResult:
        return dg.materialize(ALL_ASSETS, selection=selection, partition_key=partition, instance=instance,
                              resources=resources, raise_on_error=False, run_config=_QUIET)

    if not (result := run([encoder])).success:
        raise RuntimeError(f"registering the encoders failed: {_failure_message(result)}")
    for plate in plate_names:
        t0 = time.perf_counter()
        result = run(PER_PLATE_ASSETS, plate)
        if result.success:
            outcome.plates_ok.append(plate)
            log(f"  plate {plate}: ingested, segmented, cropped, embedded, profiled "
                f"({time.perf_counter() - t0:.0f} s)")
        else:
            outcome.failures[plate] = _failure_message(result)
            log(f"  plate {plate}: FAILED - {outcome.failures[plate]}")
    if not outcome.plates_ok:
        raise RuntimeError(f"every plate failed: {outcome.failures}")
    for selection, partitions in (([normalizer], [None]), ([normalized_profiles], outcome.plates_ok),
                                  ([evaluation], [None])):
        for partition in partitions:
            if not (result := run(selection, partition)).success:
                raise RuntimeError(f"{selection[0].key.to_user_string()} failed: {_failure_message(result)}")
    log("  normalizer fitted, plates normalized, evaluation done")
    return outcome


def run_demo(home_dir: str | Path, screen: SyntheticScreenConfig = DEMO_SCREEN,
             null_size: int = 10000, log=print) -> DemoOutcome:
    """Generate a synthetic screen under `<home>/raw` and materialize everything."""
    t0 = time.perf_counter()
    home = use_home(home_dir)
    log(f"bioembed demo: home {home.root}")
    plate_names = generate_screen(home.raw_root, screen)
    log(f"  synthetic screen: {len(plate_names)} plates under {home.raw_root}")
    outcome = materialize_home(home, plate_names, BioembedHome(root=str(home.root), null_size=null_size), log)
    outcome.seconds = time.perf_counter() - t0
    return outcome


def run_with_config(home_dir: str | Path, config: RunConfig, null_size: int = 10000, log=print) -> DemoOutcome:
    """Save `config` as the home's run configuration and materialize its plates end to end."""
    t0 = time.perf_counter()
    home = use_home(home_dir)
    save_run_config(home, config)
    raw_root = Path(config.raw_root)
    if not raw_root.is_dir():
        raise FileNotFoundError(f"raw_root {raw_root} (from the config) is not a folder")
    plate_names = config.plates or sorted(p.name for p in raw_root.iterdir() if p.is_dir())
    log(f"bioembed run: home {home.root}, {len(plate_names)} plate(s) from {raw_root} ({config.layout} layout)")
    resource = BioembedHome(root=str(home.root), encoders=config.encoders, null_size=null_size)
    outcome = materialize_home(home, plate_names, resource, log)
    outcome.seconds = time.perf_counter() - t0
    return outcome


def import_with_dagster(home_dir: str | Path, import_config: dict, null_size: int = 10000) -> tuple[Home, dict]:
    """Register the import `import_config` (the fields of `ProfileImportConfig`) and materialize
    `imported_profiles` -> `imported_evaluation` in-process; returns the home and the imported set's
    name/version."""
    home = use_home(home_dir)
    run_config = {**_QUIET, "ops": {"imported_profiles": {"config": import_config}}}
    result = dg.materialize([imported_profiles, imported_evaluation], instance=dg.DagsterInstance.get(),
                            resources={"bioembed": BioembedHome(root=str(home.root), null_size=null_size)},
                            run_config=run_config, raise_on_error=False)
    if not result.success:
        raise RuntimeError(f"import failed: {_failure_message(result)}")
    imported = result.output_for_node("imported_profiles")
    return home, next(i for i in imported if i["name"] == import_config["name"])
