"""Optional Cellpose backend for nuclei: a local weights file, a lazily imported `cellpose`.

Cellpose is not a dependency of bioembed. Install it into the same environment
(`uv pip install cellpose`, or add it to the project with `uv add cellpose`) and point
`model_path` at a weights file you already have on disk (e.g. the `nuclei` model copied from
`~/.cellpose/models/`, or one you trained). Nothing is ever downloaded: a missing file is an error.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np
from skimage.segmentation import relabel_sequential

from bioembed_assets.schema import BioembedInputError

INSTALL_HINT = (
    "the Cellpose backend needs the optional package 'cellpose', which is not installed in this "
    "environment. Install it with `uv pip install cellpose` (or `pip install cellpose`; "
    "`uv add cellpose` to make it a project dependency), then pass model_path= a local Cellpose "
    "weights file. bioembed never downloads weights. Or use backend='classic' (the default)."
)

_MODELS: dict[tuple[str, bool], Any] = {}


def check_model_path(model_path: Path | str | None) -> Path:
    """The weights path if it is an existing file, else a BioembedInputError that says what to do."""
    if model_path is None:
        raise BioembedInputError("the Cellpose backend needs model_path, a local weights file (never downloaded)")
    path = Path(model_path).expanduser()
    if not path.is_file():
        raise BioembedInputError(
            "Cellpose weights file not found. model_path must be a local file (bioembed never downloads "
            "weights): copy a Cellpose model (e.g. 'nuclei' from ~/.cellpose/models/ on a machine that has "
            "it, or your own trained model) and pass its path",
            path=path,
        )
    return path


def _import_cellpose_models() -> Any:
    try:
        return importlib.import_module("cellpose.models")
    except ImportError as exc:
        raise RuntimeError(INSTALL_HINT) from exc


def check_cellpose(model_path: Path | str | None) -> Path:
    """Fail early, with advice, unless the weights file exists and `cellpose` imports."""
    path = check_model_path(model_path)
    _import_cellpose_models()
    return path


def segment_nuclei_cellpose(
    dna: np.ndarray,
    model_path: Path,
    diameter: float | None = None,
    *,
    gpu: bool = False,
    **eval_kwargs: Any,
) -> np.ndarray:
    """Label nuclei with a Cellpose model loaded from the local file `model_path`.

    Returns an int32 label image (0 = background, 1..n, sequential). `diameter` (pixels) is
    passed to Cellpose (None: the model's own estimate or its training diameter). The model is
    loaded once per (path, gpu) and reused. Raises BioembedInputError when the file is missing
    and RuntimeError (with install instructions) when `cellpose` is not installed.
    """
    img = np.asarray(dna)
    if img.ndim != 2:
        raise ValueError(f"segment_nuclei_cellpose expects a 2-D image, got shape {img.shape}")
    path = check_model_path(model_path)
    models = _import_cellpose_models()
    key = (str(path.resolve()), bool(gpu))
    if key not in _MODELS:
        _MODELS[key] = models.CellposeModel(gpu=gpu, pretrained_model=str(path))
    model = _MODELS[key]
    kwargs: dict[str, Any] = {"diameter": diameter, **eval_kwargs}
    try:
        major = int(importlib.metadata.version("cellpose").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        major = 0
    if major < 4:  # grayscale input; Cellpose 4 dropped the `channels` argument
        kwargs.setdefault("channels", [0, 0])
    masks = model.eval(img.astype(np.float32), **kwargs)[0]
    labels, _, _ = relabel_sequential(np.asarray(masks).astype(np.int32, copy=False))
    return labels.astype(np.int32, copy=False)
