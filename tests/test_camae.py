"""CA-MAE / OpenPhenom encoder: upstream key names, checkpoint round trips, legacy block math, predict semantics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bioembed_assets.encoders import Encoder, build_encoder, build_from_spec, list_families
from bioembed_assets.encoders.base import EncoderSpec
from bioembed_assets.encoders.camae import ChannelAgnosticViT, ParallelScalingBlock, build_camae_module
from bioembed_assets.encoders.checkpoints import (
    load_openphenom_backbone,
    load_state_dict_file,
    save_state_dict_file,
)
from bioembed_assets.schema import BioembedInputError

PREFIX = "encoder.vit_backbone."
SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, max_in_chans=11)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Make *every* trainable tensor random (so biases, gamma, norms and tokens all matter); eval mode."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def randomized(seed: int = 0, **cfg: object) -> ChannelAgnosticViT:
    """A small CA-MAE backbone with every trainable tensor random."""
    return randomize_(build_camae_module("demo", seed=seed, **{**SMALL, **cfg}), seed)


def assert_close(got: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    """Max-abs-diff check (torch.testing.assert_close imports torch.distributed: ~5 s on 2 cores)."""
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff <= atol, f"max abs diff {diff} > {atol}"


def images(n: int = 3, c: int = 5, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(seed)).float()


def upstream_state_dict(model: ChannelAgnosticViT) -> dict[str, torch.Tensor]:
    """Model weights under OpenPhenom's full names, plus decoder/head junk the loader must ignore."""
    sd = {PREFIX + k: v.clone() for k, v in model.state_dict().items()}
    sd["decoder.mask_token"] = torch.randn(1, 1, 16)
    sd["decoder.decoders.0.0.attn.qkv.weight"] = torch.randn(48, 16)
    sd["encoder_decoder_proj.weight"] = torch.randn(16, 32)
    sd["decoder_pred.bias"] = torch.randn(64)
    return sd


# -- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "safetensors"])
def test_checkpoint_round_trip_gives_identical_embeddings(tmp_path: Path, fmt: str) -> None:
    model = randomized(seed=1)
    x = images()
    with torch.no_grad():
        expected = model.predict(x)
    path = tmp_path / "model.safetensors"  # upstream writes a zip pickle under this name
    sd = upstream_state_dict(model)
    if fmt == "zip":
        torch.save({"state_dict": sd}, path)
        assert path.read_bytes()[:4] == b"PK\x03\x04"
    else:
        save_state_dict_file(sd, path, format="safetensors")
        assert path.read_bytes()[:4] != b"PK\x03\x04"
    fresh = randomized(seed=2)
    load_openphenom_backbone(path, fresh)
    with torch.no_grad():
        got = fresh.predict(x)
    assert torch.equal(got, expected)


def test_loader_strips_wrappers_and_regenerates_pos_embed(tmp_path: Path) -> None:
    model = randomized(seed=3)
    sd = {"module." + k: v for k, v in upstream_state_dict(model).items() if not k.endswith("pos_embed")}
    path = save_state_dict_file(sd, tmp_path / "ddp.pt", format="zip")
    loaded = load_state_dict_file(path)
    assert all(k.startswith(("encoder.", "decoder", "encoder_decoder_proj")) for k in loaded)
    fresh = load_openphenom_backbone(path, randomized(seed=4))
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_vit_small_preset_matches_openphenom_encoder() -> None:
    model = build_camae_module("vit_small_patch16_256")
    sd = model.state_dict()
    assert sum(v.numel() for v in sd.values()) == 22_459_776
    assert sd["pos_embed"].shape == (1, 2817, 384) and not model.pos_embed.requires_grad
    block = {
        "in_norm.weight": (384,), "in_norm.bias": (384,), "in_proj.weight": (2688, 384), "mlp_bias": (1536,),
        "q_norm.weight": (64,), "q_norm.bias": (64,), "k_norm.weight": (64,), "k_norm.bias": (64,),
        "attn_out_proj.weight": (384, 384), "attn_out_proj.bias": (384,),
        "mlp_out_proj.weight": (384, 1536), "mlp_out_proj.bias": (384,), "ls.gamma": (384,),
    }  # fmt: skip
    expected = {
        "cls_token": (1, 1, 384),
        "pos_embed": (1, 2817, 384),
        "patch_embed.proj.weight": (384, 1, 16, 16),
        "patch_embed.proj.bias": (384,),
        "fc_norm.weight": (384,),
        "fc_norm.bias": (384,),
        **{f"blocks.{i}.{k}": s for i in range(12) for k, s in block.items()},
    }
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # Upstream-named weights (with decoder keys) load strictly into a fresh model; one tiny forward runs.
    other = build_camae_module("vit_small_patch16_256", seed=1)
    load_openphenom_backbone(upstream_state_dict(model), other)
    x = images(n=1, c=1, size=256)
    with torch.no_grad():
        assert torch.equal(other.predict(x), model.predict(x))


