"""The bioimage_embed family: vector quantizer, VQ-VAE, backbones x channel modes, latent sizes, plain MAE,
reconstructions logged by training.

All on CPU with tiny models (32 px crops; ResNets at 32 px have a 1x1 feature map).
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from bioembed_assets import schema as s
from bioembed_assets.encoders import Encoder, EncoderSpec, build_encoder, build_from_spec
from bioembed_assets.encoders.checkpoints import load_state_dict_file, save_state_dict_file
from bioembed_assets.encoders.vector_quantizer import VectorQuantizer, code_usage
from bioembed_assets.schema import BioembedInputError

STAINS = ["DNA", "ER", "RNA"]
SIZE = 32
TINY = dict(channels=STAINS, latent_dim=8, input_size=SIZE, base_width=4)
TINY_MAE = dict(channels=STAINS, img_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def crops(n: int = 4, c: int = 3, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, c, size, size), dtype=np.uint8)


def blobs(n: int = 8, c: int = 3, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """Float 0-255 crops with one bright square per channel at a random place: learnable structure."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((n, c, size, size), generator=g) * 40
    for i in range(n):
        for j in range(c):
            y, x = torch.randint(0, size - 12, (2,), generator=g).tolist()
            images[i, j, y:y + 12, x:x + 12] += 180
    return images


def tiny(family: str, **cfg: object) -> Encoder:
    base = TINY_MAE if family == "mae" else TINY
    return build_encoder(family, **{**base, **cfg})


def train_steps(encoder: Encoder, steps: int, lr: float = 1e-3, images: torch.Tensor | None = None
                ) -> tuple[float, float]:
    """Adam steps on one fixed batch in training mode; the training-mode loss before and after.

    (Training mode throughout: timm ResNets use BatchNorm, whose running statistics lag behind after a
    few steps. The global RNG is reseeded before every pass, so VAE samples / MAE masks repeat.)
    """
    module = encoder.training_module()
    images = blobs() if images is None else images
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    module.train()
    losses = []
    for _ in range(steps + 1):
        torch.manual_seed(0)
        loss = module(images)["loss"]
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses[0], losses[-1]


# -- the vector quantizer --------------------------------------------------------------------------


def _quantizer(**kw: object) -> VectorQuantizer:
    vq = VectorQuantizer(num_embeddings=4, embedding_dim=2, **kw)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]))
    if vq.use_ema:
        vq.ema_weight.copy_(vq.codebook.weight)
    return vq


def test_nearest_code_by_l2_per_vector_and_layouts() -> None:
    vq = _quantizer()
    z = torch.tensor([[0.9, 0.2], [0.1, 0.8], [3.0, 3.0], [-1.0, -1.0]])
    out = vq(z)
    assert out.codes.tolist() == [1, 2, 3, 0]
    torch.testing.assert_close(out.quantized, vq.codebook.weight[[1, 2, 3, 0]])
    # A latent map (B, D, H, W): the vector is the channel dim at each position.
    zmap = z.t().reshape(1, 2, 2, 2)
    out_map = vq(zmap)
    assert out_map.codes.shape == (1, 2, 2) and out_map.codes.flatten().tolist() == [1, 2, 3, 0]
    assert out_map.quantized.shape == zmap.shape
    with pytest.raises(ValueError, match=r"latents \(N, 2\) or \(B, 2, \.\.\.\), got shape \(4, 3\)"):
        vq(torch.zeros(4, 3))


def test_straight_through_gradient_equals_the_gradient_at_q() -> None:
    vq = _quantizer(commitment_cost=0.0, quantization_loss_factor=0.0)
    z = torch.tensor([[0.9, 0.2], [0.1, 0.8], [3.0, 3.0]], requires_grad=True)
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0]])
    out = vq(z)
    ((out.quantized * w).sum() + out.loss).backward()
    q = out.quantized.detach().clone().requires_grad_(True)
    (q * w).sum().backward()
    torch.testing.assert_close(z.grad, q.grad)  # d loss / d z == d loss / d q
    torch.testing.assert_close(out.quantized.detach(), vq.codebook.weight[out.codes])


