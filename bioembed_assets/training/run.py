"""A tracked training run: the champion's architecture trained on chosen plates, registered as challenger.

The MLflow run (experiment `bioembed-training`, a classic ML experiment) records the parameters,
per-epoch curves, system metrics, the dataset it saw (`log_input`: plates, wells, crops and their
split), reconstructions of validation crops where the encoder can reconstruct, and the trained
encoder as an MLflow 3 logged model registered as a new version with alias `challenger`.
Nothing is registered unless training finishes.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bioembed_assets.config import Home
from bioembed_assets.encoders.base import Encoder
from bioembed_assets.registry import CHALLENGER, TRAINING_EXPERIMENT, EncoderRegistry, EncoderVersion
from bioembed_assets.schema import BioembedInputError
from bioembed_assets.training.data import CropSet, load_crop_set
from bioembed_assets.training.loop import Callbacks, EpochResult, TrainConfig, TrainResult, fit

RUN_FILE = "mlflow_run.json"
RECONSTRUCTION_MASK_RATIO = 0.75
"""Patches hidden in the logged reconstructions of masked autoencoders (others see the whole crop)."""


@dataclass
class TrainingOutcome:
    version: EncoderVersion
    result: TrainResult
    run_id: str
    crops: int
    seconds: float


def training_dir(home: Home, name: str) -> Path:
    """Where the checkpoints of encoder `name`'s current training live (`--resume` reads them)."""
    return home.root / "training" / name


def check_channels(encoder: Encoder, crop_set: CropSet) -> None:
    """BioembedInputError unless the crops carry the channels a fixed-channel encoder was built for."""
    spec, have = encoder.spec, list(crop_set.store_channels)
    if spec.channels is not None:
        missing = [c for c in spec.channels if c not in have]
        if missing:
            raise BioembedInputError(f"encoder {spec.family} expects channels {list(spec.channels)}; the crops "
                                     f"have {have} (missing {missing})", path=crop_set.stores[0])
    elif (n := spec.config.get("num_channels")) is not None and n != len(have):
        raise BioembedInputError(f"encoder {spec.family} was built for {n} channels; the crops have {len(have)} "
                                 f"({have})", path=crop_set.stores[0])


