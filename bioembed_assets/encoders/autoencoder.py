"""bioimage_embed-style autoencoders trained on the user's crops: families "ae", "vae" and "beta_vae".

Written from the notes in `reference/seeds_systems.md` section 1 (no upstream code). bioimage_embed wraps
pythae models around ResNet18/50 encoders/decoders for 3-channel 224 px images; here the backbone is a
small plain conv net (default; trains on CPU) or a timm ResNet18/50 with a mirrored residual decoder,
for any fixed channel count (first conv built for C channels, or channels folded into the batch), with
a tunable latent size (pooled to L x L, projected to `latent_dim` channels). See `Autoencoder`.

Input normalization (both here and in `supervised.py`): crops in 0-255 units are divided by 255 and
standardized per crop and per channel (instance norm, eps 1e-5), as OpenPhenom does, so plates with
different intensity scales look alike. The autoencoders reconstruct that standardized image.

The embedding is the flattened latent: z for "ae", the posterior mean mu for "vae"/"beta_vae". The
VQ-VAE ("vqvae", `vqvae.py`) reuses this network.

This module also holds the helpers shared by the trainable families (`TrainableAdapter`,
`resolve_channels`, `channel_config`, `seeded`, `eval_mode`, `float32_region`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bioembed_assets.encoders.base import (
    EMBEDDING,
    EncoderSpec,
    TensorEncoderMixin,
    autocast,
    register_family,
    without_autograd,
)
from bioembed_assets.encoders.camae import self_standardize, to_0_255
from bioembed_assets.encoders.checkpoints import load_checked
from bioembed_assets.encoders.timm_compat import import_timm
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


class TrainableAdapter(TensorEncoderMixin):
    """`Encoder` adapter plumbing shared by the trainable families.

    Subclasses set `module` (the nn.Module with all weights) and `spec`, and implement `_features`
    (standardized float32 images on the module's device -> (B, D)), or `_tensor_outputs` for side outputs.
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

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        """0-255 crops -> the network's input (per-crop standardization; `self_standardize`)."""
        return self_standardize(x)

    def _tensor_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Standardized crops -> {EMBEDDING: (B, D), side outputs}."""
        return {EMBEDDING: self._features(x)}

    def embed_tensors(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """0-255 crops (B, C, H, W) on the device -> {EMBEDDING, side outputs} (masks are ignored)."""
        self.check_images(images.shape)
        with eval_mode(self.module), without_autograd():
            return self._tensor_outputs(self._standardize(images))

    def _run(self, images: np.ndarray, fn: Any, empty_shape: tuple[int, ...]) -> np.ndarray:
        """Check, convert and standardize crops, then `fn` in eval mode without autograd -> float32 numpy."""
        return self._run_all(images, lambda x: {"out": fn(x)}, {"out": empty_shape})["out"]

    def _run_all(
        self, images: np.ndarray, fn: Any, empty_shapes: dict[str, tuple[int, ...]]
    ) -> dict[str, np.ndarray]:
        """As `_run` for an `fn` returning {key: tensor (B, ...)}; `empty_shapes` gives each key's per-crop shape."""
        images = np.asarray(images)
        self.check_images(images.shape)
        if images.shape[0] == 0:
            return {k: np.zeros((0, *shape), dtype=np.float32) for k, shape in empty_shapes.items()}
        x = torch.from_numpy(to_0_255(images)).to(self.device)
        with eval_mode(self.module), torch.inference_mode():
            x = self._standardize(x)
            with autocast(self.device):
                out = fn(x)
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None) -> Any:
        """Strict load; `BioembedInputError` naming every missing, unexpected or mis-shaped key (and `path`)."""
        return load_checked(self.module, state_dict, path)

    def to(self, device: str | torch.device) -> TrainableAdapter:
        self.module.to(device)
        return self


# -- backbones -------------------------------------------------------------------------------------


def _norm(width: int) -> nn.GroupNorm:
    groups = next(g for g in (8, 4, 2, 1) if width % g == 0)
    return nn.GroupNorm(groups, width)


def _conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), _norm(c_out), nn.SiLU())