def test_codebook_gets_gradient_from_the_codebook_term_only() -> None:
    z0 = torch.tensor([[0.9, 0.2], [0.1, 0.8], [3.0, 3.0]])
    grads = {}
    for cc in (0.25, 5.0):
        vq = _quantizer(commitment_cost=cc)
        out = vq(z0.clone().requires_grad_(True))
        (out.loss + out.quantized.pow(2).sum()).backward()  # the decoder path adds nothing to the codebook
        grads[cc] = vq.codebook.weight.grad.clone()
    torch.testing.assert_close(grads[0.25], grads[5.0])
    # d/de of mean ||e - z||^2 over the 3 x 2 elements, for the used codes 1, 2, 3 (code 0 unused).
    e = _quantizer().codebook.weight.detach()
    expected = torch.zeros_like(e)
    expected[[1, 2, 3]] = 2.0 * (e[[1, 2, 3]] - z0) / z0.numel()
    torch.testing.assert_close(grads[0.25], expected)
    vq = _quantizer(quantization_loss_factor=0.0)
    out = vq(z0.clone().requires_grad_(True))
    out.loss.backward()
    assert vq.codebook.weight.grad is None or not vq.codebook.weight.grad.any()


def test_ema_codebook_moves_toward_assigned_outputs_without_gradient() -> None:
    vq = _quantizer(use_ema=True, decay=0.5)
    assert not vq.codebook.weight.requires_grad
    assert {"ema_cluster_size", "ema_weight", "codebook.weight"} <= set(vq.state_dict())
    target = torch.tensor([0.7, 0.3])  # nearest to code 1 = (1, 0)
    z = (target + 0.01 * torch.randn(16, 2, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    dist = [float((vq.codebook.weight[1] - target).norm())]
    for _ in range(4):
        out = vq.train()(z)
        assert (out.codes == 1).all()
        out.loss.backward()
        dist.append(float((vq.codebook.weight[1] - target).norm()))
    assert all(b < a for a, b in zip(dist, dist[1:])) and dist[-1] < 0.1 * dist[0], dist
    assert vq.codebook.weight.grad is None
    torch.testing.assert_close(out.loss, 0.25 * out.commitment_loss)  # commitment term only
    torch.testing.assert_close(vq.codebook.weight[[0, 2, 3]], _quantizer().codebook.weight[[0, 2, 3]].detach(),
                               atol=1e-4, rtol=1e-3)  # unused codes stay put (up to the smoothing)
    frozen = vq.codebook.weight.clone()
    vq.eval()(z)
    assert torch.equal(vq.codebook.weight, frozen)  # no update in eval mode


def test_perplexity_and_usage_on_constructed_assignments() -> None:
    k = 8
    perplexity, usage = code_usage(torch.full((50,), 3), k)
    assert float(perplexity) == pytest.approx(1.0) and float(usage) == pytest.approx(1 / k)
    perplexity, usage = code_usage(torch.arange(k).repeat(5), k)
    assert float(perplexity) == pytest.approx(k) and float(usage) == 1.0
    perplexity, usage = code_usage(torch.tensor([0, 0, 1, 1]), k)
    assert float(perplexity) == pytest.approx(2.0) and float(usage) == pytest.approx(2 / k)


# -- backbones x channel modes ---------------------------------------------------------------------


CELLS = [  # (backbone, channel_mode, family, extra config), one family per cell to keep CPU time low
    ("conv", "stem", "vqvae", {"latent_spatial": 2}),
    ("conv", "batch", "vae", {}),
    ("resnet18", "stem", "vae", {}),
    ("resnet18", "batch", "vqvae", {"use_ema": True}),
    ("resnet50", "stem", "ae", {}),
    ("resnet50", "batch", "vqvae", {}),
]


def _cell_id(cell: tuple) -> str:
    return "-".join(cell[:3])


@pytest.mark.parametrize("backbone,mode,family,extra", CELLS, ids=[_cell_id(c) for c in CELLS])
def test_backbone_and_channel_mode_shapes(backbone: str, mode: str, family: str, extra: dict) -> None:
    enc = tiny(family, backbone=backbone, channel_mode=mode, **extra)
    per_channel = 3 if mode == "batch" else 1
    positions = extra.get("latent_spatial", 1) ** 2
    assert enc.spec.embedding_dim == 8 * positions * per_channel
    assert len(enc.feature_names) == enc.spec.embedding_dim == len(set(enc.feature_names))
    first_conv = next(m for m in enc.module.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == (1 if mode == "batch" else 3)
    if mode == "batch":
        assert enc.feature_names[0].startswith("DNA_") and enc.feature_names[-1].startswith("RNA_")
    x = crops()
    e = enc.embed(x)
    assert e.shape == (4, enc.spec.embedding_dim) and e.dtype == np.float32 and np.isfinite(e).all()
    out = enc.reconstruct(x)
    assert out["images"].shape == out["target"].shape == x.shape


TRAINED = [pytest.param(*c, id=_cell_id(c), marks=[pytest.mark.slow] if c[0] == "resnet50" else []) for c in CELLS]


@pytest.mark.parametrize("backbone,mode,family,extra", TRAINED)
def test_backbone_and_channel_mode_training_lowers_the_loss(backbone: str, mode: str, family: str,
                                                            extra: dict) -> None:
    enc = tiny(family, backbone=backbone, channel_mode=mode, **extra)
    before, after = train_steps(enc, 3, lr=1e-3, images=blobs(4))
    assert np.isfinite(before) and after < before, (before, after)


def test_batch_mode_embeds_each_channel_by_itself() -> None:
    enc = tiny("ae", channel_mode="batch")
    x = crops()
    e = enc.embed(x).reshape(4, 3, 8)
    for c in range(3):  # the same 1-channel net: channel c alone gives block c
        one = build_encoder("ae", **{**TINY, "channels": ["DNA"]}, channel_mode="batch")
        one.load_state_dict(enc.state_dict())
        np.testing.assert_allclose(one.embed(x[:, c:c + 1]), e[:, c], atol=1e-5)
    swapped = enc.embed(x[:, ::-1].copy()).reshape(4, 3, 8)
    np.testing.assert_allclose(swapped, e[:, ::-1], atol=1e-5)


def test_latent_size_options() -> None:
    for spatial, dim in [(None, 8), (1, 8), (2, 32), (4, 128)]:
        enc = tiny("ae", latent_spatial=spatial)
        assert enc.spec.embedding_dim == dim and enc.embed(crops(2)).shape == (2, dim)
        assert enc.reconstruct(crops(2))["images"].shape == (2, 3, SIZE, SIZE)
        assert enc.spec.config.get("latent_spatial") == spatial
    assert tiny("ae", latent_spatial=2).feature_names[:5] == ["z0_y0x0", "z0_y0x1", "z0_y1x0", "z0_y1x1", "z1_y0x0"]
    flat = tiny("ae").module
    assert isinstance(flat.to_mu, torch.nn.Linear) and flat.to_mu.in_features == 32 * 4 * 4  # whole 4x4 map
    assert tiny("ae", latent_spatial=1).module.to_mu.in_features == 32  # pooled
    assert isinstance(tiny("ae", latent_spatial=2).module.to_mu, torch.nn.Conv2d)
    res = build_encoder("vae", **{**TINY, "input_size": 64}, backbone="resnet18", latent_spatial=2,
                        channel_mode="batch")
    assert res.spec.embedding_dim == 8 * 4 * 3 and res.embed(crops(1, size=64)).shape == (1, 96)
    with pytest.raises(ValueError, match=r"latent_spatial must be None or in 1\.\.4 .*got 5"):
        tiny("ae", latent_spatial=5)
    with pytest.raises(ValueError, match=r"latent_spatial must be None or in 1\.\.1 .*resnet18.*got 2"):
        tiny("ae", backbone="resnet18", latent_spatial=2)
    with pytest.raises(ValueError, match="multiple of 32 for backbone 'resnet18', got 48"):
        tiny("ae", backbone="resnet18", input_size=48)
    with pytest.raises(ValueError, match=r"backbone must be one of \['conv', 'resnet18', 'resnet50'\]"):
        tiny("ae", backbone="vgg")
    with pytest.raises(ValueError, match="channel_mode must be one of"):
        tiny("ae", channel_mode="depthwise")


def test_default_conv_spec_is_unchanged() -> None:
    enc = tiny("vae")
    assert enc.spec.config == {"channels": STAINS, "latent_dim": 8, "input_size": SIZE, "base_width": 4, "seed": 0,
                               "beta": 1.0}
    keys = set(enc.state_dict())
    assert {"to_mu.weight", "to_logvar.weight", "from_latent.weight", "encoder.0.0.weight"} <= keys
    assert not any(k.startswith("quantizer.") for k in keys)


# -- VQ-VAE, beta-VAE and their losses -------------------------------------------------------------


@torch.no_grad()
def test_vqvae_logs_bioimage_embed_losses_and_code_statistics() -> None:
    enc = tiny("vqvae", latent_spatial=2, num_embeddings=16)
    out = enc.training_module().eval()(blobs(4))
    assert set(out) == {"loss", "recon_loss", "variational_loss", "mse", "codebook_loss", "commitment_loss",
                        "perplexity", "codebook_usage"}
    assert all(v.ndim == 0 and v.dtype == torch.float32 for v in out.values())
    assert float(out["variational_loss"]) == pytest.approx(float(out["loss"] - out["recon_loss"]))
    assert float(out["variational_loss"]) == pytest.approx(1.25 * float(out["commitment_loss"]), rel=1e-5)
    assert 1.0 <= float(out["perplexity"]) <= 16 and 0 < float(out["codebook_usage"]) <= 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = enc.training_module()(blobs(4))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in auto.values())


def test_vqvae_embedding_and_code_outputs() -> None:
    enc = tiny("vqvae", latent_spatial=2, channel_mode="batch")
    assert enc.output_names == {"vq_codes": [f"{c}_code_y{i}x{j}" for c in STAINS for i in (0, 1) for j in (0, 1)]}
    x = crops()
    emb, side = enc.embed_with_outputs(x)
    np.testing.assert_array_equal(emb, enc.embed(x))
    codes = side["vq_codes"]
    assert codes.shape == (4, 12) and codes.dtype == np.float32 and np.array_equal(codes, codes.round())
    quantized = tiny("vqvae", latent_spatial=2, channel_mode="batch", embed="quantized")
    qe = quantized.embed(x).reshape(4, 3, 8, 4)  # (crop, channel, latent dim, position)
    book = quantized.module.quantizer.codebook.weight.detach().numpy()
    np.testing.assert_allclose(qe.transpose(0, 1, 3, 2).reshape(-1, 8), book[codes.astype(int).reshape(-1)],
                               atol=1e-6)
    assert not np.allclose(emb, quantized.embed(x))  # the default embeds the pre-quantization latent
    empty, side0 = enc.embed_with_outputs(x[:0])
    assert empty.shape == (0, 96) and side0["vq_codes"].shape == (0, 12)
    with pytest.raises(ValueError, match="embed must be one of"):
        tiny("vqvae", embed="codes")


@torch.no_grad()
def test_beta_vae_by_name_and_vae_losses() -> None:
    enc = tiny("beta_vae")
    assert enc.spec.family == "beta_vae" and enc.spec.config["beta"] == 4.0
    assert set(enc.state_dict()) == set(tiny("vae").state_dict())
    out = enc.training_module().eval()(blobs(4))
    assert {"loss", "recon_loss", "variational_loss", "mse", "kl"} <= set(out)
    assert float(out["variational_loss"]) == pytest.approx(4.0 * float(out["kl"]) / (3 * SIZE * SIZE), rel=1e-4)
    rebuilt = build_from_spec(EncoderSpec.from_dict(enc.spec.to_dict()), enc.state_dict())
    assert rebuilt.spec == enc.spec
    with pytest.raises(ValueError, match="beta"):
        tiny("beta_vae", beta=-1.0)


# -- the plain MAE ---------------------------------------------------------------------------------


def test_mae_spec_embedding_and_reconstruction() -> None:
    enc = tiny("mae")
    spec = enc.spec
    assert (spec.family, spec.embedding_dim, spec.input_size, spec.channels) == ("mae", 32, SIZE, tuple(STAINS))
    assert spec.trainable and spec.config["mask_ratio"] == 0.75 and spec.config["pool"] == "mean"
    assert enc.module.patch_embed.proj.in_channels == 3  # one patch embedding over all channels
    x = crops()
    e = enc.embed(x)
    assert e.shape == (4, 32) and e.dtype == np.float32
    np.testing.assert_array_equal(enc.embed(x), e)  # no masking at embedding time
    assert not np.allclose(tiny("mae", pool="cls").embed(x), e)
    out = enc.reconstruct(x)
    assert out["images"].shape == out["target"].shape == out["mask"].shape == x.shape
    assert out["mask"].dtype == bool and out["mask"].mean() == pytest.approx(0.75)  # 12 of 16 patches
    assert enc.reconstruct(x, mask_ratio=0.0)["mask"].sum() == 0
    np.testing.assert_array_equal(enc.reconstruct(x, seed=3)["mask"], enc.reconstruct(x, seed=3)["mask"])
    assert not np.array_equal(enc.reconstruct(x, seed=3)["mask"], out["mask"])
    with pytest.raises(ValueError, match="expects 32x32 crops, got 16x16"):
        enc.embed(crops(size=16))
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\)"):
        tiny("mae", mask_ratio=0.0)
    with pytest.raises(ValueError, match="unknown MAE options"):
        tiny("mae", depthh=3)


@torch.no_grad()
def test_mae_patchify_and_masked_loss() -> None:
    net = tiny("mae").module
    x = torch.randn(2, 3, SIZE, SIZE)
    patches = net.patchify(x)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    torch.testing.assert_close(patches[0, 1].reshape(8, 8, 3), x[0, :, 0:8, 8:16].permute(1, 2, 0))
    torch.testing.assert_close(net.unpatchify(patches), x)
    torch.manual_seed(0)
    pred, mask = net(x, 0.75)
    assert pred.shape == patches.shape and mask.sum(1).tolist() == [12.0, 12.0]
    torch.manual_seed(0)
    out = net.loss(x, 0.75)
    per_patch = (pred - patches).pow(2).mean(-1)
    assert float(out["loss"]) == pytest.approx(float(per_patch[mask == 1].mean()), rel=1e-5)
    assert float(out["mse_visible"]) == pytest.approx(float(per_patch[mask == 0].mean()), rel=1e-5)
    norm = tiny("mae", norm_pix_loss=True).module
    target = norm.target(x)[0]
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)


