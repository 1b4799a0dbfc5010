"""bioimage_embed-style autoencoders trained on the user's crops: families "ae" and "vae" (beta-VAE).

Written from the notes in `reference/seeds_systems.md` section 1 (no upstream code). bioimage_embed wraps
pythae models around ResNet encoders/decoders for 3-channel 224 px images; here a small plain-torch conv
encoder/decoder takes any fixed channel count and any power-of-two crop size, so it trains on CPU.

Input normalization (both here and in `supervised.py`): crops in 0-255 units are divided by 255 and
standardized per crop and per channel (instance norm, eps 1e-5), as OpenPhenom does, so plates with
different intensity scales look alike. The autoencoders reconstruct that standardized image.

The embedding is the latent code: z for "ae", the posterior mean mu for "vae".

This module also holds the helpers shared by the trainable families (`self_standardize`,
`TrainableAdapter`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bioembed_assets.encoders.base import EncoderSpec, autocast, register_family
from bioembed_assets.encoders.camae import self_standardize, to_0_255
from bioembed_assets.schema import CELL_PAINTING_CHANNELS

BOTTLENECK_SIZE = 4  # spatial side of the last encoder feature map
LOGVAR_RANGE = (-30.0, 20.0)


# -- shared helpers for trainable encoders ---------------------------------------------------------


@contextlib.contextmanager
def float32_region(device: torch.device) -> Iterator[None]:
    """Turn autocast off (if on) so the enclosed math runs in float32."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own train/eval flag afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the CPU RNG for module construction without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        yield


def resolve_channels(
    channels: Sequence[str] | None, num_channels: int | None
) -> tuple[tuple[str, ...] | None, int]:
    """(stain tuple or None, channel count) from the two ways of fixing the channels.

    Neither given -> the five Cell Painting stains (as the classical encoder defaults to).
    """
    if channels is None and num_channels is None:
        channels = CELL_PAINTING_CHANNELS
    if channels is not None:
        if isinstance(channels, str):
            raise ValueError(f"channels must be a list of stain names, got the string {channels!r}")
        stains = tuple(str(c) for c in channels)
        if not stains:
            raise ValueError("channels must name at least one stain, got []")
        if len(set(stains)) != len(stains):
            raise ValueError(f"channels must be distinct, got {list(stains)}")
        if num_channels is not None and int(num_channels) != len(stains):
            raise ValueError(f"num_channels={num_channels} does not match channels={list(stains)} ({len(stains)} stains)")
        return stains, len(stains)
    n = int(num_channels)  # type: ignore[arg-type]
    if n < 1:
        raise ValueError(f"num_channels must be >= 1, got {num_channels}")
    return None, n


def channel_config(stains: tuple[str, ...] | None, n: int) -> dict[str, Any]:
    """The config entry that rebuilds the channel setting: the stain list, else the count."""
    return {"channels": list(stains)} if stains is not None else {"num_channels": n}


