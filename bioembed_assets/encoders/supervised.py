"""DeepProfiler-style weakly supervised CNN: family "supervised_cnn".

A timm backbone (built with `in_chans` = the channel count, `num_classes=0`, never pretrained, so
nothing is downloaded) is trained with a linear `head` to predict each cell's treatment; the profile
is the pooled backbone feature (B, backbone.num_features), not the logits. `logits` keeps the head's
output available for Grad-CAM(O). Input normalization as in `autoencoder.py`: /255, then per-crop
per-channel standardization.

The head exists once the treatment list is known: `training_module(classes)` creates it and stores
`classes` in `spec.config`, so `build_from_spec(spec, state_dict)` rebuilds backbone and head.

3-D (`spatial_dims=3`, as Grad-CAMO's z-stack classifier): timm has no 3-D models, so the backbone is
`ResNet3d`, a small own residual net (3x3x3 convs, GroupNorm, stages `layer1`..`layer4` as in timm's
resnets, so Grad-CAM's default layer is `backbone.layer4` in both cases). Stages halve H and W but keep
Z by default (z-stacks have few, thick slices); crops are (B, C, Z, H, W) with H == W, any Z.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bioembed_assets.encoders.autoencoder import (
    TrainableAdapter,
    _norm,
    channel_config,
    float32_region,
    resolve_channels,
    seeded,
    self_standardize,
)
from bioembed_assets.encoders.base import EncoderSpec, register_family
from bioembed_assets.encoders.timm_compat import import_timm

_RESERVED = ("pretrained", "num_classes", "in_chans")
BACKBONE_3D = "resnet3d"


class _Block3d(nn.Module):
    """Residual block: two 3x3x3 conv-GroupNorm layers (the first with `stride`), 1x1x1 shortcut if needed."""

    def __init__(self, c_in: int, c_out: int, stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(c_out)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if c_in != c_out or stride != (1, 1, 1):
            self.shortcut = nn.Sequential(nn.Conv3d(c_in, c_out, 1, stride=stride, bias=False), _norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(y)) + self.shortcut(x))


class ResNet3d(nn.Module):
    """Small 3-D ResNet for z-stacks (B, C, Z, H, W) -> pooled features (B, widths[-1]).

    `stem` (3x3x3 conv, stride 1), then four stages `layer1`..`layer4` of `blocks` blocks with widths
    `widths`; stages 2-4 halve H and W, and Z where `z_strides` says 2. GroupNorm (no running
    statistics), global average pooling over (Z, H, W).
    """

    def __init__(
        self,
        in_chans: int,
        widths: Sequence[int] = (16, 32, 64, 128),
        blocks: int = 1,
        z_strides: Sequence[int] = (1, 1, 1, 1),
    ) -> None:
        super().__init__()
        widths, z_strides = [int(w) for w in widths], [int(z) for z in z_strides]
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"resnet3d needs 4 positive stage widths, got widths={widths}")
        if len(z_strides) != 4 or not set(z_strides) <= {1, 2}:
            raise ValueError(f"resnet3d needs 4 z strides of 1 or 2, got z_strides={z_strides}")
        if blocks < 1:
            raise ValueError(f"resnet3d blocks (per stage) must be >= 1, got {blocks}")
        self.stem = nn.Sequential(nn.Conv3d(in_chans, widths[0], 3, padding=1, bias=False), _norm(widths[0]), nn.ReLU())
        c = widths[0]
        for i, (w, zs) in enumerate(zip(widths, z_strides)):
            stride = (zs, 1 if i == 0 else 2, 1 if i == 0 else 2)
            stage = [_Block3d(c, w, stride)] + [_Block3d(w, w, (1, 1, 1)) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            c = w
        self.global_pool = nn.AdaptiveAvgPool3d(1)
        self.num_features = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.global_pool(x).flatten(1)


class SupervisedCNN(nn.Module):
    """`backbone` (timm, or `ResNet3d` for z-stacks; pooled features) plus an optional linear class `head`."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_features = int(backbone.num_features)
        self.head: nn.Linear | None = None

    def set_head(self, num_classes: int) -> None:
        device = next(self.backbone.parameters()).device
        self.head = nn.Linear(self.num_features, num_classes).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardized images -> logits (B, num_classes)."""
        if self.head is None:
            raise RuntimeError("this classifier has no head yet; call training_module(classes) first")
        return self.head(self.backbone(x))


def _check_classes(classes: Sequence[Any]) -> list[str]:
    if isinstance(classes, str):
        raise ValueError(f"classes must be a list of treatment names, got the string {classes!r}")
    names = [str(c) for c in classes]
    if len(names) < 2:
        raise ValueError(f"a supervised classifier needs at least 2 classes (treatments), got {len(names)}: {names}")
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise ValueError(f"classes must be distinct, got duplicates {dupes}")
    return names


class ClassifierObjective(nn.Module):
    """Training view of a `SupervisedEncoder` (shares its parameters).

    forward(images 0-255 (B, C, H, W), or (B, C, Z, H, W) for a 3-D encoder, labels (B,) int64 indices
    into `classes`) ->
    {"loss": cross-entropy (with label smoothing), "accuracy": top-1 on the batch}, in float32.
    """

    def __init__(self, encoder: SupervisedEncoder, label_smoothing: float) -> None:
        super().__init__()
        self.net = encoder.module
        self.classes = list(encoder.classes)
        self.label_smoothing = float(label_smoothing)
        self._check = encoder.check_images

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """0-255 crops -> the network's input: per-crop, per-channel standardization."""
        return self_standardize(images)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check(images.shape)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"expected labels (B,) = ({images.shape[0]},), got shape {tuple(labels.shape)}")
        n = len(self.classes)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            got = f"{int(labels.min())}..{int(labels.max())}"
            raise ValueError(f"labels must be class indices in 0..{n - 1}, got {got}")
        logits = self.net(self.preprocess(images))
        with float32_region(images.device):
            logits = logits.float()
            labels = labels.long()
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "accuracy": accuracy}