def test_mae_training_lowers_the_loss() -> None:
    before, after = train_steps(tiny("mae"), 6, lr=2e-3)
    assert after < before, (before, after)


# -- weights: round trips, strict loads, seeds -----------------------------------------------------


ROUND_TRIP = [
    ("ae", {"backbone": "resnet18", "channel_mode": "batch"}),
    ("vqvae", {"latent_spatial": 2, "use_ema": True}),
    ("beta_vae", {"latent_spatial": 2}),
    ("mae", {"norm_pix_loss": True}),
]


@pytest.mark.parametrize("family,cfg", ROUND_TRIP, ids=[f for f, _ in ROUND_TRIP])
def test_golden_round_trip_through_safetensors(family: str, cfg: dict, tmp_path) -> None:
    enc = tiny(family, seed=2, **cfg)
    train_steps(enc, 1, images=blobs(2))  # moves weights (and EMA buffers / BatchNorm statistics) off their init
    path = save_state_dict_file(enc.state_dict(), tmp_path / "weights.safetensors")
    spec = EncoderSpec.from_dict(json.loads(json.dumps(enc.spec.to_dict())))
    rebuilt = build_from_spec(spec, load_state_dict_file(path))
    x = crops(3, seed=5)
    np.testing.assert_array_equal(rebuilt.embed(x), enc.embed(x))
    np.testing.assert_array_equal(rebuilt.reconstruct(x)["images"], enc.reconstruct(x)["images"])
    if "vq_codes" in (getattr(enc, "output_names", None) or {}):
        codes = enc.embed_with_outputs(x)[1]["vq_codes"]
        np.testing.assert_array_equal(rebuilt.embed_with_outputs(x)[1]["vq_codes"], codes)
    assert not np.array_equal(tiny(family, seed=2, **cfg).embed(x), enc.embed(x))  # training changed it


