"""Cheap validation of a raw plate folder before it is registered as a partition."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bioembed_assets.config import PlatemapConfig, RunConfig
from bioembed_assets.schema import BioembedInputError, validate_plate_name
from bioembed_assets.sources.layouts import check_image_size, display_path, list_fields, os_error
from bioembed_assets.sources.platemap import read_platemap, resolve_platemap_path
from bioembed_assets.sources.synthetic import SYNTHETIC_CHANNEL_MAP

PLATEMAP_FILE = "platemap.csv"
_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))


def default_config() -> RunConfig:
    """The configuration of plates written by the synthetic generator (Phenix layout, five stains)."""
    return RunConfig(
        layout="phenix",
        channels=[SYNTHETIC_CHANNEL_MAP[k] for k in sorted(SYNTHETIC_CHANNEL_MAP)],
        channel_map={str(k): v for k, v in SYNTHETIC_CHANNEL_MAP.items()},
        platemap=PlatemapConfig(path=PLATEMAP_FILE),
    )


def check_plate_folder(
    folder: Path, config: RunConfig | None = None, *, plate: str | None = None, config_dir: Path | None = None
) -> str | None:
    """None if `folder` is a complete, readable plate; otherwise the reason it is not.

    Uses the configured layout, layout options, channel map and platemap (`config`; default: the
    synthetic Phenix plates). Checks the plate name (`plate`, default the folder name: no path
    separators or `..`, so it cannot escape the home), that every site has every mapped channel and
    the configured `channels`, that every image header reads with one shape and one uint8/uint16
    dtype of at most `config.max_image_pixels` pixels, and that the platemap parses (with negative
    controls). Relative platemap paths are looked up in the plate folder, then in `config_dir`. An
    OSError (a symbolic-link loop, an unreadable file) is returned as a reason too, naming the path.

    Fields that can (OME-Zarr: `check_stored`) are also checked to have every chunk their planes are
    read from, once the size is known to be in bounds.
    """
    config = config or default_config()
    folder = Path(folder)
    plate = folder.name if plate is None else plate
    try:
        return _check(folder, config, plate, config_dir)
    except BioembedInputError as err:
        return str(err)
    except OSError as err:
        return str(os_error(err, plate, folder))


def _check(folder: Path, config: RunConfig, plate: str, config_dir: Path | None) -> None:
    """`check_plate_folder`, raising BioembedInputError (or OSError) for the first problem."""
    validate_plate_name(plate)
    fields = list_fields(config.layout, folder, plate, config.channel_map, **config.layout_options)
    mapped = {v for v in config.channel_map.values() if v}
    unmapped = [c for c in config.channels if c not in mapped]
    if unmapped:
        raise BioembedInputError(
            f"channels {unmapped} are not stains of the channel map {config.channel_map}", plate=plate
        )
    first: tuple[tuple[int, ...], np.dtype, str] | None = None
    for f in fields:
        for stain in config.channels:
            where = f.location(stain)
            try:
                shape, dtype = f.header(stain)
            except BioembedInputError:
                raise
            except Exception as err:  # noqa: BLE001 - any unreadable header
                raise BioembedInputError(
                    f"unreadable image header ({type(err).__name__}: {err})", plate=plate, well=f.well, path=where
                ) from err
            if dtype not in _DTYPES or len(shape) != 2:
                raise BioembedInputError(
                    f"expected a 2-D uint8/uint16 image, got shape {shape} dtype {dtype}", plate=plate, well=f.well,
                    path=where,
                )
            check_image_size(shape, config.max_image_pixels, plate=plate, well=f.well, path=where)
            # Missing OME-Zarr chunks would be read as zeros. A stat per chunk of the planes that are read,
            # rather than `nchunks_initialized == nchunks` per array: as cheap (that lists every chunk), and
            # exact (t, z and channels that are not read may legitimately be unwritten).
            check_stored = getattr(f, "check_stored", None)
            if check_stored is not None:
                check_stored(stain)
            if first is None:
                first = (shape, dtype, where)
            elif dtype != first[1]:
                raise BioembedInputError(
                    f"mixed bit depth: {dtype} here but {first[1]} in {first[2]}", plate=plate, well=f.well, path=where
                )
            elif shape != first[0]:
                raise BioembedInputError(
                    f"images of different shapes: {shape} here but {first[0]} in {first[2]}", plate=plate,
                    well=f.well, path=where,
                )
    pm = config.platemap
    platemap = resolve_platemap_path(folder, pm.path, plate, config_dir)
    if not platemap.exists():
        raise BioembedInputError(f"no platemap {pm.path} in the plate folder", plate=plate,
                                 path=display_path(platemap))
    read_platemap(platemap, plate, pm.columns, pm.controls)
