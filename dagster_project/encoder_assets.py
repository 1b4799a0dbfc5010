"""Per-encoder assets: `encoder/<name>` (its champion), `embeddings/<name>` (per plate) and, for
trainable encoders, `challenger/<name>` (train + evaluate + the promotion rule as an asset check).

Each encoder has its own lineage, so promoting one re-embeds that encoder's plates only: its
`embeddings/<name>` re-materializes (declarative automation) when `encoder/<name>` reports a new
champion version, and everything downstream follows.
"""


import dataclasses
from typing import TYPE_CHECKING

import dagster as dg

from bioembed_assets.encoder_setups import EncoderSetup
from bioembed_assets.promotion import apply_promotion, decide
from bioembed_assets.registry import CHALLENGER
from dagster_project.assets import EMBED, LEARN, check_result, crops, info_progress, per_plate_check
from dagster_project.metadata import (
    DAGSTER_RUN_TAG,
    evaluation_metadata,
    evaluation_run_links,
    lake_table_metadata,
    mlflow_run_url,
    mlflow_version_url,
    table_value,
)
from dagster_project.partitions import plates
from dagster_project.resources import BioembedHome
from dagster_project.versions import owned

if TYPE_CHECKING:
    from bioembed_assets.training.loop import TrainConfig

CHAMPION_VERSION = "champion_version"


def encoder_key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["encoder", name])


def embeddings_key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["embeddings", name])


def reembed_on_new_champion(name: str) -> dg.AutomationCondition:
    """Requested for every plate once `encoder/<name>` is updated (a new champion), and only then:
    new plates come through the plate sensor and backfills, not through automation."""
    encoder_updated = (dg.AutomationCondition.any_deps_match(dg.AutomationCondition.newly_updated())
                       .allow(dg.AssetSelection.assets(encoder_key(name))))
    return (encoder_updated.since_last_handled() & ~dg.AutomationCondition.any_deps_missing()
            & dg.AutomationCondition.all_deps_blocking_checks_passed()  # a plate that failed `crops`' checks
            & ~dg.AutomationCondition.any_deps_in_progress() & ~dg.AutomationCondition.in_progress()
            ).with_label(f"re-embed on new {name} champion")


class ChallengerConfig(dg.Config):
    """Run config of a challenger: train (or take the registered challenger), evaluate, decide."""

    train: bool = True
    """Train a new challenger from the champion; False evaluates the already registered challenger."""
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-4
    warmup_epochs: int = 1
    patience: int = 3
    seed: int = 0
    device: str = "auto"
    num_workers: int = 1
    max_steps_per_epoch: int | None = None
    plates: list[str] = []
    """Plates to train on (default: the champion's plates); the evaluation always uses the champion's plates."""
    resume: bool = False
    promote: bool = False
    """Apply the promotion rule's decision (move `champion`) when it says promote."""

    def train_config(self) -> "TrainConfig":
        """The loop settings among these fields (the rest say what to do around the training)."""
        from bioembed_assets.training.loop import TrainConfig

        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in self.model_dump().items() if k in names})


def build_encoder_assets(setup: EncoderSetup) -> list[dg.AssetsDefinition]:
    """The assets of one configured encoder."""
    name = setup.name

    @dg.asset(key=encoder_key(name), group_name=EMBED, kinds={"mlflow"}, **owned("encoder"),
              description=f"The `champion` version of encoder {name} in the MLflow registry ({setup.description}); "
                          "registers an untrained version 1 if there is none. Its data version is the champion "
                          "version; the registry sensor reports each promotion as a new materialization.")
    def encoder_asset(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
        from bioembed_assets import pipeline

        run_config = bioembed.run_config()
        options = pipeline.encoder_options(run_config, setup)
        version = bioembed.registry().ensure(name, lambda: setup.build(run_config.channels, options),
                                             description=setup.description)
        return dg.MaterializeResult(metadata={CHAMPION_VERSION: version.version, "state": version.describe(),
                                              "mlflow_model_version": mlflow_version_url(bioembed.mlflow_ui_url, version)},
                                    data_version=dg.DataVersion(version.version))

    @dg.asset(key=embeddings_key(name), partitions_def=plates, group_name=EMBED, deps=[crops, encoder_key(name)],
              pool="gpu" if setup.uses_gpu else None, kinds={"pytorch" if setup.uses_gpu else "numpy", "parquet"},
              backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=8),
              automation_condition=reembed_on_new_champion(name), **owned("embeddings"),
              check_specs=[per_plate_check("embeddings_finite", embeddings_key(name),
                                           "No embedding row holds a NaN or infinite value. Blocking: a plate that "
                                           "fails is not profiled (a multi-plate backfill run is checked as one).")],
              description=f"Per-cell embeddings from encoder {name}'s champion version (loaded once per run, "
                          "batched on GPU when present); rows carry the version.")
    def embeddings_asset(context: dg.AssetExecutionContext, bioembed: BioembedHome) -> dg.MaterializeResult:
        from bioembed_assets import pipeline
        from bioembed_assets.inference import resolve_device

        model, version = bioembed.registry().load(name)
        device = resolve_device(bioembed.device)
        model.to(device)
        nan_rows, reused = 0, 0
        for plate in context.partition_keys:
            summary = pipeline.embed_plate(
                bioembed.home(), plate, model, version, engine=bioembed.engine_options(),
                reuse=bioembed.reuse_embeddings,
                progress=info_progress(context.log, f"embeddings/{name} {plate}: crops embedded"))
            nan_rows += summary["nan_rows"]
            reused += summary["reused"]
            context.log.info(f"{name} v{version.version} plate {plate}: {summary['cells']} cells "
                             f"{'(rows of this version reused)' if summary['reused'] else 'embedded'}")
        # a multi-plate run's result is recorded on each of its plates: a row count only for one plate
        written = [dict(encoder=version.name, version=version.version, plate=p) for p in context.partition_keys]
        table = lake_table_metadata(bioembed.home(), "embeddings", written, row_count=len(written) == 1)
        return dg.MaterializeResult(
            metadata={"encoder_version": version.version, "device": str(device), "plates_reused": reused,
                      "mlflow_model_version": mlflow_version_url(bioembed.mlflow_ui_url, version), **table},
            data_version=dg.DataVersion(version.version),
            check_results=[check_result("embeddings_finite", embeddings_key(name), nan_rows == 0, nan_rows=nan_rows)])

    assets = [encoder_asset, embeddings_asset]
    if setup.trainable:
        assets.append(_challenger_asset(setup))
    return assets