def test_strict_load_rejects_another_familys_keys() -> None:
    vq, ae = tiny("vqvae"), tiny("ae")
    with pytest.raises(BioembedInputError, match=r"VQAutoencoder: missing keys \(1\): quantizer\.codebook\.weight"):
        vq.load_state_dict(ae.state_dict())
    with pytest.raises(BioembedInputError, match=r"unexpected keys \(1\): quantizer\.codebook\.weight"):
        ae.load_state_dict(vq.state_dict())
    other = r"MaskedAutoencoderViT: missing keys \(\d+\): blocks\.0.*unexpected keys \(\d+\): decoder\."
    with pytest.raises(BioembedInputError, match=other):
        tiny("mae").load_state_dict(ae.state_dict())
    with pytest.raises(BioembedInputError, match=r"shape mismatch.*to_mu\.weight: file \(16, 512\) vs model \(8, 512"):
        ae.load_state_dict(tiny("ae", latent_dim=16).state_dict())
    with pytest.raises(BioembedInputError, match=r"file=.*w\.safetensors"):
        vq.load_state_dict(ae.state_dict(), path="w.safetensors")


@pytest.mark.parametrize("family,cfg", [("vqvae", {"backbone": "resnet18"}), ("vqvae", {"use_ema": True}),
                                        ("mae", {}), ("beta_vae", {"channel_mode": "batch"})])
