"""CA-MAE decoder / masked autoencoder: OpenPhenom key names, strict loading, masking, loss, in-painting, adapter."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bioembed_assets.encoders import build_encoder, build_from_spec
from bioembed_assets.encoders.base import EncoderSpec
from bioembed_assets.encoders.camae import PRESETS, CAMAEEncoder, ChannelAgnosticViT
from bioembed_assets.encoders.camae_decoder import (
    DECODER_PRESETS,
    CAMAEDecoder,
    CAMAEModel,
    build_camae_model,
    load_openphenom_mae,
)
from bioembed_assets.encoders.checkpoints import save_state_dict_file
from bioembed_assets.schema import BioembedInputError

from .test_camae import randomize_

ENC = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)  # 16 tokens per channel
DEC = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, decoder_cross_attn_heads=2)
DEC_CFG = {"preset": "demo", "embed_dim": 32, "num_heads": 2, "cross_attn_heads": 2}


def tiny(seed: int = 0, randomize: bool = False, **cfg: object) -> CAMAEModel:
    model = build_camae_model("demo", "demo", seed=seed, **{**ENC, **DEC, **cfg})
    return randomize_(model, seed) if randomize else model.eval()


def images(n: int = 2, c: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(seed)).float()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Adam:
    """Bias-corrected Adam in a few lines (building a torch.optim optimizer costs ~3 s of imports once)."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.params, self.lr, self.betas, self.t = params, lr, betas, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:  # unused (fc_norm), as torch.optim skips it
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.sub_(self.lr * (m / (1 - b1**self.t)) / ((v / (1 - b2**self.t)).sqrt() + 1e-8))
            p.grad = None


# -- OpenPhenom names ------------------------------------------------------------------------------


def test_openphenom_preset_has_upstream_names_and_shapes() -> None:
    # Built on CPU without our init (0.8 s; the meta device's one-time warm-up costs ~3 s).
    model = CAMAEModel(
        ChannelAgnosticViT(**PRESETS["vit_small_patch16_256"]),
        CAMAEDecoder(**DECODER_PRESETS["openphenom"], tokens_per_modality=256),
    )
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(sd) == 765 and sum(math.prod(s) for s in sd.values()) == 178_045_568  # the HF file's totals
    assert sum(k.startswith("encoder.vit_backbone.") for k in sd) == 162
    d = 512
    block = {
        "norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
        "mlp.fc1.weight": (4 * d, d), "mlp.fc1.bias": (4 * d,), "mlp.fc2.weight": (d, 4 * d), "mlp.fc2.bias": (d,),
    }  # fmt: skip
    expected = {
        "mask_token": (1, 1, d),
        "placeholder": (1, 1, d),
        "pos_embeddings": (1, 1537, d),
        **{f"modality_tokens.{m}": (1, 1, d) for m in range(6)},
        "cross_attention.q.weight": (d, d),
        "cross_attention.kv.weight": (2 * d, d),
        "cross_attention.proj.weight": (d, d),
        "cross_attention.proj.bias": (d,),
        "mlp.fc1.weight": (4 * d, d), "mlp.fc1.bias": (4 * d,), "mlp.fc2.weight": (d, 4 * d), "mlp.fc2.bias": (d,),
        **{f"{n}.{p}": (d,) for n in ("query_norm", "context_norm", "out_norm") for p in ("weight", "bias")},
        **{f"decoders.{m}.{b}.{k}": s for m in range(6) for b in range(8) for k, s in block.items()},
    }  # fmt: skip
    assert {k[len("decoder.") :]: s for k, s in sd.items() if k.startswith("decoder.")} == expected
    heads = {k: s for k, s in sd.items() if not k.startswith(("encoder.vit_backbone.", "decoder."))}
    assert heads == {
        "encoder_decoder_proj.weight": (512, 384),
        "encoder_decoder_proj.bias": (512,),
        "decoder_pred.weight": (256, 512),
        "decoder_pred.bias": (256,),
    }
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"encoder.vit_backbone.pos_embed", "decoder.placeholder", "decoder.pos_embeddings"}


def test_decoder_pos_embeddings_are_tiled_sincos_with_zero_cls_row() -> None:
    dec = tiny().decoder
    pe = dec.pos_embeddings.detach()
    assert pe.shape == (1, 1 + 6 * 16, 32) and torch.all(pe[0, 0] == 0)
    h, w, k = 2, 3, 5  # D/4 = 8 frequencies over a 4x4 grid
    row = pe[0, 1 + 4 * 16 + h * 4 + w]
    omega = 10000.0 ** (-k / 8)
    assert row[k].item() == pytest.approx(math.sin(h * omega), abs=1e-6)
    assert row[24 + k].item() == pytest.approx(math.cos(w * omega), abs=1e-6)
    assert torch.equal(pe[0, 1:17], pe[0, 1 + 5 * 16 :])
    assert torch.equal(dec.placeholder, torch.zeros(1, 1, 32))