class SupervisedEncoder(TrainableAdapter):
    """`Encoder` adapter around a `SupervisedCNN`; embeds the pooled backbone features."""

    def __init__(self, module: SupervisedCNN, spec: EncoderSpec, num_channels: int) -> None:
        self.module, self.spec, self.num_channels = module.eval(), spec, num_channels
        self.spatial_dims = int(spec.config.get("spatial_dims", 2))

    def check_images(self, shape: Sequence[int]) -> None:
        """As `TrainableAdapter.check_images`; a 3-D encoder takes z-stacks (B, C, Z, H, W)."""
        if self.spatial_dims == 2:
            return super().check_images(shape)
        if len(shape) != 5:
            raise ValueError(f"3-D supervised_cnn encoder expects z-stacks (B, C, Z, H, W), got shape {tuple(shape)}")
        super().check_images((shape[0], shape[1], *shape[3:]))

    @property
    def classes(self) -> list[str] | None:
        """The treatment names the head predicts (None before `training_module(classes)`)."""
        classes = self.spec.config.get("classes")
        return list(classes) if classes is not None else None

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.backbone(x)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Crops (B, C, H, W) (3-D: (B, C, Z, H, W)) -> float32 logits (B, len(classes)), columns in `classes` order."""
        if self.module.head is None:
            raise ValueError("this supervised_cnn encoder has no classifier head; call training_module(classes) first")
        return self._run(images, self.module, (self.module.head.out_features,))

    def training_module(self, classes: list[str] | None = None) -> ClassifierObjective:
        """The cross-entropy module over `classes` (default: the stored ones).

        Creates the head when there is none, or a fresh one when `classes` differ from the stored
        list, and records `classes` in `spec.config`.
        """
        if classes is None:
            if self.classes is None:
                raise ValueError("supervised_cnn needs the treatment classes: call training_module(classes=[...])")
            classes = self.classes
        names = _check_classes(classes)
        if self.module.head is None or names != self.classes:
            with seeded(int(self.spec.config.get("seed", 0)) + 1):
                self.module.set_head(len(names))
            self.spec = dataclasses.replace(self.spec, config={**self.spec.config, "classes": names})
        return ClassifierObjective(self, float(self.spec.config.get("label_smoothing", 0.0)))


@register_family("supervised_cnn")
def build_supervised_cnn(
    channels: Sequence[str] | None = None,
    num_channels: int | None = None,
    backbone: str | None = None,
    input_size: int = 64,
    classes: Sequence[str] | None = None,
    label_smoothing: float = 0.0,
    backbone_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    spatial_dims: int = 2,
) -> SupervisedEncoder:
    """A timm `backbone` classifier for fixed channels (random weights from `seed`, never downloaded).

    Channels as in the autoencoders (`channels` stain names or `num_channels`; neither = the five Cell
    Painting stains). `input_size` is the crop side the engine resizes to (the pooled backbone takes any
    size). `classes` (normally set by `training_module`) creates the head; `backbone_kwargs` go to
    `timm.create_model` (e.g. drop_path_rate). `backbone` defaults to "resnet18".
    `spatial_dims=3`: a z-stack classifier; `backbone` is then "resnet3d" (`ResNet3d`, the default;
    `backbone_kwargs` set its widths, blocks, z_strides).
    """
    stains, n = resolve_channels(channels, num_channels)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 (crops) or 3 (z-stacks), got {spatial_dims}")
    extra = dict(backbone_kwargs or {})
    if spatial_dims == 3:
        backbone = backbone or BACKBONE_3D
        if backbone != BACKBONE_3D:
            raise ValueError(f"spatial_dims=3 needs backbone={BACKBONE_3D!r} (timm has no 3-D nets), got {backbone!r}")
        unknown = sorted(set(extra) - {"widths", "blocks", "z_strides"})
        if unknown:
            raise ValueError(f"backbone_kwargs for {BACKBONE_3D} may set widths, blocks, z_strides; got {unknown}")
        with seeded(seed):
            net = SupervisedCNN(ResNet3d(n, **extra))
    else:
        backbone = backbone or "resnet18"
        reserved = sorted(set(extra) & set(_RESERVED))
        if reserved:
            raise ValueError(
                f"backbone_kwargs may not set {reserved} (fixed: pretrained=False, num_classes=0, in_chans)"
            )
        timm = import_timm()
        if not timm.is_model(backbone):
            raise ValueError(f"unknown timm backbone {backbone!r} (see timm.list_models())")
        with seeded(seed):
            net = SupervisedCNN(timm.create_model(backbone, pretrained=False, num_classes=0, in_chans=n, **extra))
    config: dict[str, Any] = dict(
        **channel_config(stains, n), backbone=backbone, input_size=int(input_size),
        label_smoothing=float(label_smoothing), seed=int(seed),
    )
    if backbone_kwargs:
        config["backbone_kwargs"] = extra
    if spatial_dims == 3:
        config["spatial_dims"] = 3
    spec = EncoderSpec(
        family="supervised_cnn", embedding_dim=net.num_features, input_size=int(input_size), channels=stains,
        per_cell=True, trainable=True, config=config,
    )
    encoder = SupervisedEncoder(net, spec, n)
    if classes is not None:
        encoder.training_module(list(classes))
    return encoder