def _challenger_asset(setup: EncoderSetup) -> dg.AssetsDefinition:
    name = setup.name
    key = dg.AssetKey(["challenger", name])

    @dg.asset(key=key, group_name=LEARN, deps=[crops, encoder_key(name)], kinds={"pytorch", "mlflow"},
              pool="gpu", **owned("challenger"), check_specs=[dg.AssetCheckSpec(
                  "promotion_rule", asset=key,
                  description="The promotion rule's verdict on this challenger vs the champion (passes = promote).")],
              description=f"Encoder {name} trained on the plates' crops from its champion, registered as "
                          "`challenger`, evaluated on the champion's plates with the same recipes and metrics; "
                          "the `promotion_rule` check reports the rule's decision (and applies it with promote).")
    def challenger_asset(context: dg.AssetExecutionContext, config: ChallengerConfig,
                         bioembed: BioembedHome) -> dg.MaterializeResult:
        from bioembed_assets import challenger as challenger_lib
        from bioembed_assets.training.run import train_challenger

        home, registry, run_config = bioembed.home(), bioembed.registry(), bioembed.run_config()
        run_config.promotion.check_names(list(run_config.recipes))
        champion = bioembed.champion(name)
        meta: dict = {}
        tags = {DAGSTER_RUN_TAG: context.run_id}
        if config.train:
            base = registry.load_version(champion)
            plates_ = config.plates or challenger_lib.evaluation_plates(home, champion)
            outcome = train_challenger(home, registry, name, base, champion, plates_, config.train_config(),
                                       resume=config.resume, log=context.log.info,
                                       progress=_DagsterProgress(context), tags=tags)
            meta |= {"training_run": mlflow_run_url(bioembed.mlflow_ui_url, registry, outcome.run_id),
                     "training_seconds": round(outcome.seconds, 1),
                     "epochs_run": len(outcome.result.history), "best_val_loss": outcome.result.best_val_loss}
        version = registry.get(name, CHALLENGER)
        if version is None:
            raise LookupError(f"encoder {name!r} has no challenger; run with train: true")
        result = challenger_lib.evaluate_against_champion(
            home, registry, champion, version, run_config.recipes, device=bioembed.device,
            batch_size=bioembed.batch_size, null_size=bioembed.null_size, crossfit=run_config.crossfit,
            tags=tags, log=context.log.info)
        decision = decide(home, registry, name, run_config.promotion, list(run_config.recipes))
        context.log.info(decision.summary())
        if config.promote and decision.promote:
            apply_promotion(registry, decision)
            context.log.info(f"promoted {name} v{version.version} to champion")
        table = challenger_lib.compare_table(home, [("champion", champion), ("challenger", version)])
        meta |= {"challenger_version": version.version, "champion_version": champion.version,
                 "challenger_mlflow_version": mlflow_version_url(bioembed.mlflow_ui_url, version),
                 "decision": decision.summary(), "promoted": bool(config.promote and decision.promote),
                 "comparison": table_value(table), **evaluation_metadata(result, "challenger_"),
                 **evaluation_run_links(bioembed.mlflow_ui_url, registry, result, "challenger_")}
        return dg.MaterializeResult(metadata=meta, check_results=[check_result(
            "promotion_rule", key, decision.promote, decision=decision.summary(), rule=table_value(decision.table()))])

    return challenger_asset


class _DagsterProgress:
    """Training progress as INFO lines in the Dagster run log (one per epoch)."""

    def __init__(self, context: dg.AssetExecutionContext) -> None:
        self.context = context

    def on_start(self, total_epochs: int, steps_per_epoch: int) -> None:
        self.context.log.info(f"training: {total_epochs} epochs x {steps_per_epoch} steps")

    def on_step(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, result) -> None:
        val = f", val loss {result.val['loss']:.4f}" if "loss" in result.val else ""
        self.context.log.info(f"epoch {result.epoch}: train loss {result.train['loss']:.4f}{val}, lr {result.lr:.2e}")