class _MlflowCallbacks(Callbacks):
    """Per-epoch metrics (and reconstructions) to the active MLflow run, plus the caller's progress."""

    def __init__(self, encoder: Encoder, crop_set: CropSet, progress: Callbacks | None) -> None:
        self.encoder, self.crop_set, self.progress = encoder, crop_set, progress
        self.examples = _example_crops(crop_set)

    def on_start(self, total_epochs: int, steps_per_epoch: int) -> None:
        if self.progress:
            self.progress.on_start(total_epochs, steps_per_epoch)

    def on_step(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        if self.progress:
            self.progress.on_step(epoch, step, logs)

    def on_epoch_end(self, result: EpochResult) -> None:
        import mlflow

        metrics = {f"train_{k}": v for k, v in result.train.items()} | {f"val_{k}": v for k, v in result.val.items()}
        mlflow.log_metrics({**metrics, "lr": result.lr}, step=result.epoch)
        if hasattr(self.encoder, "reconstruct") and self.examples is not None:
            try:
                mlflow.log_image(_reconstruction_png(self.encoder, self.examples), key="reconstruction",
                                 step=result.epoch)
            except (ValueError, RuntimeError):  # an encoder without a decoder cannot reconstruct
                pass
        if self.progress:
            self.progress.on_epoch_end(result)


def _example_crops(crop_set: CropSet, n: int = 4) -> np.ndarray | None:
    """A few validation crops (raw dtype) to show reconstructions of."""
    import zarr

    val = crop_set.split("val").head(n)
    if val.height == 0:
        return None
    rows = [zarr.open_group(str(crop_set.stores[st]), mode="r")["images"][ci]
            for st, ci in zip(val["store"].to_list(), val["crop_index"].to_list())]
    return np.stack(rows)


def _reconstruction_png(encoder: Encoder, crops: np.ndarray):
    """PIL image: per example, input and reconstruction of each channel (self-standardized units).

    Every reconstructing family (ae, vae, beta_vae, vqvae, mae, ca_mae) answers the same call,
    `reconstruct(crops, mask_ratio=..., seed=...) -> {"target", "images", ...}`; the mask ratio and
    seed only matter to the masked autoencoders.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from bioembed_assets.inference import resize_crops

    size = encoder.spec.input_size
    crops, _ = resize_crops(crops, np.ones((crops.shape[0], *crops.shape[2:]), dtype=bool), size)
    out = encoder.reconstruct(crops, mask_ratio=RECONSTRUCTION_MASK_RATIO, seed=0)
    target, recon = out["target"], out["images"]
    n, c = target.shape[:2]
    fig, axes = plt.subplots(2 * n, c, figsize=(1.2 * c, 2.4 * n), squeeze=False)
    for i in range(n):
        for j in range(c):
            for k, img in enumerate((target[i, j], recon[i, j])):
                ax = axes[2 * i + k, j]
                ax.imshow(img, cmap="gray", vmin=-2, vmax=3)
                ax.set_xticks([]), ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel("input" if k == 0 else "recon", fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return Image.open(io.BytesIO(buf.getvalue()))


def train_challenger(home: Home, registry: EncoderRegistry, name: str, base: Encoder, base_version: EncoderVersion,
                     plates: Sequence[str], config: TrainConfig, *, resume: bool = False, min_plates: int = 2,
                     progress: Callbacks | None = None, log: Callable[[str], None] = print,
                     tags: Mapping[str, str] | None = None) -> TrainingOutcome:
    """Train `base` (the champion's architecture and weights) on `plates`; register it as `challenger`.
    `tags` (e.g. the orchestrator's run id) are set on the MLflow training run."""
    import mlflow

    t0 = time.perf_counter()
    if not base.spec.trainable:
        raise ValueError(f"encoder {name!r} ({base.spec.family}) has no learned weights to train")
    crop_set = load_crop_set(home, plates, val_fraction=config.val_fraction, seed=config.seed, min_plates=min_plates)
    check_channels(base, crop_set)
    folder = training_dir(home, name)
    run_file = folder / RUN_FILE
    run_id = None
    if resume:
        if not run_file.exists():
            raise BioembedInputError(f"cannot resume training of {name!r}: no earlier run", path=run_file)
        run_id = json.loads(run_file.read_text())["run_id"]
    experiment = registry.experiment_id(TRAINING_EXPERIMENT)
    summary = crop_set.summary()
    with mlflow.start_run(run_id=run_id, experiment_id=experiment, run_name=f"train-{name}",
                          log_system_metrics=True,
                          tags={"encoder": name, "base_version": base_version.version, **(tags or {})}) as run:
        folder.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps({"run_id": run.info.run_id}))
        if run_id is None:
            mlflow.log_params({**asdict(config), "family": base.spec.family,
                               "base_version": base_version.version, "plates": ",".join(plates),
                               "train_crops": crop_set.split("train").height, "val_crops": crop_set.split("val").height,
                               "classes": len(crop_set.classes), "spec": json.dumps(base.spec.config)[:6000]})
            dataset = mlflow.data.from_polars(summary, name=f"crops:{'+'.join(plates)}"[:200],
                                              source=str(home.root / "zarr" / "crops"))
            mlflow.log_input(dataset, context="training")
        log(f"training {name} ({base.spec.family}) from v{base_version.version} on {len(plates)} plates: "
            f"{crop_set.split('train').height} train / {crop_set.split('val').height} val crops"
            f"{' (resumed)' if resume else ''}")
        result = fit(base, crop_set, config, folder, resume=resume,
                     callbacks=_MlflowCallbacks(base, crop_set, progress))
        mlflow.log_metrics({"best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch,
                            "epochs_run": len(result.history), "stopped_early": float(result.stopped_early)})
        dtype = _crop_dtype(crop_set)
        version = registry.register(
            name, base, trained=True, alias=CHALLENGER, run_id=run.info.run_id, input_dtype=dtype,
            num_channels=len(crop_set.store_channels),
            description=f"{base.spec.family} trained {len(result.history)} epochs on {len(plates)} plates",
            tags={"base_version": base_version.version, "training_run": run.info.run_id,
                  "plates": ",".join(plates)[:4000]})
    run_file.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    log(f"registered {name} v{version.version} as {CHALLENGER} (best epoch {result.best_epoch}, "
        f"val loss {result.best_val_loss:.4f}, {seconds:.0f} s)")
    return TrainingOutcome(version, result, run.info.run_id, crop_set.cells.height, seconds)


def _crop_dtype(crop_set: CropSet) -> str:
    import zarr

    return str(zarr.open_group(str(crop_set.stores[0]), mode="r")["images"].dtype)