def test_seed_makes_init_deterministic(family: str, cfg: dict) -> None:
    state = torch.get_rng_state()
    a = tiny(family, seed=5, **cfg)
    assert torch.equal(torch.get_rng_state(), state)  # building does not consume the global RNG
    x = crops()
    np.testing.assert_array_equal(tiny(family, seed=5, **cfg).embed(x), a.embed(x))
    assert not np.allclose(tiny(family, seed=6, **cfg).embed(x), a.embed(x))


# -- reconstructions logged by training ------------------------------------------------------------


RECONSTRUCTING = [("ae", {}), ("vae", {}), ("beta_vae", {}), ("vqvae", {"channel_mode": "batch"}), ("mae", {}),
                  ("ca_mae", {})]


@pytest.mark.parametrize("family,cfg", RECONSTRUCTING, ids=[f for f, _ in RECONSTRUCTING])
def test_reconstruction_png_for_every_reconstructing_family(family: str, cfg: dict) -> None:
    from bioembed_assets.training.run import _reconstruction_png

    if family == "ca_mae":
        enc = build_encoder("ca_mae", preset="demo", img_size=SIZE, embed_dim=32, depth=1, num_heads=2,
                            decoder={"preset": "demo", "embed_dim": 32, "depth": 1, "num_heads": 2,
                                     "cross_attn_heads": 2})
    else:
        enc = tiny(family, **cfg)
    image = _reconstruction_png(enc, crops(2, size=48))  # resized to the encoder's input size first
    assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > image.size[0]


