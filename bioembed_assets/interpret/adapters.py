"""`CamClassifier`s for bioembed's differentiable encoders: supervised CNN (2-D/3-D), CA-MAE, timm ViTs.

Each adapter reuses the encoder's own embedding path, so a head on top sees exactly `embed`'s output:
supervised_cnn standardizes crops (`self_standardize`) and runs `module.backbone` (+ its `head`, or a
probe's); CA-MAE runs `ChannelAgnosticViT.predict` (which standardizes itself) and a linear head on the
pooled embedding. Layer names are those of the adapter's net: `backbone.layer4`, `backbone.blocks.3`, ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from bioembed_assets.encoders.camae import CAMAEEncoder, ChannelAgnosticViT, self_standardize
from bioembed_assets.encoders.supervised import SupervisedCNN, SupervisedEncoder
from bioembed_assets.encoders.timm_backbone import TimmBackbone
from bioembed_assets.interpret.gradcam import AttentionTap, CamClassifier, TokenLayout


class HeadOnFeatures(nn.Module):
    """`head(features(x))`: a (probe) head on an encoder's embedding path; `backbone` owns the weights."""

    def __init__(self, backbone: nn.Module, head: nn.Module, features: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self._features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._features(x))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _normalizer(net: SupervisedCNN) -> Callable[[torch.Tensor], torch.Tensor]:
    """The input transform of a supervised_cnn's embedding path: per-crop standardization, except for
    a `TimmBackbone` (the `timm` family), which applies its model's own mean/std to 0-255 crops."""
    return _identity if isinstance(net.backbone, TimmBackbone) else self_standardize


def _default_layer(backbone: nn.Module) -> str | None:
    """`backbone.layer4` for ResNet-style nets (ResNet3d, timm resnets), else None (found automatically)."""
    if hasattr(backbone, "layer4"):
        return "backbone.layer4"
    if isinstance(backbone, TimmBackbone) and hasattr(backbone.model, "layer4"):
        return "backbone.model.layer4"
    return None


def _check_head(head: nn.Module | None, dim: int, classes: Sequence[str] | None, what: str) -> list[str] | None:
    if isinstance(head, nn.Linear) and head.in_features != dim:
        raise ValueError(f"{what}: head takes {head.in_features} features, the embedding has {dim}")
    if classes is not None and isinstance(head, nn.Linear) and len(classes) != head.out_features:
        raise ValueError(f"{what}: {len(classes)} class names for a head with {head.out_features} outputs")
    return list(classes) if classes is not None else None


def embedding_module(encoder: object) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], Callable, int]:
    """(backbone module, features fn on normalized input, normalize fn, embedding dim) of an encoder."""
    if isinstance(encoder, SupervisedEncoder):
        net: SupervisedCNN = encoder.module
        return net.backbone, net.backbone, _normalizer(net), net.num_features  # as the encoder's `_run`
    if isinstance(encoder, CAMAEEncoder):
        vit = encoder.module
        return vit, lambda x: vit.predict(x, channelwise=encoder.channelwise), _identity, encoder.spec.embedding_dim
    raise TypeError(
        f"Grad-CAM needs a differentiable encoder (supervised_cnn, ca_mae), got {type(encoder).__name__}; "
        "for another torch classifier build a CamClassifier directly"
    )


