"""CA-MAE / OpenPhenom masked autoencoder: the channel-agnostic decoder, the MAE objective, channel in-painting.

Written from the description in `reference/openphenom.md` §1.5 (no upstream code). Module and parameter
names equal OpenPhenom's full checkpoint: `encoder.vit_backbone.*` (a `ChannelAgnosticViT`), `decoder.*`
(`CAMAEDecoder`), `encoder_decoder_proj.*` and `decoder_pred.*`. Upstream's `mae_modules.py` (trunk
`b3e68bb`, read for names only) makes `mlp`, `query_norm`, `context_norm` and `out_norm` attributes of the
decoder itself, siblings of `cross_attention` (keys `decoder.mlp.fc1.weight`, `decoder.query_norm.weight`,
...), not children of the cross-attention, whose only parameters are `q`, `kv` and `proj`; the
per-modality block stacks are `nn.Sequential`s, hence `decoder.decoders.{m}.{b}.*`.

Decoder flow: tokens + frozen sin-cos positions + each channel's modality token; per channel m, its
tokens (query_norm) cross-attend to all tokens (context_norm) with no residual, then a residual MLP on
out_norm, then channel m's own block stack; no final norm. Channel c is decoded by modality c, so a
decoder with M modalities takes 1..M channels (OpenPhenom: exactly 6, in its training order).
LayerNorm eps is 1e-5, as the published HF class builds it (its config.json says 1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bioembed_assets.encoders.camae import (
    ChannelAgnosticViT,
    build_camae_module,
    self_standardize,
    sincos_pos_embed_2d,
)
from bioembed_assets.encoders.checkpoints import load_checked, load_state_dict_file, strip_wrapper_prefixes

DECODER_LN_EPS = 1e-5

DECODER_PRESETS: dict[str, dict[str, Any]] = {
    # OpenPhenom's decoder (with the two heads ~155.6 M elements).
    "openphenom": dict(embed_dim=512, depth=8, num_heads=16, num_modalities=6, cross_attn_heads=8),
    "demo": dict(embed_dim=64, depth=1, num_heads=4, num_modalities=6, cross_attn_heads=4),
}


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused `qkv` projection (output rows [q | k | v], heads contiguous)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block (timm `Block` names; no LayerScale, no qk-norm)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=DECODER_LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=DECODER_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossAttention(nn.Module):
    """Queries `x` attend to `context`; `q` and `kv` without bias, `proj` with bias."""

    def __init__(self, dim: int, num_heads: int = 8) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by cross_attn_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        hd = d // self.num_heads
        q = self.q(x).reshape(b, n, self.num_heads, hd).transpose(1, 2)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, self.num_heads, hd).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class CAMAEDecoder(nn.Module):
    """OpenPhenom's channel-agnostic decoder: tokens (N, 1 + C*T, D) -> (N, 1 + C*T, D), C <= num_modalities."""

    def __init__(
        self,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_modalities: int = 6,
        tokens_per_modality: int = 256,
        cross_attn_heads: int = 8,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        grid = math.isqrt(tokens_per_modality)
        if grid * grid != tokens_per_modality:
            raise ValueError(f"tokens_per_modality must be a square grid, got {tokens_per_modality}")
        self.embed_dim, self.num_modalities, self.tokens_per_modality = embed_dim, num_modalities, tokens_per_modality
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.placeholder = nn.Parameter(torch.zeros(1, 1, embed_dim), requires_grad=False)  # stands in for cls
        self.pos_embeddings = nn.Parameter(self.make_pos_embeddings(), requires_grad=False)
        self.modality_tokens = nn.ParameterList(
            nn.Parameter(torch.zeros(1, 1, embed_dim)) for _ in range(num_modalities)
        )
        self.cross_attention = CrossAttention(embed_dim, cross_attn_heads)
        self.mlp = Mlp(embed_dim, int(embed_dim * mlp_ratio))
        self.decoders = nn.ModuleList(
            nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)))
            for _ in range(num_modalities)
        )
        self.context_norm = nn.LayerNorm(embed_dim, eps=DECODER_LN_EPS)
        self.query_norm = nn.LayerNorm(embed_dim, eps=DECODER_LN_EPS)
        self.out_norm = nn.LayerNorm(embed_dim, eps=DECODER_LN_EPS)

    def make_pos_embeddings(self) -> torch.Tensor:
        """The frozen (1, 1 + M*T, D) table: a zero cls row, then the 2-D sin-cos tiled per modality."""
        table = sincos_pos_embed_2d(self.embed_dim, math.isqrt(self.tokens_per_modality))
        return torch.cat([torch.zeros(1, self.embed_dim), table.repeat(self.num_modalities, 1)])[None]

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """timm-style: normal(0, 0.02) Linear weights, mask/modality tokens; zero biases; unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator).mul_(0.02))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        for p in (self.mask_token, *self.modality_tokens):
            p.copy_(torch.randn(p.shape, generator=generator).mul_(0.02))
        self.placeholder.zero_()
        self.pos_embeddings.copy_(self.make_pos_embeddings())

    def check_channels(self, channels: int) -> None:
        """Raise ValueError unless 1 <= channels <= num_modalities."""
        if not 1 <= channels <= self.num_modalities:
            raise ValueError(
                f"this decoder has {self.num_modalities} modalities and decodes 1 to {self.num_modalities} "
                f"channels, got {channels}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        t = self.tokens_per_modality
        c = (length - 1) // t
        if c * t + 1 != length:
            raise ValueError(f"expected 1 + C*{t} tokens, got {length}")
        self.check_channels(c)
        modality = torch.cat([self.placeholder, *(tok.expand(-1, t, -1) for tok in self.modality_tokens[:c])], 1)
        x = x + self.pos_embeddings[:, :length] + modality
        tokens = x[:, 1:]
        context = self.context_norm(tokens)
        outs = []
        for m in range(c):
            x_m = self.cross_attention(self.query_norm(tokens[:, m * t : (m + 1) * t]), context)
            x_m = x_m + self.mlp(self.out_norm(x_m))
            outs.append(self.decoders[m](x_m))
        return torch.cat([x[:, :1], *outs], dim=1)

    def forward_masked(self, x: torch.Tensor, ind_restore: torch.Tensor) -> torch.Tensor:
        """Visible tokens (N, 1 + K, D) in shuffled order -> decoded (N, 1 + L, D) in original order.

        Mask tokens fill the L - K hidden slots; `ind_restore` (N, L) un-shuffles.
        """
        n, k, d = x.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(n, ind_restore.shape[1] + 1 - k, -1)
        tokens = torch.cat([x[:, 1:], mask_tokens], dim=1)
        tokens = tokens.gather(1, ind_restore[..., None].expand(-1, -1, d))
        return self.forward(torch.cat([x[:, :1], tokens], dim=1))


class MAEEncoder(nn.Module):
    """Holds the backbone as `vit_backbone` (OpenPhenom's `encoder.vit_backbone.*` keys) and masks its tokens."""

    def __init__(self, vit_backbone: ChannelAgnosticViT) -> None:
        super().__init__()
        self.vit_backbone = vit_backbone

    def forward_masked(
        self, x: torch.Tensor, noise: torch.Tensor, len_keep: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalized images -> (latent (N, 1 + len_keep, D), mask (N, L) 1 = hidden, ind_restore (N, L)).

        Positions are added, tokens sorted by `noise` (N, L) and the first `len_keep` kept, cls
        prepended, then the blocks (no final norm).
        """
        vit = self.vit_backbone
        vit.check_input(x)
        tokens = vit.patch_embed(x)
        n, length, d = tokens.shape
        tokens = tokens + vit.pos_embed[:, 1 : 1 + length]
        shuffle = noise.argsort(dim=1, stable=True)
        ind_restore = shuffle.argsort(dim=1, stable=True)
        tokens = tokens.gather(1, shuffle[:, :len_keep, None].expand(-1, -1, d))
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(n, -1, -1)
        tokens = torch.cat([cls.to(tokens.dtype), tokens], dim=1)
        for block in vit.blocks:
            tokens = block(tokens)
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        return tokens, mask.gather(1, ind_restore), ind_restore


class CAMAEModel(nn.Module):
    """The full CA-MAE masked autoencoder with OpenPhenom's top-level names.

    Inputs of `forward_masked`/`patchify` are self-standardized images (see `normalize_input`);
    `loss` and `reconstruct` take 0-255 images and normalize them like `ChannelAgnosticViT.predict`.
    """

    def __init__(self, backbone: ChannelAgnosticViT, decoder: CAMAEDecoder) -> None:
        super().__init__()
        if decoder.tokens_per_modality != backbone.tokens_per_channel:
            raise ValueError(
                f"decoder tokens_per_modality {decoder.tokens_per_modality} != encoder tokens per channel "
                f"{backbone.tokens_per_channel}"
            )
        self.patch_size = backbone.patch_size
        self.encoder = MAEEncoder(backbone)
        self.decoder = decoder
        self.encoder_decoder_proj = nn.Linear(backbone.embed_dim, decoder.embed_dim)
        self.decoder_pred = nn.Linear(decoder.embed_dim, self.patch_size**2)

    @property
    def backbone(self) -> ChannelAgnosticViT:
        return self.encoder.vit_backbone

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init of the decoder and the two heads (the backbone is left as it is)."""
        g = torch.Generator().manual_seed(seed)
        self.decoder.init_weights(g)
        for head in (self.encoder_decoder_proj, self.decoder_pred):
            head.weight.copy_(torch.randn(head.weight.shape, generator=g).mul_(0.02))
            head.bias.zero_()

    @staticmethod
    def normalize_input(images: torch.Tensor) -> torch.Tensor:
        """0-255 images -> OpenPhenom's self-standardization (`camae.self_standardize`)."""
        return self_standardize(images)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C*T, p*p): channel-major, row-major patches, each patch row-major."""
        n, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5)
        return x.reshape(n, c * (h // p) * (w // p), p * p)

    def unpatchify(self, tokens: torch.Tensor, channels: int) -> torch.Tensor:
        """Inverse of `patchify`: (N, C*T, p*p) -> (N, C, H, W)."""
        n, p = tokens.shape[0], self.patch_size
        g = math.isqrt(tokens.shape[1] // channels)
        x = tokens.reshape(n, channels, g, g, p, p).permute(0, 1, 2, 4, 3, 5)
        return x.reshape(n, channels, g * p, g * p)

    def _run(
        self, x: torch.Tensor, noise: torch.Tensor, len_keep: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.decoder.check_channels(x.shape[1])
        latent, mask, ind_restore = self.encoder.forward_masked(x, noise, len_keep)
        decoded = self.decoder.forward_masked(self.encoder_decoder_proj(latent), ind_restore)
        return latent, self.decoder_pred(decoded)[:, 1:], mask

    def forward_masked(
        self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalized images -> (latent, pred (N, C*T, p*p), mask (N, C*T) 1 = masked).

        MAE random masking per sample over all C*T patch tokens: uniform noise, argsort, keep the
        first L - round(mask_ratio * L) (upstream truncates int(L * (1 - ratio)) instead).
        """
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        n, c = x.shape[:2]
        length = c * self.backbone.tokens_per_channel
        noise = _uniform((n, length), generator, x.device)
        return self._run(x, noise, length - round(mask_ratio * length))

    def forward(
        self, x: torch.Tensor, mask_ratio: float = 0.75, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.forward_masked(x, mask_ratio, generator)

    def loss(
        self, images: torch.Tensor, mask_ratio: float = 0.75, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """0-255 images (N, C, H, W) -> {"loss": MSE over masked patches, "mse_visible": detached}.

        The target is the self-standardized image (as `predict` normalizes it); the MSE is averaged
        over pixels per patch, then over masked patches. Computed in float32 (safe under autocast).
        OpenPhenom's optional Fourier-magnitude loss (weight 0.0 in its config) is not implemented.
        """
        x = self.normalize_input(images)
        _, pred, mask = self.forward_masked(x, mask_ratio, generator)
        if not mask.any():
            raise ValueError(f"mask_ratio {mask_ratio} masks no token; the MAE loss needs masked patches")
        per_token = (pred.float() - self.patchify(x)).pow(2).mean(dim=-1)
        loss = (per_token * mask).sum() / mask.sum()
        visible = per_token.detach()[mask == 0]
        return {"loss": loss, "mse_visible": visible.mean() if visible.numel() else per_token.new_tensor(math.nan)}

    def reconstruct(
        self,
        images: torch.Tensor,
        mask_channels: Sequence[int] = (),
        mask_ratio: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """0-255 images -> {"images": prediction, "target": standardized input, "mask": hidden pixels}.

        All tokens of `mask_channels` are hidden (channel in-painting); of the other tokens a random
        `mask_ratio` fraction is hidden too (drawn from `generator`; none are drawn when it is 0).
        "images" (N, C, H, W) is the decoder's prediction for every patch, in self-standardized units,
        like "target"; "mask" (N, C, H, W) is True where the encoder did not see the pixel.
        """
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        n, c = images.shape[:2]
        hidden = sorted(set(int(ch) for ch in mask_channels))
        if any(not 0 <= ch < c for ch in hidden):
            raise ValueError(f"mask_channels must be in 0..{c - 1}, got {list(mask_channels)}")
        t = self.backbone.tokens_per_channel
        x = self.normalize_input(images)
        hidden_tok = torch.zeros(c, t, device=x.device)
        hidden_tok[hidden] = 1.0
        hidden_tok = hidden_tok.reshape(1, c * t)
        if mask_ratio > 0:
            noise = _uniform((n, c * t), generator, x.device)
        else:  # keep the input order: no randomness needed
            noise = (torch.arange(c * t, device=x.device) / (c * t)).expand(n, -1)
        visible = (c - len(hidden)) * t
        _, pred, mask = self._run(x, noise + 2.0 * hidden_tok, visible - round(mask_ratio * visible))
        pixel_mask = mask.bool()[..., None].expand(-1, -1, self.patch_size**2)
        return {
            "images": self.unpatchify(pred.float(), c),
            "target": x,
            "mask": self.unpatchify(pixel_mask, c),
        }


class MAETrainingModule(nn.Module):
    """Training view of a `CAMAEModel` (shared parameters): `forward(images_0_255, labels)` -> loss dict."""

    def __init__(self, mae: CAMAEModel, mask_ratio: float = 0.75) -> None:
        super().__init__()
        if not 0.0 < mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
        self.mae, self.mask_ratio = mae, mask_ratio

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(B, C, H, W) float 0-255 images -> {"loss", "mse_visible"}; `labels` are ignored (self-supervised)."""
        return self.mae.loss(images, self.mask_ratio)


def _uniform(shape: tuple[int, int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0, 1) noise drawn on the generator's device (CPU generators work for CUDA models)."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def decoder_args(decoder: str | Mapping[str, Any]) -> dict[str, Any]:
    """A decoder preset name, or a dict (optionally with "preset" plus overrides) -> CAMAEDecoder kwargs."""
    if isinstance(decoder, str):
        decoder = {"preset": decoder}
    args = dict(decoder)
    preset = args.pop("preset", None)
    if preset is not None:
        if preset not in DECODER_PRESETS:
            raise KeyError(f"unknown CA-MAE decoder preset {preset!r}; known: {sorted(DECODER_PRESETS)}")
        args = {**DECODER_PRESETS[preset], **args}
    return args


def attach_decoder(
    backbone: ChannelAgnosticViT, decoder: str | Mapping[str, Any] = "demo", seed: int = 0
) -> CAMAEModel:
    """Wrap `backbone` (shared, not copied) in a `CAMAEModel` with a fresh decoder initialised from `seed + 1`."""
    args = {"tokens_per_modality": backbone.tokens_per_channel, **decoder_args(decoder)}
    with torch.random.fork_rng(devices=[]):  # construction draws from the global RNG; leave it untouched
        model = CAMAEModel(backbone, CAMAEDecoder(**args))
    model.init_weights(seed + 1)
    return model.to(backbone.cls_token.device).train(backbone.training)


def build_camae_model(
    encoder_preset: str = "demo",
    decoder_preset: str | Mapping[str, Any] = "demo",
    seed: int = 0,
    **overrides: Any,
) -> CAMAEModel:
    """A randomly initialised CA-MAE, deterministic in `seed` (the backbone equals `build_camae_module`'s).

    `overrides` go to the encoder, except `decoder_*` ones, which go (prefix stripped) to the decoder:
    e.g. `embed_dim=32, img_size=32, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2`.
    """
    dec = {k[len("decoder_") :]: v for k, v in overrides.items() if k.startswith("decoder_")}
    enc = {k: v for k, v in overrides.items() if not k.startswith("decoder_")}
    backbone = build_camae_module(encoder_preset, seed, **enc)
    return attach_decoder(backbone, {**decoder_args(decoder_preset), **dec}, seed).eval()


def load_openphenom_mae(
    source: str | Path | Mapping[str, torch.Tensor], model: CAMAEModel, path: str | Path | None = None
) -> CAMAEModel:
    """Strictly load a full OpenPhenom-named checkpoint (file or state dict) into `model`.

    Every `encoder.vit_backbone.*`, `decoder.*`, `encoder_decoder_proj.*` and `decoder_pred.*` key
    must be present with the model's shape (`module.`/`model.` wrappers are stripped); errors name
    the missing, unexpected and mis-shaped keys. The frozen `pos_embed`, `pos_embeddings` and
    `placeholder` are regenerated when absent.
    """
    if isinstance(source, (str, Path)):
        path = source
        source = load_state_dict_file(source)
    fill = {
        "encoder.vit_backbone.pos_embed": model.backbone.make_pos_embed,
        "decoder.pos_embeddings": model.decoder.make_pos_embeddings,
        "decoder.placeholder": lambda: torch.zeros_like(model.decoder.placeholder, device="cpu"),
    }
    load_checked(model, strip_wrapper_prefixes(source), path, fill)
    return model
