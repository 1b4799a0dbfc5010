"""Training data: the single-cell crops of chosen plates, split by well, read in chunk windows.

Crop stores hold `images` (N, C, S, S) in zarr chunks of 64 cells. Sampling cells uniformly at
random would decode a whole chunk for every cell; instead each epoch shuffles the chunks, takes
windows of a few chunks and shuffles the cells within each window (the shuffle-buffer scheme of
streaming loaders), so every chunk is decoded once per epoch. Order depends only on (seed, epoch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
import zarr

from bioembed_assets import schema as s
from bioembed_assets.config import Home
from bioembed_assets.encoders.camae import to_0_255
from bioembed_assets.inference import channel_indices, resize_crops
from bioembed_assets.store.lake import Lake

LABEL = "label"
SPLIT = "split"


@dataclass(frozen=True)
class CropSet:
    """Cells of the chosen plates: where their crops are, their well, label and split."""

    stores: tuple[Path, ...]
    store_channels: tuple[str, ...]
    cells: pl.DataFrame
    """One row per cell: plate, well, perturbation, control_type, store (index), crop_index, label, split."""
    classes: tuple[str, ...]
    chunk: int

    def split(self, name: str) -> pl.DataFrame:
        return self.cells.filter(pl.col(SPLIT) == name)

    def summary(self) -> pl.DataFrame:
        """Per plate and well: perturbation, split and number of crops (what the run saw)."""
        return (self.cells.group_by(s.PLATE, s.WELL, s.PERTURBATION, SPLIT).len("crops")
                .with_columns(pl.col("crops").cast(pl.Int64)).sort(s.PLATE, s.WELL))


def load_crop_set(home: Home, plates: Sequence[str], *, val_fraction: float = 0.2, seed: int = 0,
                  min_plates: int = 2, exclude_qc_failed: bool = True) -> CropSet:
    """The crops of `plates` with their platemap; wells (never cells) are split into train/val.

    Raises `BioembedInputError` for too few plates, a plate without crops or platemap, or crop
    stores whose channels differ.
    """
    plates = list(dict.fromkeys(plates))
    if len(plates) < min_plates:
        raise s.BioembedInputError(
            f"training needs crops from at least {min_plates} plates (got {len(plates)}: {plates}); "
            "a validation split by well on one plate cannot tell plate effects from learning")
    lake, frames, stores, channels, chunk = Lake(home.lake), [], [], None, 64
    for i, plate in enumerate(plates):
        cells = lake.read("cells", plate=plate)
        store = home.crop_store(plate)
        if cells.height == 0 or not store.exists():
            raise s.BioembedInputError("no crops to train on; materialize `crops` for this plate first",
                                       plate=plate, path=store)
        platemap = lake.read("platemap", plate=plate)
        if platemap.height == 0:
            raise s.BioembedInputError("no platemap; materialize `platemap` for this plate first", plate=plate)
        group = zarr.open_group(str(store), mode="r")
        store_channels = tuple(group.attrs["channels"])
        if channels is not None and store_channels != channels:
            raise s.BioembedInputError(f"crop store channels {list(store_channels)} differ from the other "
                                       f"plates' {list(channels)}", plate=plate, path=store)
        channels, chunk = store_channels, int(group["images"].chunks[0])
        if exclude_qc_failed and "qc_pass" in cells.columns:
            cells = cells.filter(pl.col("qc_pass").fill_null(True))
        frames.append(cells.select(s.PLATE, s.WELL, "crop_index")
                      .join(platemap.select(s.WELL, s.PERTURBATION, s.CONTROL_TYPE), on=s.WELL, how="inner")
                      .with_columns(pl.lit(i).alias("store")))
        stores.append(store)
    cells = pl.concat(frames)
    if cells.height == 0:
        raise s.BioembedInputError(f"plates {plates} have no crops that passed QC and have a platemap entry")
    classes = tuple(sorted(cells[s.PERTURBATION].unique().to_list()))
    wells = cells.select(s.PLATE, s.WELL).unique().sort(s.PLATE, s.WELL)
    order = np.random.default_rng(seed).permutation(wells.height)
    n_val = int(round(val_fraction * wells.height)) if wells.height > 1 else 0
    split = np.where(np.isin(np.arange(wells.height), order[:n_val]), "val", "train")
    cells = (cells.join(wells.with_columns(pl.Series(SPLIT, split)), on=[s.PLATE, s.WELL])
             .with_columns(pl.col(s.PERTURBATION).replace_strict(classes, range(len(classes)),
                                                                 return_dtype=pl.Int64).alias(LABEL))
             .sort("store", "crop_index"))
    return CropSet(tuple(stores), channels, cells, classes, chunk)


def chunk_window_batches(cells: pl.DataFrame, chunk: int, batch_size: int, seed: int, epoch: int,
                         window: int = 4, shuffle: bool = True) -> list[np.ndarray]:
    """Batches of row indices into `cells`: chunks shuffled, cells shuffled within windows of chunks."""
    key = cells["store"].to_numpy().astype(np.int64) * (1 << 40) + cells["crop_index"].to_numpy() // chunk
    _, chunk_id = np.unique(key, return_inverse=True)
    members = [np.flatnonzero(chunk_id == c) for c in range(chunk_id.max() + 1)] if len(key) else []
    rng = np.random.default_rng([seed, epoch])
    if shuffle:
        members = [members[i] for i in rng.permutation(len(members))]
    rows = []
    for start in range(0, len(members), window):
        block = np.concatenate(members[start:start + window])
        rows.append(rng.permutation(block) if shuffle else block)
    order = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class CropBatches(torch.utils.data.Dataset):
    """A map-style dataset whose items are whole batches (lists of rows) of a `CropSet` split.

    Each item is (images float32 (B, C, S, S) in 0-255 units, labels int64 (B,)), crops resized to
    `input_size` and restricted to `channels` (None = all); with `with_masks`, also the crops' cell
    masks bool (B, S, S), resized alike (for objectives that declare `uses_masks`, e.g. ShapeEmbed).
    Decoded chunks are cached per worker.
    """

    crop_set: CropSet
    cells: pl.DataFrame
    batches: list[np.ndarray]
    input_size: int
    channels: Sequence[str] | None = None
    with_masks: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._store = self.cells["store"].to_numpy()
        self._crop = self.cells["crop_index"].to_numpy()
        self._label = self.cells[LABEL].to_numpy()
        self._channels = channel_indices(self.crop_set.store_channels, self.channels, "training crops")

    def __len__(self) -> int:
        return len(self.batches)

    def _chunk(self, store: int, chunk_no: int, array: str = "images") -> np.ndarray:
        key = (store, chunk_no, array)
        if key not in self._cache:
            if len(self._cache) >= 16:
                self._cache.pop(next(iter(self._cache)))
            stored = zarr.open_group(str(self.crop_set.stores[store]), mode="r")[array]
            c = self.crop_set.chunk
            self._cache[key] = np.asarray(stored[chunk_no * c:(chunk_no + 1) * c])
        return self._cache[key]

    def _rows(self, rows: np.ndarray, array: str) -> np.ndarray:
        c = self.crop_set.chunk
        return np.stack([self._chunk(int(self._store[r]), int(self._crop[r]) // c, array)[int(self._crop[r]) % c]
                         for r in rows])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        rows = self.batches[i]
        crops = self._rows(rows, "images")[:, self._channels]
        masks = self._rows(rows, "masks") if self.with_masks else np.ones(crops.shape[:1] + crops.shape[2:], bool)
        crops, masks = resize_crops(crops, masks, self.input_size)
        item = (torch.from_numpy(to_0_255(crops)), torch.from_numpy(self._label[rows].astype(np.int64)))
        return (*item, torch.from_numpy(np.ascontiguousarray(masks))) if self.with_masks else item


def batch_loader(dataset: CropBatches, num_workers: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Iterate the dataset's batches in order, read by `num_workers` worker processes (0 = inline)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                                         persistent_workers=False, prefetch_factor=2 if num_workers else None)
    return iter(loader)