class TrainableAdapter:
    """`Encoder` adapter plumbing shared by the trainable families.

    Subclasses set `module` (the nn.Module with all weights) and `spec`, and implement `_features`
    (standardized float32 images on the module's device -> (B, D)).
    """

    module: nn.Module
    spec: EncoderSpec
    num_channels: int
    fixed_size: bool = False  # whether crops must be exactly spec.input_size

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def describe_channels(self) -> str:
        if self.spec.channels is not None:
            return f"{self.num_channels} channels {list(self.spec.channels)}"
        return f"{self.num_channels} channels"

    def check_images(self, shape: Sequence[int]) -> None:
        """Raise ValueError naming expected vs got for a wrong rank, channel count or (if fixed) size."""
        family = self.spec.family
        if len(shape) != 4:
            raise ValueError(f"{family} encoder expects crops (B, C, H, W), got shape {tuple(shape)}")
        if shape[1] != self.num_channels:
            raise ValueError(f"{family} encoder expects {self.describe_channels()}, got {shape[1]} channels")
        size = self.spec.input_size
        if self.fixed_size and (shape[2] != size or shape[3] != size):
            raise ValueError(f"{family} encoder expects {size}x{size} crops, got {shape[2]}x{shape[3]} (resize first)")

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _run(self, images: np.ndarray, fn: Any, empty_shape: tuple[int, ...]) -> np.ndarray:
        """Check, convert and standardize crops, then `fn` in eval mode without autograd -> float32 numpy."""
        images = np.asarray(images)
        self.check_images(images.shape)
        if images.shape[0] == 0:
            return np.zeros((0, *empty_shape), dtype=np.float32)
        x = torch.from_numpy(to_0_255(images)).to(self.device)
        with eval_mode(self.module), torch.inference_mode():
            x = self_standardize(x)
            with autocast(self.device):
                out = fn(x)
        return out.float().cpu().numpy()

    def embed(self, images: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
        """Crops (B, C, H, W) uint8/uint16/float (0-255) -> float32 (B, spec.embedding_dim). Masks are ignored."""
        return self._run(images, self._features, (self.spec.embedding_dim,))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> Any:
        return self.module.load_state_dict(state_dict, strict=True)

    def to(self, device: str | torch.device) -> TrainableAdapter:
        self.module.to(device)
        return self


# -- the autoencoder network -----------------------------------------------------------------------


def _norm(width: int) -> nn.GroupNorm:
    groups = next(g for g in (8, 4, 2, 1) if width % g == 0)
    return nn.GroupNorm(groups, width)


def _conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), _norm(c_out), nn.SiLU())


class ConvAutoencoder(nn.Module):
    """Conv encoder (stride-2 stages down to 4x4) -> linear latent -> mirrored decoder (nearest upsampling).

    GroupNorm (no running statistics), so an embedding does not depend on the other crops in the
    batch and train/eval differ only in the VAE's sampling. `variational` adds a log-variance head.
    Widths double per stage from `base_width`, capped at 8 * base_width.
    """

    def __init__(
        self,
        in_chans: int,
        latent_dim: int = 64,
        input_size: int = 64,
        base_width: int = 16,
        variational: bool = False,
    ) -> None:
        super().__init__()
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        if base_width < 1:
            raise ValueError(f"base_width must be >= 1, got {base_width}")
        if input_size < 16 or input_size & (input_size - 1):
            raise ValueError(f"input_size must be a power of two >= 16, got {input_size}")
        self.in_chans, self.latent_dim, self.input_size = in_chans, latent_dim, input_size
        self.variational = variational
        n_stages = int(math.log2(input_size // BOTTLENECK_SIZE))
        widths = [min(base_width * 2 ** (i + 1), base_width * 8) for i in range(n_stages)]

        enc: list[nn.Module] = [_conv_block(in_chans, base_width)]
        c = base_width
        for w in widths:
            enc += [_conv_block(c, w, stride=2), _conv_block(w, w)]
            c = w
        self.encoder = nn.Sequential(*enc)
        self.bottleneck_width = c
        flat = c * BOTTLENECK_SIZE * BOTTLENECK_SIZE
        self.to_mu = nn.Linear(flat, latent_dim)
        self.to_logvar = nn.Linear(flat, latent_dim) if variational else None

        self.from_latent = nn.Linear(latent_dim, flat)
        dec: list[nn.Module] = []
        for w in [*reversed(widths[:-1]), base_width]:
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), _conv_block(c, w), _conv_block(w, w)]
            c = w
        dec.append(nn.Conv2d(c, in_chans, 3, padding=1))
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Standardized images (B, C, S, S) -> (mu, logvar); logvar is None for the plain AE."""
        h = self.encoder(x).flatten(1)
        mu = self.to_mu(h)
        if self.to_logvar is None:
            return mu, None
        return mu, self.to_logvar(h).clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(z).reshape(z.shape[0], self.bottleneck_width, BOTTLENECK_SIZE, BOTTLENECK_SIZE)
        return self.decoder(h)

    def forward(self, x: torch.Tensor, sample: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> (reconstruction, mu, logvar). With `sample` (VAE only) decode z = mu + sigma * eps."""
        mu, logvar = self.encode(x)
        z = mu
        if sample and logvar is not None:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


