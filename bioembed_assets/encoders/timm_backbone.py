"""Any timm backbone by name as a (fine-tunable) encoder: family "timm".

Why: pretrained ImageNet CNNs/ViTs are strong baselines for Cell Painting profiles, and timm names
a thousand of them; this family puts each one behind the encoder protocol without model-specific code.

Channels (`channel_strategy`):
  * "per_channel_concat" (default): every stain alone through the backbone (channels folded into the
    batch), the single channel *replicated* to the model's native input channels (3 for RGB weights)
    and normalized with the model's own per-channel mean/std, so pretrained RGB weights see an input
    like a grey photo; per-stain embeddings concatenated, D = C * F;
  * "per_channel_mean": the same, averaged over the stains, D = F;
  * "adapt_stem": the model built with `in_chans=C`; a native-channel checkpoint's first conv is
    converted with timm's own `adapt_input_conv` (weights repeated, scaled by native/C), exactly as
    `timm.create_model(..., pretrained=True, in_chans=C)` does; stain i is normalized with the mean/std of
    native channel i % native (the channel whose weights it received), D = F.

Normalization and size come from the model's pretrained config (`timm.data.resolve_data_config`): crops
in 0-255 (`to_0_255`) -> /255 -> (x - mean) / std; `spec.input_size` is the config's size unless
`input_size` overrides it (fixed-size models such as ViTs are then built with `dynamic_img_size=True`).

Weights are never downloaded: `pretrained=False` always goes to timm (under HF_HUB_OFFLINE=1); the
weights come from `checkpoint`, a local safetensors / torch zip file of that timm model's own state dict
(timm key names; classifier keys are dropped since the backbone has num_classes=0), loaded strictly.

Fine-tuning reuses `supervised.py`: the network is a `SupervisedCNN` (linear head over the pooled
features, created by `training_module(classes)`) trained with cross-entropy on each cell's treatment.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bioembed_assets.encoders.autoencoder import (
    channel_config,
    eval_mode,
    float32_region,
    resolve_channels,
    seeded,
)
from bioembed_assets.encoders.base import EncoderSpec, register_family
from bioembed_assets.encoders.checkpoints import load_checked, load_state_dict_file
from bioembed_assets.encoders.supervised import ClassifierObjective, SupervisedCNN, SupervisedEncoder
from bioembed_assets.encoders.timm_compat import import_timm

STRATEGIES = ("per_channel_concat", "per_channel_mean", "adapt_stem")
_RESERVED = ("pretrained", "num_classes", "in_chans", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay",
             "cache_dir")


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Set HF_HUB_OFFLINE=1 while creating a model (defence in depth: nothing here should download)."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _cycle(values: Sequence[float], n: int) -> torch.Tensor:
    """(1, n, 1, 1) tensor of `values` repeated over n channels (channel i gets values[i % len])."""
    return torch.tensor([float(values[i % len(values)]) for i in range(n)], dtype=torch.float32).reshape(1, n, 1, 1)


class TimmBackbone(nn.Module):
    """A headless timm `model` plus its input normalization and channel strategy.

    forward(images float32 0-255 (B, C, S, S)) -> pooled features (B, num_features). mean/std are
    non-persistent buffers (they follow `.to(device)` but are not weights). One zero crop of side
    `probe_size` is run at construction to measure the pooled width (num_features or head_hidden_size,
    depending on the model) and to fail early on a size the model cannot take.
    """

    def __init__(self, model: nn.Module, strategy: str, num_channels: int, native_chans: int,
                 mean: Sequence[float], std: Sequence[float], probe_size: int) -> None:
        super().__init__()
        self.model, self.strategy, self.num_channels = model, strategy, num_channels
        self.model_chans = num_channels if strategy == "adapt_stem" else native_chans
        self.register_buffer("mean", _cycle(mean, self.model_chans), persistent=False)
        self.register_buffer("std", _cycle(std, self.model_chans), persistent=False)
        with eval_mode(self.model), torch.inference_mode():
            self.model_features = int(self.model(torch.zeros(1, self.model_chans, probe_size, probe_size)).shape[1])
        self.num_features = self.model_features * (num_channels if strategy == "per_channel_concat" else 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, c, h, w = images.shape
        with float32_region(images.device):
            x = images.float() / 255.0
            if self.strategy != "adapt_stem":
                x = x.reshape(b * c, 1, h, w).expand(b * c, self.model_chans, h, w)
            x = (x - self.mean) / self.std
        features = self.model(x)
        if self.strategy == "adapt_stem":
            return features
        features = features.reshape(b, c, -1)
        return features.flatten(1) if self.strategy == "per_channel_concat" else features.mean(dim=1)


class TimmClassifierObjective(ClassifierObjective):
    """`ClassifierObjective` for a `TimmEncoder`: the network normalizes the 0-255 crops itself.

    (The base class standardizes each crop first, which would discard the pretrained mean/std input.)
    """

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return images


class TimmEncoder(SupervisedEncoder):
    """`Encoder` around a `SupervisedCNN` whose backbone is a `TimmBackbone`; embeds the pooled features.

    `data_config` is timm's resolved data config (input_size, interpolation, mean, std, crop_pct).
    """

    fixed_size = True

    def __init__(self, module: SupervisedCNN, spec: EncoderSpec, num_channels: int, data_config: dict[str, Any],
                 feature_names: list[str]) -> None:
        super().__init__(module, spec, num_channels)
        self.data_config, self.feature_names = data_config, feature_names

    @property
    def interpolation(self) -> str:
        """The resize mode the model was trained with (timm's pretrained config, e.g. "bicubic")."""
        return str(self.data_config.get("interpolation", "bilinear"))

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        """No per-crop standardization: `TimmBackbone` normalizes 0-255 crops with the model's mean/std."""
        return x

    def training_module(self, classes: list[str] | None = None) -> TimmClassifierObjective:
        """Cross-entropy over `classes` (default: the stored ones); creates the head as `SupervisedEncoder` does."""
        if classes is None and self.classes is None:
            raise ValueError("the timm encoder needs the treatment classes: call training_module(classes=[...])")
        base = super().training_module(classes)
        return TimmClassifierObjective(self, base.label_smoothing)


def _resolve_model_name(timm: Any, model_name: str) -> str:
    name = str(model_name)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {close}?" if close else " (see timm.list_models())"
        raise ValueError(f"unknown timm model {name!r}{hint}")
    return name


def _missing_weights_error(name: str) -> ValueError:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    where = f"model.safetensors of https://huggingface.co/{hub}" if hub else f"a state dict file of timm's {name}"
    return ValueError(f"pretrained=True for timm model {name!r} but no checkpoint: bioembed never downloads weights. "
                      f"Download {where} yourself and pass checkpoint='/path/to/model.safetensors'")


def _drop_classifier(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Remove the classifier keys (pretrained_cfg['classifier']) the headless model does not have."""
    classifiers = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    own = model.state_dict()
    drop = {f"{c}.{p}" for c in classifiers for p in ("weight", "bias")} - set(own)
    return {k: v for k, v in state_dict.items() if k not in drop}


def _adapt_stem(state_dict: dict[str, torch.Tensor], model: nn.Module, in_chans: int,
                native: int) -> dict[str, torch.Tensor]:
    """Convert first-conv weights of a `native`-channel checkpoint to `in_chans` (timm's `adapt_input_conv`).

    Only weights whose shape is consistent with a native-channel stem are converted (as timm's
    `load_pretrained` checks); anything else is left for the strict load to report.
    """
    from timm.models import adapt_input_conv

    convs = model.pretrained_cfg.get("first_conv") or ()
    sd = dict(state_dict)
    for name in (convs,) if isinstance(convs, str) else tuple(convs):
        key = f"{name}.weight"
        module = model.get_submodule(name)
        weight = sd.get(key)
        if weight is None or not isinstance(module, nn.Conv2d) or weight.ndim != 4 or weight.shape == module.weight.shape:
            continue
        if weight.shape[1] * in_chans * module.groups == native * module.in_channels:
            sd[key] = adapt_input_conv(in_chans, weight, base_chans=native).to(weight.dtype)
    return sd


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_")


def _feature_names(model_name: str, strategy: str, stains: tuple[str, ...] | None, n: int, width: int) -> list[str]:
    prefix = f"timm_{_slug(model_name)}"
    if strategy != "per_channel_concat":
        return [f"{prefix}_{i}" for i in range(width)]
    labels = [_slug(s) for s in stains] if stains is not None else []
    if len(set(labels)) != n or not all(labels):
        labels = [f"ch{k}" for k in range(n)]
    return [f"{prefix}_{label}_{i}" for label in labels for i in range(width)]


@register_family("timm")
def build_timm(
    model_name: str,
    channels: Sequence[str] | None = None,
    num_channels: int | None = None,
    channel_strategy: str = "per_channel_concat",
    input_size: int | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    classes: Sequence[str] | None = None,
    label_smoothing: float = 0.0,
    model_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
) -> TimmEncoder:
    """A timm model by name (`model_name`, any `timm.list_models()` name, optionally with a `.tag`).

    Channels as in the other trainable families (`channels` stain names or `num_channels`; neither = the
    five Cell Painting stains); `channel_strategy` one of STRATEGIES (see the module docstring).
    `checkpoint` is a local safetensors / torch zip file of this model's timm state dict; without one the
    weights are random (from `seed`) and `pretrained=True` is an error (nothing is downloaded).
    `input_size` overrides the pretrained config's crop side. `model_kwargs` go to `timm.create_model`
    (e.g. drop_path_rate); `classes` (normally set by `training_module`) creates the head.
    """
    stains, n = resolve_channels(channels, num_channels)
    if channel_strategy not in STRATEGIES:
        raise ValueError(f"channel_strategy must be one of {list(STRATEGIES)}, got {channel_strategy!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    extra = dict(model_kwargs or {})
    reserved = sorted(set(extra) & set(_RESERVED))
    if reserved:
        raise ValueError(f"model_kwargs may not set {reserved} (fixed: pretrained=False, num_classes=0, in_chans "
                         "from channel_strategy; weights come from checkpoint=)")
    timm = import_timm()
    name = _resolve_model_name(timm, model_name)
    if pretrained and checkpoint is None:
        raise _missing_weights_error(name)
    path = Path(checkpoint).expanduser().resolve() if checkpoint is not None else None
    state = load_state_dict_file(path) if path is not None else None  # read (and fail) before building

    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    native_size = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
    size = int(input_size) if input_size is not None else native_size
    if size < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    if size != native_size and cfg is not None and cfg.fixed_input_size:
        extra.setdefault("dynamic_img_size", True)
    native_chans = int(cfg.input_size[0]) if cfg is not None and cfg.input_size else 3
    in_chans = n if channel_strategy == "adapt_stem" else native_chans

    try:
        with seeded(seed), hub_offline():
            model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **extra)
    except (TypeError, RuntimeError) as e:
        hint = (f"; it has a fixed {native_size}x{native_size} input: use input_size={native_size}"
                if "dynamic_img_size" in str(e) else "")
        raise ValueError(f"cannot build timm model {name!r} with in_chans={in_chans}, model_kwargs={extra}: "
                         f"{e}{hint}") from e
    if state is not None:
        sd = _drop_classifier(state, model)
        if channel_strategy == "adapt_stem":
            sd = _adapt_stem(sd, model, n, native_chans)
        load_checked(model, sd, path)

    data_config = dict(timm.data.resolve_data_config(model=model))
    data_config["input_size"] = (in_chans, size, size)
    try:
        backbone = TimmBackbone(model.eval(), channel_strategy, n, native_chans, data_config["mean"],
                                data_config["std"], size)
    except Exception as e:  # noqa: BLE001 - timm raises RuntimeError or AssertionError; re-raised naming model and size
        raise ValueError(f"timm model {name!r} cannot take {size}x{size} crops ({type(e).__name__}: {e}); "
                         f"use its native input_size={native_size}") from e
    net = SupervisedCNN(backbone)

    config: dict[str, Any] = dict(model_name=name, **channel_config(stains, n), channel_strategy=channel_strategy,
                                  input_size=size, label_smoothing=float(label_smoothing), seed=int(seed))
    if path is not None:
        config["checkpoint"] = str(path)
    if model_kwargs:
        config["model_kwargs"] = dict(model_kwargs)
    spec = EncoderSpec(family="timm", embedding_dim=backbone.num_features, input_size=size, channels=stains,
                       per_cell=True, trainable=True, config=config)
    names = _feature_names(name, channel_strategy, stains, n, backbone.model_features)
    encoder = TimmEncoder(net, spec, n, data_config, names)
    if classes is not None:
        encoder.training_module(list(classes))
    return encoder


__all__ = ["STRATEGIES", "TimmBackbone", "TimmClassifierObjective", "TimmEncoder", "build_timm", "hub_offline"]
