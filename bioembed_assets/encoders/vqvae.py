"""bioimage_embed's VQ-VAE (`resnet18_vqvae`, `resnet50_vqvae`) as family "vqvae", with true vector quantization.

The network is `autoencoder.Autoencoder` (same backbones, latent sizes and channel modes) with a
`VectorQuantizer` between encoder and decoder: every latent vector (latent_dim channels; one per crop
with a flat latent, L*L per crop with `latent_spatial` L > 1, per channel in batch mode) is replaced by
its nearest code. With a flat latent a crop maps to one of `num_embeddings` codes; use
`latent_spatial` >= 2 for richer codes.

Embedding (`embed` option): "latent" (default) is the pre-quantization latent z, continuous, so similar
cells stay close even when they share a code; "quantized" is the code vectors the decoder sees (pythae's
`z`, bioimage_embed's embedding). Either way the code indices are a side output ("vq_codes").

Loss = MSE(recon, standardized input) + the quantizer loss (mean reductions, see `vector_quantizer.py`):
the Sonnet/legacy bioimage_embed VQ-VAE objective (pythae sums both terms per sample instead). Logged:
loss, recon_loss, variational_loss (= loss - recon_loss, the quantizer term), mse, codebook_loss,
commitment_loss, perplexity and codebook_usage (fraction of codes used in the batch).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bioembed_assets.encoders.autoencoder import (
    Autoencoder,
    AutoencoderEncoder,
    AutoencoderOptions,
    float32_region,
    latent_feature_names,
    reconstruction_logs,
    seeded,
    self_standardize,
)
from bioembed_assets.encoders.base import EMBEDDING, EncoderSpec, register_family
from bioembed_assets.encoders.vector_quantizer import QuantizerOutput, VectorQuantizer

EMBEDDINGS = ("latent", "quantized")


class VQAutoencoder(Autoencoder):
    """An `Autoencoder` (no variance head) whose latents pass through `quantizer` before decoding."""

    def __init__(self, in_chans: int, quantizer: dict[str, Any], **autoencoder: Any) -> None:
        super().__init__(in_chans, variational=False, **autoencoder)
        self.quantizer = VectorQuantizer(embedding_dim=self.latent_dim, **quantizer)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Standardized images -> (pre-quantization latent z, quantizer output)."""
        z = self.encode(x)[0]
        return z, self.quantizer(z)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:  # type: ignore[override]
        """Standardized images -> (reconstruction decoded from the quantized latent, quantizer output)."""
        vq = self.quantize(x)[1]
        return self.decode(vq.quantized), vq


class VQVAEObjective(nn.Module):
    """Training view of a `VQVAEEncoder` (shared parameters; EMA codebooks update in training mode only).

    forward(images 0-255 (B, C, S, S), labels ignored) -> the scalars listed in the module docstring.
    """

    def __init__(self, encoder: VQVAEEncoder) -> None:
        super().__init__()
        self.net: VQAutoencoder = encoder.module
        self._check = encoder.check_images

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self._check(images.shape)
        x = self_standardize(images)
        recon, vq = self.net(x)
        with float32_region(x.device):
            mse = F.mse_loss(recon.float(), x)
            loss = mse + vq.loss
        return {
            **reconstruction_logs(loss, mse, mse), "codebook_loss": vq.codebook_loss,
            "commitment_loss": vq.commitment_loss, "perplexity": vq.perplexity, "codebook_usage": vq.usage,
        }


class VQVAEEncoder(AutoencoderEncoder):
    """`Encoder` adapter around a `VQAutoencoder`; side output "vq_codes" = code index per latent vector."""

    module: VQAutoencoder

    def __init__(self, module: VQAutoencoder, spec: EncoderSpec, embed: str = "latent") -> None:
        super().__init__(module, spec)
        self.embed_kind = embed

    @property
    def output_names(self) -> dict[str, list[str]]:
        return {"vq_codes": latent_feature_names(self.module, self.spec.channels, stem="code", per_dim=False)}

    def _tensor_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Standardized crops -> {EMBEDDING: the flattened latent (or its quantization), "vq_codes": float code indices}."""
        z, vq = self.module.quantize(x)
        flat = self.module.flatten_latent
        emb = z if self.embed_kind == "latent" else vq.quantized
        return {EMBEDDING: flat(emb), "vq_codes": flat(vq.codes).float()}

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self._tensor_outputs(x)[EMBEDDING]

    def training_module(self, classes: list[str] | None = None) -> VQVAEObjective:
        """The loss module (labels and `classes` are not used: training is unsupervised)."""
        return VQVAEObjective(self)


@register_family("vqvae")
def build_vqvae(
    num_embeddings: int = 512,
    commitment_cost: float = 0.25,
    quantization_loss_factor: float = 1.0,
    use_ema: bool = False,
    decay: float = 0.99,
    embed: str = "latent",
    **options: Any,
) -> VQVAEEncoder:
    """A VQ-VAE: `build_ae`'s network and `AutoencoderOptions`, plus a codebook of `num_embeddings` vectors.

    `commitment_cost`, `quantization_loss_factor`, `use_ema` and `decay` as in `VectorQuantizer`
    (defaults: pythae's / bioimage_embed's). `embed` "latent" or "quantized" (see the module docstring).
    """
    if embed not in EMBEDDINGS:
        raise ValueError(f"embed must be one of {list(EMBEDDINGS)}, got {embed!r}")
    opts = AutoencoderOptions(**options)
    quantizer = dict(num_embeddings=int(num_embeddings), commitment_cost=float(commitment_cost),
                     quantization_loss_factor=float(quantization_loss_factor), use_ema=bool(use_ema),
                     decay=float(decay))
    with seeded(opts.seed):
        module = VQAutoencoder(opts.stains()[1], quantizer, **opts.network())
    return VQVAEEncoder(module, opts.spec("vqvae", module.latent_size, **quantizer, embed=embed), embed)
