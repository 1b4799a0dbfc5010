"""Grad-CAM against the maintained `grad-cam` package (pytorch_grad_cam), layer choice and errors, ViTs
(timm and CA-MAE: patch-token Grad-CAM and attention rollout on the patch grid), and 3-D z-stacks.

How we compare with pytorch_grad_cam: its `GradCAM.__call__` returns min-max scaled maps, so we compare
(1) its un-normalised map at the layer's resolution, `ReLU(get_cam_image(...))` from the activations and
gradients it captured during that same call, with our `CamResult.raw` (tight tolerance), and (2) its
final output with our `raw` passed through its own `scale_cam_image` as `GradCAM.__call__` does (resize
with min-max scaling, then min-max scaling again over the layer mean).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from bioembed_assets.encoders.base import build_encoder
from bioembed_assets.encoders.timm_compat import import_timm
from bioembed_assets.interpret.adapters import classifier_for, vit_classifier
from bioembed_assets.interpret.gradcam import (
    CamClassifier,
    attention_rollout,
    find_cam_layer,
    grad_cam,
    resolve_layer,
)

CLASSES = ["DMSO", "cmpd_a", "cmpd_b"]


def crops(n: int, c: int, size: int, seed: int = 0, z: int | None = None) -> np.ndarray:
    shape = (n, c, size, size) if z is None else (n, c, z, size, size)
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def with_random_head(encoder):
    """A supervised_cnn with a head whose logits differ enough between classes (random init is tiny)."""
    encoder.training_module(CLASSES)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        encoder.module.head.weight.copy_(torch.randn(encoder.module.head.weight.shape, generator=g))
    return encoder


@pytest.fixture(scope="module")
def cnn():
    return with_random_head(build_encoder("supervised_cnn", num_channels=3, backbone="test_resnet", input_size=64))


def package_cam(clf: CamClassifier, images: np.ndarray, layer: str, targets: np.ndarray, reshape=None):
    """pytorch_grad_cam on the same net, input and targets: (un-normalised ReLU map, its scaled output)."""
    x = clf.normalize(clf.prepare(images))
    module = resolve_layer(clf.net, layer)
    cam = GradCAM(model=clf.net, target_layers=[module], reshape_transform=reshape)
    wanted = [ClassifierOutputTarget(int(t)) for t in targets]
    scaled = cam(input_tensor=x, targets=wanted)
    acts = cam.activations_and_grads.activations[0].numpy()
    grads = cam.activations_and_grads.gradients[0].numpy()
    raw = np.maximum(cam.get_cam_image(x, module, wanted, acts, grads), 0)
    return raw, scaled


@pytest.mark.parametrize("layer", ["backbone.layer4", "backbone.layer3"])
def test_cnn_agrees_with_pytorch_grad_cam(cnn, layer: str) -> None:
    clf = classifier_for(cnn)
    x = crops(4, 3, 64)
    ours = grad_cam(clf, x, layer=layer, target=["DMSO", "cmpd_a", "cmpd_b", "cmpd_a"])
    np.testing.assert_array_equal(ours.targets, [0, 1, 2, 1])
    raw, scaled = package_cam(clf, x, layer, ours.targets)
    assert ours.raw.shape == raw.shape == ((4, 2, 2) if layer.endswith("4") else (4, 4, 4))
    assert raw.max() > 0
    np.testing.assert_allclose(ours.raw, raw, rtol=1e-4, atol=1e-6 * raw.max())
    # GradCAM.__call__ scales per layer while resizing, then once more over the layer mean
    np.testing.assert_allclose(scale_cam_image(scale_cam_image(ours.raw, (64, 64))), scaled, atol=1e-4)
    assert ours.maps.shape == (4, 64, 64) and ours.maps.min() >= 0
    # the map is un-normalised: upsampling keeps the layer map's scale (bilinear stays within its range)
    assert ours.maps.max() <= ours.raw.max() + 1e-6 and ours.maps.max() > 0.5 * ours.raw.max()


def test_predicted_target_default_and_per_crop(cnn) -> None:
    clf = classifier_for(cnn)
    x = crops(3, 3, 64, seed=1)
    r = grad_cam(clf, x)
    assert r.layer == "backbone.layer4"  # the adapter's default
    np.testing.assert_array_equal(r.targets, r.logits.argmax(1))
    mixed = grad_cam(clf, x, target=["cmpd_b", "predicted", 0])
    np.testing.assert_array_equal(mixed.targets, [2, r.predicted[1], 0])
    with pytest.raises(ValueError, match="unknown target class 'nope' \\(crop 0\\)"):
        grad_cam(clf, x, target="nope")
    with pytest.raises(ValueError, match="outside 0..2"):
        grad_cam(clf, x, target=5)


def test_grad_cam_leaves_weights_and_modes_alone(cnn) -> None:
    clf = classifier_for(cnn)
    cnn.module.train()
    for p in cnn.module.parameters():
        p.grad = None  # (grad-cam's own backward in other tests fills them)
    try:
        grad_cam(clf, crops(2, 3, 64))
        assert cnn.module.training and all(p.grad is None for p in cnn.module.parameters())
    finally:
        cnn.module.eval()


def test_unknown_layer_lists_close_names(cnn) -> None:
    clf = classifier_for(cnn)
    with pytest.raises(ValueError, match=r"no layer 'backbone.layer9'; closest valid names: \[.*'backbone.layer"):
        grad_cam(clf, crops(1, 3, 64), layer="backbone.layer9")
    with pytest.raises(ValueError, match=r"no layer 'zzz'; top-level modules: \['backbone', 'head'\]"):
        grad_cam(clf, crops(1, 3, 64), layer="zzz")


def test_layer_choice_and_uniform_grid_error() -> None:
    eff = with_random_head(build_encoder("supervised_cnn", num_channels=2, backbone="test_efficientnet",
                                         input_size=64))
    clf = classifier_for(eff)
    x = clf.normalize(clf.prepare(crops(1, 2, 64)))
    layer = find_cam_layer(clf.net, x)
    assert layer.startswith("backbone.") and "pool" not in layer
    assert grad_cam(clf, crops(2, 2, 64)).layer == layer  # no layer4: the automatic pick
    small = with_random_head(build_encoder("supervised_cnn", num_channels=3, backbone="test_resnet", input_size=32))
    with pytest.raises(ValueError, match=r"'backbone.layer4' has a 1x1 grid.*uniform"):
        grad_cam(classifier_for(small), crops(1, 3, 32))
    assert grad_cam(classifier_for(small), crops(1, 3, 32), layer="backbone.layer3").raw.shape == (1, 2, 2)


def test_no_head_is_a_clear_error() -> None:
    enc = build_encoder("supervised_cnn", num_channels=3, backbone="test_resnet", input_size=64)
    with pytest.raises(ValueError, match="no classifier head"):
        classifier_for(enc)
    with pytest.raises(TypeError, match="differentiable encoder"):
        classifier_for(object())


# -- ViTs -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit():
    timm = import_timm()
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=64, in_chans=3,
                            depth=2)
    return net.eval()


def vit_tokens_to_map(prefix: int, grid: int):
    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t[:, prefix:].reshape(t.shape[0], grid, grid, t.shape[-1]).permute(0, 3, 1, 2)

    return reshape


def test_timm_vit_patch_token_grad_cam_agrees_with_pytorch_grad_cam(vit) -> None:
    clf = vit_classifier(vit, CLASSES)
    assert clf.default_layer == "blocks.1.norm1"  # CLS-pooled: the last block's attention input
    x = crops(3, 3, 64, seed=2)
    ours = grad_cam(clf, x, target=[0, 1, 2])
    assert ours.raw.shape == (3, 4, 4) and ours.maps.shape == (3, 64, 64)
    raw, _ = package_cam(clf, x, clf.default_layer, ours.targets, reshape=vit_tokens_to_map(1, 4))
    assert raw.max() > 0
    np.testing.assert_allclose(ours.raw, raw, rtol=1e-4, atol=1e-6 * raw.max())
    with pytest.raises(ValueError, match="pass layer="):
        find_cam_layer(vit, clf.normalize(clf.prepare(x[:1])))


def test_timm_vit_attention_rollout_matches_explicit_attention(vit) -> None:
    """Our rollout (attention rebuilt from the q/k taps) against rollout of the attention probabilities
    that timm's non-fused attention path computes itself (read at `attn_drop`)."""
    clf = vit_classifier(vit, CLASSES)
    x = crops(2, 3, 64, seed=4)
    ours = attention_rollout(clf, x)
    probs: list[torch.Tensor] = []
    hooks = [b.attn.attn_drop.register_forward_hook(lambda _m, i, _o: probs.append(i[0].detach()))
             for b in vit.blocks]
    saved = [b.attn.fused_attn for b in vit.blocks]
    try:
        for b in vit.blocks:
            b.attn.fused_attn = False
        with torch.no_grad():
            vit(clf.normalize(clf.prepare(x)))
    finally:
        for h in hooks:
            h.remove()
        for b, f in zip(vit.blocks, saved):
            b.attn.fused_attn = f
    rollout = torch.eye(probs[0].shape[-1]).expand(2, -1, -1)
    for p in probs:
        a = 0.5 * p.mean(1) + 0.5 * torch.eye(p.shape[-1])
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    expected = rollout[:, 0, 1:].reshape(2, 4, 4).numpy()  # CLS row, patch columns
    np.testing.assert_allclose(ours.raw, expected, rtol=1e-4, atol=1e-7)
    assert ours.maps.shape == (2, 64, 64)


