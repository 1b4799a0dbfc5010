"""Encoders: one protocol (`base.Encoder`), a registry by family name, one file per family."""

from bioembed_assets.encoders.base import (
    Encoder,
    EncoderSpec,
    build_encoder,
    build_from_spec,
    list_families,
    register_family,
)

__all__ = ["Encoder", "EncoderSpec", "build_encoder", "build_from_spec", "list_families", "register_family"]
