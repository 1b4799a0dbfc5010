"""Where things live under a bioembed home, and the typed settings of a deployment."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from bioembed_assets.promotion_rule import PromotionRule
from bioembed_assets.schema import validate_plate_name

HOME_ENV_VAR = "BIOEMBED_HOME"
ARTIFACT_ROOT_ENV_VAR = "BIOEMBED_ARTIFACT_ROOT"


class Home(BaseModel):
    """A bioembed home folder: raw data, zarr stores, the parquet lake, the catalog, MLflow.

    Every path of the platform is derived here, so no other module builds paths by hand.
    """

    root: Path

    @classmethod
    def from_env(cls, default: str | Path = "bioembed-home") -> Home:
        return cls(root=Path(os.environ.get(HOME_ENV_VAR, default)).expanduser().resolve())

    # -- raw data and stores ---------------------------------------------------------------
    @property
    def raw_root(self) -> Path:
        return self.root / "raw"

    def raw_plate_dir(self, plate: str) -> Path:
        return self.raw_root / validate_plate_name(plate)

    def image_store(self, plate: str) -> Path:
        return self.root / "zarr" / "images" / f"{validate_plate_name(plate)}.zarr"

    def mask_store(self, plate: str) -> Path:
        return self.root / "zarr" / "masks" / f"{validate_plate_name(plate)}.zarr"

    def crop_store(self, plate: str) -> Path:
        return self.root / "zarr" / "crops" / f"{validate_plate_name(plate)}.zarr"

    def corrected_store(self, plate: str) -> Path:
        """The illumination-corrected copy of a plate's image store."""
        return self.root / "zarr" / "corrected" / f"{validate_plate_name(plate)}.zarr"

    def illumination_file(self, plate: str) -> Path:
        return self.root / "illumination" / f"{validate_plate_name(plate)}.npz"

    @property
    def run_config_path(self) -> Path:
        """The RunConfig this home was set up with (`bioembed run`); absent = synthetic default."""
        return self.root / "run_config.json"

    # -- lake, catalog, models ---------------------------------------------------------------
    @property
    def lake(self) -> Path:
        return self.root / "lake"

    @property
    def catalog_path(self) -> Path:
        return self.root / "bioembed.duckdb"

    @property
    def normalizers(self) -> Path:
        return self.root / "normalizers"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    @property
    def mlflow_artifacts(self) -> Path:
        """MLflow's artifact root: `<home>/mlartifacts`, or `$BIOEMBED_ARTIFACT_ROOT` (e.g. a larger volume)."""
        configured = os.environ.get(ARTIFACT_ROOT_ENV_VAR)
        return Path(configured).expanduser().absolute() if configured else self.root / "mlartifacts"

    def stage_lock(self, stage: str, plate: str | None = None) -> Path:
        """The lock file one run of `stage` holds, for `plate` (`pipeline.one_run_per_plate`) or for the
        whole home (cross-plate stages)."""
        folder = self.root / "locks"
        return folder / stage / f"{validate_plate_name(plate)}.lock" if plate else folder / f"{stage}.lock"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster"

    @property
    def matplotlib_config(self) -> Path:
        """MPLCONFIGDIR: matplotlib's caches stay in the home, not in $HOME."""
        return self.root / ".cache" / "matplotlib"

    def ensure(self) -> Home:
        for p in (self.root, self.raw_root, self.lake, self.dagster_home, self.mlflow_artifacts):
            p.mkdir(parents=True, exist_ok=True)
        return self


def unknown_keys(data: Mapping[str, Any], model: type[BaseModel], prefix: str = "") -> list[str]:
    """One message per key of `data` that `model` has no field for, with the closest field name; nested
    tables of model-typed fields are checked too (`platemap.colums` -> did you mean `platemap.columns`)."""
    errors = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.6)
            hint = f"did you mean {prefix + close[0]!r}?" if close else f"valid keys: {sorted(model.model_fields)}"
            errors.append(f"unknown key {prefix + key!r} ({hint})")
        elif isinstance(value, Mapping) and isinstance(field.annotation, type) \
                and issubclass(field.annotation, BaseModel):
            errors += unknown_keys(value, field.annotation, f"{prefix}{key}.")
    return errors


class PlatemapConfig(BaseModel):
    """Where a plate's platemap is and how its columns and control labels map to bioembed's."""

    path: str = "platemap.csv"
    """File path; relative paths are resolved against the plate folder (then the config file)."""
    columns: dict[str, str] = Field(default_factory=dict)
    """bioembed column -> file column, e.g. {"perturbation": "Metadata_broad_sample"}."""
    controls: dict[str, str] = Field(default_factory=dict)
    """File value of the control column -> negative/positive/treatment, e.g. {"-1": "negative"}."""


