"""timm imports and builds models next to the CPU torch despite a CUDA-only torchvision."""

import torch

from bioembed_assets.encoders.timm_compat import import_timm


def test_timm_builds_and_runs_a_model() -> None:
    timm = import_timm()
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 512)
    assert import_timm() is timm  # second call is a no-op
