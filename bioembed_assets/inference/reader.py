"""Reader workers: decode a zarr crop store's batches ahead of the encoder, in order.

Crops stay in their stored integer dtype (half the bytes of float32 for uint16) and are pinned
when they are bound for a CUDA device, so the host->device copy can be asynchronous.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import zarr

THREAD_PREFIX = "bioembed-reader"
MAX_DEFAULT_WORKERS = 4


def default_workers() -> int:
    """Reader threads when none are asked for: one per core, at most 4 (zarr decompression releases the GIL)."""
    return max(1, min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1))


class NonFiniteCropsError(ValueError):
    """A float crop store holds NaN or infinite pixels: an embedding of them would be silently wrong."""


@dataclass
class HostBatch:
    """One batch read from the store: crops [start, start + len) in stored dtype, masks bool."""

    start: int
    images: torch.Tensor
    masks: torch.Tensor
    read_seconds: float

    def __len__(self) -> int:
        return int(self.images.shape[0])


class CropBatchReader:
    """Iterate over a crop store in batches, `workers` threads reading up to `prefetch` batches ahead.

    Use as a context manager: leaving it (normally or on an error) cancels the batches not yet
    started and joins every worker.
    """

    def __init__(self, images: zarr.Array, masks: zarr.Array, channels: Sequence[int], batch_size: int, *,
                 workers: int | None = None, prefetch: int | None = None, pin: bool = False,
                 where: str = "crop store") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images, self.masks, self.batch_size = images, masks, int(batch_size)
        self.channels = list(channels)
        self.all_channels = self.channels == list(range(images.shape[1]))
        self.workers = int(workers or default_workers())
        self.prefetch = int(prefetch or self.workers + 1)
        self.pin, self.where = pin, where
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=THREAD_PREFIX)
        self._pending: deque[Future[HostBatch]] = deque()

    @property
    def n(self) -> int:
        return int(self.images.shape[0])

    def _read(self, start: int) -> HostBatch:
        t0 = time.perf_counter()
        stop = min(start + self.batch_size, self.n)
        if self.all_channels:
            imgs = self.images[start:stop]
        else:
            imgs = self.images.get_orthogonal_selection((slice(start, stop), self.channels))
        imgs = np.ascontiguousarray(imgs)
        if imgs.dtype.kind == "f":
            bad = np.flatnonzero(~np.isfinite(imgs.reshape(len(imgs), -1)).all(1))
            if len(bad):
                raise NonFiniteCropsError(
                    f"{self.where}: crops {(start + bad[:10]).tolist()}{' ...' if len(bad) > 10 else ''} "
                    f"(the cells table's crop_index; {len(bad)} in this batch) hold NaN or infinite pixels; "
                    "clean or re-export the float source images before embedding")
        images = torch.from_numpy(imgs)
        masks = torch.from_numpy(np.ascontiguousarray(self.masks[start:stop], dtype=bool))
        if self.pin:
            images, masks = images.pin_memory(), masks.pin_memory()
        return HostBatch(start, images, masks, time.perf_counter() - t0)

    def __iter__(self) -> Iterator[HostBatch]:
        starts = iter(range(0, self.n, self.batch_size))
        for start in starts:
            self._pending.append(self._pool.submit(self._read, start))
            if len(self._pending) >= self.prefetch:
                break
        while self._pending:
            batch = self._pending.popleft().result()
            if (start := next(starts, None)) is not None:
                self._pending.append(self._pool.submit(self._read, start))
            yield batch

    def close(self) -> None:
        """Cancel the batches not yet started and join the workers."""
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> CropBatchReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
