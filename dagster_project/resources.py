"""Typed Dagster resources: the bioembed home (paths, lake, catalog) and its encoder registry."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from bioembed_assets.config import HOME_ENV_VAR, Home, RunConfig
from bioembed_assets.encoder_setups import EncoderSetup, encoder_setups
from bioembed_assets.registry import EncoderRegistry, EncoderVersion
from bioembed_assets.run_config import load_run_config

if TYPE_CHECKING:
    from bioembed_assets.inference import EngineOptions


class BioembedHome(dg.ConfigurableResource):
    """Where bioembed keeps everything, and the run settings of the pipeline."""

    root: str = os.environ.get(HOME_ENV_VAR, "bioembed-home")
    encoders: list[str] = ["classical", "ca_mae"]
    crop_size: int = 64
    device: str = "auto"
    batch_size: int | None = None
    """Crops per embedding batch (None: from the free GPU memory, or 128 on CPU)."""
    precision: str = "auto"
    """Embedding precision: auto (bf16 on GPUs that have it, fp16 on other GPUs, fp32 on CPU), fp32, bf16, fp16."""
    reader_workers: int | None = None
    """Threads decoding crop batches ahead of the encoder (None: one per core, at most 4)."""
    compile: bool = False
    """torch.compile the encoders' tensor path (falls back to eager, with a warning, where it fails)."""
    null_size: int = 10000
    mlflow_ui_url: str = os.environ.get("BIOEMBED_MLFLOW_UI_URL", "http://127.0.0.1:5000")
    """Where `mlflow ui` serves this home's registry: asset pages link to the MLflow runs and model versions there."""
    reuse_embeddings: bool = True
    """Keep a version's stored rows for a plate whose cells are unchanged (False: always recompute)."""

    def home(self) -> Home:
        return Home(root=Path(self.root).expanduser().resolve()).ensure()

    def engine_options(self) -> EngineOptions:
        """How the embedding engine runs (see `bioembed_assets.inference.EngineOptions`)."""
        from bioembed_assets.inference import EngineOptions  # torch: imported when a run embeds

        return EngineOptions(batch_size=self.batch_size, precision=self.precision, workers=self.reader_workers,
                             compile=self.compile)

    def registry(self) -> EncoderRegistry:
        home = self.home()
        return EncoderRegistry(home.mlflow_tracking_uri, home.mlflow_artifacts)

    def champion(self, name: str) -> EncoderVersion:
        """The champion version of encoder `name`, or a clear error if none is registered."""
        version = self.registry().get(name)
        if version is None:
            raise LookupError(f"encoder {name!r} has no champion version in {self.home().mlflow_db}; "
                              "materialize the `encoder` asset first")
        return version

    def run_config(self) -> RunConfig:
        return load_run_config(self.home())

    def encoder_setups(self) -> list[EncoderSetup]:
        return encoder_setups(self.encoders)
