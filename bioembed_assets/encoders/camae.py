"""CA-MAE / OpenPhenom: a channel-agnostic ViT encoder in plain torch, state-dict compatible with OpenPhenom.

Written from the architecture description in `reference/openphenom.md` (no upstream code). Parameter
names equal OpenPhenom's `encoder.vit_backbone.*` keys without that prefix. Each channel is cut into
patches by one shared 1-channel conv; tokens are channel-major (all patches of channel 0, then
channel 1, ...); a frozen 2-D sin-cos position table is tiled per channel; there is no channel
embedding, so the pooled embedding does not depend on channel order. Blocks are timm-style
`ParallelScalingBlock`s with the *legacy* (timm <= 1.0.24) MLP-bias placement OpenPhenom was trained with.
The decoder, the MAE objective and reconstruction live in `camae_decoder.py`; an encoder may carry one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

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
    scale_to_0_255,
    without_autograd,
)
from bioembed_assets.encoders.checkpoints import load_openphenom_backbone, strip_wrapper_prefixes

if TYPE_CHECKING:
    from bioembed_assets.encoders.camae_decoder import CAMAEModel

LN_EPS = 1e-6
INSTANCE_NORM_EPS = 1e-5

PRESETS: dict[str, dict[str, Any]] = {
    # OpenPhenom's encoder (22,459,776 elements incl. the frozen pos_embed of 1,081,728).
    "vit_small_patch16_256": dict(
        img_size=256, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, max_in_chans=11
    ),
    # Small CPU config for the demo and tests (~6000 5-channel 64x64 crops in ~10 s on 2 CPU cores).
    "demo": dict(img_size=64, patch_size=16, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0, max_in_chans=11),
}


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, temperature: float = 10000.0) -> torch.Tensor:
    """(grid_size**2, embed_dim) table: per token [sin(h w_k), cos(h w_k), sin(w w_k), cos(w w_k)], w_k = T^(-k/(D/4)).

    Tokens are row-major over the (h, w) grid.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for 2-D sin-cos positions, got {embed_dim}")
    n_freq = embed_dim // 4
    omega = temperature ** (-torch.arange(n_freq, dtype=torch.float64) / n_freq)
    h, w = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float64), torch.arange(grid_size, dtype=torch.float64), indexing="ij"
    )
    h_out = h.reshape(-1, 1) * omega  # (G*G, D/4)
    w_out = w.reshape(-1, 1) * omega
    table = torch.cat([h_out.sin(), h_out.cos(), w_out.sin(), w_out.cos()], dim=1)
    return table.float()


def self_standardize(images: torch.Tensor) -> torch.Tensor:
    """0-255 images (N, C, H, W) -> /255, then per-image per-channel instance norm (biased variance,
    eps 1e-5), in float32 even under autocast: OpenPhenom's input normalization."""
    with torch.autocast(images.device.type, enabled=False):
        return F.instance_norm(images.float() / 255.0, eps=INSTANCE_NORM_EPS)


