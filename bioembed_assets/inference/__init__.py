"""The embedding engine (`engine`), its reader workers (`reader`), device choices (`devices`) and resizing (`resize`)."""

from bioembed_assets.inference.devices import resolve_device, resolve_precision
from bioembed_assets.inference.engine import (
    EmbeddedBatch,
    EmbeddingRun,
    EngineOptions,
    ProgressCallback,
    StageTimes,
    channel_indices,
    embed_crop_store,
    embed_crop_store_with_outputs,
    encoder_feature_names,
    encoder_outputs,
    has_tensor_path,
)
from bioembed_assets.inference.resize import resize_crops

__all__ = [
    "EmbeddedBatch",
    "EmbeddingRun",
    "EngineOptions",
    "ProgressCallback",
    "StageTimes",
    "channel_indices",
    "embed_crop_store",
    "embed_crop_store_with_outputs",
    "encoder_feature_names",
    "encoder_outputs",
    "has_tensor_path",
    "resize_crops",
    "resolve_device",
    "resolve_precision",
]
