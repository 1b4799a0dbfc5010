"""The embedding engine: stream a zarr crop store through an encoder, batch by batch.

Per batch: reader threads decode crops ahead in their stored dtype (pinned for CUDA) -> a
non-blocking copy to the device -> resize and 0-255 scaling on the device -> the encoder's
`embed_tensors` under the chosen precision -> a non-blocking device->host copy that is only
waited for after the next batch is launched. Rows are yielded as they come, so the caller holds a
few batches, never the plate. Encoders without a tensor path (classical features, ShapeEmbed's
contours) get host arrays resized by the same code and go through `embed`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from bioembed_assets.encoders.base import EMBEDDING, Encoder, scale_to_0_255
from bioembed_assets.inference.devices import (
    DEFAULT_CPU_BATCH,
    batch_for_memory,
    free_memory,
    is_out_of_memory,
    peak_bytes_per_crop,
    precision_context,
    resolve_precision,
)
from bioembed_assets.inference.reader import CropBatchReader, HostBatch
from bioembed_assets.inference.resize import resize_crops, resize_images, resize_masks
from bioembed_assets.schema import ProgressCallback

log = logging.getLogger(__name__)
Outputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs; the defaults suit the machine it runs on.

    `batch_size` None: from the free device memory (CUDA, measured on two probe batches) or
    `DEFAULT_CPU_BATCH`. `precision` "auto": bf16 on CUDA GPUs that support it, fp16 on other
    CUDA GPUs, fp32 on CPU. `workers`/`prefetch`: reader threads and batches read ahead (None:
    sized to the machine). `compile`: `torch.compile` the encoder's tensor path (`compile_mode`
    "reduce-overhead" adds CUDA graphs); a compile failure falls back to eager with a warning.
    `profile`: synchronize the device after each stage so the stage times are exact (slower on GPU).
    """

    batch_size: int | None = None
    precision: str = "auto"
    workers: int | None = None
    prefetch: int | None = None
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str | Callable[..., Any] = "inductor"
    profile: bool = False


@dataclass
class StageTimes:
    """Seconds per stage. `read` is worker time (it overlaps the others); `wait` is the time the
    engine stood idle for a batch. On GPU, `transfer`/`model`/`fetch` are launch times unless
    `EngineOptions.profile` synchronizes each stage."""

    read: float = 0.0
    wait: float = 0.0
    transfer: float = 0.0
    model: float = 0.0
    fetch: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class EmbeddedBatch:
    """The rows of crops [start, start + len): float32 embeddings (b, D) and side outputs (b, K)."""

    start: int
    embeddings: np.ndarray
    outputs: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])


def channel_indices(store_channels: list[str] | tuple[str, ...], wanted: tuple[str, ...] | None,
                    where: str) -> list[int]:
    """Indices of `wanted` stains in `store_channels` (all channels if `wanted` is None)."""
    if wanted is None:
        return list(range(len(store_channels)))
    missing = [c for c in wanted if c not in store_channels]
    if missing:
        raise ValueError(f"{where}: encoder expects channels {list(wanted)} but the store has "
                         f"{list(store_channels)} (missing {missing})")
    return [list(store_channels).index(c) for c in wanted]


def encoder_outputs(encoder: Encoder) -> dict[str, list[str]]:
    """The per-cell side outputs an encoder produces beside its embedding: key -> column names ({} if none)."""
    return dict(getattr(encoder, "output_names", None) or {})


def encoder_feature_names(encoder: Encoder) -> list[str] | None:
    """The names of the embedding's columns, if the encoder names them (checked against its width)."""
    names = getattr(encoder, "feature_names", None)
    if names is None:
        return None
    names = [str(n) for n in names]
    if len(names) != encoder.spec.embedding_dim or len(set(names)) != len(names):
        raise ValueError(f"encoder {encoder.spec.family}: {len(names)} feature names ({len(set(names))} distinct) "
                         f"for an embedding of {encoder.spec.embedding_dim}")
    return names


