"""Where and how precisely the engine computes: device, precision, batch size from free memory."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CPU_BATCH = 128
"""CPU batch when none is given: larger batches do not raise CPU throughput, they only cost memory."""
MAX_AUTO_BATCH = 2048
MEMORY_FRACTION = 0.7
"""Share of the device's free memory an automatically sized batch may use (the rest is headroom)."""


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else Apple MPS, else CPU; otherwise the named device."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on a CUDA GPU that supports it, fp16 on other CUDA GPUs, fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast to bf16/fp16 (matmuls, convolutions and their activations; encoders keep their
    normalizations in float32), or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is the device (or host allocator) running out of memory."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (None elsewhere: the host has no comparable per-process limit)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def batch_for_memory(free_bytes: int, bytes_per_crop: float, fraction: float = MEMORY_FRACTION,
                     cap: int = MAX_AUTO_BATCH) -> int:
    """The largest batch whose crops take at most `fraction` of `free_bytes` (a multiple of 8 from 8 up)."""
    if bytes_per_crop <= 0:
        return cap
    batch = int(free_bytes * fraction / bytes_per_crop)
    batch = min(batch, cap)
    return max(1, batch - batch % 8 if batch >= 8 else batch)


def peak_bytes_per_crop(run: Any, make_batch: Any, device: torch.device, sizes: tuple[int, int] = (4, 12)) -> float:
    """Measured CUDA memory per crop: the growth of the peak allocation of `run(make_batch(k))`
    from k = sizes[0] to sizes[1] crops, per crop (activations scale with the batch; weights do not)."""
    peaks = []
    for k in sizes:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run(make_batch(k))
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    return max((peaks[1] - peaks[0]) / (sizes[1] - sizes[0]), peaks[1] / sizes[1] / 4, 1.0)
