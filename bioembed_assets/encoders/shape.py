"""ShapeEmbed: a cell-shape embedding learnt from contour distance matrices: family "shape_embed".

Written from the ShapeEmbed notes in `reference/seeds_systems.md` section 1.9 (no upstream code). Each
cell mask becomes its outer contour resampled to N points (`shape_features.mask_contours`), then the
N x N Euclidean distance matrix of those points: invariant to rotation and translation. The matrix is
divided by its Frobenius norm; the norm is kept as a size feature (here as log of the RMS pairwise
distance, ||D||_F / N, in pixels of the engine's `input_size` crops, so it does not depend on N). The
network sees the normalised matrix times N (mean square 1).

A start-point shift of the contour rolls the matrix along its diagonal; reversing the orientation
(equivalently, mirroring the cell) flips it. Two encoders:
- `invariant=True` (default): exactly invariant to both by construction. The matrix is read in its
  circulant view E[i, d] = D[i, i + d] (contour position x offset), so a start shift rolls only the
  position axis; circular 1-D convolutions run along the positions with the offsets as channels (each
  point described by its distances to all others), features are pooled over positions (mean and max)
  and averaged over the matrix and its flipped copy. Cheap: no N x N feature maps.
- `invariant=False`: a plain strided conv encoder on D (as ShapeEmbed's VAE), invariant only as far as
  the training augmentation (random cyclic roll and reflection) teaches it.

Training (`training_module`) is an autoencoder on the matrix: an MLP decoder's output is made symmetric,
non-negative and zero on the diagonal by construction (so ShapeEmbed's penalties for those are always
zero and not needed). For the invariant encoder the latent cannot know the start point, so the loss is
the squared error to the best-aligned copy over all N shifts x 2 orientations (computed with an FFT over
the position axis); the plain encoder uses the direct squared error. Training draws, per cell, a random
sub-spacing resampling phase, cyclic roll and reflection. The module declares `uses_masks = True` and
takes `forward(images, labels, masks)`: the training loop must pass the crop masks; images are not used.

The embedding is the latent (+ the log scale, `include_scale`). Empty masks embed as zeros, flagged by
the side output `shape_qc` (`ShapeEmbed_EmptyMask` = 1); `efd_order > 0` adds the normalised elliptic
Fourier descriptors as the side output `efd`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bioembed_assets.encoders.autoencoder import TrainableAdapter, eval_mode, float32_region, seeded
from bioembed_assets.encoders.base import EncoderSpec, register_family
from bioembed_assets.encoders.checkpoints import load_checked, load_state_dict_file, strip_wrapper_prefixes
from bioembed_assets.encoders.shape_features import (
    check_masks,
    distance_matrices,
    efd_feature_names,
    efd_features,
    frobenius_normalize,
    mask_contours,
)

BOTTLENECK = 4  # side of the plain encoder's smallest feature map
QC_OUTPUT, EFD_OUTPUT = "shape_qc", "efd"


# -- distance-matrix helpers ------------------------------------------------------------------------


def circulant_view(x: torch.Tensor) -> torch.Tensor:
    """(..., N, N) -> (..., N, N) with out[..., i, d] = x[..., i, (i + d) % N]."""
    n = x.shape[-1]
    idx = (torch.arange(n, device=x.device)[:, None] + torch.arange(n, device=x.device)[None, :]) % n
    return torch.gather(x, -1, idx.expand(*x.shape[:-2], n, n))


def orbit_sq_errors(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error (B, 2N) of `recon` (B, N, N) to `target` under every start shift and both orientations.

    Column k < N compares with target[i + k, j + k], column N + k with the flipped target rolled by k.
    Uses ||R - T'||^2 = ||R||^2 + ||T||^2 - 2 <R, T'> and a circular cross-correlation along the
    position axis of the circulant views, in float32.
    """
    with float32_region(recon.device):
        recon, target = recon.float(), target.float()
        n = recon.shape[-1]
        r = circulant_view(recon)
        r_hat = torch.fft.rfft(r, dim=1).conj()
        rr = recon.pow(2).sum((1, 2))[:, None]
        errors = []
        for t in (target, target.flip((-2, -1))):
            corr = torch.fft.irfft(r_hat * torch.fft.rfft(circulant_view(t), dim=1), n=n, dim=1).sum(2)
            errors.append(rr + t.pow(2).sum((1, 2))[:, None] - 2.0 * corr)
        return torch.cat(errors, dim=1).clamp_min(0.0) / (n * n)