def test_checkpoint_with_wrong_shape_or_missing_key_is_refused(tmp_path: Path) -> None:
    sd = upstream_state_dict(randomized())
    bad = dict(sd)
    bad[PREFIX + "blocks.1.in_proj.weight"] = torch.zeros(10, 32)
    path = save_state_dict_file(bad, tmp_path / "bad_shape.safetensors")
    with pytest.raises(BioembedInputError, match=r"blocks\.1\.in_proj\.weight.*\(10, 32\)") as err:
        load_openphenom_backbone(path, randomized())
    assert str(path) in str(err.value)

    missing = {k: v for k, v in sd.items() if k != PREFIX + "blocks.0.ls.gamma"}
    path = save_state_dict_file(missing, tmp_path / "missing.pt", format="zip")
    with pytest.raises(BioembedInputError, match=r"missing keys \(1\): blocks\.0\.ls\.gamma") as err:
        load_openphenom_backbone(path, randomized())
    assert str(path) in str(err.value)

    extra = {**sd, PREFIX + "norm.weight": torch.ones(32)}
    with pytest.raises(BioembedInputError, match=r"unexpected keys \(1\): norm\.weight"):
        load_openphenom_backbone(extra, randomized())

    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BioembedInputError, match="junk.bin"):
        load_state_dict_file(junk)


# -- block math and positions ---------------------------------------------------------------------


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def test_block_matches_hand_computation_with_legacy_bias() -> None:
    d, heads, hidden = 32, 2, 128
    hd = d // heads
    block = randomized(seed=5).blocks[0]
    assert isinstance(block, ParallelScalingBlock)
    p = {k: v.detach().double() for k, v in block.state_dict().items()}
    x = torch.randn(2, 7, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    y = _layer_norm(x, p["in_norm.weight"], p["in_norm.bias"]) @ p["in_proj.weight"].T
    # Legacy bias, as described: MLP units 0..3d-1 get nothing, units 3d..4d-1 get mlp_bias[0:d],
    # q gets mlp_bias[d:2d], k gets mlp_bias[2d:3d], v gets mlp_bias[3d:4d].
    mb = p["mlp_bias"]
    m, q, k, v = y[..., :hidden].clone(), *y[..., hidden:].split(d, dim=-1)
    m[..., 3 * d :] += mb[0:d]
    q, k, v = q + mb[d : 2 * d], k + mb[2 * d : 3 * d], v + mb[3 * d : 4 * d]

    def split_heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, d) -> (B, H, N, hd)
        return t.reshape(2, 7, heads, hd).permute(0, 2, 1, 3)

    qh = _layer_norm(split_heads(q), p["q_norm.weight"], p["q_norm.bias"])
    kh = _layer_norm(split_heads(k), p["k_norm.weight"], p["k_norm.bias"])
    att = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ split_heads(v)
    att = att.permute(0, 2, 1, 3).reshape(2, 7, d) @ p["attn_out_proj.weight"].T + p["attn_out_proj.bias"]
    gelu = 0.5 * m * (1 + torch.erf(m / math.sqrt(2)))
    mlp = gelu @ p["mlp_out_proj.weight"].T + p["mlp_out_proj.bias"]
    expected = x + p["ls.gamma"] * (att + mlp)

    with torch.no_grad():
        got = block.double()(x)
    assert_close(got, expected, atol=1e-10)

    # The "fixed" (timm >= 1.0.25) placement gives a clearly different output, so this test is sensitive.
    with torch.no_grad():
        h, w = block.in_norm(x), block.in_proj.weight
        fixed = F.linear(h, w, torch.cat([block.mlp_bias, torch.zeros(3 * d, dtype=x.dtype)]))
        legacy = F.linear(h, w, torch.cat([torch.zeros(3 * d, dtype=x.dtype), block.mlp_bias]))
    assert (fixed - legacy).abs().max() > 0.1


def test_pos_embed_is_tiled_2d_sincos() -> None:
    model = randomized()  # embed_dim 32 -> 8 frequencies, grid 4x4, 11 channels
    pe = model.pos_embed.detach()
    assert pe.shape == (1, 1 + 11 * 16, 32) and not model.pos_embed.requires_grad
    assert torch.all(pe[0, 0] == 0)
    for c, h, w, k in [(0, 0, 1, 0), (0, 2, 3, 5), (7, 3, 1, 2), (10, 1, 2, 7)]:
        omega = 10000.0 ** (-k / 8)
        row = pe[0, 1 + c * 16 + h * 4 + w]
        assert row[k].item() == pytest.approx(math.sin(h * omega), abs=1e-6)
        assert row[8 + k].item() == pytest.approx(math.cos(h * omega), abs=1e-6)
        assert row[16 + k].item() == pytest.approx(math.sin(w * omega), abs=1e-6)
        assert row[24 + k].item() == pytest.approx(math.cos(w * omega), abs=1e-6)
    assert_close(pe[0, 1:17], pe[0, 1 + 10 * 16 :], atol=0)


