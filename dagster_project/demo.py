"""`bioembed demo`: a synthetic screen materialized end to end through Dagster, in-process."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import yaml

from bioembed_assets.config import HOME_ENV_VAR, Home, RunConfig
from bioembed_assets.pipeline import default_run_config, profiled_plates, save_run_config
from bioembed_assets.sources.synthetic import SyntheticScreenConfig, generate_screen
from bioembed_assets.store.atomic import atomic_file
from bioembed_assets.store.locks import file_lock
from dagster_project.assets import IMPORT_ASSETS
from dagster_project.automation import report_champion_changes, settle
from dagster_project.definitions import build_definitions
from dagster_project.graph import AssetGraph, build_graph
from dagster_project.partitions import plates
from dagster_project.resources import BioembedHome
from dagster_project.run_health import INSTANCE_SETTINGS, reaping

DEMO_SCREEN = SyntheticScreenConfig(n_plates=4, n_rows=8, n_cols=8, n_dmso_wells=24)
"""The demo's screen: 4 plates of 64 wells (20 compounds x 2 replicates + 24 DMSO), 2 sites/well."""

_QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


DEMO_TRAINING = {"epochs": 3, "batch_size": 64, "lr": 1e-3, "warmup_epochs": 1, "patience": 0, "seed": 0,
                 "num_workers": 1, "promote": True}
"""The demo's brief CA-MAE training (sized for ~5 minutes of demo on 2 CPU cores)."""


@dataclass
class LearningOutcome:
    """The demo's train -> evaluate -> promote -> re-embed loop."""

    encoder: str
    champion_version: str
    challenger_version: str
    decision: str
    promoted: bool
    reembedded: dict[str, int] = field(default_factory=dict)
    """asset -> partitions automation re-materialized after the promotion."""
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class DemoOutcome:
    """Which plates made it through, and the failures (plate -> error) of the others."""

    home: Home
    plates_ok: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    learning: LearningOutcome | None = None


def use_home(home_dir: str | Path) -> Home:
    """Point Dagster's local instance and bioembed at `home_dir` (created if needed)."""
    home = Home(root=Path(home_dir).expanduser().resolve()).ensure()
    os.environ["DAGSTER_HOME"] = str(home.dagster_home)
    os.environ[HOME_ENV_VAR] = str(home.root)
    os.environ.setdefault("MPLCONFIGDIR", str(home.matplotlib_config))
    write_instance_config(home.dagster_home / "dagster.yaml")
    return home


def write_instance_config(path: Path) -> Path:
    """The local Dagster instance's `dagster.yaml`: one step per pool at a time, no telemetry, and run
    monitoring that fails runs whose worker died and frees their slots. Settings a user added are kept;
    missing ones are added (so homes made by older versions get run monitoring too)."""
    config = (yaml.safe_load(path.read_text()) if path.exists() else None) or {}
    wanted = {"concurrency": {"pools": {"default_limit": 1}}, "telemetry": {"enabled": False}, **INSTANCE_SETTINGS}
    merged = {**wanted, **config}
    if merged != config:
        with atomic_file(path) as tmp:
            tmp.write_text(yaml.safe_dump(merged, sort_keys=False))
    return path


def _failure_message(result: dg.ExecuteInProcessResult) -> str:
    """The root cause of the first failed step, e.g. "raw_plate: BioembedInputError: [plate=…] …"."""
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            error = event.step_failure_data.error
            while error.cause is not None and error.cls_name.startswith("Dagster"):
                error = error.cause
            return f"{event.step_key}: {error.message.strip()}"
    return "run failed"


def materialize_home(home: Home, plate_names: list[str], resource: BioembedHome, log=print,
                     graph: AssetGraph | None = None) -> DemoOutcome:
    """Run the whole graph: each plate in its own run (a bad plate fails alone), then the
    cross-plate normalizer, each plate's normalized profiles, and the evaluation."""
    graph = graph or build_graph(resource.encoders)
    instance = dg.DagsterInstance.get()
    with reaping(instance, log=log):  # no daemon here: fail runs killed earlier, free their slots
        return _materialize_all(instance, graph, plate_names, resource, log, DemoOutcome(home))


