"""A plain masked autoencoder ViT (He et al. 2022, Meta's MAE) for fixed channels: family "mae".

bioimage_embed ships copies of Meta's MAE code but cannot import them (`reference/seeds_systems.md` §1.2);
this is our own implementation of that model. Unlike the channel-agnostic CA-MAE (`camae.py`), one patch
embedding sees all C channels of a patch jointly, so the channel count and order are fixed at build time.
Parameter names follow Meta's `MaskedAutoencoderViT` layout (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.*`, `norm`, `decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks.*`, `decoder_norm`,
`decoder_pred`), built from timm's `PatchEmbed` and ViT `Block` (LayerNorm eps 1e-6, qkv bias); the fixed
2-D sin-cos positions are `camae.sincos_pos_embed_2d`.

Training: per crop a random `mask_ratio` (0.75) of the patches is hidden, the encoder sees the rest
(plus cls), the decoder predicts every patch; loss = MSE on the masked patches of the self-standardized
image (per-patch normalized target with `norm_pix_loss`). Patches are flattened Meta-style, channel last
(p, p, C). The embedding is the mean of the encoder's patch tokens after its final norm over the whole,
unmasked crop (`pool="mean"`, default; `"cls"` takes the cls token instead).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from bioembed_assets.encoders.autoencoder import (
    TrainableAdapter,
    channel_config,
    float32_region,
    resolve_channels,
    seeded,
    self_standardize,
)
from bioembed_assets.encoders.base import EncoderSpec, register_family
from bioembed_assets.encoders.camae import sincos_pos_embed_2d
from bioembed_assets.encoders.timm_compat import import_timm

LN_EPS = 1e-6
NORM_PIX_EPS = 1e-6
POOLS = ("mean", "cls")

PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized default: 64 px crops, 8 px patches (64 tokens), ~0.6 M parameters.
    "tiny": dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0,
                 decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4),
    "vit_small_patch16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                              decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
    # Meta's mae_vit_base_patch16_dec512d8b.
    "vit_base_patch16_dec512d8b": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                       mlp_ratio=4.0, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}


def _pos_table(dim: int, grid: int) -> torch.Tensor:
    """(1, 1 + grid**2, dim): a zero cls row, then the 2-D sin-cos table."""
    return torch.cat([torch.zeros(1, dim), sincos_pos_embed_2d(dim, grid)])[None]


class MaskedAutoencoderViT(nn.Module):
    """ViT encoder over all-channel patches + a light ViT decoder predicting every patch's pixels."""

    def __init__(
        self,
        in_chans: int,
        img_size: int = 64,
        patch_size: int = 8,
        embed_dim: int = 96,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        decoder_embed_dim: int = 64,
        decoder_depth: int = 2,
        decoder_num_heads: int = 4,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        for name, dim, heads in (("embed_dim", embed_dim, num_heads), ("decoder_embed_dim", decoder_embed_dim,
                                                                       decoder_num_heads)):
            if dim % 4 or dim % heads:
                raise ValueError(f"{name} must be divisible by 4 (sin-cos positions) and by its heads ({heads}), "
                                 f"got {dim}")
        timm = import_timm()
        block = functools.partial(timm.models.vision_transformer.Block, mlp_ratio=mlp_ratio, qkv_bias=True,
                                  norm_layer=functools.partial(nn.LayerNorm, eps=LN_EPS))
        self.in_chans, self.img_size, self.patch_size = in_chans, img_size, patch_size
        self.grid = img_size // patch_size
        self.norm_pix_loss = norm_pix_loss
        self.patch_embed = timm.layers.PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(_pos_table(embed_dim, self.grid), requires_grad=False)
        self.blocks = nn.ModuleList(block(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(_pos_table(decoder_embed_dim, self.grid), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(block(decoder_embed_dim, decoder_num_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=LN_EPS)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Meta's MAE init (from the global RNG): xavier-uniform Linear and patch weights, zero biases,
        unit LayerNorms, normal(0, 0.02) cls and mask tokens."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C): row-major patches, each flattened (p, p, C)."""
        n, c, p, g = x.shape[0], x.shape[1], self.patch_size, self.grid
        return x.reshape(n, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(n, g * g, p * p * c)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Inverse of `patchify`."""
        n, p, g, c = patches.shape[0], self.patch_size, self.grid, self.in_chans
        return patches.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, g * p, g * p)

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls.to(tokens.dtype), tokens], dim=1)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)

    def features(self, x: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """Standardized images (N, C, S, S) -> (N, embed_dim), nothing masked."""
        tokens = self._encode(self.patch_embed(x) + self.pos_embed[:, 1:])
        return tokens[:, 1:].mean(dim=1) if pool == "mean" else tokens[:, 0]

    def forward_encoder(
        self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (tokens (N, 1 + K, D) of the kept patches, mask (N, L) 1 = hidden, ids_restore (N, L)).

        Per crop, uniform noise ranks the patches; the first L - round(mask_ratio * L) are kept.
        """
        tokens = self.patch_embed(x) + self.pos_embed[:, 1:]
        n, length, d = tokens.shape
        keep = length - round(mask_ratio * length)
        where = generator.device if generator is not None else x.device
        noise = torch.rand((n, length), generator=generator, device=where).to(x.device)
        shuffle = noise.argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        tokens = tokens.gather(1, shuffle[:, :keep, None].expand(-1, -1, d))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        return self._encode(tokens), mask.gather(1, restore), restore

    def forward_decoder(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Kept tokens + ids_restore -> predicted pixels of every patch (N, L, p*p*C)."""
        x = self.decoder_embed(latent)
        n, kept, d = x.shape
        fill = self.mask_token.to(x.dtype).expand(n, restore.shape[1] + 1 - kept, -1)
        patches = torch.cat([x[:, 1:], fill], dim=1).gather(1, restore[..., None].expand(-1, -1, d))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(
        self, x: torch.Tensor, mask_ratio: float = 0.75, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardized images -> (prediction (N, L, p*p*C), mask (N, L))."""
        latent, mask, restore = self.forward_encoder(x, mask_ratio, generator)
        return self.forward_decoder(latent, restore), mask

    def target(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(patches, their mean, their std): the loss target is (patches - mean) / std with `norm_pix_loss`."""
        patches = self.patchify(x)
        if not self.norm_pix_loss:
            return patches, torch.zeros_like(patches[..., :1]), torch.ones_like(patches[..., :1])
        mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
        std = (var + NORM_PIX_EPS).sqrt()
        return (patches - mean) / std, mean, std

    def loss(self, x: torch.Tensor, mask_ratio: float = 0.75) -> dict[str, torch.Tensor]:
        """Standardized images -> {"loss": MSE over masked patches, "mse_visible": over the others (detached)}."""
        pred, mask = self(x, mask_ratio)
        with float32_region(x.device):
            target = self.target(x)[0]
            per_patch = (pred.float() - target).pow(2).mean(dim=-1)
            loss = (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
            visible = per_patch.detach()[mask == 0]
        return {"loss": loss, "mse_visible": visible.mean() if visible.numel() else loss.detach() * float("nan")}

    def reconstruct(
        self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Standardized images -> {"images": predicted pixels of every patch (un-normalized with
        `norm_pix_loss`), "target": x, "mask": 1 where the encoder did not see the pixel}."""
        pred, mask = self(x, mask_ratio, generator)
        _, mean, std = self.target(x)
        pixel_mask = mask[..., None].expand(-1, -1, self.patch_size**2 * self.in_chans)
        return {"images": self.unpatchify(pred.float() * std + mean), "target": x,
                "mask": self.unpatchify(pixel_mask)}


class MAEObjective(nn.Module):
    """Training view of a `ViTMAEEncoder` (shared parameters): forward(images 0-255, labels ignored) ->
    {"loss", "mse_visible"}; masks are drawn from the global RNG (the training loop seeds it)."""

    def __init__(self, encoder: ViTMAEEncoder) -> None:
        super().__init__()
        self.net = encoder.module
        self.mask_ratio = encoder.mask_ratio
        self._check = encoder.check_images

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self._check(images.shape)
        return self.net.loss(self_standardize(images), self.mask_ratio)


def _check_ratio(mask_ratio: float, training: bool = False) -> float:
    """A mask ratio in [0, 1) (some patches stay visible); in (0, 1) for training (some are masked)."""
    if not (0.0 < mask_ratio < 1.0 if training else 0.0 <= mask_ratio < 1.0):
        interval = "(0, 1)" if training else "[0, 1)"
        raise ValueError(f"mask_ratio must be in {interval}, got {mask_ratio}")
    return float(mask_ratio)


class ViTMAEEncoder(TrainableAdapter):
    """`Encoder` adapter around a `MaskedAutoencoderViT`; embeds the pooled encoder tokens (B, embed_dim)."""

    fixed_size = True

    def __init__(self, module: MaskedAutoencoderViT, spec: EncoderSpec) -> None:
        self.module, self.spec, self.num_channels = module.eval(), spec, module.in_chans
        self.mask_ratio = float(spec.config["mask_ratio"])
        self.pool = str(spec.config["pool"])

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.features(x, self.pool)

    def training_module(self, classes: list[str] | None = None) -> MAEObjective:
        """The masked-patch loss module (labels and `classes` are not used: training is self-supervised)."""
        return MAEObjective(self)

    def reconstruct(
        self, images: np.ndarray, mask_ratio: float | None = None, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """Crops -> {"images", "target"} float32 and "mask" bool (B, C, S, S), self-standardized units.

        A random `mask_ratio` (default: the training one) of the patches, drawn from `seed`, is hidden;
        "images" is the decoder's prediction for every patch.
        """
        ratio = self.mask_ratio if mask_ratio is None else _check_ratio(mask_ratio)
        images = np.asarray(images)
        shape = tuple(images.shape[1:])
        generator = torch.Generator().manual_seed(int(seed))
        out = self._run_all(images, lambda x: self.module.reconstruct(x, ratio, generator),
                            {"images": shape, "target": shape, "mask": shape})
        out["mask"] = out["mask"] > 0.5
        return out


@register_family("mae")
def build_mae(
    channels: Sequence[str] | None = None,
    num_channels: int | None = None,
    preset: str = "tiny",
    mask_ratio: float = 0.75,
    norm_pix_loss: bool = False,
    pool: str = "mean",
    seed: int = 0,
    **overrides: Any,
) -> ViTMAEEncoder:
    """A masked autoencoder ViT for fixed channels (random weights from `seed`; train via `training_module()`).

    Channels as in the autoencoders (`channels` stain names or `num_channels`; neither = the five Cell
    Painting stains). `preset` one of `PRESETS`; `overrides` change its fields (img_size = the crop side,
    patch_size, embed_dim, depth, num_heads, mlp_ratio, decoder_embed_dim, decoder_depth, decoder_num_heads).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown MAE preset {preset!r}; known: {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - set(PRESETS[preset]))
    if unknown:
        raise ValueError(f"unknown MAE options {unknown}; preset fields are {sorted(PRESETS[preset])}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {list(POOLS)}, got {pool!r}")
    stains, n = resolve_channels(channels, num_channels)
    args = {**PRESETS[preset], **overrides}
    with seeded(seed):
        module = MaskedAutoencoderViT(n, **args, norm_pix_loss=bool(norm_pix_loss))
    config: dict[str, Any] = dict(
        **channel_config(stains, n), preset=preset, mask_ratio=_check_ratio(mask_ratio, training=True),
        norm_pix_loss=bool(norm_pix_loss), pool=pool, seed=int(seed), **overrides,
    )
    spec = EncoderSpec(
        family="mae", embedding_dim=int(args["embed_dim"]), input_size=int(args["img_size"]), channels=stains,
        per_cell=True, trainable=True, config=config,
    )
    return ViTMAEEncoder(module, spec)