# -- predict semantics ----------------------------------------------------------------------------


def test_pooled_embedding_ignores_channel_order_and_channelwise_permutes() -> None:
    model = randomized(seed=6)
    x = images(c=5)
    perm = [3, 0, 4, 1, 2]
    with torch.no_grad():
        pooled, pooled_p = model.predict(x), model.predict(x[:, perm])
        cw, cw_p = model.predict(x, channelwise=True), model.predict(x[:, perm], channelwise=True)
    assert_close(pooled_p, pooled, atol=1e-5)
    assert cw.shape == (3, 5 * 32)
    assert_close(cw_p.reshape(3, 5, 32), cw.reshape(3, 5, 32)[:, perm], atol=1e-5)
    assert_close(cw.reshape(3, 5, 32).mean(1), pooled, atol=1e-5)


def test_predict_is_instance_normalized_0_255_input() -> None:
    model = randomized(seed=7)
    x = images(c=2)
    # Per-image-per-channel standardization: an affine change of a channel's intensities barely matters.
    with torch.no_grad():
        a, b = model.predict(x), model.predict(x * 0.5 + 20)
    assert_close(a, b, atol=1e-3)


@pytest.mark.parametrize("channels", [1, 3, 5, 6, 11])
def test_channel_counts(channels: int) -> None:
    model = randomized()
    with torch.no_grad():
        out = model.predict(images(n=2, c=channels))
        cw = model.predict(images(n=2, c=channels), channelwise=True)
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    assert cw.shape == (2, channels * 32)


def test_bad_inputs_are_refused() -> None:
    model = randomized()
    with pytest.raises(ValueError, match="1 to 11 channels, got 12"):
        model.predict(images(c=12))
    with pytest.raises(ValueError, match="32x32 crops, got 48x48"):
        model.predict(images(size=48))
    with pytest.raises(ValueError, match="32x32 crops, got 32x16"):
        model.predict(images()[..., :16])


# -- the Encoder adapter --------------------------------------------------------------------------


def test_adapter_embeds_raw_crops_deterministically() -> None:
    assert "ca_mae" in list_families()
    rng_state = torch.get_rng_state()
    enc = build_encoder("ca_mae")
    assert torch.equal(torch.get_rng_state(), rng_state)  # building does not consume the global RNG
    assert isinstance(enc, Encoder)
    spec = enc.spec
    assert (spec.family, spec.channels, spec.per_cell, spec.trainable) == ("ca_mae", None, True, True)
    size, dim = spec.input_size, spec.embedding_dim
    crops8 = np.random.default_rng(0).integers(0, 256, (4, 5, size, size), dtype=np.uint8)
    crops16 = crops8.astype(np.uint16) * 257
    masks = np.ones((4, size, size), dtype=bool)
    e8, e16 = enc.embed(crops8, masks), enc.embed(crops16, masks)
    assert e8.shape == (4, dim) and e8.dtype == np.float32 and np.isfinite(e8).all()
    np.testing.assert_allclose(e16, e8, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(build_encoder("ca_mae", seed=0).embed(crops8, masks), e8)
    assert not np.allclose(build_encoder("ca_mae", seed=1).embed(crops8, masks), e8)
    assert enc.embed(crops8[:0], masks[:0]).shape == (0, dim)
    with pytest.raises(TypeError, match="int32"):
        enc.embed(crops8.astype(np.int32), masks)


def test_adapter_rebuilds_from_spec_and_weights() -> None:
    enc = build_encoder("ca_mae", seed=3, depth=2)
    crops = np.random.default_rng(1).integers(0, 4096, (3, 4, 64, 64), dtype=np.uint16)
    expected = enc.embed(crops, None)
    spec = EncoderSpec.from_dict(enc.spec.to_dict())
    assert spec.config == {"preset": "demo", "channelwise": False, "seed": 3, "depth": 2}
    rebuilt = build_from_spec(spec, enc.state_dict())
    np.testing.assert_array_equal(rebuilt.embed(crops, None), expected)
    # Full upstream names are accepted too.
    other = build_encoder("ca_mae", seed=9, depth=2)
    other.load_state_dict({PREFIX + k: v for k, v in enc.state_dict().items()})
    np.testing.assert_array_equal(other.embed(crops, None), expected)


def test_adapter_channelwise_needs_a_fixed_channel_count() -> None:
    with pytest.raises(ValueError, match="num_channels"):
        build_encoder("ca_mae", channelwise=True)
    enc = build_encoder("ca_mae", channelwise=True, num_channels=3, depth=1)
    assert enc.spec.embedding_dim == 3 * 128
    crops = np.random.default_rng(2).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    assert enc.embed(crops, None).shape == (2, 3 * 128)
    with pytest.raises(ValueError, match="built for 3 channels, got 5"):
        enc.embed(np.zeros((2, 5, 64, 64), np.uint8), None)