def _materialize_all(instance: dg.DagsterInstance, graph: AssetGraph, plate_names: list[str],
                     resource: BioembedHome, log, outcome: DemoOutcome) -> DemoOutcome:
    known = set(instance.get_dynamic_partitions(plates.name))
    instance.add_dynamic_partitions(plates.name, [p for p in plate_names if p not in known])
    resources = {"bioembed": resource}

    def run(selection, partition: str | None = None) -> dg.ExecuteInProcessResult:
        return dg.materialize(graph.all, selection=selection, partition_key=partition, instance=instance,
                              resources=resources, raise_on_error=False, run_config=_QUIET)

    if not (result := run(graph.encoder_assets)).success:
        raise RuntimeError(f"registering the encoders failed: {_failure_message(result)}")
    t_plates = time.perf_counter()
    for plate in plate_names:
        t0 = time.perf_counter()
        result = run(graph.per_plate, plate)
        if result.success:
            outcome.plates_ok.append(plate)
            log(f"  plate {plate}: ingested, segmented, cropped, embedded, profiled "
                f"({time.perf_counter() - t0:.0f} s)")
        else:
            outcome.failures[plate] = _failure_message(result)
            log(f"  plate {plate}: FAILED - {outcome.failures[plate]}")
    if not outcome.plates_ok:
        raise RuntimeError(f"every plate failed: {outcome.failures}")
    t_profiles = time.perf_counter()
    outcome.stage_seconds["plates"] = t_profiles - t_plates
    # The normalizer is refitted on every profiled plate, so every one of them is normalized again (not only
    # this run's: plates profiled by an earlier run would keep the old fit's features otherwise).
    # One run at a time fits, applies and evaluates (runs of other plates may be going on in parallel).
    with file_lock(outcome.home.stage_lock("cross-plate"), "another run's normalizer, normalized profiles and "
                   "evaluation", on_wait=lambda msg: log(f"  {msg}")):
        profiled = sorted(set(instance.get_dynamic_partitions(plates.name)) & profiled_plates(outcome.home))
        for selection, partitions in (([graph.normalizer], [None]), ([graph.normalized_profiles], profiled),
                                      ([graph.evaluation], [None])):
            for partition in partitions:
                if not (result := run(selection, partition)).success:
                    if selection == [graph.evaluation]:  # some recipes failed; the others' results are stored
                        outcome.failures["evaluation"] = _failure_message(result)
                        log(f"  evaluation: FAILED - {outcome.failures['evaluation']}")
                        continue
                    raise RuntimeError(f"{selection[0].key.to_user_string()} failed: {_failure_message(result)}")
    outcome.stage_seconds["normalize + evaluate"] = time.perf_counter() - t_profiles
    log("  normalizer fitted, plates normalized, evaluation done")
    return outcome


LEARNING_ENCODER = "ca_mae"
"""The encoder the demo trains a challenger of."""