def _ln(x: torch.Tensor, p: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-5)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
    return att.transpose(1, 2).reshape(q.shape[0], -1, heads * q.shape[-1])


def _mlp(x: torch.Tensor, p: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    h = x @ p[f"{name}.fc1.weight"].T + p[f"{name}.fc1.bias"]
    return (0.5 * h * (1 + torch.erf(h / math.sqrt(2)))) @ p[f"{name}.fc2.weight"].T + p[f"{name}.fc2.bias"]


@pytest.mark.parametrize("channels", [6, 3])
def test_decoder_matches_hand_computation(channels: int) -> None:
    dec = tiny(randomize=True).decoder.double()
    p = {k: v.detach() for k, v in dec.state_dict().items()}
    t, d = 16, 32
    x = torch.randn(2, 1 + channels * t, d, generator=gen(1), dtype=torch.float64)

    tiled = [p[f"modality_tokens.{m}"].expand(-1, t, -1) for m in range(channels)]
    mod = torch.cat([torch.zeros(1, 1, d, dtype=x.dtype), *tiled], dim=1)  # placeholder (zero) for cls
    y = x + p["pos_embeddings"][:, : 1 + channels * t] + mod
    context = _ln(y[:, 1:], p, "context_norm")
    outs = []
    for m in range(channels):
        q = _ln(y[:, 1 + m * t : 1 + (m + 1) * t], p, "query_norm") @ p["cross_attention.q.weight"].T
        k, v = (context @ p["cross_attention.kv.weight"].T).split(d, dim=-1)
        z = _attend(q, k, v, 2) @ p["cross_attention.proj.weight"].T + p["cross_attention.proj.bias"]  # no residual
        z = z + _mlp(_ln(z, p, "out_norm"), p, "mlp")
        b = f"decoders.{m}.0"
        qkv = _ln(z, p, f"{b}.norm1") @ p[f"{b}.attn.qkv.weight"].T + p[f"{b}.attn.qkv.bias"]
        att = _attend(*qkv.split(d, dim=-1), 2) @ p[f"{b}.attn.proj.weight"].T + p[f"{b}.attn.proj.bias"]
        z = z + att
        outs.append(z + _mlp(_ln(z, p, f"{b}.norm2"), p, f"{b}.mlp"))
    expected = torch.cat([y[:, :1], *outs], dim=1)

    with torch.no_grad():
        got = dec(x)
    assert (got - expected).abs().max().item() < 1e-10


def test_decoder_refuses_more_channels_than_modalities() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="1 to 6 channels, got 7"):
        model.loss(images(c=7))
    with pytest.raises(ValueError, match="1 to 6 channels, got 7"):
        model.decoder(torch.zeros(1, 1 + 7 * 16, 32))


# -- checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "safetensors"])
def test_openphenom_checkpoint_loads_strictly_from_disk(tmp_path: Path, fmt: str) -> None:
    model = tiny(seed=1, randomize=True)
    x = images()
    with torch.no_grad():
        expected = model.reconstruct(x, mask_channels=[2])["images"]
    sd = model.state_dict()
    path = tmp_path / "model.safetensors"
    if fmt == "zip":
        torch.save({"state_dict": sd}, path)  # what upstream's save_pretrained writes
        assert path.read_bytes()[:4] == b"PK\x03\x04"
    else:
        save_state_dict_file(sd, path, format="safetensors")
    fresh = load_openphenom_mae(path, tiny(seed=2))
    with torch.no_grad():
        assert torch.equal(fresh.reconstruct(x, mask_channels=[2])["images"], expected)
    # Frozen tables may be absent (regenerated); wrapper prefixes are stripped.
    frozen = ("encoder.vit_backbone.pos_embed", "decoder.pos_embeddings", "decoder.placeholder")
    slim = {"module." + k: v for k, v in sd.items() if k not in frozen}
    fresh = load_openphenom_mae(slim, tiny(seed=3))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())


def test_incomplete_or_misshaped_checkpoint_is_refused(tmp_path: Path) -> None:
    sd = tiny().state_dict()
    missing = {k: v for k, v in sd.items() if k != "decoder.decoders.3.0.attn.qkv.weight"}
    path = save_state_dict_file(missing, tmp_path / "missing.pt", format="zip")
    with pytest.raises(BioembedInputError, match=r"missing keys \(1\): decoder\.decoders\.3\.0\.attn\.qkv\.weight") as e:
        load_openphenom_mae(path, tiny())
    assert str(path) in str(e.value)

    bad = {**sd, "decoder.cross_attention.kv.weight": torch.zeros(32, 32)}
    path = save_state_dict_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(BioembedInputError, match=r"decoder\.cross_attention\.kv\.weight: file \(32, 32\) vs model \(64, 32\)"):
        load_openphenom_mae(path, tiny())

    with pytest.raises(BioembedInputError, match=r"unexpected keys \(1\): decoder\.norm\.weight"):
        load_openphenom_mae({**sd, "decoder.norm.weight": torch.ones(32)}, tiny())


