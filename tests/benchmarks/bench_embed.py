"""The embeddings step against the bare forward of its encoder: does the engine keep the model busy?

For each model (`--models`), in one process, on a temporary Home holding one synthetic plate (a
`cells` lake table and a zarr 3 crop store chunked as `segment.crops` writes it: uint16 crops of
smoothed-noise backgrounds with a flat-topped cell, a brighter nucleus and shot noise, disk masks):

- `step`: `pipeline.embed_plate(home, plate, encoder, version, reuse=False, engine=EngineOptions(batch_size=B,
  precision=P))`, wall time around the call: lake read, reader threads, host->device copy, resize and
  0-255 scaling on the device, the forward, device->host copy, parquet rows into the `embeddings` partition;
- `bare`: `encoder.embed_tensors` on pre-staged device tensors (float32 0-255, already at the input size,
  already on the device) in the same batch sizes, under `torch.inference_mode()` and
  `inference.devices.precision_context`, one `torch.cuda.synchronize` at the end on CUDA.

Both are warmed up first (one batch: the step on a one-batch warm-up plate), then `--rounds` rounds
interleave them (best round of each kept). Reported: crops/s of both, their ratio step/bare (goal: >= 0.9
on CPU, >= 0.8 on GPU), the step's stages as shares of its wall time (`read` is reader-thread time that
overlaps the rest; `other` = wall - wait - transfer - model - fetch - write, the main thread's unexplained
remainder). On CPU the stages of the best step pass are exact; on CUDA they come from one extra step pass
with `EngineOptions(profile=True)` (synchronized stages). GFLOP/crop is counted with
`torch.utils.flop_counter.FlopCounterMode` on one batch (at most 8 crops; CPU flash attention, which
the counter misses, is counted as two matmuls); TFLOP/s = GFLOP/crop x bare crops/s; MFU against
`--peak-tflops` (default on CUDA from the device name: H100/H200 SXM bf16 dense 989.4 TFLOP/s, NVIDIA's
datasheet; the value and its source are printed). With `--compile` (default on CUDA) each model gets an
extra row: `EngineOptions(compile=True)` for the step, `torch.compile(encoder.embed_tensors)` for the bare,
measured in a child process with the eager row's crops and batch (a failed compile can leave torch unusable
in its process; the failure then becomes an error row).

Models: `ca_mae_demo` (CA-MAE demo preset, 5 channels stored and embedded at 64 px), `vit_s16_256` (the
OpenPhenom ViT-S/16 preset, 6 channels stored at 128 px and resized on the device to 256: 1536 tokens,
~109 GFLOP/crop), `resnet18` (supervised_cnn, 5 stains, 64 px), `timm_vit_s16_224` (timm's plain
vit_small_patch16_224 through our timm family, 3 stains into its 3-channel stem, stored at 128 px,
resized to 224; random weights; in the default list on CUDA only). Absolute crops/s are of this machine
and noisy (the CPU default sizes are tiny: vit_s16_256 runs at ~1 crop/s on 2 cores); read the ratios.

Plain torch + the library (no Dagster, no MLflow server), so it runs as it is on a GPU machine::

    # CPU (ca_mae_demo, vit_s16_256, resnet18 at tiny sizes; ~3 min on 2 cores):
    uv run --frozen python tests/benchmarks/bench_embed.py
    uv run --frozen python tests/benchmarks/bench_embed.py --models ca_mae_demo,resnet18 --rounds 3
    # GPU (all 4 models, bf16, the engine's automatic batch, plus the torch.compile rows):
    uv run --frozen python tests/benchmarks/bench_embed.py --device cuda
    uv run --frozen python tests/benchmarks/bench_embed.py --device cuda --models vit_s16_256 --crops 8192 --batch-size 512
    uv run --frozen pytest -m benchmark tests/benchmarks/bench_embed.py -s

Writes `bench-results/embed.json` (rows plus platform, torch version, device name, CPU count).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
import zarr
from torch.utils.flop_counter import FlopCounterMode

from bioembed_assets import pipeline
from bioembed_assets.config import Home
from bioembed_assets.encoders import build_encoder
from bioembed_assets.encoders.base import EMBEDDING, Encoder, scale_to_0_255
from bioembed_assets.inference import EmbeddingRun, EngineOptions, channel_indices, resolve_device, resolve_precision
from bioembed_assets.inference.devices import precision_context
from bioembed_assets.inference.resize import resize_images, resize_masks
from bioembed_assets.registry import EncoderVersion
from bioembed_assets.schema import CELL_PAINTING_CHANNELS, well_name
from bioembed_assets.segment.plate import cell_id
from bioembed_assets.store.lake import Lake
from tests.benchmarks import save_results

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench-results" / "embed.json"
STAINS: tuple[str, ...] = tuple(CELL_PAINTING_CHANNELS)
PLATE, WARMUP_PLATE = "BENCH", "BENCH-WARMUP"
CHUNK_CELLS = 64  # `segment.crops` chunks crops by min(64, n) along the cell axis
STAGES = ("read", "wait", "transfer", "model", "fetch", "write")
MAIN_THREAD_STAGES = ("wait", "transfer", "model", "fetch", "write")
GOAL = {"cpu": 0.9, "cuda": 0.8}
FLOP_CROPS = 8
STAGED_BATCHES = 2
PEAK_BF16_TFLOPS = (  # (name fragment, dense bf16/fp16 tensor TFLOP/s, source); first match wins
    ("H200 NVL", 835.5, "NVIDIA H200 NVL datasheet, bf16 dense (1671 with sparsity / 2)"),
    ("H100 NVL", 835.5, "NVIDIA H100 NVL datasheet, bf16 dense (1671 with sparsity / 2)"),
    ("H100 PCIe", 756.5, "NVIDIA H100 PCIe datasheet, bf16 dense (1513 with sparsity / 2)"),
    ("H200", 989.4, "NVIDIA H100/H200 SXM datasheet, bf16 dense"),
    ("H100", 989.4, "NVIDIA H100/H200 SXM datasheet, bf16 dense"),
    ("A100", 312.0, "NVIDIA A100 datasheet, bf16 dense"),
)
_ENGINE_LOGGER = "bioembed_assets.inference.engine"


@dataclass(frozen=True)
class ModelCase:
    """A benchmarked model: how to build it, the stains and crop side of its store, default sizes."""

    name: str
    build: Callable[[], Encoder]
    channels: tuple[str, ...]
    stored_size: int
    cpu_crops: int
    cpu_batch: int
    cuda_crops: int
    default_on_cpu: bool = True


MODELS: dict[str, ModelCase] = {c.name: c for c in (
    ModelCase("ca_mae_demo", lambda: build_encoder("ca_mae", preset="demo"), STAINS, 64,
              cpu_crops=2048, cpu_batch=128, cuda_crops=32768),
    ModelCase("vit_s16_256", lambda: build_encoder("ca_mae", preset="vit_small_patch16_256"),
              (*STAINS, "Brightfield"), 128, cpu_crops=16, cpu_batch=8, cuda_crops=8192),
    ModelCase("resnet18", lambda: build_encoder("supervised_cnn", channels=list(STAINS), backbone="resnet18",
                                                input_size=64), STAINS, 64,
              cpu_crops=1024, cpu_batch=128, cuda_crops=32768),
    ModelCase("timm_vit_s16_224", lambda: build_encoder("timm", model_name="vit_small_patch16_224",
                                                        channels=list(STAINS[:3]), channel_strategy="adapt_stem",
                                                        input_size=224, pretrained=False),
              STAINS[:3], 128, cpu_crops=16, cpu_batch=8, cuda_crops=16384, default_on_cpu=False),
)}


def default_models(device: torch.device) -> list[str]:
    """Every model on CUDA; on other devices those cheap enough by default (timm's ViT is opt-in)."""
    return [m for m, case in MODELS.items() if device.type == "cuda" or case.default_on_cpu]


# -- the synthetic plate ----------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise over the last two axes (FFT, periodic), scaled to unit std."""
    s = shape[-1]
    f = np.fft.fftfreq(s)[:, None] ** 2 + np.fft.rfftfreq(s)[None, :] ** 2
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * f)
    out = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape)) * kernel, s=(s, s))
    return out / (out.std(axis=(-2, -1), keepdims=True) + 1e-9)


