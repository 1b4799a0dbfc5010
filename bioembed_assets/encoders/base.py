"""The one encoder protocol, its spec, and a registry of encoder families by name (as timm does)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder expects and produces.

    `channels` is None for channel-agnostic encoders (any number of channels, any order);
    otherwise the stains it expects, in order. `input_size` is the square crop side in pixels
    the encoder consumes (the inference engine resizes crops to it). `config` holds the family's
    constructor arguments, enough to rebuild the encoder (stored in the registry).
    """

    family: str
    embedding_dim: int
    input_size: int
    channels: tuple[str, ...] | None = None
    per_cell: bool = True
    trainable: bool = False
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels) if self.channels is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderSpec:
        d = dict(d)
        if d.get("channels") is not None:
            d["channels"] = tuple(d["channels"])
        return cls(**d)


@runtime_checkable
class Encoder(Protocol):
    """Anything that turns a batch of single-cell crops into vectors.

    `embed` takes raw crops `images` (B, C, H, W) in their stored dtype (uint8/uint16) and
    the cell masks `masks` (B, H, W) bool, and returns float32 (B, spec.embedding_dim).
    H == W == spec.input_size (the engine resizes). `state_dict` returns the learnable
    weights ({} for parameter-free encoders); `load_state_dict` restores them strictly.
    """

    spec: EncoderSpec

    def embed(self, images: np.ndarray, masks: np.ndarray) -> np.ndarray: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> Any: ...

    def to(self, device: str | torch.device) -> Any: ...


EMBEDDING = "embedding"
"""The key of the embedding in the outputs of `embed_tensors` (the other keys are `output_names`)."""


@runtime_checkable
class TensorEncoder(Encoder, Protocol):
    """An encoder that also runs on device tensors, so the engine never brings crops back to the host.

    `embed_tensors` takes float32 crops in 0-255 units (`scale_to_0_255`) on the encoder's device,
    already at `spec.input_size` and in `spec.channels` order, and the bool masks (B, H, W) (or None);
    it returns {EMBEDDING: (B, D), key: (B, K) for each key of `output_names`} on the device, under
    the caller's autocast and inference mode (see `embed_numpy`).
    """

    @property
    def device(self) -> torch.device: ...

    def embed_tensors(self, images: torch.Tensor, masks: torch.Tensor | None) -> dict[str, torch.Tensor]: ...


def scale_to_0_255(images: torch.Tensor, stored: torch.dtype | None = None) -> torch.Tensor:
    """Raw crops -> float32 in 0-255 units: uint8 as-is, uint16 / 257, floats assumed 0-255 already.

    `stored` is the dtype the values were stored in, when `images` already holds them as floats."""
    stored = images.dtype if stored is None else stored
    if stored == torch.uint16:
        return images.float() / 257.0
    if stored == torch.uint8 or stored.is_floating_point:
        return images.float()
    raise TypeError(f"expected uint8, uint16 or float crops, got {stored}")


def embed_numpy(encoder: TensorEncoder, images: np.ndarray, masks: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """`embed_tensors` for host arrays (the numpy protocol): -> {EMBEDDING: float32 (B, D), side outputs}.

    Converts on the encoder's device and runs under `autocast` (bf16 on CUDA, fp32 elsewhere)."""
    images = np.asarray(images)
    if images.ndim >= 1 and images.shape[0] == 0:
        widths = {EMBEDDING: encoder.spec.embedding_dim,
                  **{k: len(v) for k, v in (getattr(encoder, "output_names", None) or {}).items()}}
        return {k: np.zeros((0, w), dtype=np.float32) for k, w in widths.items()}
    device = encoder.device
    x = scale_to_0_255(torch.from_numpy(np.ascontiguousarray(images)).to(device))
    m = None if masks is None else torch.from_numpy(np.asarray(masks, dtype=bool)).to(device)
    with torch.inference_mode(), autocast(device):
        out = encoder.embed_tensors(x, m)
    return {k: v.float().cpu().numpy() for k, v in out.items()}


class TensorEncoderMixin:
    """`embed` and `embed_with_outputs` of the numpy protocol, for a class defining `embed_tensors`."""

    def embed(self, images: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
        """Crops (B, C, H, W) uint8/uint16/float (0-255) -> float32 (B, spec.embedding_dim)."""
        return embed_numpy(self, images, masks)[EMBEDDING]  # type: ignore[arg-type]

    def embed_with_outputs(
        self, images: np.ndarray, masks: np.ndarray | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """-> (embedding (B, D), {key of `output_names`: float32 (B, K)})."""
        out = embed_numpy(self, images, masks)  # type: ignore[arg-type]
        return out.pop(EMBEDDING), out


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (fp16 where bf16 is missing); plain fp32 elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def without_autograd() -> contextlib.AbstractContextManager[Any]:
    """`torch.inference_mode` for an eager forward; nothing when autograd is already off, as under
    the engine's compiled graph (Dynamo cannot trace into an inference-mode region)."""
    return torch.inference_mode() if torch.is_grad_enabled() else contextlib.nullcontext()


EncoderBuilder = Callable[..., Encoder]
_FAMILIES: dict[str, EncoderBuilder] = {}


def register_family(name: str) -> Callable[[EncoderBuilder], EncoderBuilder]:
    """Decorator registering a builder `builder(**config) -> Encoder` under `name`."""

    def deco(builder: EncoderBuilder) -> EncoderBuilder:
        if name in _FAMILIES and _FAMILIES[name] is not builder:
            raise ValueError(f"encoder family {name!r} is already registered")
        _FAMILIES[name] = builder
        return builder

    return deco


def _import_families() -> None:
    """Import every module of the `encoders` package: that runs their @register_family decorators."""
    import importlib
    import pkgutil

    import bioembed_assets.encoders as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def list_families() -> list[str]:
    """Names of all registered encoder families."""
    _import_families()
    return sorted(_FAMILIES)


def build_encoder(family: str, **config: Any) -> Encoder:
    """Build an encoder of `family` with the given constructor config (random/untrained weights)."""
    _import_families()
    if family not in _FAMILIES:
        raise KeyError(f"unknown encoder family {family!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[family](**config)


def build_from_spec(spec: EncoderSpec, state_dict: dict[str, torch.Tensor] | None = None) -> Encoder:
    """Rebuild an encoder from a stored spec and, if given, its weights (strict).

    With weights given, a `checkpoint` file named in the config is not read again: the stored
    weights fully determine the encoder (and that file may not exist on this machine)."""
    config = dict(spec.config)
    if state_dict:
        config.pop("checkpoint", None)
    encoder = build_encoder(spec.family, **config)
    if state_dict:
        encoder.load_state_dict(state_dict)
    return encoder