class AutoencoderObjective(nn.Module):
    """Training view of an autoencoder encoder (shares its parameters).

    forward(images 0-255 (B, C, S, S), labels ignored) -> {"loss", "recon"} (+ "kl" for the VAE).
    recon = MSE (mean over elements) between the reconstruction and the standardized input.
    kl = KL(q(z|x) || N(0, I)), summed over latent dims and averaged over the batch (always >= 0).
    VAE loss = recon + beta * kl / (C * S * S): the pythae / bioimage_embed ELBO (per-sample summed
    squared error + beta * KL) divided by the pixel count, so beta = 1 is the standard VAE and the loss
    scale matches the AE's. In training mode the VAE decodes a sample; in eval mode, the mean.
    """

    def __init__(self, encoder: AutoencoderEncoder) -> None:
        super().__init__()
        self.net = encoder.module
        self.beta = encoder.beta
        self._check = encoder.check_images

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self._check(images.shape)
        x = self_standardize(images)
        recon, mu, logvar = self.net(x, sample=self.training)
        with float32_region(x.device):
            mse = F.mse_loss(recon.float(), x)
            if logvar is None:
                return {"loss": mse, "recon": mse}
            mu, logvar = mu.float(), logvar.float()
            kl = (-0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()
            loss = mse + self.beta * kl / x[0].numel()
        return {"loss": loss, "recon": mse, "kl": kl}


class AutoencoderEncoder(TrainableAdapter):
    """`Encoder` adapter around a `ConvAutoencoder`; the embedding is the latent mean (B, latent_dim)."""

    fixed_size = True

    def __init__(self, module: ConvAutoencoder, spec: EncoderSpec, beta: float | None = None) -> None:
        self.module, self.spec, self.beta = module.eval(), spec, beta
        self.num_channels = module.in_chans

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.encode(x)[0]

    def training_module(self, classes: list[str] | None = None) -> AutoencoderObjective:
        """The loss module (labels and `classes` are not used: training is unsupervised)."""
        return AutoencoderObjective(self)

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """Crops -> float32 reconstructions of their *standardized* version (B, C, S, S), from the mean latent."""
        images = np.asarray(images)
        return self._run(images, lambda x: self.module.decode(self.module.encode(x)[0]), tuple(images.shape[1:]))


def _build(
    family: str,
    variational: bool,
    beta: float | None,
    channels: Sequence[str] | None,
    num_channels: int | None,
    latent_dim: int,
    input_size: int,
    base_width: int,
    seed: int,
) -> AutoencoderEncoder:
    stains, n = resolve_channels(channels, num_channels)
    with seeded(seed):
        module = ConvAutoencoder(n, int(latent_dim), int(input_size), int(base_width), variational)
    config: dict[str, Any] = dict(
        **channel_config(stains, n), latent_dim=int(latent_dim), input_size=int(input_size),
        base_width=int(base_width), seed=int(seed),
    )
    if beta is not None:
        config["beta"] = float(beta)
    spec = EncoderSpec(
        family=family, embedding_dim=int(latent_dim), input_size=int(input_size), channels=stains,
        per_cell=True, trainable=True, config=config,
    )
    return AutoencoderEncoder(module, spec, beta)


@register_family("ae")
def build_ae(
    channels: Sequence[str] | None = None,
    num_channels: int | None = None,
    latent_dim: int = 64,
    input_size: int = 64,
    base_width: int = 16,
    seed: int = 0,
) -> AutoencoderEncoder:
    """A deterministic conv autoencoder (random weights from `seed`; train it via `training_module()`).

    Fix the channels with `channels` (stain names, kept in `spec.channels`) or `num_channels`; neither
    means the five Cell Painting stains. `input_size` is a power of two >= 16.
    """
    return _build("ae", False, None, channels, num_channels, latent_dim, input_size, base_width, seed)


@register_family("vae")
def build_vae(
    channels: Sequence[str] | None = None,
    num_channels: int | None = None,
    latent_dim: int = 64,
    input_size: int = 64,
    base_width: int = 16,
    beta: float = 1.0,
    seed: int = 0,
) -> AutoencoderEncoder:
    """A (beta-)VAE: as `build_ae` plus a log-variance head; `beta` weights the KL term (1 = plain VAE)."""
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    return _build("vae", True, beta, channels, num_channels, latent_dim, input_size, base_width, seed)