@pytest.fixture(scope="module")
def camae():
    return build_encoder("ca_mae", preset="demo", depth=2, seed=0)


def camae_classifier(encoder, n_classes: int = 3) -> CamClassifier:
    torch.manual_seed(1)
    head = nn.Linear(encoder.spec.embedding_dim, n_classes)
    return classifier_for(encoder, head=head, classes=CLASSES[:n_classes])


def test_camae_patch_token_grad_cam_agrees_with_pytorch_grad_cam(camae) -> None:
    """CA-MAE tokens are channel-major (C groups of the 4x4 grid): grad-cam sees them stacked as a
    (C*4, 4) map; our map averages the C group maps, so the package's map is averaged the same way."""
    clf = camae_classifier(camae)
    assert clf.default_layer == "backbone.blocks.1"
    c = 3
    x = crops(2, c, 64, seed=5)
    ours = grad_cam(clf, x, target=[2, 0])
    assert ours.raw.shape == (2, 4, 4) and ours.maps.shape == (2, 64, 64)

    def stacked(t: torch.Tensor) -> torch.Tensor:
        return t[:, 1:].reshape(t.shape[0], c * 4, 4, t.shape[-1]).permute(0, 3, 1, 2)

    raw, _ = package_cam(clf, x, clf.default_layer, ours.targets, reshape=stacked)
    assert raw.shape == (2, c * 4, 4) and raw.max() > 0
    np.testing.assert_allclose(ours.raw, raw.reshape(2, c, 4, 4).mean(1), rtol=1e-4, atol=1e-6 * raw.max())