def _conv_widths(input_size: int, base_width: int) -> list[int]:
    """Stage widths of the plain conv net: doubling from `base_width`, capped at 8 * base_width."""
    n_stages = int(math.log2(input_size // BOTTLENECK_SIZE))
    return [min(base_width * 2 ** (i + 1), base_width * 8) for i in range(n_stages)]


def _conv_encoder(in_chans: int, input_size: int, base_width: int) -> tuple[nn.Sequential, int, int]:
    """Stride-2 conv stages down to 4x4 -> (encoder, feature width, feature grid side)."""
    enc: list[nn.Module] = [_conv_block(in_chans, base_width)]
    c = base_width
    for w in _conv_widths(input_size, base_width):
        enc += [_conv_block(c, w, stride=2), _conv_block(w, w)]
        c = w
    return nn.Sequential(*enc), c, BOTTLENECK_SIZE


def _conv_decoder(out_chans: int, input_size: int, base_width: int) -> nn.Sequential:
    """The conv encoder mirrored: nearest x2 upsampling + two conv blocks per stage, then a 3x3 conv."""
    widths = _conv_widths(input_size, base_width)
    c = widths[-1]
    dec: list[nn.Module] = []
    for w in [*reversed(widths[:-1]), base_width]:
        dec += [nn.Upsample(scale_factor=2, mode="nearest"), _conv_block(c, w), _conv_block(w, w)]
        c = w
    dec.append(nn.Conv2d(c, out_chans, 3, padding=1))
    return nn.Sequential(*dec)


RESNETS = {"resnet18": False, "resnet50": True}
"""The timm ResNet backbones -> whether their (and so the mirrored decoder's) blocks are bottlenecks."""
BACKBONES = ("conv", *RESNETS)
CHANNEL_MODES = ("stem", "batch")


def _resnet_encoder(name: str, in_chans: int) -> nn.Module:
    """A timm ResNet feature extractor (no pooling, no head, random weights: never downloaded)."""
    return import_timm().create_model(name, pretrained=False, num_classes=0, global_pool="", in_chans=in_chans)


class UpBlock(nn.Module):
    """Nearest upsampling by `scale`, then a residual block (two 3x3 convs, or 1x1-3x3-1x1 with `bottleneck`).

    GroupNorm and SiLU; the skip path is a 1x1 conv when the width changes.
    """

    def __init__(self, c_in: int, c_out: int, scale: int, bottleneck: bool) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=scale, mode="nearest") if scale > 1 else nn.Identity()
        if bottleneck:
            mid = max(c_out // 4, 8)
            layers: list[nn.Module] = [
                nn.Conv2d(c_in, mid, 1, bias=False), _norm(mid), nn.SiLU(),
                nn.Conv2d(mid, mid, 3, padding=1, bias=False), _norm(mid), nn.SiLU(),
                nn.Conv2d(mid, c_out, 1, bias=False), _norm(c_out),
            ]
        else:
            layers = [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), _norm(c_out), nn.SiLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), _norm(c_out),
            ]
        self.body = nn.Sequential(*layers)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        return F.silu(self.body(x) + self.skip(x))


