"""The training loop shared by every trainable encoder family.

An encoder takes part by offering `training_module(classes)`: an nn.Module whose
`forward(images, labels)` returns {"loss": ..., other scalars}. The loop adds what every run
needs: timm's optimizer and cosine-with-warmup scheduler factories, bf16/fp16 autocast on CUDA
(fp32 on CPU), a validation pass on held-out wells, a checkpoint after every epoch (so a killed run
resumes where it stopped, with the same result), early stopping on the validation loss, and a seed
that makes a CPU run reproducible.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bioembed_assets.encoders.base import Encoder, autocast
from bioembed_assets.encoders.timm_compat import import_timm
from bioembed_assets.inference import resolve_device
from bioembed_assets.schema import BioembedInputError
from bioembed_assets.store.atomic import atomic_file
from bioembed_assets.training.data import CropBatches, CropSet, batch_loader, chunk_window_batches

CHECKPOINT = "last.pt"
BEST = "best.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (CLI flags and Dagster run config map onto these)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.05
    opt: str = "adamw"
    sched: str = "cosine"
    warmup_epochs: int = 1
    min_lr: float = 1e-6
    patience: int = 3
    """Stop after this many epochs without a better validation loss (0 = never stop early)."""
    seed: int = 0
    device: str = "auto"
    num_workers: int = 1
    val_fraction: float = 0.2
    max_steps_per_epoch: int | None = None
    """Cap on training steps per epoch (a brief run on a large screen)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def fingerprint(self) -> str:
        """What must match for `--resume` to continue a run (everything but device and workers)."""
        keep = {k: v for k, v in asdict(self).items() if k not in ("device", "num_workers")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class EpochResult:
    epoch: int
    train: dict[str, float]
    val: dict[str, float]
    lr: float


@dataclass
class TrainResult:
    """What a finished (or early-stopped) run did; the encoder holds the best weights."""

    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int = -1
    best_val_loss: float = math.inf
    stopped_early: bool = False
    resumed_from_epoch: int | None = None
    steps: int = 0
    crops_seen: int = 0


class Callbacks:
    """Hooks of a run: override to show progress or log metrics (all optional)."""

    def on_start(self, total_epochs: int, steps_per_epoch: int) -> None: ...

    def on_step(self, epoch: int, step: int, logs: dict[str, float]) -> None: ...

    def on_epoch_end(self, result: EpochResult) -> None: ...


def _set_epoch_seed(seed: int, epoch: int) -> None:
    # Reseeding at each epoch start makes masking/dropout of epoch e independent of how the run
    # got there, so a run resumed at epoch e continues exactly like an uninterrupted one.
    torch.manual_seed(seed * 1_000_003 + epoch)


def _run_epoch(module: torch.nn.Module, dataset: CropBatches, device: torch.device, num_workers: int,
               optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, step0: int = 0,
               on_step: Callable[[int, dict[str, float]], None] | None = None) -> tuple[dict[str, float], int, int]:
    """One pass over `dataset` (training when `optimizer` is given); mean of every logged scalar."""
    sums: dict[str, float] = {}
    n_crops, step = 0, step0
    module.train(optimizer is not None)
    grad = torch.enable_grad() if optimizer is not None else torch.no_grad()
    with grad:
        for batch in batch_loader(dataset, num_workers):
            images, labels, *masks = (t.to(device, non_blocking=True) for t in batch)
            with autocast(device):
                out = module(images, labels, *masks)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss {loss.item()} at step {step}; lower the lr")
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                scheduler.step_update(num_updates=step)
            b = images.shape[0]
            logs = {k: float(v.detach()) for k, v in out.items()}
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v * b
            n_crops += b
            if on_step is not None:
                on_step(step, logs)
    return {k: v / max(n_crops, 1) for k, v in sums.items()}, step, n_crops


def _read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise BioembedInputError(f"cannot resume: checkpoint is unreadable or corrupt ({type(e).__name__}: {e}); "
                                 "delete it to start over", path=path) from e


def fit(encoder: Encoder, crop_set: CropSet, config: TrainConfig, checkpoint_dir: str | Path,
        resume: bool = False, callbacks: Callbacks | None = None) -> TrainResult:
    """Train `encoder` in place on `crop_set`'s train split; returns the history.

    A checkpoint (`last.pt`: weights, optimizer, scheduler, epoch, early-stopping state) is written
    atomically after every epoch; `resume=True` continues from it. At the end the encoder holds
    the weights of the epoch with the lowest validation loss (`best.pt`).
    """
    import_timm()  # next to a CPU-only torch, makes `import timm` work (see timm_compat)
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    callbacks = callbacks or Callbacks()
    checkpoint_dir = Path(checkpoint_dir)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    module = encoder.training_module(list(crop_set.classes)).to(device)
    encoder.to(device)
    train_cells, val_cells = crop_set.split("train"), crop_set.split("val")
    if train_cells.height == 0:
        raise BioembedInputError("no training crops after the split by well")
    input_size, channels = encoder.spec.input_size, encoder.spec.channels
    steps_per_epoch = math.ceil(train_cells.height / config.batch_size)
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    optimizer = create_optimizer_v2(module, opt=config.opt, lr=config.lr, weight_decay=config.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=config.sched, num_epochs=config.epochs, warmup_epochs=config.warmup_epochs,
        min_lr=config.min_lr, warmup_lr=config.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    result, start_epoch, bad_epochs = TrainResult(), 0, 0
    fingerprint = {"config": config.fingerprint(), "family": encoder.spec.family,
                   "cells": _cells_digest(crop_set)}
    last = checkpoint_dir / CHECKPOINT
    if resume and last.exists():
        state = _read_checkpoint(last)
        if state.get("fingerprint") != fingerprint:
            raise BioembedInputError(f"cannot resume: the checkpoint was written by a different training "
                                     f"(config/data/family {state.get('fingerprint')} vs {fingerprint})", path=last)
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, bad_epochs = int(state["epoch"]) + 1, int(state["bad_epochs"])
        result.best_epoch, result.best_val_loss = int(state["best_epoch"]), float(state["best_val_loss"])
        result.steps, result.crops_seen = int(state["steps"]), int(state["crops_seen"])
        result.history = [EpochResult(**h) for h in json.loads(state["history"])]
        result.resumed_from_epoch = start_epoch
    elif resume:
        raise BioembedInputError("cannot resume: no checkpoint of an earlier run", path=last)
    else:  # a new run: checkpoints of an earlier one in this folder must not leak into it
        for stale in (last, checkpoint_dir / BEST):
            stale.unlink(missing_ok=True)
    callbacks.on_start(config.epochs, steps_per_epoch)
    with_masks = bool(getattr(module, "uses_masks", False))
    val_set = CropBatches(crop_set, val_cells, chunk_window_batches(val_cells, crop_set.chunk, config.batch_size,
                                                                   config.seed, 0, shuffle=False), input_size, channels,
                          with_masks)
    for epoch in range(start_epoch, config.epochs):
        if config.patience and bad_epochs >= config.patience:  # (a resumed run that had already stopped)
            result.stopped_early = True
            break
        _set_epoch_seed(config.seed, epoch)
        batches = chunk_window_batches(train_cells, crop_set.chunk, config.batch_size, config.seed, epoch)
        train_set = CropBatches(crop_set, train_cells, batches[:steps_per_epoch], input_size, channels, with_masks)
        train_logs, result.steps, n = _run_epoch(
            module, train_set, device, config.num_workers, optimizer, scheduler, result.steps,
            lambda step, logs, e=epoch: callbacks.on_step(e, step, logs))
        result.crops_seen += n
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the same validation masks every epoch
            val_logs = _run_epoch(module, val_set, device, config.num_workers)[0] if len(val_set) else {}
        val_loss = val_logs.get("loss", train_logs["loss"])
        if val_loss < result.best_val_loss:
            result.best_val_loss, result.best_epoch, bad_epochs = val_loss, epoch, 0
            _save(checkpoint_dir / BEST, {"module": module.state_dict()})
        else:
            bad_epochs += 1
        epoch_result = EpochResult(epoch, train_logs, val_logs, float(optimizer.param_groups[0]["lr"]))
        result.history.append(epoch_result)
        _save(last, {"module": module.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "bad_epochs": bad_epochs,
                     "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss, "steps": result.steps,
                     "crops_seen": result.crops_seen, "fingerprint": fingerprint,
                     "history": json.dumps([asdict(h) for h in result.history])})
        callbacks.on_epoch_end(epoch_result)
        if config.patience and bad_epochs >= config.patience and epoch + 1 < config.epochs:
            result.stopped_early = True
            break
    if (checkpoint_dir / BEST).exists():
        module.load_state_dict(_read_checkpoint(checkpoint_dir / BEST)["module"])
    module.eval()
    return result


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def _cells_digest(crop_set: CropSet) -> str:
    """Which crops (plate, crop index, split) a run trains on; part of the resume fingerprint."""
    cols = crop_set.cells.select("store", "crop_index", "split")
    h = hashlib.sha256(np.ascontiguousarray(cols["crop_index"].to_numpy()).tobytes())
    h.update("|".join(str(p) for p in crop_set.stores).encode())
    h.update("".join(cols["split"].to_list()).encode())
    return h.hexdigest()[:16]