# -- masking, loss, reconstruction -------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.33])
def test_random_masking_counts_and_determinism(ratio: float) -> None:
    model = tiny()
    x = CAMAEModel.normalize_input(images(n=3, c=5))
    length = 5 * 16
    with torch.no_grad():
        latent, pred, mask = model.forward_masked(x, ratio, gen(7))
        _, pred2, mask2 = model.forward_masked(x, ratio, gen(7))
        _, _, mask3 = model.forward_masked(x, ratio, gen(8))
    n_mask = round(ratio * length)
    assert mask.shape == (3, length) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum(dim=1).tolist() == [n_mask] * 3
    assert latent.shape == (3, 1 + length - n_mask, 32) and pred.shape == (3, length, 64)
    assert torch.equal(mask, mask2) and torch.equal(pred, pred2)
    assert not torch.equal(mask, mask3)
    assert not torch.equal(mask[0], mask[1])  # per-sample masks


def test_patchify_is_channel_major_row_major() -> None:
    model = tiny()
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    tokens = model.patchify(x)
    assert tokens.shape == (2, 3 * 16, 64)
    c, gh, gw = 2, 1, 3
    assert torch.equal(tokens[1, c * 16 + gh * 4 + gw], x[1, c, 8:16, 24:32].reshape(-1))
    assert torch.equal(model.unpatchify(tokens, 3), x)


def test_loss_decreases_when_training_a_tiny_model() -> None:
    # Masked patches of i.i.d. noise are unpredictable (MSE floor 1), so use structured crops: a ramp pattern.
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    x = ((xx * 8 + yy * 3) % 256).float().expand(4, 3, -1, -1)
    model = tiny(seed=4).train()
    opt = Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(30):
        out = model.loss(x, mask_ratio=0.75, generator=gen(step))
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        assert not out["mse_visible"].requires_grad
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses


