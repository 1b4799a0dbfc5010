"""The "timm" encoder family: any timm backbone by name, three channel strategies, local checkpoints only.

All on CPU at 32 px (resnet18, vit_tiny_patch16_224 with dynamic size, efficientnet_b0, convnext_atto).
Checkpoints are written from freshly created timm models with their own key names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bioembed_assets.encoders import Encoder, build_encoder, build_from_spec, list_families
from bioembed_assets.encoders.checkpoints import save_state_dict_file
from bioembed_assets.encoders.timm_compat import import_timm
from bioembed_assets.schema import BioembedInputError

STAINS = ["DNA", "ER", "RNA", "AGP", "Mito"]
SIZE = 32
CLASSES = ["DMSO", "cmpd_a", "cmpd_b"]


def crops(n: int = 3, c: int = len(STAINS), seed: int = 0, dtype: type = np.uint8) -> np.ndarray:
    hi = 256 if dtype == np.uint8 else 65536
    return np.random.default_rng(seed).integers(0, hi, (n, c, SIZE, SIZE), dtype=dtype)


def timm_encoder(model_name: str = "resnet18", **cfg: object) -> Encoder:
    return build_encoder("timm", **{"model_name": model_name, "channels": STAINS, "input_size": SIZE, **cfg})


def reference(model: torch.nn.Module, images: np.ndarray, mean: list[float], std: list[float],
              per_channel: bool) -> np.ndarray:
    """Features by hand: 0-255 -> /255 -> (x - mean) / std; per_channel: each channel replicated, -> (B, C, F)."""
    x = torch.from_numpy(images.astype(np.float32) / (257.0 if images.dtype == np.uint16 else 1.0)) / 255.0
    b, c = x.shape[:2]
    if per_channel:
        x = x.reshape(b * c, 1, SIZE, SIZE).expand(-1, len(mean), -1, -1)
    x = (x - torch.tensor(mean).reshape(1, -1, 1, 1)) / torch.tensor(std).reshape(1, -1, 1, 1)
    model.eval()
    with torch.no_grad():
        features = model(x).numpy()
    return features.reshape(b, c, -1) if per_channel else features


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A resnet18 checkpoint (timm keys, 1000-class head included) and the model it came from."""
    timm = import_timm()
    torch.manual_seed(123)
    model = timm.create_model("resnet18")
    with torch.no_grad():  # non-default BN statistics, so they must be loaded too
        model.bn1.running_mean.uniform_(-0.1, 0.1)
    path = save_state_dict_file(model.state_dict(), tmp_path_factory.mktemp("ckpt") / "resnet18.safetensors")
    return path, model


# -- spec, shapes, names ---------------------------------------------------------------------------


def test_registered_and_spec() -> None:
    assert "timm" in list_families()
    enc = timm_encoder()
    assert isinstance(enc, Encoder)
    spec = enc.spec
    assert (spec.family, spec.input_size, spec.channels, spec.trainable, spec.per_cell) == (
        "timm", SIZE, tuple(STAINS), True, True)
    assert spec.config["model_name"] == "resnet18" and spec.config["channel_strategy"] == "per_channel_concat"
    json.dumps(spec.to_dict())
    assert build_encoder("timm", model_name="resnet18").spec.input_size == 224  # from pretrained_cfg


@pytest.mark.parametrize(("strategy", "dim"), [("per_channel_concat", 5 * 512), ("per_channel_mean", 512),
                                               ("adapt_stem", 512)])
def test_strategy_shapes_and_feature_names(strategy: str, dim: int) -> None:
    enc = timm_encoder(channel_strategy=strategy)
    out = enc.embed(crops(), np.ones((3, SIZE, SIZE), bool))
    assert out.shape == (3, dim) and out.dtype == np.float32 and np.isfinite(out).all()
    assert enc.spec.embedding_dim == dim
    names = enc.feature_names
    assert len(names) == dim == len(set(names))
    assert names[0] == ("timm_resnet18_DNA_0" if strategy == "per_channel_concat" else "timm_resnet18_0")
    assert enc.embed(crops(0), None).shape == (0, dim)