def _resnet_decoder(feature_info: Sequence[dict[str, Any]], out_chans: int, bottleneck: bool) -> nn.Sequential:
    """The encoder's stages in reverse: one `UpBlock` per stage back to its width and resolution, a last
    one to full resolution at half the stem width, then a 3x3 conv to `out_chans`."""
    stages = [(int(f["num_chs"]), int(f["reduction"])) for f in feature_info]
    targets = [*reversed(stages[:-1]), (max(stages[0][0] // 2, 8), 1)]
    c, reduction = stages[-1]
    blocks: list[nn.Module] = []
    for width, red in targets:
        blocks.append(UpBlock(c, width, reduction // red, bottleneck))
        c, reduction = width, red
    blocks.append(nn.Conv2d(c, out_chans, 3, padding=1))
    return nn.Sequential(*blocks)


# -- the autoencoder network -----------------------------------------------------------------------


class Autoencoder(nn.Module):
    """Backbone encoder -> latent -> mirrored decoder, for any fixed channel count.

    * `backbone`: "conv" (plain stride-2 conv stages to a 4x4 map, GroupNorm; needs a power-of-two
      `input_size` >= 16) or "resnet18"/"resnet50" (timm, BatchNorm, stride 32: `input_size` a
      multiple of 32) with a mirrored residual decoder (GroupNorm, nearest upsampling).
    * latent (`latent_spatial`): None flattens the whole feature map into a Linear to `latent_dim`
      (the conv default, as before); an int L average-pools the feature map to L x L first. L = 1
      gives a flat (B, latent_dim) vector (Linear), L > 1 a (B, latent_dim, L, L) map (1x1 conv).
      The decoder expands back with a Linear (flat) or a 1x1 conv plus nearest resizing (map).
    * `channel_mode`: "stem" builds the first conv for C channels; "batch" folds the channels into
      the batch, (B, C, S, S) -> (B*C, 1, S, S), through a 1-channel net: every channel gets its own
      latent (concatenated in the embedding, channel-major) and is reconstructed by itself.
    `variational` adds a log-variance head (same shape as the mean).
    """

    def __init__(
        self,
        in_chans: int,
        latent_dim: int = 64,
        input_size: int = 64,
        base_width: int = 16,
        variational: bool = False,
        backbone: str = "conv",
        latent_spatial: int | None = None,
        channel_mode: str = "stem",
    ) -> None:
        super().__init__()
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {backbone!r}")
        if channel_mode not in CHANNEL_MODES:
            raise ValueError(f"channel_mode must be one of {list(CHANNEL_MODES)}, got {channel_mode!r}")
        if backbone == "conv":
            if base_width < 1:
                raise ValueError(f"base_width must be >= 1, got {base_width}")
            if input_size < 16 or input_size & (input_size - 1):
                raise ValueError(f"input_size must be a power of two >= 16, got {input_size}")
        elif input_size < 32 or input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32 for backbone {backbone!r}, got {input_size}")
        self.in_chans, self.latent_dim, self.input_size = in_chans, latent_dim, input_size
        self.variational, self.backbone, self.channel_mode = variational, backbone, channel_mode
        net_chans = 1 if channel_mode == "batch" else in_chans

        # Construction order (encoder, heads, decoder) fixes the random init: keep it.
        if backbone == "conv":
            self.encoder, width, grid = _conv_encoder(net_chans, input_size, base_width)
        else:
            self.encoder = _resnet_encoder(backbone, net_chans)
            width, grid = int(self.encoder.num_features), input_size // 32
        if latent_spatial is not None and not 1 <= latent_spatial <= grid:
            raise ValueError(
                f"latent_spatial must be None or in 1..{grid} (the {backbone} feature map is {grid}x{grid} "
                f"at input_size {input_size}), got {latent_spatial}"
            )
        self.bottleneck_width, self.grid, self.latent_spatial = width, grid, latent_spatial
        if self.spatial_latent:
            self.to_mu: nn.Module = nn.Conv2d(width, latent_dim, 1)
            self.to_logvar = nn.Conv2d(width, latent_dim, 1) if variational else None
            self.from_latent: nn.Module = nn.Conv2d(latent_dim, width, 1)
        else:
            flat = width * grid * grid if latent_spatial is None else width
            self.to_mu = nn.Linear(flat, latent_dim)
            self.to_logvar = nn.Linear(flat, latent_dim) if variational else None
            self.from_latent = nn.Linear(latent_dim, width * grid * grid)
        if backbone == "conv":
            self.decoder = _conv_decoder(net_chans, input_size, base_width)
        else:
            self.decoder = _resnet_decoder(self.encoder.feature_info, net_chans, RESNETS[backbone])

    @property
    def spatial_latent(self) -> bool:
        """Whether the latent is a (latent_dim, L, L) map rather than a flat vector."""
        return self.latent_spatial is not None and self.latent_spatial > 1

    @property
    def positions(self) -> list[str]:
        """Latent positions, in flattening order: per channel (batch mode) and grid cell (map latent)."""
        cells = [""]
        if self.spatial_latent:
            side = self.latent_spatial
            cells = [f"_y{i}x{j}" for i in range(side) for j in range(side)]
        return cells

    @property
    def latent_size(self) -> int:
        """Elements of one crop's flattened latent (all channels in batch mode)."""
        per = self.latent_dim * len(self.positions)
        return per * (self.in_chans if self.channel_mode == "batch" else 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Standardized images (B, C, S, S) -> (mu, logvar); leading dim B*C in batch mode; logvar None for an AE."""
        if self.channel_mode == "batch":
            x = x.reshape(-1, 1, *x.shape[2:])
        h = self.encoder(x)
        if self.latent_spatial is not None:
            h = F.adaptive_avg_pool2d(h, self.latent_spatial)
        if not self.spatial_latent:
            h = h.flatten(1)
        mu = self.to_mu(h)
        if self.to_logvar is None:
            return mu, None
        return mu, self.to_logvar(h).clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents as `encode` returns them -> reconstructions (B, C, S, S) in standardized units."""
        h = self.from_latent(z)
        if self.spatial_latent:
            if self.latent_spatial != self.grid:
                h = F.interpolate(h, size=(self.grid, self.grid), mode="nearest")
        else:
            h = h.reshape(z.shape[0], self.bottleneck_width, self.grid, self.grid)
        out = self.decoder(h)
        return out.reshape(-1, self.in_chans, *out.shape[2:]) if self.channel_mode == "batch" else out

    def flatten_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B or B*C, ...) -> one row per crop (B, latent_size), channel-major in batch mode."""
        rows = z.shape[0] // self.in_chans if self.channel_mode == "batch" else z.shape[0]
        return z.reshape(rows, -1)

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Standardized images -> (B, latent_size): the latent mean."""
        return self.flatten_latent(self.encode(x)[0])

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Standardized images -> reconstructions from the latent mean."""
        return self.decode(self.encode(x)[0])

    def forward(self, x: torch.Tensor, sample: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> (reconstruction, mu, logvar). With `sample` (VAE only) decode z = mu + sigma * eps."""
        mu, logvar = self.encode(x)
        z = mu
        if sample and logvar is not None:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


def reconstruction_logs(loss: torch.Tensor, recon_loss: torch.Tensor, mse: torch.Tensor) -> dict[str, torch.Tensor]:
    """bioimage_embed's logged losses: loss, recon_loss, variational_loss (= loss - recon_loss) and mse."""
    return {"loss": loss, "recon_loss": recon_loss, "variational_loss": loss - recon_loss, "mse": mse}


class AutoencoderObjective(nn.Module):
    """Training view of an autoencoder encoder (shares its parameters).

    forward(images 0-255 (B, C, S, S), labels ignored) -> `reconstruction_logs` plus "recon" (the
    earlier name of recon_loss, kept for existing runs) and, for the VAE, "kl".
    recon_loss = mse = MSE (mean over elements) between the reconstruction and the standardized input.
    kl = KL(q(z|x) || N(0, I)), summed over a crop's latent elements and averaged over the batch (>= 0).
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
                return {**reconstruction_logs(mse, mse, mse), "recon": mse}
            mu, logvar = mu.float(), logvar.float()
            terms = -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())
            kl = terms.reshape(x.shape[0], -1).sum(dim=1).mean()
            loss = mse + self.beta * kl / x[0].numel()
        return {**reconstruction_logs(loss, mse, mse), "recon": mse, "kl": kl}


def latent_feature_names(module: Autoencoder, stains: Sequence[str] | None, stem: str = "z", per_dim: bool = True
                         ) -> list[str]:
    """Column names of a flattened latent: [channel_]{stem}{k}[_y{i}x{j}] in `flatten_latent` order.

    Channel prefixes (batch mode) are the stain names, else ch0, ch1, ...; `per_dim=False` names one
    column per latent position (e.g. VQ code indices) instead of one per latent element.
    """
    channels = [""]
    if module.channel_mode == "batch":
        names = list(stains) if stains is not None else [f"ch{c}" for c in range(module.in_chans)]
        channels = [f"{n}_" for n in names]
    dims = [f"{stem}{k}" for k in range(module.latent_dim)] if per_dim else [stem]
    return [f"{c}{d}{p}" for c in channels for d in dims for p in module.positions]


class AutoencoderEncoder(TrainableAdapter):
    """`Encoder` adapter around an `Autoencoder`; the embedding is the flattened latent mean (B, latent_size)."""

    fixed_size = True

    def __init__(self, module: Autoencoder, spec: EncoderSpec, beta: float | None = None) -> None:
        self.module, self.spec, self.beta = module.eval(), spec, beta
        self.num_channels = module.in_chans

    @property
    def feature_names(self) -> list[str]:
        """Embedding column names (see `latent_feature_names`)."""
        return latent_feature_names(self.module, self.spec.channels)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.embedding(x)

    def training_module(self, classes: list[str] | None = None) -> nn.Module:
        """The loss module (labels and `classes` are not used: training is unsupervised)."""
        return AutoencoderObjective(self)

    def reconstruct(self, images: np.ndarray, mask_ratio: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
        """Crops (B, C, S, S) -> {"target": the standardized crops, "images": their reconstructions}, float32.

        The call every reconstructing family answers (see `training/run.py`); `mask_ratio` and `seed`
        only matter to masked autoencoders: an autoencoder sees the whole crop and decodes its latent
        mean, deterministically.
        """
        images = np.asarray(images)
        shape = tuple(images.shape[1:])
        return self._run_all(images, lambda x: {"target": x, "images": self.module.reconstruct(x)},
                             {"target": shape, "images": shape})


@dataclass(frozen=True)
class AutoencoderOptions:
    """The network options every autoencoder family (ae, vae, beta_vae, vqvae) takes.

    Fix the channels with `channels` (stain names, kept in `spec.channels`) or `num_channels`; neither
    means the five Cell Painting stains. `backbone` "conv" (default; `base_width` sets its widths,
    `input_size` a power of two >= 16), "resnet18" or "resnet50" (`input_size` a multiple of 32).
    `latent_spatial` and `channel_mode` as in `Autoencoder`; embedding_dim = latent_dim * L * L
    (L = latent_spatial, 1 if None) * C (batch mode only). Random weights come from `seed`.
    """

    channels: Sequence[str] | None = None
    num_channels: int | None = None
    latent_dim: int = 64
    input_size: int = 64
    base_width: int = 16
    backbone: str = "conv"
    latent_spatial: int | None = None
    channel_mode: str = "stem"
    seed: int = 0

    def stains(self) -> tuple[tuple[str, ...] | None, int]:
        return resolve_channels(self.channels, self.num_channels)

    def network(self) -> dict[str, Any]:
        """`Autoencoder` keyword arguments (all but `in_chans` and `variational`)."""
        return dict(latent_dim=int(self.latent_dim), input_size=int(self.input_size), base_width=int(self.base_width),
                    backbone=self.backbone, channel_mode=self.channel_mode,
                    latent_spatial=None if self.latent_spatial is None else int(self.latent_spatial))

    def config(self) -> dict[str, Any]:
        """The spec config; options at their defaults are left out, so today's conv specs stay as they were."""
        stains, n = self.stains()
        config: dict[str, Any] = dict(
            **channel_config(stains, n), latent_dim=int(self.latent_dim), input_size=int(self.input_size),
            base_width=int(self.base_width), seed=int(self.seed),
        )
        if self.backbone != "conv":
            config["backbone"] = self.backbone
        if self.latent_spatial is not None:
            config["latent_spatial"] = int(self.latent_spatial)
        if self.channel_mode != "stem":
            config["channel_mode"] = self.channel_mode
        return config

    def spec(self, family: str, embedding_dim: int, **extra: Any) -> EncoderSpec:
        """The encoder spec of `family` built with these options (+ family-specific config `extra`)."""
        return EncoderSpec(family=family, embedding_dim=embedding_dim, input_size=int(self.input_size),
                           channels=self.stains()[0], per_cell=True, trainable=True,
                           config={**self.config(), **extra})


def _build(family: str, beta: float | None, options: dict[str, Any]) -> AutoencoderEncoder:
    """An AE (`beta` None) or (beta-)VAE of `family` from `AutoencoderOptions` keyword arguments."""
    opts = AutoencoderOptions(**options)
    with seeded(opts.seed):
        module = Autoencoder(opts.stains()[1], variational=beta is not None, **opts.network())
    extra = {} if beta is None else {"beta": float(beta)}
    return AutoencoderEncoder(module, opts.spec(family, module.latent_size, **extra), beta)


@register_family("ae")
def build_ae(**options: Any) -> AutoencoderEncoder:
    """A deterministic autoencoder with `AutoencoderOptions` (train it via `training_module()`)."""
    return _build("ae", None, options)


def _check_beta(beta: float) -> float:
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    return float(beta)


@register_family("vae")
def build_vae(beta: float = 1.0, **options: Any) -> AutoencoderEncoder:
    """A (beta-)VAE: `build_ae` plus a log-variance head; `beta` weights the KL term (1 = plain VAE)."""
    return _build("vae", _check_beta(beta), options)


@register_family("beta_vae")
def build_beta_vae(beta: float = 4.0, **options: Any) -> AutoencoderEncoder:
    """bioimage_embed's `*_beta_vae` by name: the "vae" family with beta 4 by default (pythae's
    BetaVAE defaults to beta 1, which is the plain VAE). Same network, loss and weights as "vae"."""
    return _build("beta_vae", _check_beta(beta), options)
