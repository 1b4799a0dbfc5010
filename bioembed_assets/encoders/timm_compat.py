"""Import timm next to a CPU torch whose registry torchvision was built for CUDA torch.

There, `import torchvision` raises "operator torchvision::nms does not exist" because its
compiled ops library fails to load, and timm (which imports torchvision) fails with it.
`import_timm()` catches that error once, declares the missing operator schemas so the
Python modules can register their fake/meta kernels, drops the half-imported modules and
imports again. Compiled torchvision ops (nms, roi_align, ...) still raise their own error
when called; timm's models do not need them. Where torchvision works this is a no-op.
"""

from __future__ import annotations

import sys
from types import ModuleType

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keep the torch.library.Library alive for the process lifetime


def _declare_torchvision_ops() -> None:
    global _library
    import torch

    if _library is None:
        _library = torch.library.Library("torchvision", "DEF")  # noqa: TOR901
        for schema in _SCHEMAS:
            _library.define(schema)


def _forget(prefixes: tuple[str, ...]) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in prefixes]:
        del sys.modules[name]


def import_timm() -> ModuleType:
    """Return the `timm` module, repairing a CUDA-only torchvision import if needed."""
    try:
        import timm

        return timm
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    _forget(("torchvision", "timm"))
    _declare_torchvision_ops()
    import timm

    return timm
