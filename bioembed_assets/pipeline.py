"""One function per stage of the asset graph, over a bioembed Home and a plate.

These are what the Dagster assets call (and what a notebook can call directly): each reads
its inputs from the home, writes its outputs atomically, and returns a small summary dict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from bioembed_assets import schema as s
from bioembed_assets.config import Home, RunConfig
from bioembed_assets.encoder_setups import (  # noqa: F401  re-exported: pipeline.EncoderSetup etc.
    DEFAULT_ENCODERS,
    TIMM_PREFIX,
    TRAINABLE_FAMILIES,
    EncoderSetup,
    encoder_options,
    encoder_setups,
    timm_setup,
)
from bioembed_assets.encoders.base import Encoder
from bioembed_assets.images.illumination import correct_plate_store, estimate_illumination, save_illumination
from bioembed_assets.images.plots import plate_heatmap_png
from bioembed_assets.images.qc import site_qc
from bioembed_assets.images.store import ingest_plate
from bioembed_assets.inference import (
    EmbeddingRun,
    EngineOptions,
    ProgressCallback,
    encoder_feature_names,
    encoder_outputs,
)
from bioembed_assets.profiles.aggregate import aggregate_to_wells
from bioembed_assets.registry import EncoderVersion
from bioembed_assets.run_config import default_run_config, load_run_config, save_run_config  # noqa: F401  re-exported
from bioembed_assets.segment.crops import extract_crops, extract_tiles
from bioembed_assets.segment.plate import segment_plate
from bioembed_assets.sources.layouts import list_fields
from bioembed_assets.sources.platemap import read_platemap, resolve_platemap_path, validate_platemap_join
from bioembed_assets.store.lake import Lake, features_to_numpy, with_features
from bioembed_assets.store.locks import file_lock

log = logging.getLogger(__name__)


def analysis_store(home: Home, plate: str, config: RunConfig) -> Path:
    """The image store segmentation and crops read: illumination-corrected when enabled."""
    return home.corrected_store(plate) if config.illumination_correction else home.image_store(plate)


# -- per-plate stages ---------------------------------------------------------------------------
def one_run_per_plate(stage: str) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    """Serialize a stage per plate (per encoder too, for stages given a `version`) across processes:
    a second run of the same plate waits for the first (and says so) instead of racing it."""

    def wrap(fn: Callable[..., dict]) -> Callable[..., dict]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def serialized(*args: Any, **kwargs: Any) -> dict:
            bound = signature.bind(*args, **kwargs).arguments
            home, plate = bound["home"], s.validate_plate_name(bound["plate"])
            name = f"{stage}-{bound['version'].name}" if "version" in bound else stage
            with file_lock(home.stage_lock(name, plate), f"{name} of plate {plate}", on_wait=log.warning):
                return fn(*args, **kwargs)

        return serialized

    return wrap


@one_run_per_plate("raw_plate")
def ingest_raw_plate(home: Home, plate: str, config: RunConfig | None = None,
                     progress: ProgressCallback | None = None) -> dict:
    """Raw acquisition folder (any layout) -> zarr plate store + `images` lake partition with
    per-site QC (focus, saturation, intensity; `qc_pass`, `qc_flags`). `progress(done, total)` per field stored."""
    cfg = config or load_run_config(home)
    fields_ = list_fields(cfg.layout, cfg.plate_dir(plate), plate, cfg.channel_map, **cfg.layout_options)
    table = ingest_plate(fields_, home.image_store(plate), cfg.channels, compressor=cfg.store_compressor,
                         max_image_pixels=cfg.max_image_pixels, progress=progress)
    table = site_qc(home.image_store(plate), table)
    Lake(home.lake).write("images", table, plate=plate)
    return {"fields": table.height, "wells": table[s.WELL].n_unique(), "channels": cfg.channels,
            "qc_failed_sites": int((~table["qc_pass"]).sum())}


@one_run_per_plate("platemap")
def load_platemap(home: Home, plate: str, config: RunConfig | None = None) -> dict:
    """The plate's platemap (columns/controls mapped as configured) -> `platemap` lake partition;
    wells with images but no platemap entry are an error, platemap wells without images a warning."""
    cfg = config or load_run_config(home)
    path = resolve_platemap_path(cfg.plate_dir(plate), cfg.platemap.path, plate,
                                 base=Path(cfg.config_dir) if cfg.config_dir else None)
    platemap = read_platemap(path, plate, cfg.platemap.columns or None, cfg.platemap.controls or None)
    if plate in cfg.batches:
        platemap = platemap.with_columns(pl.lit(cfg.batches[plate], pl.Utf8).alias(s.BATCH))
    lake = Lake(home.lake)
    images = lake.read("images", plate=plate)
    join = validate_platemap_join(platemap, images, plate) if images.height else None
    lake.write("platemap", platemap, plate=plate)
    counts = platemap.group_by(s.CONTROL_TYPE).len().sort(s.CONTROL_TYPE)
    summary = {"wells": platemap.height, **{f"{r[0]}_wells": r[1] for r in counts.iter_rows()}}
    if join is not None and join.warning:
        summary["warning"] = join.warning
    return summary


@one_run_per_plate("illumination")
def correct_illumination(home: Home, plate: str, config: RunConfig | None = None,
                         progress: ProgressCallback | None = None) -> dict:
    """Per-channel illumination function from all sites of the plate (stored), and the corrected
    image store that segmentation and crops read. A no-op when switched off in the config.
    `progress(done, total)` per field corrected."""
    cfg = config or load_run_config(home)
    if not cfg.illumination_correction:
        return {"enabled": False}
    illum = estimate_illumination(home.image_store(plate))
    save_illumination(illum, home.illumination_file(plate), cfg.channels)
    correct_plate_store(home.image_store(plate), illum, home.corrected_store(plate), progress=progress)
    return {"enabled": True, **{f"{c}_min_max": f"{illum[i].min():.2f}..{illum[i].max():.2f}"
                                for i, c in enumerate(cfg.channels)}}


@one_run_per_plate("segmentation")
def segment_raw_plate(home: Home, plate: str, config: RunConfig | None = None,
                      progress: ProgressCallback | None = None) -> dict:
    """Nuclei (and, if configured, whole cells) of every field -> mask store + `nuclei` partition.
    `progress(done, total)` per field segmented."""
    cfg = config or load_run_config(home)
    lake = Lake(home.lake)
    images = lake.read("images", plate=plate)
    _require(images, "images", plate, "raw_plate")
    nuclei = segment_plate(analysis_store(home, plate, cfg), images.select(s.PLATE, s.WELL, s.SITE, s.FIELD),
                           home.mask_store(plate), nuclear_channel=cfg.nuclear_channel, on_field=progress,
                           cell_channel=cfg.cell_channel, backend=cfg.segmentation_backend,
                           model_path=Path(cfg.cellpose_model) if cfg.cellpose_model else None)
    lake.write("nuclei", nuclei, plate=plate)
    return {"nuclei": nuclei.height, "fields": images.height,
            "nuclei_per_field": round(nuclei.height / max(images.height, 1), 1)}


@one_run_per_plate("crops")
def crop_cells(home: Home, plate: str, config: RunConfig | None = None,
               progress: ProgressCallback | None = None) -> dict:
    """Single-cell crops around each nucleus (or whole-field tiles) -> crop store + `cells` lake
    partition, each cell carrying its site's QC verdict (`qc_pass`, `qc_flags`). `progress(done, total)`
    per field cropped (crop mode; tiles report none)."""
    cfg = config or load_run_config(home)
    lake = Lake(home.lake)
    images = lake.read("images", plate=plate)
    if cfg.crop_mode == "tiles":
        cells, summary = _tiles_as_cells(home, plate, cfg, images)
    else:
        nuclei = lake.read("nuclei", plate=plate)
        _require(nuclei, "nuclei", plate, "segmentation")
        cells, summary = extract_crops(analysis_store(home, plate, cfg), home.mask_store(plate), nuclei,
                                       home.crop_store(plate), crop_size=cfg.crop_size, border=cfg.crop_border,
                                       mask_neighbors=cfg.mask_neighbors, progress=progress)
    cells = cells.join(images.select(s.WELL, s.SITE, "qc_pass", "qc_flags"), on=[s.WELL, s.SITE], how="left")
    lake.write("cells", cells, plate=plate)
    per_well = cells.group_by(s.WELL).len()["len"]
    return {**summary, "min_cells_per_well": int(per_well.min() or 0) if len(per_well) else 0,
            "wells_with_cells": len(per_well), "cells_on_qc_failed_sites": int((~cells["qc_pass"]).sum())}


def _tiles_as_cells(home: Home, plate: str, cfg: RunConfig, images: pl.DataFrame) -> tuple[pl.DataFrame, dict]:
    """Whole-field tiles in the shape of the cell table (one 'cell' per tile, id `<well>-s<site>-t<k>`)."""
    tiles, summary = extract_tiles(analysis_store(home, plate, cfg), home.crop_store(plate), cfg.tile_size,
                                   image_table=images.select(s.PLATE, s.WELL, s.SITE, s.FIELD))
    half = cfg.tile_size / 2
    cells = tiles.with_columns(
        pl.format("{}-s{}-t{}", s.WELL, s.SITE, "tile_id").alias(s.CELL_ID),
        pl.lit(0).alias("label"), (pl.col("y0") + half).alias("centroid_y"),
        (pl.col("x0") + half).alias("centroid_x"), pl.lit(cfg.tile_size**2).alias("area"))
    return cells, summary


def plate_heatmaps(home: Home, plate: str) -> dict[str, bytes]:
    """Plate-layout heatmaps (PNG): cells per well and QC-failed sites per well."""
    lake = Lake(home.lake)
    cells = lake.read("cells", plate=plate).group_by(s.WELL).len("cells")
    failed = (lake.read("images", plate=plate).group_by(s.WELL)
              .agg((~pl.col("qc_pass")).sum().cast(pl.Int64).alias("failed_sites")))
    return {"cells_per_well": plate_heatmap_png(cells, "cells", f"{plate}: cells per well"),
            "qc_failed_sites": plate_heatmap_png(failed, "failed_sites", f"{plate}: QC-failed sites per well")}


@one_run_per_plate("embeddings")
def embed_plate(home: Home, plate: str, encoder: Encoder, version: EncoderVersion,
                batch_size: int | None = None, progress: ProgressCallback | None = None, reuse: bool = True,
                engine: EngineOptions | None = None) -> dict:
    """Every crop of the plate through one encoder version -> `embeddings` lake partition.

    Rows are written as the engine yields them (memory holds a few batches, not the plate) into
    temporary files that replace the partitions only when the plate is done: a crash mid-plate
    leaves none of its new rows visible. With `reuse`, rows this version already wrote for exactly
    the plate's current cells (written after its crop store) are kept: a version's weights never
    change, so they would come out the same (this is what makes a resumed run, a rollback or the
    promotion of an evaluated challenger cheap). `batch_size` overrides `engine.batch_size`.
    """
    lake = Lake(home.lake)
    cells = lake.read("cells", plate=plate).sort("crop_index")
    _require(cells, "cells", plate, "crops")
    if reuse and (existing := _reusable_embeddings(home, plate, version, cells)) is not None:
        return {"cells": existing.height, "dim": int(len(existing[s.FEATURES][0])), "reused": True,
                "nan_rows": int(np.isnan(features_to_numpy(existing)).any(1).sum())}
    engine = engine or EngineOptions()
    if batch_size is not None:
        engine = dataclasses.replace(engine, batch_size=batch_size)
    t0 = time.perf_counter()
    run = EmbeddingRun(encoder, home.crop_store(plate), engine, progress)
    if run.n != cells.height:
        raise RuntimeError(f"plate {plate}: the crop store holds {run.n} crops for {cells.height} cells")
    keys = dict(encoder=version.name, version=version.version)
    meta = cells.select(s.PLATE, s.WELL, s.SITE, s.CELL_ID).with_columns(
        pl.lit(version.name).alias(s.ENCODER), pl.lit(version.version).alias(s.ENCODER_VERSION))
    write_feature_names(lake, encoder, version)
    nan_rows, write_seconds = 0, 0.0
    with contextlib.ExitStack() as stack:
        append_rows = stack.enter_context(lake.writer("embeddings", **keys, plate=plate))
        # side outputs are committed first (an ExitStack exits in reverse): the embeddings
        # partition is what marks the plate as embedded
        append_side = stack.enter_context(lake.writer("cell_outputs", **keys, plate=plate)) if run.output_names else None
        batches = stack.enter_context(contextlib.closing(iter(run)))  # reader threads joined on any exit
        for batch in batches:
            t_write = time.perf_counter()
            rows = meta.slice(batch.start, len(batch))
            append_rows(with_features(rows, batch.embeddings))
            if append_side is not None:
                append_side(pl.concat([with_features(rows.with_columns(pl.lit(key).alias("output")), values,
                                                     column="values") for key, values in batch.outputs.items()]))
            nan_rows += int(np.isnan(batch.embeddings).any(1).sum())
            write_seconds += time.perf_counter() - t_write
    seconds = time.perf_counter() - t0
    rate = run.n / seconds if seconds > 0 else float("nan")
    lake.write("embedding_stats", pl.DataFrame({
        s.PLATE: [plate], s.ENCODER: [version.name], s.ENCODER_VERSION: [version.version], "cells": [run.n],
        "seconds": [seconds], "crops_per_second": [rate], "device": [str(run.device)],
        "batch_size": [run.batch_size], "precision": [run.precision],
        **{f"{stage}_seconds": [value] for stage, value in run.stages.as_dict().items()},
        "write_seconds": [write_seconds]}), **keys, plate=plate)
    return {"cells": run.n, "dim": encoder.spec.embedding_dim, "reused": False, "nan_rows": nan_rows,
            "crops_per_second": round(rate, 1), "batch_size": run.batch_size, "precision": run.precision,
            "stages": {**run.stages.as_dict(), "write": round(write_seconds, 4)}}


def write_feature_names(lake: Lake, encoder: Encoder, version: EncoderVersion) -> None:
    """Record the names of the version's embedding columns and side outputs (if the encoder names them)."""
    named = {"features": encoder_feature_names(encoder), **encoder_outputs(encoder)}
    rows = [(key, i, name) for key, names in named.items() if names for i, name in enumerate(names)]
    if not rows:
        return
    lake.write("feature_names", pl.DataFrame(rows, schema=["output", "feature_index", "feature"], orient="row")
               .with_columns(pl.lit(version.name).alias(s.ENCODER), pl.lit(version.version).alias(s.ENCODER_VERSION)),
               encoder=version.name, version=version.version)