def classifier_for(
    encoder: object, head: nn.Module | None = None, classes: Sequence[str] | None = None
) -> CamClassifier:
    """A `CamClassifier` for a supervised_cnn (its own head unless `head` is given) or a CA-MAE encoder
    (needs `head`, e.g. a probe from `probe.train_linear_probe`, over its pooled embedding)."""
    if isinstance(encoder, SupervisedEncoder):
        module = encoder.module
        if head is None:
            if module.head is None:
                raise ValueError(
                    "this supervised_cnn encoder has no classifier head: train it (training_module(classes)) "
                    "or pass a probe head (probe.fit_probe)"
                )
            net: nn.Module = module
            names = encoder.classes
        else:
            names = _check_head(head, module.num_features, classes, "supervised_cnn")
            net = HeadOnFeatures(module.backbone, head, module.backbone)
        return CamClassifier(
            net=net, normalize=_normalizer(module), classes=names, default_layer=_default_layer(module.backbone),
            check=encoder.check_images,
        )
    if isinstance(encoder, CAMAEEncoder):
        if head is None:
            raise ValueError("a CA-MAE encoder has no classifier: pass a head over its embedding (probe.fit_probe)")
        vit, features, normalize, dim = embedding_module(encoder)
        names = _check_head(head, dim, classes, "ca_mae")
        return camae_classifier(vit, HeadOnFeatures(vit, head, features), normalize, names, encoder)
    raise TypeError(
        f"Grad-CAM needs a differentiable encoder (supervised_cnn, ca_mae), got {type(encoder).__name__}; "
        "for another torch classifier build a CamClassifier directly (see vit_classifier)"
    )


def camae_classifier(
    vit: ChannelAgnosticViT, net: nn.Module, normalize: Callable, classes: list[str] | None, encoder: CAMAEEncoder
) -> CamClassifier:
    """CA-MAE taps: channel-major tokens after one CLS token; logits read the mean of the patch tokens."""

    def check(shape: Sequence[int]) -> None:
        if len(shape) != 4:
            raise ValueError(f"ca_mae encoder expects crops (B, C, H, W), got shape {tuple(shape)}")
        if encoder.channelwise and shape[1] != encoder.num_channels:
            raise ValueError(f"channelwise ca_mae encoder built for {encoder.num_channels} channels, got {shape[1]}")

    taps = tuple(AttentionTap(b.q_norm, b.k_norm, heads_first=False, scale=b.head_dim**-0.5) for b in vit.blocks)
    return CamClassifier(
        net=net, normalize=normalize, classes=classes, default_layer=f"backbone.blocks.{len(vit.blocks) - 1}",
        tokens=TokenLayout(prefix_tokens=1, patch_size=vit.patch_size), attention=taps, rollout_query="mean",
        check=check,
    )


def vit_classifier(
    vit: nn.Module,
    classes: Sequence[str] | None = None,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> CamClassifier:
    """A `CamClassifier` for a timm `VisionTransformer` with a classification head (input standardized
    as bioembed's encoders do unless `normalize` is given).

    Default layer: the last block's output for mean-pooled ViTs; for CLS-pooled ones the last block's
    `norm1` (its patch tokens reach the CLS token only through that block's attention).
    """
    blocks = getattr(vit, "blocks", None)
    if blocks is None or not hasattr(vit, "patch_embed") or not hasattr(vit, "num_prefix_tokens"):
        raise TypeError(f"expected a timm VisionTransformer, got {type(vit).__name__}")
    if getattr(vit, "num_classes", 0) < 1:
        raise ValueError("this ViT has no classification head (num_classes=0)")
    for i, b in enumerate(blocks):
        attn = getattr(b, "attn", None)
        if not all(hasattr(attn, a) for a in ("q_norm", "k_norm", "scale")):
            raise TypeError(f"block {i} attention {type(attn).__name__} is not timm's Attention (q_norm/k_norm/scale)")
    cls_pooled = getattr(vit, "global_pool", "token") == "token"
    last = len(blocks) - 1
    patch = vit.patch_embed.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    taps = tuple(AttentionTap(b.attn.q_norm, b.attn.k_norm, True, float(b.attn.scale)) for b in blocks)
    return CamClassifier(
        net=vit, normalize=normalize or self_standardize, classes=list(classes) if classes else None,
        default_layer=f"blocks.{last}.norm1" if cls_pooled else f"blocks.{last}",
        tokens=TokenLayout(prefix_tokens=int(vit.num_prefix_tokens), patch_size=patch),
        attention=taps, rollout_query="cls" if cls_pooled else "mean",
    )