@pytest.mark.parametrize(("model_name", "width"), [("vit_tiny_patch16_224", 192), ("efficientnet_b0", 1280),
                                                   ("convnext_atto", 320)])
def test_other_backbones(model_name: str, width: int) -> None:
    enc = timm_encoder(model_name, channel_strategy="per_channel_mean", num_channels=2, channels=None)
    assert enc.embed(crops(c=2), None).shape == (3, width)
    assert enc.spec.channels is None and enc.feature_names[-1] == f"timm_{model_name}_{width - 1}"
    if model_name.startswith("vit"):
        assert enc.module.backbone.model.dynamic_img_size  # non-native size on a fixed-size model


def test_channel_names_without_stains() -> None:
    enc = timm_encoder("convnext_atto", channels=None, num_channels=2)
    assert enc.feature_names[0] == "timm_convnext_atto_ch0_0" and enc.feature_names[-1] == "timm_convnext_atto_ch1_319"


# -- normalization ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["resnet18", "vit_tiny_patch16_224"])
def test_normalization_matches_pretrained_cfg(model_name: str) -> None:
    enc = timm_encoder(model_name, channel_strategy="per_channel_concat")
    model = enc.module.backbone.model
    cfg = model.pretrained_cfg
    assert enc.data_config["mean"] == cfg["mean"] and enc.data_config["std"] == cfg["std"]
    assert enc.interpolation == cfg["interpolation"]
    images = crops(dtype=np.uint16)
    want = reference(model, images, list(cfg["mean"]), list(cfg["std"]), per_channel=True).reshape(3, -1)
    np.testing.assert_allclose(enc.embed(images, None), want, rtol=1e-4, atol=1e-5)


def test_per_channel_mean_is_mean_of_concat() -> None:
    concat = timm_encoder(channel_strategy="per_channel_concat").embed(crops(), None)
    mean = timm_encoder(channel_strategy="per_channel_mean").embed(crops(), None)
    np.testing.assert_allclose(mean, concat.reshape(3, 5, 512).mean(axis=1), rtol=1e-4, atol=1e-5)


# -- checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "zip"])
def test_checkpoint_loads_strictly_and_matches_the_model(
    resnet18_file: tuple[Path, torch.nn.Module], tmp_path: Path, fmt: str
) -> None:
    path, ref = resnet18_file
    if fmt == "zip":
        path = save_state_dict_file(ref.state_dict(), tmp_path / "resnet18.pth", format="zip")
    enc = timm_encoder(checkpoint=str(path), pretrained=True, channel_strategy="per_channel_mean")
    assert enc.spec.config["checkpoint"] == str(path.resolve())
    loaded = enc.module.backbone.model.state_dict()
    expected = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], v) for k, v in expected.items())
    headless = import_timm().create_model("resnet18", num_classes=0)
    headless.load_state_dict(expected)
    cfg = headless.pretrained_cfg
    want = reference(headless, crops(), list(cfg["mean"]), list(cfg["std"]), per_channel=True).mean(axis=1)
    np.testing.assert_allclose(enc.embed(crops(), None), want, rtol=1e-4, atol=1e-5)


def test_vit_checkpoint_at_dynamic_size(tmp_path: Path) -> None:
    timm = import_timm()
    torch.manual_seed(1)
    ref = timm.create_model("vit_tiny_patch16_224")
    path = save_state_dict_file(ref.state_dict(), tmp_path / "vit.safetensors")
    enc = timm_encoder("vit_tiny_patch16_224", checkpoint=path, channel_strategy="per_channel_mean")
    assert torch.equal(enc.module.backbone.model.pos_embed, ref.pos_embed)  # native grid kept, resampled at run time
    assert enc.embed(crops(), None).shape == (3, 192)