def _reusable_embeddings(home: Home, plate: str, version: EncoderVersion, cells: pl.DataFrame) -> pl.DataFrame | None:
    """This version's stored rows for the plate, if they cover exactly its current cells and are newer than the crops."""
    lake = Lake(home.lake)
    path = lake.partition_path("embeddings", encoder=version.name, version=version.version, plate=plate)
    crops_marker = home.crop_store(plate) / "zarr.json"
    if not path.exists() or not crops_marker.exists() or path.stat().st_mtime < crops_marker.stat().st_mtime:
        return None
    existing = pl.read_parquet(path)
    return existing if existing[s.CELL_ID].to_list() == cells[s.CELL_ID].to_list() else None


@one_run_per_plate("well_profiles")
def profile_plate(home: Home, plate: str, version: EncoderVersion) -> dict:
    """Cell embeddings -> per-well median profiles annotated with the platemap."""
    lake = Lake(home.lake)
    emb = lake.read("embeddings", encoder=version.name, version=version.version, plate=plate)
    _require(emb, "embeddings", plate, "embeddings")
    platemap = lake.read("platemap", plate=plate)
    _require(platemap, "platemap", plate, "platemap")
    passed = lake.read("images", plate=plate).filter(pl.col("qc_pass")).select(s.WELL, s.SITE)
    kept = emb.join(passed, on=[s.WELL, s.SITE], how="semi")
    excluded = emb.height - kept.height
    if kept.height == 0:
        raise s.BioembedInputError("every site failed image QC; nothing to profile", plate=plate)
    emb = kept
    meta = emb.drop(s.FEATURES).join(platemap.drop(s.PLATE), on=s.WELL, how="left")
    unmapped = meta.filter(pl.col(s.PERTURBATION).is_null())[s.WELL].unique().to_list()
    if unmapped:
        raise s.BioembedInputError(f"wells with images but no platemap entry: {sorted(unmapped)}",
                                   plate=plate)
    wells_meta, W = aggregate_to_wells(meta, features_to_numpy(emb))
    design = [c for c in (s.BATCH, s.COMPOUND) if c in wells_meta.columns]  # optional platemap columns
    wells_meta = wells_meta.select(s.PLATE, s.WELL, s.PERTURBATION, s.CONTROL_TYPE, s.MOA,
                                   s.ENCODER, s.ENCODER_VERSION, "n_cells", *design)
    lake.write("well_profiles", with_features(wells_meta, W), encoder=version.name,
               version=version.version, plate=plate)
    missing = sorted(set(platemap[s.WELL]) - set(wells_meta[s.WELL]))
    return {"wells": wells_meta.height, "wells_without_cells": len(missing), "cells_excluded_by_qc": excluded}


def profiled_plates(home: Home) -> set[str]:
    """Plates with well profiles of any feature set in the lake."""
    return {keys[s.PLATE] for keys in Lake(home.lake).partitions("well_profiles")}


def _require(df: pl.DataFrame, table: str, plate: str, asset: str) -> None:
    if df.height == 0:
        raise LookupError(f"plate {plate}: no {table} rows; materialize `{asset}` for this plate first")