def learning_loop(home: Home, resource: BioembedHome, graph: AssetGraph, encoder: str = LEARNING_ENCODER,
                  training: dict | None = None, log=print) -> LearningOutcome:
    """Train a challenger of `encoder` through its Dagster asset (evaluate it against the champion,
    apply the rule), then let the registry sensor and declarative automation re-embed if it was promoted."""
    instance, resources = dg.DagsterInstance.get(), {"bioembed": resource}
    defs = build_definitions(graph)
    cursor = dg.evaluate_automation_conditions(defs, instance).cursor  # the baseline tick before the promotion
    t0 = time.perf_counter()
    run_config = {**_QUIET, "ops": {f"challenger__{encoder}": {"config": training or DEMO_TRAINING}}}
    result = dg.materialize(graph.all, selection=[graph.challengers[encoder]], instance=instance, resources=resources,
                            run_config=run_config, raise_on_error=False)
    if not result.success:
        raise RuntimeError(f"challenger/{encoder} failed: {_failure_message(result)}")
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    value = {k: getattr(v, "value", v) for k, v in meta.items()}
    outcome = LearningOutcome(encoder, str(value["champion_version"]), str(value["challenger_version"]),
                              decision=value["decision"], promoted=bool(value["promoted"]))
    outcome.seconds["train"] = float(value.get("training_seconds", 0.0))
    outcome.seconds["evaluate + decide"] = time.perf_counter() - t0 - outcome.seconds["train"]
    log(f"  challenger/{encoder}: trained {value.get('epochs_run')} epochs in {outcome.seconds['train']:.0f} s; "
        f"{outcome.decision}")
    t1 = time.perf_counter()
    changed = report_champion_changes(instance, resource.registry(), graph.registered)
    ticks, _ = settle(defs, graph.all, instance, resources, cursor)
    for requested in ticks:
        for key, partitions in requested.items():
            outcome.reembedded[key.to_user_string()] = outcome.reembedded.get(key.to_user_string(), 0) + len(partitions)
    outcome.seconds["re-embed + downstream"] = time.perf_counter() - t1
    if changed:
        log(f"  {', '.join(changed)} changed; automation re-materialized "
            + ", ".join(f"{k} ({n})" for k, n in outcome.reembedded.items())
            + f" in {outcome.seconds['re-embed + downstream']:.0f} s")
    return outcome


def run_demo(home_dir: str | Path, screen: SyntheticScreenConfig = DEMO_SCREEN, null_size: int = 10000,
             log=print, learn: bool = True, training: dict | None = None,
             overrides: dict | None = None) -> DemoOutcome:
    """Generate a synthetic screen under `<home>/raw`, materialize everything, then (with `learn`)
    train a CA-MAE challenger, evaluate it against the untrained champion and promote it by the rule.

    `overrides`: RunConfig fields over the synthetic screen's defaults (e.g. `encoders`, `encoder_options`,
    `recipes`), saved as the home's run configuration."""
    t0 = time.perf_counter()
    home = use_home(home_dir)
    log(f"bioembed demo: home {home.root}")
    config = default_run_config(home)
    if overrides:
        RunConfig.check_keys(overrides, "demo config")
        config = RunConfig.model_validate({**config.model_dump(), **overrides})
        save_run_config(home, config)
    plate_names = generate_screen(home.raw_root, screen)
    log(f"  synthetic screen: {len(plate_names)} plates under {home.raw_root}; encoders {', '.join(config.encoders)}")
    resource = BioembedHome(root=str(home.root), encoders=config.encoders, null_size=null_size)
    graph = build_graph(resource.encoders)
    outcome = materialize_home(home, plate_names, resource, log, graph)
    if learn and LEARNING_ENCODER not in graph.encoders:
        log(f"  learning loop skipped: it trains {LEARNING_ENCODER}, which this run does not embed with")
    elif learn:
        outcome.learning = learning_loop(home, resource, graph, training=training, log=log)
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


def import_with_dagster(home_dir: str | Path, import_config: dict,
                        null_size: int = 10000) -> tuple[Home, dict, str | None]:
    """Register the import `import_config` (the fields of `ProfileImportConfig`) and materialize
    `imported_profiles` -> `imported_evaluation` in-process; returns the home, the imported set's
    name/version and None, or, when the import succeeded but some recipe failed (the others are
    stored), the failure message. A failed import raises."""
    home = use_home(home_dir)
    run_config = {**_QUIET, "ops": {"imported_profiles": {"config": import_config}}}
    result = dg.materialize(IMPORT_ASSETS, instance=dg.DagsterInstance.get(),
                            resources={"bioembed": BioembedHome(root=str(home.root), null_size=null_size)},
                            run_config=run_config, raise_on_error=False)
    imported_ok = any(e.is_step_success and e.step_key == "imported_profiles" for e in result.all_events)
    if not imported_ok:
        raise RuntimeError(f"import failed: {_failure_message(result)}")
    imported = result.output_for_node("imported_profiles")
    found = next(i for i in imported if i["name"] == import_config["name"])
    return home, found, None if result.success else _failure_message(result)