def test_loss_is_float32_under_bf16_autocast() -> None:
    model = tiny(seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.loss(images(c=4), generator=gen(0))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.backbone.patch_embed.proj.weight.grad is not None


def test_reconstruct_masks_exactly_the_requested_channels() -> None:
    model = tiny(seed=6, randomize=True)
    x = images(c=5)
    with torch.no_grad():
        out = model.reconstruct(x, mask_channels=[1, 3])
        again = model.reconstruct(x, mask_channels=[3, 1])
        mixed = model.reconstruct(x, mask_channels=[0], mask_ratio=0.5, generator=gen(1))
        mixed2 = model.reconstruct(x, mask_channels=[0], mask_ratio=0.5, generator=gen(1))
        plain = model.reconstruct(x)
    assert out["images"].shape == out["target"].shape == out["mask"].shape == (2, 5, 32, 32)
    assert out["mask"].dtype == torch.bool
    assert out["mask"][:, [1, 3]].all() and not out["mask"][:, [0, 2, 4]].any()
    assert torch.equal(out["images"], again["images"])
    assert torch.equal(out["target"], CAMAEModel.normalize_input(x))
    # Channel 0 fully hidden plus half of the other 4*16 tokens, the same with the same generator.
    assert mixed["mask"][:, 0].all()
    tokens_hidden = mixed["mask"][:, 1:, ::8, ::8].sum(dim=(1, 2, 3))
    assert tokens_hidden.tolist() == [32, 32]
    assert torch.equal(mixed["mask"], mixed2["mask"]) and torch.equal(mixed["images"], mixed2["images"])
    assert not plain["mask"].any()
    # In-painting depends on the hidden channel's neighbours, not on its own pixels.
    x2 = x.clone()
    x2[:, 1] = 255 - x2[:, 1]
    with torch.no_grad():
        blind = model.reconstruct(x2, mask_channels=[1, 3])
    assert (blind["images"][:, 1] - out["images"][:, 1]).abs().max() < 1e-5
    with pytest.raises(ValueError, match=r"mask_channels must be in 0\.\.4"):
        model.reconstruct(x, mask_channels=[5])


def test_unmasked_latent_equals_the_encoder_tokens() -> None:
    model = tiny(seed=7, randomize=True)
    x = CAMAEModel.normalize_input(images(c=4))
    noise = torch.arange(64.0).expand(2, -1)
    with torch.no_grad():
        latent, mask, _ = model.encoder.forward_masked(x, noise, 64)
        expected = model.backbone.forward_features(x)
    assert not mask.any()
    assert (latent - expected).abs().max().item() < 1e-5


# -- the Encoder adapter ---------------------------------------------------------------------------


def adapter(seed: int = 0, decoder: object = DEC_CFG, **cfg: object) -> CAMAEEncoder:
    enc = build_encoder("ca_mae", seed=seed, decoder=decoder, **{**ENC, **cfg})
    assert isinstance(enc, CAMAEEncoder)
    return enc


def test_decoder_does_not_change_embeddings() -> None:
    crops = np.random.default_rng(0).integers(0, 256, (3, 5, 32, 32), dtype=np.uint8)
    with_dec, without = adapter(seed=3), adapter(seed=3, decoder=None)
    np.testing.assert_array_equal(with_dec.embed(crops, None), without.embed(crops, None))
    assert with_dec.mae is not None and with_dec.mae.backbone is with_dec.module
    assert set(with_dec.state_dict()) == {f"encoder.vit_backbone.{k}" for k in without.state_dict()} | {
        k for k in with_dec.mae.state_dict() if not k.startswith("encoder.")
    }
    assert not any(k.startswith("encoder.") for k in without.state_dict())


def test_spec_and_weights_round_trip_the_decoder() -> None:
    enc = adapter(seed=4, mask_ratio=0.6)
    with torch.no_grad():
        for p in enc.mae.decoder.parameters():
            p.add_(0.01)
    crops = np.random.default_rng(1).integers(0, 4096, (2, 4, 32, 32), dtype=np.uint16)
    expected = enc.reconstruct(crops, mask_channels=[2])
    spec = EncoderSpec.from_dict(enc.spec.to_dict())
    assert spec.config["decoder"] == DEC_CFG and spec.config["mask_ratio"] == 0.6
    rebuilt = build_from_spec(spec, enc.state_dict())
    got = rebuilt.reconstruct(crops, mask_channels=[2])
    for k in ("images", "target", "mask"):
        np.testing.assert_array_equal(got[k], expected[k])
    assert got["mask"].dtype == bool and got["images"].dtype == np.float32
    np.testing.assert_array_equal(rebuilt.embed(crops, None), enc.embed(crops, None))
    # A backbone-only state dict loads the backbone and leaves the decoder as it is.
    other = adapter(seed=9)
    dec_before = {k: v.clone() for k, v in other.mae.decoder.state_dict().items()}
    other.load_state_dict(adapter(seed=4, decoder=None).state_dict())
    np.testing.assert_array_equal(other.embed(crops, None), enc.embed(crops, None))
    assert all(torch.equal(other.mae.decoder.state_dict()[k], v) for k, v in dec_before.items())
    # An encoder without a decoder takes the full checkpoint and ignores the decoder keys.
    plain = adapter(seed=9, decoder=None)
    plain.load_state_dict(enc.state_dict())
    np.testing.assert_array_equal(plain.embed(crops, None), enc.embed(crops, None))
    with pytest.raises(RuntimeError, match="no decoder"):
        plain.reconstruct(crops)


def test_training_module_trains_the_encoder() -> None:
    enc = adapter(seed=5, decoder=None, num_channels=3)
    assert "decoder" not in enc.spec.config
    module = enc.training_module()
    assert enc.spec.config["decoder"] == "demo" and enc.mae is not None
    shared = {id(p) for p in module.parameters()}
    assert all(id(p) in shared for p in enc.module.parameters())
    crops = np.random.default_rng(2).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    before = enc.embed(crops, None)
    module.train()
    out = module(torch.from_numpy(crops).float(), torch.zeros(2, dtype=torch.long))
    out["loss"].backward()
    # Every trainable backbone tensor gets a gradient, except fc_norm (unused by predict and by the MAE).
    grads = {k: p.grad for k, p in enc.module.named_parameters() if p.requires_grad and not k.startswith("fc_norm")}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [k for k, g in grads.items() if g is None]
    Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2).step()
    assert not np.array_equal(enc.embed(crops, None), before)
    # The recorded spec rebuilds the same MAE, weights included.
    rebuilt = build_from_spec(enc.spec, enc.state_dict())
    for k in ("images", "mask"):
        np.testing.assert_array_equal(rebuilt.reconstruct(crops, [0])[k], enc.reconstruct(crops, [0])[k])
    assert module.mask_ratio == 0.75


def test_training_module_default_decoder_follows_the_preset_and_channels() -> None:
    enc = adapter(seed=0, decoder=None, num_channels=8)
    enc.training_module()
    assert enc.spec.config["decoder"] == {"preset": "demo", "num_modalities": 8}
    assert enc.mae.decoder.num_modalities == 8