def test_camae_attention_rollout_on_the_patch_grid(camae) -> None:
    clf = camae_classifier(camae)
    r = attention_rollout(clf, crops(2, 4, 64, seed=6))
    assert r.raw.shape == (2, 4, 4) and r.maps.shape == (2, 64, 64)
    assert np.isfinite(r.raw).all() and r.raw.min() > 0
    # each rollout row is a distribution over the 1 + 4*16 tokens: the patch part is below 1
    assert (r.raw.sum(axis=(1, 2)) * 4 < 1.0 + 1e-5).all()
    with pytest.raises(ValueError, match="a CA-MAE encoder has no classifier"):
        classifier_for(camae)


def test_rollout_needs_a_transformer(cnn) -> None:
    with pytest.raises(ValueError, match="attention rollout needs a transformer"):
        attention_rollout(classifier_for(cnn), crops(1, 3, 64))


# -- 3-D z-stacks -------------------------------------------------------------------------------------


def test_z_stack_cnn_forward_and_grad_cam() -> None:
    enc = with_random_head(build_encoder("supervised_cnn", num_channels=2, spatial_dims=3, input_size=32,
                                         backbone_kwargs={"widths": (4, 8, 8, 16)}))
    assert enc.spec.config["spatial_dims"] == 3 and enc.spec.config["backbone"] == "resnet3d"
    z = crops(3, 2, 32, seed=7, z=5)
    emb = enc.embed(z)
    assert emb.shape == (3, 16) and np.isfinite(emb).all()
    assert enc.logits(z).shape == (3, 3)
    with pytest.raises(ValueError, match=r"z-stacks \(B, C, Z, H, W\)"):
        enc.embed(crops(1, 2, 32))
    clf = classifier_for(enc)
    ours = grad_cam(clf, z, target=[0, 1, 2])
    assert ours.layer == "backbone.layer4"
    assert ours.raw.shape == (3, 5, 4, 4) and ours.maps.shape == (3, 5, 32, 32)  # Z kept, H and W / 8
    raw, _ = package_cam(clf, z, "backbone.layer4", ours.targets)  # grad-cam's 3-D (5-D tensor) path
    assert raw.max() > 0
    np.testing.assert_allclose(ours.raw, raw, rtol=1e-4, atol=1e-6 * raw.max())
    with pytest.raises(ValueError, match="spatial_dims=3 needs backbone='resnet3d'"):
        build_encoder("supervised_cnn", num_channels=2, spatial_dims=3, backbone="resnet18")


