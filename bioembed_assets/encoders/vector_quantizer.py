"""Vector quantization (VQ-VAE, van den Oord et al. 2017) with a straight-through estimator, optionally EMA codebooks.

Written from the description in `reference/seeds_systems.md` §1.3 (no upstream code). Each latent *vector*
(the channel dimension of a (B, D, ...) tensor, or the rows of a (N, D) one) is snapped to its nearest
codebook entry by L2 distance: true vector quantization, not pythae's per-scalar quirk (§1.3), where a flat
latent made every coordinate its own 1-d code.

Losses use mean reduction (MSE over every element of the latent batch):
codebook = ||sg[z] - e||^2, commitment = ||z - sg[e]||^2,
loss = quantization_loss_factor * codebook + commitment_cost * commitment (defaults 1.0 and 0.25).
With `use_ema` the codebook gets no gradient: in training mode it follows exponential moving averages
(decay 0.99) of the code counts (Laplace-smoothed) and of the sums of the vectors assigned to each code,
and the loss is the commitment term alone. All quantizer math runs in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bioembed_assets.encoders.autoencoder import float32_region


@dataclass
class QuantizerOutput:
    """What `VectorQuantizer.forward` returns; `quantized` has the input's shape, `codes` drops its vector dim."""

    quantized: torch.Tensor
    """z + sg[e - z]: the codebook vectors forward, the identity backward (straight-through)."""
    codes: torch.Tensor
    """int64 index of each vector's code."""
    loss: torch.Tensor
    codebook_loss: torch.Tensor
    """MSE(e, sg[z]); in EMA mode detached (reported, not trained)."""
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


def code_usage(codes: torch.Tensor, num_embeddings: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity, usage) of a batch of code indices: exp(entropy of the code frequencies) and the
    fraction of the `num_embeddings` codes used at least once. One code for everything -> (1, 1/K)."""
    counts = torch.bincount(codes.reshape(-1), minlength=num_embeddings).float()
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -torch.special.xlogy(p, p).sum()
    return entropy.exp(), (counts > 0).float().mean()


class VectorQuantizer(nn.Module):
    """A codebook `codebook.weight` (num_embeddings, embedding_dim), init U(-1/K, 1/K).

    forward(z) takes (N, D) vectors or (B, D, *spatial) maps (D = embedding_dim) and returns a
    `QuantizerOutput`. With `use_ema`, buffers `ema_cluster_size` (K,) and `ema_weight` (K, D) hold the
    moving averages; they start at ones and at the initial codebook, so codebook == ema_weight /
    smoothed size from the first step and a code never used keeps its initial value.
    """

    def __init__(
        self,
        num_embeddings: int = 512,
        embedding_dim: int = 64,
        commitment_cost: float = 0.25,
        quantization_loss_factor: float = 1.0,
        use_ema: bool = False,
        decay: float = 0.99,
        epsilon: float = 1e-5,
    ) -> None:
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"num_embeddings and embedding_dim must be >= 1, got {num_embeddings}, {embedding_dim}")
        if commitment_cost < 0 or quantization_loss_factor < 0:
            raise ValueError(f"commitment_cost and quantization_loss_factor must be >= 0, got {commitment_cost}, "
                             f"{quantization_loss_factor}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.commitment_cost, self.quantization_loss_factor = float(commitment_cost), float(quantization_loss_factor)
        self.use_ema, self.decay, self.epsilon = bool(use_ema), float(decay), float(epsilon)
        self.codebook = nn.Embedding(self.num_embeddings, self.embedding_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / self.num_embeddings, 1.0 / self.num_embeddings)
        if self.use_ema:
            self.codebook.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.ones(self.num_embeddings))
            self.register_buffer("ema_weight", self.codebook.weight.detach().clone())

    def _vectors(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) or (B, D, *spatial) -> (M, D) rows, vector dim last."""
        if z.ndim < 2 or z.shape[1] != self.embedding_dim:
            raise ValueError(f"vector quantizer expects latents (N, {self.embedding_dim}) or "
                             f"(B, {self.embedding_dim}, ...), got shape {tuple(z.shape)}")
        return z.movedim(1, -1).reshape(-1, self.embedding_dim)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (L2) of each latent vector: shape z.shape without dim 1."""
        with float32_region(z.device):
            flat = self._vectors(z.float())
            e = self.codebook.weight.float()
            d = flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ e.t() + e.pow(2).sum(1)[None]
            codes = d.argmin(dim=1)
        return codes.reshape(z.shape[0], *z.shape[2:])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices (B, *spatial) -> codebook vectors (B, D, *spatial)."""
        return self.codebook(codes).movedim(-1, 1)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        onehot = F.one_hot(codes, self.num_embeddings).float()
        self.ema_cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1.0 - self.decay)
        self.ema_weight.mul_(self.decay).add_(onehot.t() @ flat, alpha=1.0 - self.decay)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
        self.codebook.weight.copy_(self.ema_weight / smoothed[:, None])

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with float32_region(z.device):
            z = z.float()
            codes = self.nearest(z)
            q = self.lookup(codes)
            codebook_loss = F.mse_loss(q, z.detach())
            commitment_loss = F.mse_loss(z, q.detach())
            if self.use_ema:
                loss = self.commitment_cost * commitment_loss
                codebook_loss = codebook_loss.detach()
                if self.training:
                    self._ema_update(self._vectors(z.detach()), codes.reshape(-1))
            else:
                loss = self.quantization_loss_factor * codebook_loss + self.commitment_cost * commitment_loss
            perplexity, usage = code_usage(codes, self.num_embeddings)
            quantized = z + (q - z).detach()
        return QuantizerOutput(quantized, codes, loss, codebook_loss, commitment_loss, perplexity, usage)
