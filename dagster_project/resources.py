"""Typed Dagster resources: the bioembed home (paths, lake, catalog) and its encoder registry."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from bioembed_assets.config import HOME_ENV_VAR, Home, RunConfig
from bioembed_assets.pipeline import EncoderSetup, encoder_setups, load_run_config
from bioembed_assets.registry import EncoderRegistry, EncoderVersion


class BioembedHome(dg.ConfigurableResource):
    """Where bioembed keeps everything, and the run settings of the pipeline."""

    root: str = os.environ.get(HOME_ENV_VAR, "bioembed-home")
    encoders: list[str] = ["classical", "ca_mae"]
    crop_size: int = 64
    device: str = "auto"
    batch_size: int = 256
    null_size: int = 10000
    reuse_embeddings: bool = True
    """Keep a version's stored rows for a plate whose cells are unchanged (False: always recompute)."""

    def home(self) -> Home:
        return Home(root=Path(self.root).expanduser().resolve()).ensure()

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