def crop_bank(k: int, n_channels: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`k` distinct cell-like crops: uint16 (k, C, S, S) and their disk masks bool (k, S, S).

    Background ~300 with smooth variation; a flat-topped cell body (per-channel brightness, textured);
    a brighter nucleus in the first channel; Gaussian shot noise (std = sqrt(signal))."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    cy = size / 2 + rng.uniform(-0.08, 0.08, (k, 1, 1)) * size
    cx = size / 2 + rng.uniform(-0.08, 0.08, (k, 1, 1)) * size
    radius = rng.uniform(0.2, 0.38, (k, 1, 1)) * size
    dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    body = np.exp(-((dist / radius) ** 4))[:, None]
    nucleus = np.exp(-((dist / (0.45 * radius)) ** 4))
    brightness = rng.uniform(500, 3000, (k, n_channels, 1, 1))
    texture = 1 + 0.3 * _smooth_noise(rng, (k, n_channels, size, size), sigma=size / 32)
    signal = 300 + 60 * _smooth_noise(rng, (k, n_channels, size, size), sigma=size / 8)
    signal = signal + brightness * body * texture
    signal[:, 0] += rng.uniform(3000, 9000, (k, 1, 1)) * nucleus
    signal += rng.standard_normal(signal.shape) * np.sqrt(np.clip(signal, 1, None))
    images = np.clip(np.rint(signal), 0, 65535).astype(np.uint16)
    return images, dist < radius


def write_plate(home: Home, plate: str, n: int, channels: tuple[str, ...], size: int, seed: int = 0) -> None:
    """A crop store of `n` crops at `home.crop_store(plate)` (zarr 3, chunked as `segment.crops`: min(64, n)
    cells per chunk) and its `cells` lake table (crop_index 0..n-1, 96-well layout, 1 site)."""
    bank_images, bank_masks = crop_bank(min(n, 256), len(channels), size, seed)
    rng = np.random.default_rng(seed + 1)
    chunk = max(1, min(CHUNK_CELLS, n))
    areas: list[int] = []
    group = zarr.open_group(str(home.crop_store(plate)), mode="w")
    images = group.create_array("images", shape=(n, len(channels), size, size), chunks=(chunk, len(channels), size, size),
                                dtype="uint16", fill_value=0)
    masks = group.create_array("masks", shape=(n, size, size), chunks=(chunk, size, size), dtype="bool",
                               fill_value=False)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        pick, turns, flips = rng.integers(len(bank_images), size=stop - start), rng.integers(4, size=stop - start), \
            rng.integers(2, size=stop - start)
        imgs = np.stack([np.rot90(bank_images[i], t, axes=(1, 2))[..., ::-1] if f else
                         np.rot90(bank_images[i], t, axes=(1, 2)) for i, t, f in zip(pick, turns, flips)])
        msks = np.stack([np.rot90(bank_masks[i], t)[..., ::-1] if f else np.rot90(bank_masks[i], t)
                         for i, t, f in zip(pick, turns, flips)])
        images[start:stop] = imgs
        masks[start:stop] = msks
        areas += msks.sum(axis=(1, 2)).tolist()
    group.attrs.update({"plate": plate, "channels": list(channels), "crop_size": size, "n_cells": n,
                        "policy": "drop", "mask_source": "synthetic"})
    wells = [well_name(r, c) for r in range(1, 9) for c in range(1, 13)]
    idx = np.arange(n)
    well = [wells[i % len(wells)] for i in idx]
    label = idx // len(wells) + 1
    cells = pl.DataFrame({
        "plate": [plate] * n, "well": well, "site": [1] * n, "field": (idx % len(wells)).tolist(),
        "cell_id": [cell_id(w, 1, int(lab)) for w, lab in zip(well, label)], "label": label.tolist(),
        "centroid_y": [size / 2] * n, "centroid_x": [size / 2] * n, "area": areas,
        "crop_index": idx.tolist()})
    Lake(home.lake).write("cells", cells, plate=plate)


# -- measurements -----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _CompileFallbacks(logging.Handler):
    """Counts the engine's 'torch.compile failed' warnings (the step then ran eager)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "torch.compile failed" in record.getMessage():
            self.messages.append(record.getMessage())
            print(record.getMessage(), file=sys.stderr, flush=True)  # the parent of a compile child reads it


def step_pass(home: Home, plate: str, encoder: Encoder, version: EncoderVersion,
              options: EngineOptions) -> tuple[float, dict]:
    """One `embed_plate` call: (wall seconds, its summary)."""
    t0 = time.perf_counter()
    summary = pipeline.embed_plate(home, plate, encoder, version, reuse=False, engine=options)
    return time.perf_counter() - t0, summary


def stage_batches(home: Home, encoder: Encoder, batch: int, device: torch.device,
                  k: int = STAGED_BATCHES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`k` full batches of the plate's first crops (repeated if the plate is smaller) as the engine
    hands them to the encoder: on the device, resized to the input size, float32 0-255."""
    group = zarr.open_group(str(home.crop_store(PLATE)), mode="r")
    n = int(group["images"].shape[0])
    picked = channel_indices(group.attrs["channels"], encoder.spec.channels, "bench crop store")
    take = min(n, k * batch)
    images = np.asarray(group["images"][:take])[:, picked]
    masks = np.asarray(group["masks"][:take])
    size = encoder.spec.input_size
    out = []
    for j in range(k):
        rows = np.arange(j * batch, (j + 1) * batch) % take
        x = torch.from_numpy(np.ascontiguousarray(images[rows])).to(device)
        m = torch.from_numpy(np.ascontiguousarray(masks[rows])).to(device)
        out.append((scale_to_0_255(resize_images(x, size), stored=x.dtype), resize_masks(m, size)))
    _sync(device)
    return out


def batch_sizes(n: int, batch: int) -> list[int]:
    """The sizes of the batches the engine cuts `n` crops into."""
    return [min(batch, n - s) for s in range(0, n, batch)]


def bare_pass(fn: Callable[..., dict[str, torch.Tensor]], staged: list[tuple[torch.Tensor, torch.Tensor]],
              sizes: list[int], precision: str, device: torch.device, full: bool) -> float:
    """Seconds for `fn` over batches of `sizes` crops from `staged` (`full`: always the whole staged batch,
    as the engine pads a compiled call's last batch)."""
    t0 = time.perf_counter()
    with torch.inference_mode(), precision_context(precision, device):
        for i, b in enumerate(sizes):
            x, m = staged[i % len(staged)]
            out = fn(x, m) if full else fn(x[:b], m[:b])
    _sync(device)
    seconds = time.perf_counter() - t0
    if out[EMBEDDING].shape[0] != (staged[0][0].shape[0] if full else sizes[-1]):
        raise RuntimeError(f"bare forward returned {tuple(out[EMBEDDING].shape)} embeddings")
    return seconds


def _cpu_flash_attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                               out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of CPU flash attention (the counter has no formula for it): q @ k^T and scores @ v."""
    b, h, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * d_q + 2 * b * h * s_q * s_k * d_v


def flop_per_crop(encoder: Encoder, x: torch.Tensor, m: torch.Tensor, precision: str, device: torch.device) -> float:
    """FLOP per crop of one `embed_tensors` call on the first `FLOP_CROPS` crops of a staged batch."""
    custom = {}
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        custom[cpu_flash] = _cpu_flash_attention_flops
    b = min(FLOP_CROPS, x.shape[0])
    with torch.inference_mode(), precision_context(precision, device), \
            FlopCounterMode(display=False, custom_mapping=custom) as counter:
        encoder.embed_tensors(x[:b], m[:b])
    return counter.get_total_flops() / b


def stage_breakdown(wall: float, stages: dict[str, float]) -> dict[str, Any]:
    """Stage seconds, `other` (wall minus the main thread's stages) and shares of the wall in %."""
    other = wall - sum(stages.get(k, 0.0) for k in MAIN_THREAD_STAGES)
    seconds = {**{k: float(stages.get(k, 0.0)) for k in STAGES}, "other": other}
    return {"wall": wall, "seconds": seconds, "percent": {k: 100 * v / wall for k, v in seconds.items()}}


def peak_tflops(device: torch.device, precision: str, given: float | None) -> tuple[float | None, str]:
    """The peak MFU is measured against: `given`, else the table's bf16/fp16 dense value for this GPU."""
    if given is not None:
        return given, "--peak-tflops"
    if device.type != "cuda":
        return None, "none (CPU: pass --peak-tflops)"
    if precision not in ("bf16", "fp16"):
        return None, f"none for {precision} (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for fragment, value, source in PEAK_BF16_TFLOPS:
        if fragment.lower() in name.lower():
            return value, f"{source} ({name})"
    return None, f"none for {name} (pass --peak-tflops)"


def bench_model(case: ModelCase, root: Path, device: torch.device, precision: str, crops: int | None,
                batch_size: int | str | None, rounds: int, compile_modes: list[bool], workers: int | None,
                peak: float | None) -> list[dict]:
    """One model's rows (eager, then compiled if asked) on a fresh Home under `root/<model>`."""
    torch.manual_seed(0)
    home = Home(root=root / case.name).ensure()
    n = crops if crops is not None else (case.cuda_crops if device.type == "cuda" else case.cpu_crops)
    encoder = case.build()
    encoder.to(device)
    version = EncoderVersion(case.name, "1", run_id="bench", tags={})
    write_plate(home, PLATE, n, case.channels, case.stored_size, seed=0)
    if batch_size == "auto":  # the engine's own choice (free device memory on CUDA), used for both paths
        batch = EmbeddingRun(encoder, home.crop_store(PLATE), EngineOptions(precision=precision)).batch_size
    else:
        batch = int(batch_size) if batch_size is not None else case.cpu_batch
    write_plate(home, WARMUP_PLATE, min(n, batch), case.channels, case.stored_size, seed=1)
    staged = stage_batches(home, encoder, batch, device)
    sizes = batch_sizes(n, batch)
    gflop = flop_per_crop(encoder, *staged[0], precision, device) / 1e9
    rows = []
    for compiled in compile_modes:
        options = EngineOptions(batch_size=batch, precision=precision, workers=workers, compile=compiled)
        fallbacks = _CompileFallbacks()
        logging.getLogger(_ENGINE_LOGGER).addHandler(fallbacks)
        bare_fn: Callable[..., dict[str, torch.Tensor]] = encoder.embed_tensors  # type: ignore[attr-defined]
        bare_note = None
        try:
            step_pass(home, WARMUP_PLATE, encoder, version, options)  # warm-up: one batch (compiles if asked)
            if compiled:
                try:
                    bare_fn = torch.compile(bare_fn, dynamic=False)
                    bare_pass(bare_fn, staged, [batch], precision, device, full=True)
                except Exception as err:  # noqa: BLE001 - report it and measure eager, as the engine falls back
                    bare_note = f"torch.compile failed ({type(err).__name__}); eager"
                    bare_fn = encoder.embed_tensors  # type: ignore[attr-defined]
            bare_pass(bare_fn, staged, [batch], precision, device, full=compiled)
            step_times, bare_times, best_summary = [], [], None
            for _ in range(rounds):  # interleaved, so machine noise hits both alike
                seconds, summary = step_pass(home, PLATE, encoder, version, options)
                if not step_times or seconds < min(step_times):
                    best_summary = summary
                step_times.append(seconds)
                bare_times.append(bare_pass(bare_fn, staged, sizes, precision, device, full=compiled))
            if device.type == "cuda":  # synchronized stages: exact, but slower than the timed passes
                profile = EngineOptions(batch_size=batch, precision=precision, workers=workers, compile=compiled,
                                        profile=True)
                stage_wall, stage_summary = step_pass(home, PLATE, encoder, version, profile)
                stage_source = "extra pass with EngineOptions(profile=True)"
            else:
                stage_wall, stage_summary = min(step_times), best_summary
                stage_source = "best step pass (exact on CPU)"
        finally:
            logging.getLogger(_ENGINE_LOGGER).removeHandler(fallbacks)
        assert best_summary is not None and stage_summary is not None
        embedded = Lake(home.lake).read("embeddings", encoder=version.name, version=version.version, plate=PLATE)
        if embedded.height != n:
            raise RuntimeError(f"{case.name}: the embeddings partition of plate {PLATE} holds {embedded.height} rows, "
                               f"expected {n}")
        step_rate, bare_rate = n / min(step_times), n / min(bare_times)
        tflops = gflop * bare_rate / 1e3
        rows.append({
            "model": case.name, "device": str(device), "precision": best_summary["precision"], "compile": compiled,
            "compile_fell_back": bool(fallbacks.messages), "bare_note": bare_note, "batch": best_summary["batch_size"],
            "crops": n, "stored_size": case.stored_size, "input_size": encoder.spec.input_size,
            "channels": list(case.channels), "dim": encoder.spec.embedding_dim, "rounds": rounds,
            "workers": workers, "step_seconds": step_times, "bare_seconds": bare_times,
            "step_crops_per_s": step_rate, "bare_crops_per_s": bare_rate, "ratio": step_rate / bare_rate,
            "goal": GOAL.get(device.type, GOAL["cuda"]), "meets_goal": step_rate / bare_rate >= GOAL.get(
                device.type, GOAL["cuda"]),
            "stages": stage_breakdown(stage_wall, stage_summary["stages"]), "stage_source": stage_source,
            "gflop_per_crop": gflop, "tflops": tflops, "mfu": tflops / peak if peak else None,
            "lake_rows": embedded.height, "home": str(home.root),
        })
    del staged
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def compiled_in_child(eager: dict, precision: str, rounds: int, workers: int | None, peak: float | None) -> dict:
    """The `torch.compile` row of `eager`'s model (same device, crops, batch), measured in a child process.

    Isolated because a failed compile can leave torch unusable in its process (torch 2.13: after inductor
    fails on CA-MAE's `embed_tensors`, every later op raises "PythonDispatcherTLS was not set", so the
    engine's fallback to eager cannot run); a failure becomes an error row instead of ending the benchmark."""
    print(f"{eager['model']}: torch.compile row in a child process ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-embed-compile-") as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--compile-only", "--models", eager["model"],
               "--device", eager["device"], "--precision", precision, "--crops", str(eager["crops"]),
               "--batch-size", str(eager["batch"]), "--rounds", str(rounds), "--out", str(out)]
        cmd += ["--workers", str(workers)] if workers is not None else []
        cmd += ["--peak-tflops", str(peak)] if peak is not None else []
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
        if proc.returncode == 0 and out.exists():
            return json.loads(out.read_text())["rows"][0]
    lines = proc.stderr.strip().splitlines()
    errors = [line.strip() for line in lines if "Error" in line or "error" in line] or lines[-1:]
    fallback = [line.split(": ", 1)[-1] for line in lines if "torch.compile failed" in line][:1]
    error = "; then ".join([*fallback, errors[-1][:300] if errors else ""])
    return {"model": eager["model"], "device": eager["device"], "compile": True, "crops": eager["crops"],
            "batch": eager["batch"], "error": f"exit {proc.returncode}: {error}",
            "stderr_tail": lines[-20:]}


def run(models: list[str], device: str = "auto", precision: str = "auto", crops: int | None = None,
        batch_size: int | str | None = None, rounds: int = 3, compile: bool | None = None,
        workers: int | None = None, peak: float | None = None, root: Path | None = None,
        compile_only: bool = False) -> dict:
    """Rows for `models` plus machine info; Homes live under `root` (a temporary folder when None).

    `crops`/`batch_size` None: the model's defaults (CUDA: its `cuda_crops` and the engine's automatic batch);
    `batch_size` "auto": the engine's choice on any device. `compile` None: on for CUDA, off elsewhere; each
    compiled row runs in a child process (`compiled_in_child`) after the model's eager row, with the same
    crops and batch. `compile_only`: the compiled rows only, in this process (what the child runs)."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise KeyError(f"unknown models {unknown}; known: {list(MODELS)}")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    if batch_size is None and dev.type == "cuda":
        batch_size = "auto"
    with_compile = compile if compile is not None else dev.type == "cuda"
    peak_value, peak_source = peak_tflops(dev, prec, peak)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        base = Path(root) if root is not None else Path(tmp)
        for name in models:
            rows += bench_model(MODELS[name], base, dev, prec, crops, batch_size, rounds, [compile_only], workers,
                                peak_value)
            if with_compile and not compile_only:
                rows.append(compiled_in_child(rows[-1], prec, rounds, workers, peak))
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__, "device": str(dev),
                    "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "precision": prec, "peak_tflops": peak_value, "peak_source": peak_source, "rows": rows,
    }


def format_table(result: dict) -> str:
    """The rows as a markdown table, preceded by the machine and the peak used for MFU."""
    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)

    m = result["machine"]
    lines = [f"{m['device']} {m['device_name'] or m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']}; "
             f"MFU peak: {fmt(result['peak_tflops'], '.1f')} TFLOP/s ({result['peak_source']})",
             "stage shares: % of the step's wall time; (read) is reader-thread time overlapping the rest; "
             "other = wall - wait - transfer - model - fetch - write", "",
             "| model | device | precision | compile | batch | N | step crops/s | bare crops/s | step/bare "
             "| (read) | wait | transfer | model | fetch | write | other | GFLOP/crop | TFLOP/s | MFU |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['device']} | {result['precision']} | yes | {r['batch']} | {r['crops']} "
                         f"| failed: {r['error']} |")
            continue
        pct = r["stages"]["percent"]
        compiled = ("yes (fell back)" if r["compile_fell_back"] else "yes") if r["compile"] else "no"
        lines.append(
            f"| {r['model']} | {r['device']} | {r['precision']} | {compiled} | {r['batch']} | {r['crops']} "
            f"| {r['step_crops_per_s']:.1f} | {r['bare_crops_per_s']:.1f} | {r['ratio']:.2f} "
            + " ".join(f"| {pct[k]:.0f}%" for k in (*STAGES, "other"))
            + f" | {r['gflop_per_crop']:.3g} | {fmt(r['tflops'], '.3g')} | {fmt(r['mfu'] and 100 * r['mfu'], '.1f')}"
            f"{'%' if r['mfu'] else ''} |")
    return "\n".join(lines)


@pytest.mark.benchmark
def test_embed_step_keeps_up_with_the_bare_forward(tmp_path: Path) -> None:
    result = run(["ca_mae_demo", "resnet18"], device="cpu", crops=256, batch_size=64, rounds=2, root=tmp_path)
    print(format_table(result))
    assert [r["model"] for r in result["rows"]] == ["ca_mae_demo", "resnet18"]
    for row in result["rows"]:  # ratios and counts only, never an absolute time
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert row["ratio"] >= 0.5, row  # 0.84-1.03 over 3 runs on 2 shared cores
        assert row["stages"]["seconds"]["other"] >= -1e-3, row  # the main thread's stages fit in the wall
        embedded = Lake(Home(root=Path(row["home"])).lake).read("embeddings", encoder=row["model"], version="1", plate=PLATE)
        assert embedded.height == 256 and embedded["cell_id"].n_unique() == 256, row["model"]
        assert len(embedded["features"][0]) == row["dim"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated, of {list(MODELS)} (default: all on CUDA; "
                                         "all but timm_vit_s16_224 elsewhere)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")
    parser.add_argument("--crops", type=int, help="crops per plate (default: per model and device)")
    parser.add_argument("--batch-size", help="an integer or 'auto' (the engine's choice; default on CUDA)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, help="reader threads (default: the engine's)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="add torch.compile rows (default: on for CUDA, off elsewhere)")
    parser.add_argument("--peak-tflops", type=float, help="peak for MFU (default on CUDA: from the device name)")
    parser.add_argument("--compile-only", action="store_true",
                        help="only the torch.compile rows, in this process (what the isolated child runs)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    models = args.models.split(",") if args.models else default_models(device)
    batch = args.batch_size if args.batch_size in (None, "auto") else int(args.batch_size)
    result = run(models, args.device, args.precision, args.crops, batch, args.rounds, args.compile, args.workers,
                 args.peak_tflops, compile_only=args.compile_only)
    save_results(result, args.out, format_table(result))


if __name__ == "__main__":
    main()