def _crop_set(root, n: int = 48):
    """A hand-made two-plate CropSet (zarr crop stores as `segment/crops.py` writes them)."""
    import zarr

    from bioembed_assets.training.data import CropSet

    stores, frames = [], []
    for i, plate in enumerate(["P1", "P2"]):
        path = root / f"{plate}.zarr"
        group = zarr.open_group(str(path), mode="w")
        images = group.create_array("images", shape=(n, 3, SIZE, SIZE), chunks=(16, 3, SIZE, SIZE), dtype="uint8")
        images[:] = blobs(n, seed=i).clamp(0, 255).to(torch.uint8).numpy()
        group.create_array("masks", shape=(n, SIZE, SIZE), chunks=(16, SIZE, SIZE), dtype="bool", fill_value=True)
        group.attrs["channels"] = STAINS
        stores.append(path)
        wells = [f"A{1 + k % 4:02d}" for k in range(n)]
        frames.append(pl.DataFrame({
            s.PLATE: plate, s.WELL: wells, s.PERTURBATION: ["DMSO" if w == "A01" else "cmpd" for w in wells],
            "store": i, "crop_index": np.arange(n), "label": [0 if w == "A01" else 1 for w in wells],
            "split": ["val" if w == "A04" else "train" for w in wells],
        }))
    return CropSet(tuple(stores), tuple(STAINS), pl.concat(frames), ("DMSO", "cmpd"), 16)


@pytest.mark.slow  # ~30 s on 2 busy cores (MLflow's sqlite store); test_reconstruction_png_* covers the image
def test_training_a_vqvae_logs_a_reconstruction_image_to_mlflow(tmp_path) -> None:
    import mlflow

    from bioembed_assets.training.loop import TrainConfig, fit
    from bioembed_assets.training.run import _MlflowCallbacks

    crop_set = _crop_set(tmp_path)
    enc = tiny("vqvae", latent_spatial=2, num_embeddings=32)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("bie-test", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            config = TrainConfig(epochs=2, batch_size=16, lr=1e-3, warmup_epochs=0, num_workers=0, patience=0)
            result = fit(enc, crop_set, config, tmp_path / "ckpt", callbacks=_MlflowCallbacks(enc, crop_set, None))
        client = mlflow.MlflowClient()
        metrics = client.get_run(run.info.run_id).data.metrics
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    finally:
        mlflow.set_tracking_uri(previous)
    assert len(result.history) == 2
    assert {"train_perplexity", "train_codebook_usage", "val_recon_loss", "val_variational_loss"} <= set(metrics)
    assert any("reconstruction" in a for a in artifacts), artifacts