def test_adapt_stem_converts_like_timm(resnet18_file: tuple[Path, torch.nn.Module]) -> None:
    path, ref = resnet18_file
    timm = import_timm()
    enc = timm_encoder(checkpoint=path, channel_strategy="adapt_stem")
    ours = enc.module.backbone.model
    assert ours.conv1.weight.shape == (64, 5, 7, 7)
    assert torch.equal(ours.conv1.weight, timm.models.adapt_input_conv(5, ref.conv1.weight))
    theirs = timm.create_model("resnet18", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                               in_chans=5, num_classes=0)  # timm's own loader from the same local file
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    cfg = theirs.pretrained_cfg
    mean, std = [cfg["mean"][i % 3] for i in range(5)], [cfg["std"][i % 3] for i in range(5)]
    want = reference(theirs, crops(), mean, std, per_channel=False).reshape(3, -1)
    np.testing.assert_allclose(enc.embed(crops(), None), want, rtol=1e-4, atol=1e-5)


def test_wrong_model_checkpoint_names_file_and_keys(tmp_path: Path) -> None:
    other = import_timm().create_model("convnext_atto")
    path = save_state_dict_file(other.state_dict(), tmp_path / "convnext.safetensors")
    with pytest.raises(BioembedInputError, match="convnext.safetensors") as err:
        timm_encoder(checkpoint=path)
    message = str(err.value)
    assert "missing keys" in message and "conv1.weight" in message
    assert "unexpected keys" in message and "stages.0.blocks.0" in message


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(BioembedInputError, match="not found"):
        timm_encoder(checkpoint=tmp_path / "absent.safetensors")


def test_pretrained_without_file_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="never downloads") as err:
        timm_encoder(pretrained=True)
    assert "model.safetensors" in str(err.value) and "timm/resnet18" in str(err.value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    timm_encoder("convnext_atto")
    assert "HF_HUB_OFFLINE" not in os.environ  # set only around model creation


# -- bad input -------------------------------------------------------------------------------------


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(ValueError, match="unknown timm model 'resnet19x'.*resnet18"):
        timm_encoder("resnet19x")


@pytest.mark.parametrize(("cfg", "match"), [
    ({"channel_strategy": "rgb"}, "channel_strategy must be one of"),
    ({"model_kwargs": {"in_chans": 3}}, r"may not set \['in_chans'\]"),
    ({"model_name": "mixer_s16_224"}, "fixed 224x224 input: use input_size=224"),
    ({"model_name": "vit_tiny_patch16_224", "input_size": 40}, "cannot take 40x40 crops"),
])
def test_bad_config(cfg: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        timm_encoder(**cfg)


def test_bad_crops() -> None:
    enc = timm_encoder("convnext_atto", channel_strategy="per_channel_mean")
    with pytest.raises(ValueError, match="expects 5 channels"):
        enc.embed(crops(c=3), None)
    with pytest.raises(ValueError, match="expects 32x32 crops"):
        enc.embed(np.zeros((1, 5, 16, 16), np.uint8), None)


# -- fine-tuning and round trip --------------------------------------------------------------------


def labelled_batch(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """The class is visible in the image: channel `label` is brighter in the centre."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % len(CLASSES)
    images = torch.rand((n, 3, SIZE, SIZE), generator=g) * 60
    images[torch.arange(n), labels, 8:24, 8:24] += 150
    return images, labels


def test_training_lowers_loss_and_round_trips() -> None:
    enc = timm_encoder(channels=STAINS[:3])
    with pytest.raises(ValueError, match="needs the treatment classes"):
        enc.training_module()
    module = enc.training_module(CLASSES)
    assert enc.spec.config["classes"] == CLASSES
    images, labels = labelled_batch()

    def eval_loss() -> float:
        module.eval()
        with torch.no_grad():
            out = module(images, labels)
        assert set(out) == {"loss", "accuracy"}
        return float(out["loss"])

    before = eval_loss()
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    module.train()
    for _ in range(8):
        opt.zero_grad()
        module(images, labels)["loss"].backward()
        opt.step()
    assert eval_loss() < before

    x = crops(c=3)
    rebuilt = build_from_spec(enc.spec, enc.state_dict())
    assert rebuilt.spec == enc.spec
    np.testing.assert_array_equal(rebuilt.embed(x, None), enc.embed(x, None))
    np.testing.assert_array_equal(rebuilt.logits(x), enc.logits(x))
    with pytest.raises(ValueError, match="labels must be class indices"):
        module(images, labels + 5)
