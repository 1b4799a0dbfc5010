"""Trainable encoder families: bioimage_embed-style AE / (beta-)VAE and the DeepProfiler-style supervised CNN.

All on CPU with tiny models (32 px crops, narrow widths, timm's `test_resnet` / `test_efficientnet`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bioembed_assets.encoders import Encoder, EncoderSpec, build_encoder, build_from_spec, list_families
from bioembed_assets.schema import CELL_PAINTING_CHANNELS

STAINS = ["DNA", "ER", "RNA"]
SIZE = 32
TINY_AE = dict(channels=STAINS, latent_dim=8, input_size=SIZE, base_width=4)
TINY_CNN = dict(channels=STAINS, backbone="test_resnet", input_size=SIZE)
CLASSES = ["DMSO", "cmpd_a", "cmpd_b"]


def crops(n: int = 6, c: int = 3, size: int = SIZE, seed: int = 0, dtype: type = np.uint8) -> np.ndarray:
    hi = 256 if dtype == np.uint8 else 4096
    return np.random.default_rng(seed).integers(0, hi, (n, c, size, size), dtype=dtype)


def labelled_batch(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch whose class is visible in the image (brighter channel = class) so it can be learnt."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    images = torch.rand((n, 3, SIZE, SIZE), generator=g) * 60
    images[torch.arange(n), labels, 8:24, 8:24] += 150
    return images, labels


def tiny(family: str, **cfg: object) -> Encoder:
    base = TINY_CNN if family == "supervised_cnn" else TINY_AE
    return build_encoder(family, **{**base, **cfg})


def train(encoder: Encoder, steps: int, lr: float = 1e-2, classes: list[str] | None = None) -> tuple[float, float]:
    """Adam steps on one fixed batch; returns the eval-mode loss before and after."""
    module = encoder.training_module(classes)
    images, labels = labelled_batch()
    opt = torch.optim.Adam(module.parameters(), lr=lr)

    def eval_loss() -> float:
        module.eval()
        with torch.no_grad():
            return float(module(images, labels)["loss"])

    before = eval_loss()
    module.train()
    torch.manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        module(images, labels)["loss"].backward()
        opt.step()
    return before, eval_loss()


# -- specs and embeddings --------------------------------------------------------------------------


def test_families_are_registered() -> None:
    assert {"ae", "vae", "beta_vae", "vqvae", "mae", "supervised_cnn", "timm", "subcell", "shape_embed"} <= set(list_families())


@pytest.mark.parametrize("family", ["ae", "vae"])
def test_autoencoder_spec_and_embedding(family: str) -> None:
    rng_state = torch.get_rng_state()
    enc = tiny(family)
    assert torch.equal(torch.get_rng_state(), rng_state)  # building does not consume the global RNG
    assert isinstance(enc, Encoder)
    spec = enc.spec
    assert (spec.family, spec.embedding_dim, spec.input_size, spec.channels) == (family, 8, SIZE, tuple(STAINS))
    assert spec.trainable and spec.per_cell
    json.dumps(spec.to_dict())  # the registry stores the spec as JSON
    x8 = crops()
    e8 = enc.embed(x8, np.ones((6, SIZE, SIZE), bool))
    assert e8.shape == (6, 8) and e8.dtype == np.float32 and np.isfinite(e8).all()
    np.testing.assert_array_equal(enc.embed(x8.astype(np.uint16) * 257), e8)
    assert enc.embed(x8[:0]).shape == (0, 8)
    # Per-crop per-channel self-standardization: a global intensity scale barely changes the embedding.
    np.testing.assert_allclose(enc.embed(x8.astype(np.float32) * 0.25), e8, atol=2e-3)
    out = enc.reconstruct(x8)
    assert out["images"].shape == out["target"].shape == x8.shape


def test_autoencoder_channel_settings() -> None:
    enc = build_encoder("ae", num_channels=2, latent_dim=4, input_size=16, base_width=2)
    assert enc.spec.channels is None and enc.spec.config["num_channels"] == 2
    assert enc.embed(crops(2, c=2, size=16)).shape == (2, 4)
    default = build_encoder("vae")
    assert default.spec.channels == CELL_PAINTING_CHANNELS and default.spec.embedding_dim == 64
    assert default.spec.input_size == 64 and default.spec.config["beta"] == 1.0
    with pytest.raises(ValueError, match="num_channels=2 does not match"):
        build_encoder("ae", channels=STAINS, num_channels=2)
    with pytest.raises(ValueError, match="power of two"):
        build_encoder("ae", num_channels=1, input_size=48)
    with pytest.raises(ValueError, match="beta"):
        build_encoder("vae", num_channels=1, beta=-1.0)


def test_supervised_spec_and_embedding() -> None:
    enc = tiny("supervised_cnn")
    spec = enc.spec
    assert (spec.family, spec.embedding_dim, spec.channels) == ("supervised_cnn", 96, tuple(STAINS))
    assert spec.trainable and enc.module.head is None and enc.classes is None
    e = enc.embed(crops())
    assert e.shape == (6, 96) and e.dtype == np.float32
    assert enc.embed(crops()[:0]).shape == (0, 96)
    eff = build_encoder("supervised_cnn", num_channels=2, backbone="test_efficientnet", input_size=SIZE)
    assert eff.spec.embedding_dim == eff.module.backbone.num_features == 256
    assert eff.embed(crops(2, c=2)).shape == (2, 256)
    with pytest.raises(ValueError, match="no classifier head"):
        enc.logits(crops())
    with pytest.raises(ValueError, match="unknown timm backbone"):
        build_encoder("supervised_cnn", num_channels=1, backbone="no_such_net")
    with pytest.raises(ValueError, match="in_chans"):
        build_encoder("supervised_cnn", num_channels=1, backbone="test_resnet", backbone_kwargs={"in_chans": 3})


@pytest.mark.parametrize("family", ["ae", "vae", "beta_vae", "vqvae", "supervised_cnn"])
def test_seed_makes_init_deterministic(family: str) -> None:
    x = crops()
    a = tiny(family, seed=5).embed(x)
    np.testing.assert_array_equal(tiny(family, seed=5).embed(x), a)
    assert not np.allclose(tiny(family, seed=6).embed(x), a)


# -- training hook ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family,steps", [("ae", 15), ("vae", 15), ("beta_vae", 15), ("supervised_cnn", 10)])
def test_a_few_steps_lower_the_loss(family: str, steps: int) -> None:
    enc = tiny(family)
    before, after = train(enc, steps, classes=CLASSES if family == "supervised_cnn" else None)
    assert np.isfinite(before) and after < before, (before, after)


@pytest.mark.parametrize("family", ["ae", "vae", "beta_vae", "vqvae", "supervised_cnn"])
def test_trained_weights_round_trip_through_the_spec(family: str) -> None:
    enc = tiny(family, seed=2)
    train(enc, 2, classes=CLASSES if family == "supervised_cnn" else None)
    spec = EncoderSpec.from_dict(json.loads(json.dumps(enc.spec.to_dict())))
    rebuilt = build_from_spec(spec, enc.state_dict())
    x = crops(4, seed=3)
    np.testing.assert_array_equal(rebuilt.embed(x), enc.embed(x))
    if family == "supervised_cnn":
        assert spec.config["classes"] == CLASSES and rebuilt.classes == CLASSES
        assert any(k.startswith("head.") for k in enc.state_dict())
        np.testing.assert_array_equal(rebuilt.logits(x), enc.logits(x))
        assert enc.logits(x).shape == (4, 3)


@torch.no_grad()
def test_vae_logs_recon_and_nonnegative_kl() -> None:
    images, labels = labelled_batch()
    out = tiny("vae", beta=4.0).training_module()(images, labels)
    assert {"loss", "recon", "kl"} <= set(out)
    assert all(v.ndim == 0 and v.dtype == torch.float32 for v in out.values())
    assert float(out["kl"]) >= 0 and float(out["recon"]) > 0
    n_pix = images[0].numel()
    assert abs(float(out["loss"]) - float(out["recon"] + 4.0 * out["kl"] / n_pix)) < 1e-6
    module = tiny("vae", beta=0.0).training_module().eval()
    out0 = module(images, labels)
    assert float(out0["loss"]) == float(out0["recon"])
    ae_out = tiny("ae").training_module()(images, labels)
    assert set(ae_out) == {"loss", "recon", "recon_loss", "variational_loss", "mse"}


def test_losses_are_float32_under_bf16_autocast() -> None:
    images, labels = labelled_batch(4)
    for family, classes in [("vae", None), ("supervised_cnn", CLASSES)]:
        module = tiny(family).training_module(classes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(images, labels)
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values()), (family, out)
        out["loss"].backward()


def test_supervised_classes_and_head() -> None:
    enc = tiny("supervised_cnn")
    with pytest.raises(ValueError, match="at least 2 classes"):
        enc.training_module(["DMSO"])
    with pytest.raises(ValueError, match="treatment classes"):
        enc.training_module()
    with pytest.raises(ValueError, match="distinct"):
        enc.training_module(["a", "a"])
    module = enc.training_module(CLASSES)
    head = enc.module.head
    assert head is not None and head.out_features == 3 and enc.spec.config["classes"] == CLASSES
    assert enc.training_module().net.head is head  # stored classes reused, head kept
    assert enc.training_module(CLASSES).net.head is head
    assert {id(p) for p in module.parameters()} == {id(p) for p in enc.module.parameters()}
    images, labels = labelled_batch(3)
    out = module(images, labels)
    assert set(out) == {"loss", "accuracy"} and 0.0 <= float(out["accuracy"]) <= 1.0
    with pytest.raises(ValueError, match=r"class indices in 0\.\.2"):
        module(images, torch.tensor([0, 1, 3]))
    enc.training_module(["x", "y"])  # new treatments: a fresh head
    assert enc.module.head.out_features == 2 and enc.classes == ["x", "y"]
    smooth = build_encoder("supervised_cnn", **TINY_CNN, label_smoothing=0.1, classes=CLASSES)
    assert smooth.classes == CLASSES and smooth.training_module().label_smoothing == 0.1


# -- adapter behaviour -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["ae", "vae", "vqvae", "supervised_cnn"])
def test_channel_count_mismatch_names_expected_and_got(family: str) -> None:
    enc = tiny(family)
    with pytest.raises(ValueError, match=r"expects 3 channels \['DNA', 'ER', 'RNA'\], got 5 channels"):
        enc.embed(crops(c=5))
    classes = CLASSES if family == "supervised_cnn" else None
    with pytest.raises(ValueError, match="expects 3 channels"):
        enc.training_module(classes)(torch.zeros(2, 1, SIZE, SIZE), torch.zeros(2, dtype=torch.long))
    counted = build_encoder(family, **{**(TINY_CNN if family == "supervised_cnn" else TINY_AE),
                                       "channels": None, "num_channels": 2})
    with pytest.raises(ValueError, match="expects 2 channels, got 3 channels"):
        counted.embed(crops(c=3))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        enc.embed(crops()[0])


def test_autoencoder_rejects_other_crop_sizes() -> None:
    with pytest.raises(ValueError, match="expects 32x32 crops, got 16x16"):
        tiny("ae").embed(crops(size=16))


@pytest.mark.parametrize("family", ["vae", "vqvae", "supervised_cnn"])
def test_embed_restores_train_mode(family: str) -> None:
    enc = tiny(family)
    module = enc.training_module(CLASSES if family == "supervised_cnn" else None)
    module.train()
    first = next(m for m in enc.module.modules() if not list(m.children()))
    first.eval()  # a mixed state (e.g. a frozen submodule) is restored as it was
    x = crops(2)
    e = enc.embed(x)
    assert enc.module.training and not first.training
    assert sum(m.training for m in enc.module.modules()) == sum(1 for _ in enc.module.modules()) - 1
    np.testing.assert_array_equal(enc.embed(x), e)  # eval mode: no VAE sampling, deterministic
    enc.module.eval()
    enc.embed(x)
    assert not enc.module.training