def _norm(width: int) -> nn.GroupNorm:
    return nn.GroupNorm(next(g for g in (8, 4, 2, 1) if width % g == 0), width)


def _block(c_in: int, c_out: int, stride: int | tuple[int, int] = 1) -> nn.Sequential:
    """3x3 conv with circular padding (distance matrices are periodic in both indices), GroupNorm, SiLU."""
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, padding_mode="circular")
    return nn.Sequential(conv, _norm(c_out), nn.SiLU())


def _widths(n_points: int, base_width: int) -> list[int]:
    stages = int(math.log2(n_points // BOTTLENECK))
    return [min(base_width * 2 ** (i + 1), base_width * 8) for i in range(stages)]


# -- the network ------------------------------------------------------------------------------------


def _block1d(c_in: int, c_out: int, dilation: int) -> nn.Sequential:
    """Circular 1-D conv (kernel 3, `dilation`) along the contour positions, GroupNorm, SiLU."""
    conv = nn.Conv1d(c_in, c_out, 3, padding=dilation, dilation=dilation, padding_mode="circular")
    return nn.Sequential(conv, _norm(c_out), nn.SiLU())


class ShiftPooledEncoder(nn.Module):
    """Distance matrix (B, 1, N, N) -> latent, exactly invariant to start shift and orientation reversal.

    Each contour point i is described by its row of the circulant view, E[i, :] = distances to the
    points d steps ahead (d = 0..N-1): the N offsets are the channels of circular 1-D convs along the
    positions (no striding, dilations 1, 2, 4, ...), then mean and max over positions; the same is
    done for the flipped matrix and the two are averaged.
    """

    def __init__(self, n_points: int, latent_dim: int, base_width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = n_points
        for k, w in enumerate(_widths(n_points, base_width)):
            layers.append(_block1d(c, w, 2**k))
            c = w
        self.features = nn.Sequential(*layers)
        self.to_latent = nn.Linear(2 * c, latent_dim)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(circulant_view(x[:, 0]).transpose(1, 2))  # (B, C, N): channels x positions
        return torch.cat([h.mean(2), h.amax(2)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_latent(0.5 * (self._pooled(x) + self._pooled(x.flip((-2, -1)))))


class PlainEncoder(nn.Module):
    """Distance matrix (B, 1, N, N) -> latent with stride-2 circular convs down to 4 x 4 (not invariant)."""

    def __init__(self, n_points: int, latent_dim: int, base_width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [_block(1, base_width)]
        c = base_width
        for w in _widths(n_points, base_width):
            layers += [_block(c, w, stride=2), _block(w, w)]
            c = w
        self.features = nn.Sequential(*layers)
        self.to_latent = nn.Linear(c * BOTTLENECK * BOTTLENECK, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_latent(self.features(x).flatten(1))


class DistanceDecoder(nn.Module):
    """Latent -> distance matrix (B, 1, N, N): symmetric, non-negative, zero diagonal by construction.

    An MLP (two hidden layers of 32 * base_width units, SiLU) to the N x N entries, symmetrised, softplus.
    """

    def __init__(self, n_points: int, latent_dim: int, base_width: int) -> None:
        super().__init__()
        hidden = 32 * base_width
        self.n_points = n_points
        self.layers = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, n_points * n_points),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.layers(z).float().reshape(z.shape[0], 1, self.n_points, self.n_points)
        y = F.softplus(0.5 * (y + y.transpose(-2, -1)))
        return y * (1.0 - torch.eye(y.shape[-1], device=y.device, dtype=y.dtype))


class ShapeAutoencoder(nn.Module):
    """`encoder` (shift-pooled or plain) and `decoder` over (B, 1, N, N) normalised distance matrices."""

    def __init__(self, n_points: int, latent_dim: int, base_width: int, invariant: bool) -> None:
        super().__init__()
        if n_points < 16 or n_points & (n_points - 1):
            raise ValueError(f"n_points must be a power of two >= 16, got {n_points}")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        if base_width < 1:
            raise ValueError(f"base_width must be >= 1, got {base_width}")
        self.n_points, self.latent_dim, self.invariant = n_points, latent_dim, invariant
        encoder = ShiftPooledEncoder if invariant else PlainEncoder
        self.encoder = encoder(n_points, latent_dim, base_width)
        self.decoder = DistanceDecoder(n_points, latent_dim, base_width)


# -- contours -> network input ----------------------------------------------------------------------


def shape_inputs(contours: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Contours (B, N, 2) -> (distance matrices / RMS distance (B, 1, N, N) float32, log RMS distance (B,))."""
    normalized, frob = frobenius_normalize(distance_matrices(contours))
    n = contours.shape[1]
    x = torch.from_numpy((normalized * n).astype(np.float32))[:, None].to(device)
    log_scale = torch.from_numpy(np.log(np.maximum(frob / n, 1e-6)).astype(np.float32)).to(device)
    return x, log_scale


def augment_contours(contours: np.ndarray, shifts: np.ndarray, reverse: np.ndarray) -> np.ndarray:
    """Roll each contour (B, N, 2) by `shifts` (B,) points, then reverse the orientation where `reverse` (B,)."""
    n = contours.shape[1]
    idx = (np.arange(n)[None, :] + shifts[:, None]) % n
    idx = np.where(reverse[:, None], idx[:, ::-1], idx)
    return np.take_along_axis(contours, idx[:, :, None], axis=1)


class ShapeObjective(nn.Module):
    """Training view of a `ShapeEmbedEncoder` (shares its parameters); the loop passes the crop masks.

    forward(images (B, C, S, S) unused, labels unused, masks (B, S, S) bool) ->
    {"loss": reconstruction MSE, "recon": the same, "empty_masks": fraction of crops skipped as empty}.
    In training mode each contour gets a random resampling phase, cyclic roll and reflection.
    """

    uses_masks = True

    def __init__(self, encoder: ShapeEmbedEncoder) -> None:
        super().__init__()
        self.net = encoder.module

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, masks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if masks is None:
            raise ValueError("shape_embed training needs the crop masks: forward(images, labels, masks)")
        if masks.ndim != 3 or masks.shape[0] != images.shape[0]:
            raise ValueError(f"expected masks (B, S, S) with B = {images.shape[0]}, got shape {tuple(masks.shape)}")
        device = next(self.net.parameters()).device
        b, n = masks.shape[0], self.net.n_points
        phases = torch.rand(b).numpy() if self.training else None
        contours, empty = mask_contours(masks.detach().cpu().numpy(), n, allow_empty=True, phases=phases)
        if self.training:
            contours = augment_contours(contours, torch.randint(0, n, (b,)).numpy(), torch.rand(b).numpy() < 0.5)
        empty_fraction = torch.tensor(float(empty.mean()) if b else 0.0, device=device)
        if empty.all():
            zero = torch.zeros((), device=device, requires_grad=True)
            return {"loss": zero, "recon": zero.detach(), "empty_masks": empty_fraction}
        x, _ = shape_inputs(contours[~empty], device)
        recon = self.net.decoder(self.net.encoder(x))[:, 0]
        with float32_region(device):
            if self.net.invariant:
                mse = orbit_sq_errors(recon, x[:, 0]).amin(1).mean()
            else:
                mse = F.mse_loss(recon.float(), x[:, 0])
        return {"loss": mse, "recon": mse.detach(), "empty_masks": empty_fraction}


# -- the Encoder adapter ----------------------------------------------------------------------------


class ShapeEmbedEncoder(TrainableAdapter):
    """`Encoder` adapter: masks -> contours -> distance matrices -> latent (+ log scale). Images are not used."""

    embed_tensors = None  # contours are traced on the host: the engine calls `embed` with host arrays

    def __init__(self, module: ShapeAutoencoder, spec: EncoderSpec, include_scale: bool, efd_order: int) -> None:
        self.module, self.spec = module.eval(), spec
        self.include_scale, self.efd_order = include_scale, efd_order
        self.num_channels = 0  # channel-agnostic: any channel count, images ignored

    @property
    def feature_names(self) -> list[str]:
        names = [f"ShapeEmbed_{i}" for i in range(self.module.latent_dim)]
        return names + ["ShapeEmbed_LogScale"] if self.include_scale else names

    @property
    def output_names(self) -> dict[str, list[str]]:
        names = {QC_OUTPUT: ["ShapeEmbed_EmptyMask"]}
        if self.efd_order:
            names[EFD_OUTPUT] = efd_feature_names(self.efd_order)
        return names

    def _check(self, images: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        if masks is None:
            raise ValueError("shape_embed embeds cell masks: pass masks (B, H, W) with the crops")
        images, masks = np.asarray(images), check_masks(masks)
        if images.ndim != 4 or images.shape[:1] + images.shape[2:] != masks.shape:
            raise ValueError(f"shape_embed expects crops (B, C, H, W) and masks (B, H, W) of the same B, H, W; "
                             f"got crops {images.shape} and masks {masks.shape}")
        return masks

    def embed_masks(self, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masks (B, H, W) (cell or nucleus) -> (float32 (B, spec.embedding_dim), empty bool (B,)); empty -> zeros."""
        masks = check_masks(masks)
        out = np.zeros((masks.shape[0], self.spec.embedding_dim), dtype=np.float32)
        contours, empty = mask_contours(masks, self.module.n_points, allow_empty=True)
        if (~empty).any():
            x, log_scale = shape_inputs(contours[~empty], self.device)
            with eval_mode(self.module), torch.inference_mode(), float32_region(self.device):
                z = self.module.encoder(x)
                if self.include_scale:
                    z = torch.cat([z, log_scale[:, None]], dim=1)
            out[~empty] = z.float().cpu().numpy()
        return out, empty

    def embed(self, images: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
        """Crops (B, C, H, W) (only their shape is checked) and masks (B, H, W) -> float32 (B, D)."""
        return self.embed_masks(self._check(images, masks))[0]

    def embed_with_outputs(
        self, images: np.ndarray, masks: np.ndarray | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """As `embed`, plus the side outputs of `output_names` ((B, K) float32 each)."""
        masks = self._check(images, masks)
        embedding, empty = self.embed_masks(masks)
        outputs = {QC_OUTPUT: empty.astype(np.float32)[:, None]}
        if self.efd_order:
            outputs[EFD_OUTPUT] = efd_features(masks, self.efd_order)
        return embedding, outputs

    def reconstruct(
        self, images: np.ndarray, masks: np.ndarray | None = None, *, mask_ratio: float | None = None,
        seed: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Crops and masks -> {"target": normalised input matrices, "images": reconstructions}, (B, 1, N, N).

        The call every reconstructing family answers (`mask_ratio`/`seed` are ignored); without masks
        there is nothing to reconstruct (ValueError). Empty masks give all-zero matrices.
        """
        masks = self._check(images, masks)
        n = self.module.n_points
        target, recon = np.zeros((2, masks.shape[0], 1, n, n), dtype=np.float32)
        contours, empty = mask_contours(masks, n, allow_empty=True)
        if (~empty).any():
            x, _ = shape_inputs(contours[~empty], self.device)
            with eval_mode(self.module), torch.inference_mode(), float32_region(self.device):
                out = self.module.decoder(self.module.encoder(x))
            target[~empty], recon[~empty] = x.cpu().numpy(), out.float().cpu().numpy()
        return {"target": target, "images": recon}

    def training_module(self, classes: list[str] | None = None) -> ShapeObjective:
        """The autoencoder loss module (unsupervised: labels and `classes` are not used; masks are)."""
        return ShapeObjective(self)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None) -> Any:
        """Strict load; BioembedInputError naming every missing, unexpected or wrongly shaped key (and `path`)."""
        return load_checked(self.module, strip_wrapper_prefixes(state_dict), path)

    def load_file(self, path: str | Path) -> ShapeEmbedEncoder:
        """Load weights from a local safetensors / torch zip (`weights_only`) file."""
        self.load_state_dict(load_state_dict_file(path), path)
        return self


@register_family("shape_embed")
def build_shape_embed(
    n_points: int = 64,
    latent_dim: int = 32,
    base_width: int = 16,
    invariant: bool = True,
    include_scale: bool = True,
    efd_order: int = 0,
    input_size: int = 64,
    seed: int = 0,
) -> ShapeEmbedEncoder:
    """A ShapeEmbed encoder on cell masks (random weights from `seed`; train it via `training_module()`).

    `n_points` (power of two >= 16) contour points; `invariant` picks the exactly shift/reflection
    invariant encoder; `include_scale` appends the log RMS contour distance; `efd_order > 0` adds the EFD
    side output. `input_size` is the crop side the engine resizes crops and masks to.
    """
    if efd_order < 0:
        raise ValueError(f"efd_order must be >= 0, got {efd_order}")
    if input_size < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    with seeded(seed):
        module = ShapeAutoencoder(int(n_points), int(latent_dim), int(base_width), bool(invariant))
    config: dict[str, Any] = dict(
        n_points=int(n_points), latent_dim=int(latent_dim), base_width=int(base_width), invariant=bool(invariant),
        include_scale=bool(include_scale), efd_order=int(efd_order), input_size=int(input_size), seed=int(seed),
    )
    spec = EncoderSpec(
        family="shape_embed", embedding_dim=int(latent_dim) + int(bool(include_scale)), input_size=int(input_size),
        channels=None, per_cell=True, trainable=True, config=config,
    )
    return ShapeEmbedEncoder(module, spec, bool(include_scale), int(efd_order))