class RunConfig(BaseModel):
    """A documented run configuration (`bioembed run --config FILE`, TOML).

    Example::

        layout = "imagexpress"            # phenix | imagexpress | loaddata | rxrx | omezarr | regex
        raw_root = "/data/screen"          # one folder per plate (relative to the config file)
        channels = ["DNA", "GFP"]          # stains to ingest, in order
        [channel_map]                      # file channel token -> stain
        w1 = "DNA"
        w2 = "GFP"
        [platemap]
        path = "platemap.csv"
        [platemap.columns]
        perturbation = "Metadata_compound"
        [layout_options]                   # e.g. pattern = '(?P<well>...)...' for layout "regex"
    """

    layout: str = "phenix"
    raw_root: str = "raw"
    plates: list[str] | None = None
    """Plate folder names to run (default: every folder under raw_root)."""
    channels: list[str]
    channel_map: dict[str, str]
    layout_options: dict[str, str] = Field(default_factory=dict)
    platemap: PlatemapConfig = Field(default_factory=PlatemapConfig)
    max_image_pixels: int = Field(default=2**26, ge=1)
    """Most pixels one image may have (default 2**26, about 8192 x 8192): a larger header is refused by the
    folder check and at ingest, before any memory is allocated. Raise it for genuinely larger images."""
    nuclear_channel: str = "DNA"
    cell_channel: str | None = None
    """Channel for whole-cell segmentation (watershed from nuclei); None = nuclei only."""
    illumination_correction: bool = True
    store_compressor: Literal["none", "lz4", "zstd"] = "none"
    """Codec of the plate image stores: none (fastest ingest, as large as the pixels), lz4 (~1.6x smaller)
    or zstd (~1.75x smaller, slowest)."""
    segmentation_backend: Literal["classic", "cellpose"] = "classic"
    cellpose_model: str | None = None
    """Local Cellpose weights file (never downloaded) for `segmentation_backend = "cellpose"`."""
    crop_mode: Literal["cells", "tiles"] = "cells"
    """Single-cell crops around nuclei, or whole-field tiles of `tile_size` (as OpenPhenom was trained)."""
    crop_size: int = 64
    crop_border: Literal["drop", "pad"] = "drop"
    """Cells whose crop leaves the image: dropped, or zero-padded (counted either way)."""
    mask_neighbors: bool = False
    """Zero the pixels of other cells inside each crop (as SubCell expects)."""
    tile_size: int = 256
    min_cells_per_well: int = Field(default=1, ge=0)
    """Fewest cell crops a well may keep; a plate with a well below it fails the blocking `cells_per_well`
    check and goes no further downstream (1: no empty well; raise it, e.g. to 20, for full-size fields)."""
    max_border_loss_fraction: float = Field(default=0.3, ge=0.0, le=1.0)
    """Largest fraction of a plate's segmented cells that may be lost at the image border (`crop_border =
    "drop"`) before the blocking `border_loss` check stops the plate. A crop of c px on fields of s px loses
    about 1 - (1 - c/s)^2 of uniformly placed cells: 11 % for 64 px on 1080 px, 19 % on 640 px, 44 % on the
    synthetic screen's 256 px sites (its config sets 0.6; `crop_border = "pad"` keeps them instead)."""
    max_replicate_map_drop: float = Field(default=0.05, ge=0.0)
    """Largest drop of a recipe's replicate mAP from the previous evaluation before the `replicate_map_regression`
    check of `evaluation` warns (absolute mAP units)."""
    encoders: list[str] = Field(default_factory=lambda: ["classical", "ca_mae"])
    """Encoders to embed with: names from `bioembed encoders` (e.g. classical, ca_mae, vqvae, subcell,
    shape_embed) or `timm:<model_name>` for any timm backbone."""
    encoder_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per encoder name, constructor settings over its defaults, used when its version 1 is registered
    (e.g. `[encoder_options.subcell] encoder_checkpoint = "/models/subcell.pth"`)."""
    recipes: dict[str, str] = Field(default_factory=lambda: {"card": "card"})
    """Normalization recipes to fit and evaluate: name -> preset name or step string (see README)."""
    batches: dict[str, str] = Field(default_factory=dict)
    """Plate -> batch (e.g. its week): the `batch` of the plate's wells, overriding a platemap `batch` column.
    Plates without one are their own batch. Steps with `by=batch` and NSCB / batch metrics use it."""
    nsc_aggregate: Literal["mean", "median"] = "mean"
    """How NSC / NSCB build a treatment's profile from its replicate wells."""
    crossfit: Literal["auto", "off"] | Annotated[int, Field(ge=2)] = "auto"
    """How a recipe's replicate mAP is cross-fitted: auto (2 folds when every plate keeps 4 controls per
    fold, else in-sample), off (in-sample) or a fold count (see README: Cross-fitting)."""
    promotion: PromotionRule = Field(default_factory=PromotionRule)
    """When a trained challenger replaces the champion (see README: Promotion)."""
    config_dir: str | None = None
    """Folder of the config file (set by `load`); relative platemap paths may resolve against it."""

    @classmethod
    def check_keys(cls, data: Mapping[str, Any], where: str) -> None:
        """Refuse keys that are no field of the run configuration (or of its nested tables), naming the key
        and the closest valid one: a typo must not be silently ignored. Free-form tables (channel_map,
        encoder_options, …) are not checked."""
        errors = unknown_keys(data, cls)
        if errors:
            raise ValueError(f"{where}: " + "; ".join(errors))

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """Parse a TOML run configuration; relative paths are resolved against its folder."""
        import tomllib

        path = Path(path)
        data = tomllib.loads(path.read_text())
        cls.check_keys(data, f"run config {path}")
        cfg = cls.model_validate(data)
        base = path.resolve().parent
        cfg.raw_root = str((base / cfg.raw_root).resolve())
        cfg.config_dir = str(base)
        return cfg

    def plate_dir(self, plate: str) -> Path:
        """The acquisition folder of `plate` under `raw_root` (plate name validated)."""
        return Path(self.raw_root) / validate_plate_name(plate)
