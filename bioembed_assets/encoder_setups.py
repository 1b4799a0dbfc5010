"""The encoders a run can embed with: their setups by name, without importing torch.

What the Dagster graph needs at definition time (which encoders, their families, whether they are
trainable); building one (`EncoderSetup.build`) imports the encoder code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bioembed_assets.config import RunConfig

if TYPE_CHECKING:
    from bioembed_assets.encoders.base import Encoder


@dataclass(frozen=True)
class EncoderSetup:
    """An encoder the platform embeds with: registered-model name + how to build version 1."""

    name: str
    family: str
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    takes_channels: bool = False
    """Whether the family is built for a fixed stain list (the run's channels) or is channel-agnostic."""

    @property
    def uses_gpu(self) -> bool:
        """Whether embedding runs a neural network (GPU pool) rather than classical feature code."""
        return self.family != "classical"

    @property
    def trainable(self) -> bool:
        return self.family in TRAINABLE_FAMILIES

    def build(self, channels: Sequence[str] | None = None, options: Mapping[str, Any] | None = None) -> Encoder:
        """Version 1 of this encoder: its config, the run's channels (if it takes them), then `options`."""
        config = dict(self.config)
        if self.takes_channels and channels is not None:
            config["channels"] = list(channels)
        config.update(options or {})
        from bioembed_assets.encoders.base import build_encoder  # torch: imported when an encoder is built

        encoder = build_encoder(self.family, **config)
        needed = encoder.spec.channels
        if channels is not None and needed is not None and (missing := [c for c in needed if c not in channels]):
            raise ValueError(f"encoder {self.name} reads stains {missing} that the run's channels {list(channels)} "
                             f"lack (set encoder_options.{self.name} to map it onto the plate's stains)")
        return encoder


TRAINABLE_FAMILIES = frozenset({"ca_mae", "ae", "vae", "beta_vae", "vqvae", "mae", "supervised_cnn", "timm",
                                "shape_embed"})
INTERPRETABLE_FAMILIES = frozenset({"supervised_cnn", "timm"})
"""Families whose `gradcamo/<name>` asset the graph builds (CNN classifiers; ViTs via the library)."""
TIMM_PREFIX = "timm:"

DEFAULT_ENCODERS: tuple[EncoderSetup, ...] = (
    EncoderSetup("classical", "classical", {},
                 "CellProfiler-like intensity, shape, texture and correlation features", takes_channels=True),
    EncoderSetup("ca_mae", "ca_mae", {"preset": "demo", "seed": 0, "decoder": "demo"},
                 "Channel-agnostic MAE ViT (OpenPhenom architecture) with its decoder, small CPU configuration"),
    EncoderSetup("vae", "vae", {"latent_dim": 64, "input_size": 64, "seed": 0},
                 "bioimage_embed-style convolutional VAE (64-d latent)", takes_channels=True),
    EncoderSetup("supervised_cnn", "supervised_cnn", {"backbone": "resnet18", "input_size": 64, "seed": 0},
                 "DeepProfiler-style weakly supervised CNN (timm ResNet-18; predicts each cell's treatment)",
                 takes_channels=True),
    EncoderSetup("ae", "ae", {"latent_dim": 64, "input_size": 64, "seed": 0},
                 "bioimage_embed-style convolutional autoencoder (64-d latent)", takes_channels=True),
    EncoderSetup("beta_vae", "beta_vae", {"latent_dim": 64, "input_size": 64, "seed": 0},
                 "bioimage_embed-style beta-VAE (beta 4, 64-d latent)", takes_channels=True),
    EncoderSetup("vqvae", "vqvae", {"latent_dim": 64, "input_size": 64, "num_embeddings": 512, "seed": 0},
                 "bioimage_embed-style VQ-VAE: 512-code codebook, pre-quantization latent as the profile",
                 takes_channels=True),
    EncoderSetup("mae", "mae", {"preset": "tiny", "seed": 0},
                 "bioimage_embed-style masked autoencoder ViT over the run's stains", takes_channels=True),
    EncoderSetup("subcell", "subcell", {"seed": 0},
                 "SubCell ViT-B/16 + attention pooling (set encoder_options.subcell.encoder_checkpoint to the "
                 "published weights); localization probabilities as side outputs"),
    EncoderSetup("shape_embed", "shape_embed", {"seed": 0},
                 "ShapeEmbed: cell-contour distance matrices -> shift/reflection-invariant shape embedding"),
)
"""Encoders a run config can name; `RunConfig.encoders` picks which ones the graph embeds with."""


def timm_setup(name: str) -> EncoderSetup:
    """The setup of `timm:<model_name>`: registered as `timm_<model_name>` (non-alphanumerics -> `_`)."""
    model = name[len(TIMM_PREFIX):]
    if not model:
        raise KeyError(f"{name!r}: name a timm model after 'timm:', e.g. timm:resnet18")
    registered = "timm_" + re.sub(r"[^A-Za-z0-9_]", "_", model)
    return EncoderSetup(registered, "timm", {"model_name": model},
                        f"timm backbone {model} as a feature extractor (weights only from a local checkpoint file)",
                        takes_channels=True)


def encoder_options(config: RunConfig, setup: EncoderSetup) -> dict[str, Any]:
    """The run config's `encoder_options` for `setup` (keyed by its name, or as `timm:<model>`)."""
    for key, options in config.encoder_options.items():
        if key == setup.name or (key.startswith(TIMM_PREFIX) and timm_setup(key).name == setup.name):
            return dict(options)
    return {}


def encoder_setups(names: Sequence[str]) -> list[EncoderSetup]:
    """The encoder setups selected by name: `DEFAULT_ENCODERS` names and `timm:<model_name>`."""
    known = {e.name: e for e in DEFAULT_ENCODERS}
    unknown = [n for n in names if n not in known and not n.startswith(TIMM_PREFIX)]
    if unknown:
        raise KeyError(f"unknown encoders {unknown}; known: {sorted(known)} or timm:<model_name>")
    return [timm_setup(n) if n.startswith(TIMM_PREFIX) else known[n] for n in names]