def has_tensor_path(encoder: Encoder) -> bool:
    """Whether the encoder runs on device tensors (`TensorEncoder`) rather than host arrays only."""
    return callable(getattr(encoder, "embed_tensors", None))


@dataclass
class _InFlight:
    """A launched batch: its outputs on their way to the host (`ready` marks the copy's end on CUDA)."""

    start: int
    size: int
    outputs: Outputs
    ready: Any = None


class EmbeddingRun:
    """One pass of an encoder over a crop store; iterate to get `EmbeddedBatch`es in crop order.

    After construction `batch_size`, `precision` and `device` say how it runs; after iteration
    `stages` holds the per-stage seconds and `compiled` whether `torch.compile` stayed on.
    """

    def __init__(self, encoder: Encoder, crops_path: str | Path, options: EngineOptions | None = None,
                 progress: ProgressCallback | None = None) -> None:
        self.encoder, self.options, self.progress = encoder, options or EngineOptions(), progress
        self.where = f"crop store {crops_path}"
        group = zarr.open_group(str(crops_path), mode="r")
        self.images, self.masks = group["images"], group["masks"]
        self.channels = channel_indices(group.attrs["channels"], encoder.spec.channels, self.where)
        self.n = int(self.images.shape[0])
        self.output_names = encoder_outputs(encoder)
        self.tensor_path = has_tensor_path(encoder)
        self.device = torch.device(getattr(encoder, "device", "cpu")) if self.tensor_path else torch.device("cpu")
        self.precision = resolve_precision(self.options.precision, self.device) if self.tensor_path else "fp32"
        self.stages = StageTimes()
        self.compiled = False
        self._eager: Callable[..., Outputs] | None = getattr(encoder, "embed_tensors", None)
        self._compiled_fn: Callable[..., Outputs] | None = None
        if self.tensor_path and self.options.compile:
            self._compiled_fn = torch.compile(self._eager, mode=self.options.compile_mode,
                                              backend=self.options.compile_backend, dynamic=False)
            self.compiled = True
        self.batch_size = self._choose_batch_size()
        self._micro = self.batch_size

    # -- set-up ---------------------------------------------------------------------------------

    def _choose_batch_size(self) -> int:
        if self.options.batch_size is not None:
            if self.options.batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {self.options.batch_size}")
            return int(self.options.batch_size)
        free = free_memory(self.device) if self.tensor_path else None
        if free is None or self.n == 0:
            return DEFAULT_CPU_BATCH
        size, channels = self.encoder.spec.input_size, len(self.channels)

        def probe(k: int) -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.zeros(k, channels, size, size, device=self.device),
                    torch.ones(k, size, size, dtype=torch.bool, device=self.device))

        per_crop = peak_bytes_per_crop(lambda batch: self._call(self._eager, *batch), probe, self.device)
        batch = batch_for_memory(free, per_crop)
        log.info("%s: batch of %d crops from %.1f GiB free at %.1f MiB per crop", self.where, batch,
                 free / 2**30, per_crop / 2**20)
        return batch

    # -- one batch ------------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.options.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _call(self, fn: Callable[..., Outputs] | None, images: torch.Tensor, masks: torch.Tensor) -> Outputs:
        assert fn is not None
        # A compiled graph runs under no_grad: Dynamo cannot trace into inference-mode regions
        # ("Cannot set version_counter for inference tensor"); the encoders skip their own
        # inference_mode when autograd is already off.
        grad_off = torch.no_grad() if fn is self._compiled_fn else torch.inference_mode()
        with grad_off, precision_context(self.precision, self.device):
            return fn(images, masks)

    def _run_chunk(self, images: torch.Tensor, masks: torch.Tensor) -> Outputs:
        """The compiled call (inputs padded to the full batch: static shapes), else eager."""
        if self._compiled_fn is not None:
            b = images.shape[0]
            pad = self.batch_size - b
            try:
                if pad > 0:
                    images = torch.cat([images, images[-1:].expand(pad, *images.shape[1:])])
                    masks = torch.cat([masks, masks[-1:].expand(pad, *masks.shape[1:])])
                out = self._call(self._compiled_fn, images, masks)
                return {k: v[:b] for k, v in out.items()}
            except Exception as err:  # noqa: BLE001 - any compiler failure: fall back, never a wrong answer
                if is_out_of_memory(err):
                    raise
                log.warning("%s: torch.compile failed (%s: %s); embedding in eager mode", self.where,
                            type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                log.debug("%s: the torch.compile failure in full", self.where, exc_info=err)
                self._compiled_fn, self.compiled = None, False
                images, masks = images[:b], masks[:b]
        return self._call(self._eager, images, masks)

    def _forward(self, images: torch.Tensor, masks: torch.Tensor) -> Outputs:
        """The batch in chunks of `_micro` crops; a chunk that does not fit in memory halves `_micro`."""
        parts: list[Outputs] = []
        i, b = 0, images.shape[0]
        while i < b:
            j = min(i + self._micro, b)
            try:
                parts.append(self._run_chunk(images[i:j], masks[i:j]))
                i = j
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                if self._micro == 1:
                    raise RuntimeError(f"{self.where}: one crop at {self.encoder.spec.input_size} px does not fit "
                                       f"in {self.device} memory") from err
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self._micro = max(1, self._micro // 2)
                log.warning("%s: a batch of %d crops did not fit in %s memory; continuing with %d",
                            self.where, j - i, self.device, self._micro)
        if len(parts) == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _check(self, outputs: dict[str, Any], b: int) -> None:
        spec = self.encoder.spec
        emb = outputs.get(EMBEDDING)
        if emb is None or tuple(emb.shape) != (b, spec.embedding_dim):
            raise RuntimeError(f"encoder {spec.family} returned shape {None if emb is None else tuple(emb.shape)} "
                               f"for a batch of {b} crops (expected ({b}, {spec.embedding_dim}))")
        for key, columns in self.output_names.items():
            values = outputs.get(key)
            if values is None or tuple(values.shape) != (b, len(columns)):
                raise RuntimeError(f"encoder {spec.family} output {key!r} has shape "
                                   f"{None if values is None else tuple(values.shape)}, expected ({b}, {len(columns)})")

    def _launch_tensor(self, batch: HostBatch) -> _InFlight:
        t0 = time.perf_counter()
        non_blocking = self.device.type == "cuda"
        images = batch.images.to(self.device, non_blocking=non_blocking)
        masks = batch.masks.to(self.device, non_blocking=non_blocking)
        size = self.encoder.spec.input_size
        x = scale_to_0_255(resize_images(images, size), stored=images.dtype)
        m = resize_masks(masks, size)
        self._sync()
        t1 = time.perf_counter()
        outputs = self._forward(x, m)
        self._check(outputs, len(batch))
        self._sync()
        t2 = time.perf_counter()
        wanted = {EMBEDDING, *self.output_names}
        ready = None
        if self.device.type == "cuda":
            host = {k: torch.empty(tuple(v.shape), dtype=torch.float32, pin_memory=True) for k, v in outputs.items()
                    if k in wanted}
            for k, dst in host.items():
                dst.copy_(outputs[k], non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host = {k: v.float() for k, v in outputs.items() if k in wanted}
        self.stages.transfer += t1 - t0
        self.stages.model += t2 - t1
        return _InFlight(batch.start, len(batch), host, ready)

    def _launch_host(self, batch: HostBatch) -> _InFlight:
        """Encoders without a tensor path: host arrays through the same resize, then `embed`."""
        t0 = time.perf_counter()
        imgs, msks = resize_crops(batch.images.numpy(), batch.masks.numpy(), self.encoder.spec.input_size)
        t1 = time.perf_counter()
        if self.output_names:
            emb, side = self.encoder.embed_with_outputs(imgs, msks)  # type: ignore[attr-defined]
        else:
            emb, side = self.encoder.embed(imgs, msks), {}
        outputs = {EMBEDDING: np.asarray(emb, dtype=np.float32),
                   **{k: np.asarray(v, dtype=np.float32) for k, v in side.items()}}
        self._check(outputs, len(batch))
        self.stages.transfer += t1 - t0
        self.stages.model += time.perf_counter() - t1
        return _InFlight(batch.start, len(batch), {k: torch.from_numpy(v) for k, v in outputs.items()})

    def _launch(self, batch: HostBatch) -> _InFlight:
        try:
            return self._launch_tensor(batch) if self.tensor_path else self._launch_host(batch)
        except ValueError as err:  # the encoder speaks of positions in its batch: say where they are
            raise ValueError(f"{self.where}, crops {batch.start}..{batch.start + len(batch) - 1} "
                             f"(the cells table's crop_index): {err}") from err

    def _finish(self, flight: _InFlight) -> EmbeddedBatch:
        t0 = time.perf_counter()
        if flight.ready is not None:
            flight.ready.synchronize()
        arrays = {k: v.numpy() for k, v in flight.outputs.items()}
        self.stages.fetch += time.perf_counter() - t0
        emb = arrays.pop(EMBEDDING)
        return EmbeddedBatch(flight.start, emb, {k: arrays[k] for k in self.output_names})

    # -- the pass -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[EmbeddedBatch]:
        pin = self.device.type == "cuda"
        reader = CropBatchReader(self.images, self.masks, self.channels, self.batch_size,
                                 workers=self.options.workers, prefetch=self.options.prefetch, pin=pin,
                                 where=self.where)
        done = 0
        with reader:
            pending: _InFlight | None = None
            batches = iter(reader)
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                self.stages.wait += time.perf_counter() - t0
                if batch is None:
                    break
                self.stages.read += batch.read_seconds
                flight = self._launch(batch)
                if pending is not None:  # the previous batch's copy overlapped this batch's launch
                    done += pending.size
                    yield self._finish(pending)
                    self._report(done)
                pending = flight
            if pending is not None:
                done += pending.size
                yield self._finish(pending)
                self._report(done)

    def _report(self, done: int) -> None:
        if self.progress is not None:
            self.progress(done, self.n)


def embed_crop_store_with_outputs(
    encoder: Encoder,
    crops_path: str | Path,
    *,
    batch_size: int | None = None,
    progress: ProgressCallback | None = None,
    options: EngineOptions | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every crop of the store at `crops_path` in memory: (float32 (N, D), {side output: float32 (N, K)}).

    For plates of any size prefer iterating an `EmbeddingRun`, which holds a few batches at a time."""
    if batch_size is not None:
        options = EngineOptions(**{**asdict(options or EngineOptions()), "batch_size": batch_size})
    run = EmbeddingRun(encoder, crops_path, options, progress)
    parts = list(run)
    dim = encoder.spec.embedding_dim
    side = {key: (np.concatenate([p.outputs[key] for p in parts]) if parts else np.zeros((0, len(cols)), np.float32))
            for key, cols in run.output_names.items()}
    emb = np.concatenate([p.embeddings for p in parts]) if parts else np.zeros((0, dim), np.float32)
    return emb, side


def embed_crop_store(encoder: Encoder, crops_path: str | Path, *, batch_size: int | None = None,
                     progress: ProgressCallback | None = None, options: EngineOptions | None = None) -> np.ndarray:
    """Embed every crop of the zarr crop store at `crops_path`; returns float32 (N, D).

    The store holds `images` (N, C, S, S), `masks` (N, S, S) and attrs `channels`."""
    return embed_crop_store_with_outputs(encoder, crops_path, batch_size=batch_size, progress=progress,
                                         options=options)[0]