class PatchEmbed(nn.Module):
    """One 1-channel conv shared by every channel; returns channel-major tokens (B, C*G*G, D)."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj(x.reshape(b * c, 1, h, w))  # (B*C, D, G, G)
        return y.flatten(2).transpose(1, 2).reshape(b, -1, y.shape[1])


class LayerScale(nn.Module):
    """Per-feature learned scale `gamma`."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ParallelScalingBlock(nn.Module):
    """Attention and MLP in parallel from one fused input projection (rows [mlp | q | k | v]).

    Legacy bias placement: the bias added to the fused projection is cat(zeros(3*dim), mlp_bias),
    i.e. aligned to the *end* of the [mlp | q | k | v] output, not to the MLP rows. OpenPhenom's
    weights were trained this way.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, init_values: float = 1e-4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.mlp_hidden = int(dim * mlp_ratio)
        self.in_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.in_proj = nn.Linear(dim, self.mlp_hidden + 3 * dim, bias=False)
        self.mlp_bias = nn.Parameter(torch.zeros(self.mlp_hidden))
        self.q_norm = nn.LayerNorm(self.head_dim, eps=LN_EPS)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=LN_EPS)
        self.attn_out_proj = nn.Linear(dim, dim)
        self.mlp_out_proj = nn.Linear(self.mlp_hidden, dim)
        self.ls = LayerScale(dim, init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        bias = torch.cat([self.mlp_bias.new_zeros(3 * d), self.mlp_bias])
        y = F.linear(self.in_norm(x), self.in_proj.weight, bias)
        m, q, k, v = torch.split(y, [self.mlp_hidden, d, d, d], dim=-1)
        heads = (b, n, self.num_heads, self.head_dim)
        q = self.q_norm(q.reshape(heads)).transpose(1, 2)
        k = self.k_norm(k.reshape(heads)).transpose(1, 2)
        v = v.reshape(heads).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        out = self.attn_out_proj(attn) + self.mlp_out_proj(F.gelu(m))
        return x + self.ls(out)


class ChannelAgnosticViT(nn.Module):
    """OpenPhenom's encoder backbone; `predict` is the official embedding path."""

    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        max_in_chans: int = 11,
        init_values: float = 1e-4,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.max_in_chans, self.init_values = max_in_chans, init_values
        self.tokens_per_channel = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(self.make_pos_embed(), requires_grad=False)
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.blocks = nn.ModuleList(
            ParallelScalingBlock(embed_dim, num_heads, mlp_ratio, init_values) for _ in range(depth)
        )
        self.fc_norm = nn.LayerNorm(embed_dim, eps=LN_EPS)

    def make_pos_embed(self) -> torch.Tensor:
        """The frozen (1, 1 + max_in_chans*G*G, D) table: a zero cls row, then the 2-D sin-cos tiled per channel."""
        table = sincos_pos_embed_2d(self.embed_dim, self.img_size // self.patch_size)
        return torch.cat([torch.zeros(1, self.embed_dim), table.repeat(self.max_in_chans, 1)])[None]

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic timm-style random init: normal(0, 0.02) weights, zero biases, LayerScale = init_values."""
        g = torch.Generator().manual_seed(seed)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                # timm's trunc_normal_(std=.02) cuts at +-2 absolute (100 sigma): in effect a plain normal.
                m.weight.copy_(torch.randn(m.weight.shape, generator=g).mul_(0.02))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, ParallelScalingBlock):
                m.mlp_bias.zero_()
            elif isinstance(m, LayerScale):
                m.gamma.fill_(self.init_values)
        self.cls_token.copy_(torch.randn(self.cls_token.shape, generator=g) * 1e-6)
        self.pos_embed.copy_(self.make_pos_embed())

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless x is (N, C, img_size, img_size) with 1 <= C <= max_in_chans."""
        if x.ndim != 4:
            raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
        _, c, h, w = x.shape
        if h != self.img_size or w != self.img_size:
            raise ValueError(
                f"this encoder takes {self.img_size}x{self.img_size} crops, got {h}x{w} "
                "(positions are laid out for that grid; crop or resize first)"
            )
        if not 1 <= c <= self.max_in_chans:
            raise ValueError(f"this encoder takes 1 to {self.max_in_chans} channels, got {c}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized images (N, C, H, W) -> tokens (N, 1 + C*G*G, D) after the blocks (no final norm)."""
        self.check_input(x)
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.pos_embed[:, : tokens.shape[1]]
        for block in self.blocks:
            tokens = block(tokens)
        return tokens

    def predict(self, x: torch.Tensor, channelwise: bool = False) -> torch.Tensor:
        """Images (N, C, H, W) in 0-255 units -> (N, D), or (N, C*D) per-channel means with `channelwise`.

        Steps: /255, per-image per-channel instance norm (biased variance, eps 1e-5), blocks,
        mean of the patch tokens (cls and fc_norm unused). Call `eval()` first.
        """
        self.check_input(x)
        x = self_standardize(x)
        patches = self.forward_features(x)[:, 1:]
        if not channelwise:
            return patches.mean(dim=1)
        n, c = x.shape[:2]
        return patches.reshape(n, c, self.tokens_per_channel, -1).mean(dim=2).reshape(n, -1)

    def forward(self, x: torch.Tensor, channelwise: bool = False) -> torch.Tensor:
        return self.predict(x, channelwise)


def to_0_255(images: np.ndarray) -> np.ndarray:
    """Raw crops -> float32 in 0-255 units (`scale_to_0_255` on host arrays)."""
    return scale_to_0_255(torch.from_numpy(np.ascontiguousarray(images))).numpy()


class CAMAEEncoder(TensorEncoderMixin):
    """`Encoder` adapter around a `ChannelAgnosticViT`; `embed` runs the official `predict` path.

    Masks are ignored (whole crops are embedded). With `channelwise`, `embed` returns the per-channel
    embeddings concatenated (B, num_channels * D), so the channel count is fixed at build time.
    An encoder may carry its MAE decoder (`mae`, sharing `module`) for `reconstruct` and training.
    """

    def __init__(
        self,
        module: ChannelAgnosticViT,
        spec: EncoderSpec,
        channelwise: bool = False,
        mae: CAMAEModel | None = None,
    ) -> None:
        if mae is not None and mae.backbone is not module:
            raise ValueError("the MAE must wrap this encoder's own backbone module")
        self.module, self.spec, self.channelwise, self.mae = module.eval(), spec, channelwise, mae
        self.num_channels: int | None = spec.config.get("num_channels")

    @property
    def device(self) -> torch.device:
        return self.module.cls_token.device

    def embed_tensors(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """0-255 crops (B, C, H, W) on the device -> {EMBEDDING: (B, spec.embedding_dim)} (the `predict` path)."""
        if self.channelwise and images.ndim == 4 and images.shape[1] != self.num_channels:
            raise ValueError(f"channelwise encoder built for {self.num_channels} channels, got {images.shape[1]}")
        was_training = self.module.training
        try:
            with without_autograd():
                return {EMBEDDING: self.module.eval().predict(images, channelwise=self.channelwise)}
        finally:
            self.module.train(was_training)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Backbone keys (no prefix); with a decoder, the full OpenPhenom names (`encoder.vit_backbone.*`, ...)."""
        return (self.mae if self.mae is not None else self.module).state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> Any:
        """Strict load of backbone keys or full OpenPhenom names (a missing frozen pos_embed is regenerated).

        With a decoder, a state dict holding `decoder.*` keys must be a complete OpenPhenom-named
        checkpoint; one without them loads the backbone only (the decoder keeps its weights).
        Without a decoder, decoder and head keys are ignored.
        """
        if self.mae is not None and any(k.startswith("decoder.") for k in strip_wrapper_prefixes(state_dict)):
            from bioembed_assets.encoders.camae_decoder import load_openphenom_mae

            return load_openphenom_mae(state_dict, self.mae)
        return load_openphenom_backbone(state_dict, self.module)

    def to(self, device: str | torch.device) -> CAMAEEncoder:
        (self.mae if self.mae is not None else self.module).to(device)
        return self

    def reconstruct(
        self, images: np.ndarray, mask_channels: Sequence[int] = (), mask_ratio: float = 0.0, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """Crops (B, C, H, W) as `embed` takes them -> {"images", "target"} float32 and "mask" bool (B, C, H, W).

        See `CAMAEModel.reconstruct`: `mask_channels` are in-painted from the other channels, a random
        `mask_ratio` of the remaining tokens (drawn from `seed`) is hidden too; values are in
        self-standardized units.
        """
        if self.mae is None:
            raise RuntimeError(
                "this CA-MAE encoder has no decoder: build it with decoder='demo' or 'openphenom' "
                "(and load trained MAE weights), or train it via training_module()"
            )
        x = torch.from_numpy(to_0_255(np.asarray(images))).to(self.device)
        generator = torch.Generator().manual_seed(seed)
        was_training = self.mae.training
        try:
            with torch.inference_mode(), autocast(self.device):
                out = self.mae.eval().reconstruct(x, mask_channels, mask_ratio, generator)
        finally:
            self.mae.train(was_training)
        return {k: v.cpu().numpy() if k == "mask" else v.float().cpu().numpy() for k, v in out.items()}

    def training_module(self, classes: Sequence[str] | None = None) -> nn.Module:
        """A module whose `forward(images_0_255, labels)` returns {"loss", "mse_visible"} (labels ignored).

        It shares parameters with this encoder, so training it trains the encoder. Without a decoder,
        the default one for the preset is attached ("openphenom" for vit_small_patch16_256, else
        "demo"; widened to `num_channels` modalities if needed) and recorded in `spec.config["decoder"]`.
        The mask ratio is `spec.config.get("mask_ratio", 0.75)`.
        """
        from bioembed_assets.encoders.camae_decoder import DECODER_PRESETS, MAETrainingModule, attach_decoder

        if self.mae is None:
            config = self.spec.config
            name = "openphenom" if config.get("preset") == "vit_small_patch16_256" else "demo"
            decoder: str | dict[str, Any] = name
            if (config.get("num_channels") or 0) > DECODER_PRESETS[name]["num_modalities"]:
                decoder = {"preset": name, "num_modalities": config["num_channels"]}
            self.mae = attach_decoder(self.module, decoder, config.get("seed", 0))
            self.spec = dataclasses.replace(self.spec, config={**config, "decoder": decoder})
        return MAETrainingModule(self.mae, self.spec.config.get("mask_ratio", 0.75))


def build_camae_module(preset: str = "demo", seed: int = 0, **overrides: Any) -> ChannelAgnosticViT:
    """A randomly initialised `ChannelAgnosticViT` from a preset plus overrides, deterministic in `seed`."""
    if preset not in PRESETS:
        raise KeyError(f"unknown CA-MAE preset {preset!r}; known: {sorted(PRESETS)}")
    with torch.random.fork_rng(devices=[]):  # construction draws from the global RNG; leave it untouched
        module = ChannelAgnosticViT(**{**PRESETS[preset], **overrides})
    module.init_weights(seed)
    return module.eval()


@register_family("ca_mae")
def build_ca_mae(
    preset: str = "demo",
    channelwise: bool = False,
    seed: int = 0,
    num_channels: int | None = None,
    decoder: str | Mapping[str, Any] | None = None,
    mask_ratio: float | None = None,
    **overrides: Any,
) -> CAMAEEncoder:
    """Build a CA-MAE encoder (random weights from `seed`; load trained ones with `load_state_dict`).

    `overrides` change preset fields (img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio,
    max_in_chans, init_values). `channelwise=True` needs `num_channels`: the embedding is then
    (num_channels * embed_dim), one block per input channel in input order. `decoder` (a
    `DECODER_PRESETS` name or a dict of decoder args) attaches an MAE decoder, initialised from
    `seed + 1`; `mask_ratio` is the training mask ratio (default 0.75). `embed` is unaffected by both.
    """
    if channelwise and num_channels is None:
        raise ValueError("channelwise CA-MAE embeddings need num_channels (embedding_dim = num_channels * embed_dim)")
    module = build_camae_module(preset, seed, **overrides)
    if num_channels is not None and not 1 <= num_channels <= module.max_in_chans:
        raise ValueError(f"num_channels must be in 1..{module.max_in_chans}, got {num_channels}")
    config: dict[str, Any] = dict(preset=preset, channelwise=channelwise, seed=seed, **overrides)
    if num_channels is not None:
        config["num_channels"] = num_channels
    mae = None
    if decoder is not None:
        from bioembed_assets.encoders.camae_decoder import attach_decoder

        decoder = decoder if isinstance(decoder, str) else dict(decoder)
        mae = attach_decoder(module, decoder, seed)
        config["decoder"] = decoder
    if mask_ratio is not None:
        if not 0.0 < mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
        config["mask_ratio"] = mask_ratio
    dim = module.embed_dim * (num_channels if channelwise else 1)
    spec = EncoderSpec(
        family="ca_mae",
        embedding_dim=dim,
        input_size=module.img_size,
        channels=None,
        per_cell=True,
        trainable=True,
        config=config,
    )
    return CAMAEEncoder(module, spec, channelwise, mae)