@pytest.mark.parametrize("strategy", ["adapt_stem", "per_channel_mean"])
def test_timm_family_encoder(strategy: str) -> None:
    """`timm` encoders normalize inside their backbone (no per-crop standardization); with a per-channel
    strategy the layer sees each channel as its own image, and the map is their average."""
    enc = build_encoder("timm", model_name="test_resnet", num_channels=2, input_size=64, channel_strategy=strategy)
    with_random_head(enc)
    clf = classifier_for(enc)
    assert clf.default_layer == "backbone.model.layer4"
    x = crops(3, 2, 64, seed=8)
    assert torch.equal(clf.normalize(clf.prepare(x)), clf.prepare(x))
    ours = grad_cam(clf, x, target=[0, 1, 2])
    np.testing.assert_allclose(ours.logits, enc.logits(x), rtol=1e-4, atol=1e-5)  # same path as the encoder
    if strategy == "adapt_stem":
        raw, _ = package_cam(clf, x, clf.default_layer, ours.targets)
    else:
        raw = package_per_channel(clf, x, ours.targets)
    assert ours.raw.shape == (3, 2, 2) and raw.max() > 0
    np.testing.assert_allclose(ours.raw, raw, rtol=1e-4, atol=1e-6 * raw.max())


def package_per_channel(clf: CamClassifier, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """grad-cam's maps for a channels-as-batch layer: its per-sub-image maps, averaged per crop."""
    x = clf.normalize(clf.prepare(images))
    module = resolve_layer(clf.net, clf.default_layer)
    cam = GradCAM(model=clf.net, target_layers=[module])
    wanted = [ClassifierOutputTarget(int(t)) for t in targets]
    cam(input_tensor=x, targets=wanted)
    acts = cam.activations_and_grads.activations[0].numpy()
    grads = cam.activations_and_grads.gradients[0].numpy()
    per_image = np.maximum(cam.get_cam_image(x, module, wanted, acts, grads), 0)
    return per_image.reshape(len(images), -1, *per_image.shape[1:]).mean(1)
