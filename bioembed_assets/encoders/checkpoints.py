"""Checkpoint files: read/write state dicts (safetensors or torch zip) and load them strictly by name and shape."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch
from torch import nn

from bioembed_assets.schema import BioembedInputError
from bioembed_assets.store.atomic import atomic_file

StateDict = dict[str, torch.Tensor]

_ZIP_MAGIC = b"PK\x03\x04"
_WRAPPER_PREFIXES = ("module.", "model.")
OPENPHENOM_BACKBONE_PREFIXES = ("encoder.vit_backbone.", "vit_backbone.")
"""Where an OpenPhenom (CA-MAE) checkpoint keeps the encoder; the first one found is kept, the rest dropped."""


def load_state_dict_file(path: str | Path) -> StateDict:
    """Read a state dict from a torch zip pickle (`weights_only=True`) or a safetensors file.

    The format is sniffed from the magic bytes, not the extension (OpenPhenom publishes a zip
    pickle named `model.safetensors`). A top-level `"state_dict"` wrapper is unwrapped and a
    `module.`/`model.` prefix shared by every key is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise BioembedInputError("checkpoint file not found", path=path)
    with path.open("rb") as f:
        magic = f.read(4)
    try:
        if magic == _ZIP_MAGIC:
            # Pass a file object: torch >= 2.13 routes *paths* ending in .safetensors to safetensors,
            # which fails on OpenPhenom's zip pickle named model.safetensors.
            with path.open("rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
        else:
            obj = safetensors.torch.load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise BioembedInputError(
            f"cannot read checkpoint (expected a torch zip pickle or a safetensors file): {e}", path=path
        ) from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BioembedInputError("checkpoint does not hold a {name: tensor} state dict", path=path)
    return strip_wrapper_prefixes(dict(obj))


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Strip `module.` (DDP) / `model.` (Lightning) prefixes while every key carries one."""
    sd = dict(state_dict)
    while sd:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def save_state_dict_file(
    state_dict: Mapping[str, torch.Tensor],
    path: str | Path,
    format: Literal["safetensors", "zip"] = "safetensors",
) -> Path:
    """Write `state_dict` (moved to CPU, contiguous) to `path` atomically, as safetensors or a torch zip."""
    path = Path(path)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_file(path) as tmp:
        if format == "safetensors":
            safetensors.torch.save_file(sd, str(tmp))
        elif format == "zip":
            torch.save(sd, tmp)
        else:
            raise ValueError(f"unknown checkpoint format {format!r}; expected 'safetensors' or 'zip'")
    return path


def select_prefixed(state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> StateDict:
    """Keep the keys under the first of `prefixes` present (stripped); if none is present, return all keys."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def check_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module, path: str | Path | None = None) -> None:
    """Raise `BioembedInputError` naming every missing, unexpected and wrongly shaped key (and the file)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(v.shape)} vs model {expected[k]}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    )
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:12])}{' ...' if len(items) > 12 else ''}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched))
        if items
    ]
    if problems:
        raise BioembedInputError(
            f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems), path=path
        )


def load_checked(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    path: str | Path | None = None,
    fill_missing: Mapping[str, Callable[[], torch.Tensor]] | None = None,
) -> nn.Module:
    """Load `state_dict` into `model` strictly after `check_state_dict`; `fill_missing` regenerates absent keys."""
    sd = dict(state_dict)
    for key, make in (fill_missing or {}).items():
        if key not in sd:
            sd[key] = make()
    check_state_dict(sd, model, path)
    model.load_state_dict(sd, strict=True)
    return model


def load_openphenom_backbone(
    source: str | Path | Mapping[str, torch.Tensor], model: nn.Module, path: str | Path | None = None
) -> nn.Module:
    """Load an OpenPhenom/CA-MAE checkpoint's encoder into a `ChannelAgnosticViT`.

    `source` is a checkpoint file or a state dict with full upstream names
    (`encoder.vit_backbone.*`; decoder and head keys are ignored) or already-stripped names.
    A missing frozen `pos_embed` is regenerated by the model (`model.make_pos_embed()`).
    """
    if isinstance(source, (str, Path)):
        path = source
        source = load_state_dict_file(source)
    sd = select_prefixed(strip_wrapper_prefixes(source), OPENPHENOM_BACKBONE_PREFIXES)
    fill = {"pos_embed": model.make_pos_embed} if hasattr(model, "make_pos_embed") else None
    return load_checked(model, sd, path, fill)
