"""SubCell encoder: upstream key names and renames at ViT-B shapes, golden sizes, preprocessing, outputs, errors.

Upstream files are state dicts built here with SubCell's names (no weights are shipped). ViT-B is only
constructed (plus forwards at 32x32 px: 5 tokens); numerics use the tiny preset.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bioembed_assets.encoders import Encoder, build_encoder, build_from_spec, list_families
from bioembed_assets.encoders.base import EncoderSpec
from bioembed_assets.encoders.camae import build_camae_module
from bioembed_assets.encoders.checkpoints import load_state_dict_file, save_state_dict_file
from bioembed_assets.encoders.subcell import (
    LOCALIZATION_CLASSES,
    PRESETS,
    SubCellEncoder,
    interpolate_pos_encoding,
    preprocess,
)
from bioembed_assets.inference import channel_indices
from bioembed_assets.schema import CELL_PAINTING_CHANNELS, BioembedInputError

SIZE = 32
DEFAULT_CHANNELS = ("ER", "DNA", "Mito", "AGP", "RNA")


def crops(n: int = 3, c: int = 5, size: int = SIZE, seed: int = 0, dtype: type = np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, c, size, size)).astype(dtype)


def cell_masks(n: int = 3, size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    return np.repeat(disk[None], n, axis=0)


def randomize_(encoder: SubCellEncoder, seed: int = 0) -> SubCellEncoder:
    """Every tensor random (norms, biases, tokens too), so a misrouted key changes the output."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in encoder.module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return encoder


def tiny(seed: int = 0, **cfg: object) -> SubCellEncoder:
    enc = build_encoder("subcell", **{"preset": "tiny", "input_size": SIZE, **cfg})
    assert isinstance(enc, SubCellEncoder)
    return randomize_(enc, seed)


def upstream_encoder_shapes(d: int, layers: int, mlp: int, chans: int, tokens: int, int_dim: int, heads: int,
                            patch: int = 16) -> dict[str, tuple[int, ...]]:
    """An upstream SubCell encoder file's keys and shapes (HF ViT under `encoder.`, pooler with `.1.`)."""
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.embeddings.cls_token": (1, 1, d),
        "encoder.embeddings.position_embeddings": (1, tokens, d),
        "encoder.embeddings.patch_embeddings.projection.weight": (d, chans, patch, patch),
        "encoder.embeddings.patch_embeddings.projection.bias": (d,),
        "encoder.layernorm.weight": (d,),
        "encoder.layernorm.bias": (d,),
        "pool_model.attention_v.1.weight": (int_dim, d),
        "pool_model.attention_v.1.bias": (int_dim,),
        "pool_model.attention_u.1.weight": (int_dim, d),
        "pool_model.attention_u.1.bias": (int_dim,),
        "pool_model.attention.weight": (heads, int_dim),
        "pool_model.attention.bias": (heads,),
    }
    per_layer = {
        "layernorm_before": (d,), "attention.attention.query": (d, d), "attention.attention.key": (d, d),
        "attention.attention.value": (d, d), "attention.output.dense": (d, d), "layernorm_after": (d,),
        "intermediate.dense": (mlp, d), "output.dense": (d, mlp),
    }  # fmt: skip
    for i in range(layers):
        for name, shape in per_layer.items():
            shapes[f"encoder.encoder.layer.{i}.{name}.weight"] = shape
            shapes[f"encoder.encoder.layer.{i}.{name}.bias"] = (shape[0],)
    return shapes


def upstream_head_shapes(pool: int, hidden: tuple[int, int], classes: int = 31) -> dict[str, tuple[int, ...]]:
    """An upstream classifier file: Sequential with dropouts, Linear layers at 0, 3, 6."""
    (h1, h2) = hidden
    return {"0.weight": (h1, pool), "0.bias": (h1,), "3.weight": (h2, h1), "3.bias": (h2,),
            "6.weight": (classes, h2), "6.bias": (classes,)}  # fmt: skip


def ours(upstream_key: str, head: int | None = None) -> str:
    """The name a key of an upstream file gets in `SubCellModel` (written out, not via the module's regexes)."""
    if head is not None:
        index, rest = upstream_key.split(".", 1)
        return f"classifiers.{head}.{ {'0': '0', '3': '2', '6': '4'}[index]}.{rest}"
    for gate in ("v", "u"):
        upstream_key = upstream_key.replace(f"pool_model.attention_{gate}.1.", f"pool_model.attention_{gate}.0.")
    return upstream_key


def to_upstream(encoder: SubCellEncoder) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """An encoder's weights as SubCell's files: encoder file (with junk keys) and one file per head."""
    sd = encoder.state_dict()
    enc = {k.replace("attention_v.0.", "attention_v.1.").replace("attention_u.0.", "attention_u.1."): v.clone()
           for k, v in sd.items() if not k.startswith("classifiers.")}
    enc["proj_head.0.weight"] = torch.randn(8, 8)  # training-only heads are dropped by the loader
    enc["decoder.decoder_pred.bias"] = torch.randn(8)
    heads = []
    for i in range(len(encoder.module.classifiers)):
        rename = {"0": "0", "2": "3", "4": "6"}
        heads.append({f"{rename[k.split('.')[2]]}.{k.split('.')[3]}": v.clone()
                      for k, v in sd.items() if k.startswith(f"classifiers.{i}.")})
    return enc, heads


def save_zip(sd: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(sd, path)  # what upstream publishes: a flat torch.save state dict
    return path


# -- ViT-B: upstream keys, renames, golden sizes ------------------------------------------------------


@pytest.fixture(scope="module")
def vit_b_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], dict[str, float]]:
    """ViT-B ybg encoder + 2 classifier files; each tensor a distinct constant (stride-0, so files are tiny)."""
    root = tmp_path_factory.mktemp("subcell_vitb")
    values: dict[str, float] = {}

    def fill(shapes: dict[str, tuple[int, ...]], head: int | None) -> dict[str, torch.Tensor]:
        out = {}
        for key, shape in shapes.items():
            c = 0.001 * (len(values) + 1)
            values[ours(key, head)] = c
            out[key] = torch.full((), c).expand(shape)
        return out

    encoder = fill(upstream_encoder_shapes(768, 12, 3072, 3, 785, 512, 2), None)
    heads = [fill(upstream_head_shapes(1536, (512, 256)), i) for i in range(2)]
    enc_path = save_zip(encoder, root / "ER-DNA-Protein_MAE-CellS-ProtS-Pool.pth")
    head_paths = [save_zip(h, root / f"ER-DNA-Protein_MAE_MLP_classifier_seed_{i}.pth") for i, h in enumerate(heads)]
    return enc_path, head_paths, values


@pytest.fixture(scope="module")
def vit_b(vit_b_files: tuple[Path, list[Path], dict[str, float]]) -> SubCellEncoder:
    enc_path, head_paths, _ = vit_b_files
    enc = build_encoder("subcell", encoder_checkpoint=str(enc_path), classifier_checkpoints=[str(p) for p in head_paths])
    assert isinstance(enc, SubCellEncoder)
    return enc


def test_family_registered() -> None:
    assert "subcell" in list_families()


def test_vit_b_upstream_files_load_strictly_with_renames(
    vit_b: SubCellEncoder, vit_b_files: tuple[Path, list[Path], dict[str, float]]
) -> None:
    _, _, values = vit_b_files
    sd = vit_b.state_dict()
    assert set(sd) == set(values)  # strict: every file key used, every model key filled
    for key, c in values.items():
        assert torch.all(sd[key] == torch.tensor(c)), key  # each tensor reached its own place
    # The pooler rename touched `attention_{v,u}.1.` only, not `layer.1.`; heads 3/6 became 2/4.
    assert "encoder.encoder.layer.1.output.dense.weight" in sd and "pool_model.attention_v.0.weight" in sd
    assert sd["classifiers.1.4.weight"].shape == (31, 256) and "classifiers.0.3.weight" not in sd


def test_vit_b_golden_numbers(vit_b: SubCellEncoder) -> None:
    spec = vit_b.spec
    assert isinstance(vit_b, Encoder)
    assert (spec.family, spec.embedding_dim, spec.input_size, spec.channels) == ("subcell", 4608, 448, DEFAULT_CHANNELS)
    assert not spec.trainable and spec.per_cell
    assert vit_b.module.encoder.embeddings.position_embeddings.shape == (1, 785, 768)
    assert (28 * 28 + 1) == 785 and PRESETS["vit_base_patch16_448"].pool_size == 1536
    assert [p.indices for p in vit_b.passes] == [(0, 1, 2), (0, 1, 3), (0, 1, 4)]  # [ER, DNA, X]
    assert vit_b.feature_names[0] == "SubCell_Mito_0000" and vit_b.feature_names[-1] == "SubCell_RNA_1535"
    assert len(vit_b.feature_names) == len(set(vit_b.feature_names)) == 4608
    assert list(vit_b.output_names) == ["localization_Mito", "localization_AGP", "localization_RNA"]
    assert all(names == list(LOCALIZATION_CLASSES) for names in vit_b.output_names.values())
    assert len(LOCALIZATION_CLASSES) == 31 and LOCALIZATION_CLASSES[26] == "Nucleoplasm"
    cfg = json.loads(json.dumps(spec.to_dict()))["config"]  # the registry stores the spec as JSON
    assert cfg["stains"] == {"y": "ER", "b": "DNA"} and cfg["protein"] == ["Mito", "AGP", "RNA"]
    assert (cfg["variant"], cfg["minmax"], cfg["mask_neighbours"], cfg["num_classifiers"]) == ("ybg", "cell", True, 2)
    assert len(cfg["weights_source"]["classifier_checkpoints"]) == 2
    # A cheap forward (32 px = 5 tokens) through all 12 layers.
    emb, out = vit_b.embed_with_outputs(crops(2), cell_masks(2))
    assert emb.shape == (2, 4608) and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert {k: v.shape for k, v in out.items()} == {k: (2, 31) for k in vit_b.output_names}


def test_layernorm_eps_and_exact_gelu(vit_b: SubCellEncoder) -> None:
    norms = [m for m in vit_b.module.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 12 + 1 and all(m.eps == 1e-12 for m in norms)
    gelus = [m for m in vit_b.module.modules() if isinstance(m, torch.nn.GELU)]
    assert len(gelus) == 12 + 1 and all(m.approximate == "none" for m in gelus)
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    exact = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    tanh_approx = F.gelu(x, approximate="tanh")
    for m in (gelus[0], vit_b.module.pool_model.attention_u[1]):
        assert (m(x) - exact).abs().max() < 1e-12
        assert (m(x) - tanh_approx).abs().max() > 1e-5


# -- network math (tiny preset) -----------------------------------------------------------------------


def _ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-12) * w + b


def test_layer_and_pooler_match_hand_computation() -> None:
    model = tiny().module.double()
    p = {k: v.detach() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def lin(t: torch.Tensor, name: str) -> torch.Tensor:
        return t @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    pre = "encoder.encoder.layer.0."
    h = _ln(x, p[pre + "layernorm_before.weight"], p[pre + "layernorm_before.bias"])
    q, k, v = (lin(h, pre + f"attention.attention.{n}").reshape(2, 5, 2, 32).transpose(1, 2)
               for n in ("query", "key", "value"))
    att = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), -1) @ v).transpose(1, 2).reshape(2, 5, 64)
    y = x + lin(att, pre + "attention.output.dense")
    m = lin(_ln(y, p[pre + "layernorm_after.weight"], p[pre + "layernorm_after.bias"]), pre + "intermediate.dense")
    expected = y + lin(0.5 * m * (1 + torch.erf(m / math.sqrt(2))), pre + "output.dense")
    with torch.no_grad():
        assert (model.encoder.encoder.layer[0](x) - expected).abs().max() < 1e-10

    # Gated pooler: tanh(V) * GELU(U) -> 2 logits per token -> softmax over all 5 tokens incl. CLS.
    gate = torch.tanh(lin(x, "pool_model.attention_v.0"))
    u = lin(x, "pool_model.attention_u.0")
    logits = lin(gate * 0.5 * u * (1 + torch.erf(u / math.sqrt(2))), "pool_model.attention")  # (2, 5, 2)
    weights = torch.softmax(logits, dim=1)
    pooled = torch.cat([(weights[:, :, i : i + 1] * x).sum(1) for i in range(2)], dim=1)
    with torch.no_grad():
        got, got_w = model.pool_model(x)
    assert got.shape == (2, 128) and (got - pooled).abs().max() < 1e-10
    assert (got_w - weights.transpose(1, 2)).abs().max() < 1e-12


def test_pos_embedding_interpolation() -> None:
    table = torch.randn(1, 17, 8, generator=torch.Generator().manual_seed(0))  # native 4x4 grid
    assert interpolate_pos_encoding(table, 4, 4) is table  # native size: no interpolation
    same = F.interpolate(table[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic")
    assert torch.allclose(same.permute(0, 2, 3, 1).reshape(1, 16, 8), table[:, 1:])  # bicubic at same size = id
    for gh, gw in ((2, 2), (2, 3), (7, 7)):
        out = interpolate_pos_encoding(table, gh, gw)
        assert out.shape == (1, 1 + gh * gw, 8) and torch.equal(out[:, 0], table[:, 0])  # CLS kept

    enc = tiny()  # tiny preset: native 64 px = 4x4 grid, 17 position rows
    assert enc.module.encoder.embeddings.position_embeddings.shape == (1, 17, 64)
    for size in (64, 32, 80):
        assert enc.embed(crops(2, size=size), cell_masks(2, size)).shape == (2, 384)
    rect = enc.attention_maps(crops(2, size=48)[..., :32], np.ones((2, 48, 32), bool))  # 3x2 patches
    assert rect.shape == (2, 3, 2, 3, 2)
    total = rect.sum(axis=(3, 4))  # CLS dropped: the patch weights sum to less than 1
    assert ((total > 0) & (total < 1)).all()


# -- preprocessing ------------------------------------------------------------------------------------


def test_minmax_scopes_hand_computed() -> None:
    x = torch.tensor([[[[0.0, 2.0], [4.0, 8.0]], [[1.0, 1.0], [1.0, 5.0]]]])  # (1, 2, 2, 2)
    cell = preprocess(x, None, "cell")
    channel = preprocess(x, None, "channel")
    eps = 1e-6
    assert torch.allclose(cell[0, 0], torch.tensor([[0, 2], [4, 8]]) / (8 + eps))
    assert torch.allclose(cell[0, 1], torch.tensor([[1, 1], [1, 5]]) / (8 + eps))
    assert torch.allclose(channel[0, 0], torch.tensor([[0, 2], [4, 8]]) / (8 + eps))
    assert torch.allclose(channel[0, 1], torch.tensor([[0, 0], [0, 4]]) / (4 + eps))
    assert torch.equal(preprocess(torch.full((1, 1, 2, 2), 7.0), None, "cell"), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="minmax must be one of"):
        preprocess(x, None, "plate")

    a, b = tiny(minmax="cell"), tiny(minmax="channel")
    assert (a.spec.config["minmax"], b.spec.config["minmax"]) == ("cell", "channel")
    imgs = crops(2)
    imgs[:, 1] //= 4  # DNA dimmer than the rest: the two scopes now see different inputs
    assert not np.allclose(a.embed(imgs, cell_masks(2)), b.embed(imgs, cell_masks(2)))


def test_neighbour_masking_changes_only_what_it_should() -> None:
    x = torch.tensor([[[[9.0, 1.0], [3.0, 2.0]]]])  # a bright neighbour pixel at (0, 0)
    mask = torch.tensor([[[False, True], [True, True]]])
    got = preprocess(x, mask, "cell")
    # masked first, then normalised by the cell's own range: neighbour -> 0, cell pixels / 3
    assert torch.allclose(got, torch.tensor([[[[0.0, 1.0], [3.0, 2.0]]]]) / (3 + 1e-6))
    clean = torch.tensor([[[[0.0, 1.0], [3.0, 2.0]]]])  # nothing outside the cell: masking is a no-op
    assert torch.equal(preprocess(clean, mask, "cell"), preprocess(clean, None, "cell"))

    masked, unmasked = tiny(), tiny(mask_neighbours=False)
    imgs, masks = crops(2), cell_masks(2)
    outside = imgs.copy()
    outside[:, :, ~masks[0]] = 255 - outside[:, :, ~masks[0]]
    assert np.array_equal(masked.embed(imgs, masks), masked.embed(outside, masks))  # outside pixels ignored
    assert not np.allclose(unmasked.embed(imgs, None), unmasked.embed(outside, None))
    assert not np.allclose(masked.embed(imgs, masks), unmasked.embed(imgs, masks))


def test_dtype_scale_does_not_matter() -> None:
    enc = tiny()
    imgs, masks = crops(2), cell_masks(2)
    a = enc.embed(imgs, masks)
    b = enc.embed(imgs.astype(np.uint16) * 257, masks)
    assert np.abs(a - b).max() < 1e-4


# -- passes, outputs ----------------------------------------------------------------------------------


def test_passes_select_their_channels() -> None:
    two = tiny(protein=["Mito", "AGP"])
    assert two.spec.channels == ("ER", "DNA", "Mito", "AGP") and two.spec.embedding_dim == 256
    one = build_encoder("subcell", preset="tiny", input_size=SIZE, protein=["AGP"])
    one.load_state_dict(two.state_dict())  # weights do not depend on the passes
    imgs, masks = crops(2, c=4), cell_masks(2)
    emb = two.embed(imgs, masks)
    assert np.array_equal(emb[:, 128:], one.embed(imgs[:, [0, 1, 3]], masks))
    changed = imgs.copy()
    changed[:, 3] = 255 - changed[:, 3]  # AGP only feeds the second pass
    emb2 = two.embed(changed, masks)
    assert np.array_equal(emb[:, :128], emb2[:, :128]) and not np.allclose(emb[:, 128:], emb2[:, 128:])

    bg = tiny(variant="bg", protein=["RNA"])
    assert bg.spec.channels == ("DNA", "RNA") and bg.spec.config["stains"] == {"b": "DNA"}
    rybg = tiny(variant="rybg", stains={"r": "Tubulin", "y": "ER", "b": "DNA"}, protein=["GFP"])
    assert rybg.spec.channels == ("Tubulin", "ER", "DNA", "GFP")
    assert rybg.module.encoder.embeddings.patch_embeddings.projection.weight.shape[1] == 4
    assert rybg.embed(crops(1, c=4), cell_masks(1)).shape == (1, 128)
    assert rybg.output_names == {} and rybg.embed_with_outputs(crops(1, c=4), cell_masks(1))[1] == {}
    assert bg.embed(crops(0, c=2), cell_masks(0)).shape == (0, 128)


def test_probabilities_are_mean_of_head_sigmoids() -> None:
    enc = tiny(protein=["Mito"], num_classifiers=2)
    assert list(enc.output_names) == ["localization"]
    with torch.no_grad():
        for head, bias in zip(enc.module.classifiers, (0.0, math.log(3.0))):
            head[4].weight.zero_()
            head[4].bias.fill_(bias)
        enc.module.classifiers[1][4].bias[1] = math.log(1 / 3)
    _, out = enc.embed_with_outputs(crops(2, c=3), cell_masks(2))
    probs = out["localization"]
    assert probs.shape == (2, 31) and probs.dtype == np.float32
    # sigmoid(0) = 0.5, sigmoid(log 3) = 0.75, sigmoid(log 1/3) = 0.25: class 1 -> 0.375, others 0.625
    expected = np.full(31, 0.625, np.float32)
    expected[1] = 0.375
    assert np.allclose(probs, expected, atol=1e-6)
    assert not np.allclose(probs.sum(axis=1), 1.0)  # raw sigmoids, not softmaxed


def test_attention_maps_per_pass_and_head() -> None:
    enc = tiny()
    maps = enc.attention_maps(crops(2), cell_masks(2))
    assert maps.shape == (2, 3, 2, 2, 2) and maps.dtype == np.float32 and (maps > 0).all()


# -- round trips --------------------------------------------------------------------------------------


def test_round_trip_through_upstream_files_safetensors_and_spec(tmp_path: Path) -> None:
    src = tiny(seed=3, num_classifiers=2)
    enc_sd, heads = to_upstream(src)
    enc_path = save_zip({"module." + k: v for k, v in enc_sd.items()}, tmp_path / "enc.pth")  # DDP-wrapped
    head_paths = [str(save_zip(h, tmp_path / f"head{i}.pth")) for i, h in enumerate(heads)]
    loaded = build_encoder("subcell", preset="tiny", input_size=SIZE, encoder_checkpoint=str(enc_path),
                           classifier_checkpoints=head_paths)
    imgs, masks = crops(3), cell_masks(3)
    expected, expected_out = src.embed_with_outputs(imgs, masks)
    got, got_out = loaded.embed_with_outputs(imgs, masks)
    assert np.array_equal(got, expected)
    assert all(np.array_equal(got_out[k], expected_out[k]) for k in expected_out)

    weights = save_state_dict_file(loaded.state_dict(), tmp_path / "weights.safetensors")
    for p in [enc_path, *map(Path, head_paths)]:
        p.unlink()  # the spec never re-reads checkpoint files
    spec = EncoderSpec.from_dict(json.loads(json.dumps(loaded.spec.to_dict())))
    rebuilt = build_from_spec(spec, load_state_dict_file(weights))
    assert rebuilt.spec == loaded.spec
    got2, out2 = rebuilt.embed_with_outputs(imgs, masks)
    assert np.array_equal(got2, expected) and all(np.array_equal(out2[k], expected_out[k]) for k in out2)


# -- bad input ----------------------------------------------------------------------------------------


def test_bad_checkpoints_are_refused_naming_file_and_keys(tmp_path: Path) -> None:
    camae = {"encoder.vit_backbone." + k: v for k, v in build_camae_module("demo").state_dict().items()}
    path = save_zip(camae, tmp_path / "openphenom.pth")
    with pytest.raises(BioembedInputError, match=r"unexpected keys.*encoder\.vit_backbone\.") as err:
        tiny(encoder_checkpoint=str(path))
    assert "openphenom.pth" in str(err.value) and "missing keys" in str(err.value)

    resnet = save_zip({"conv1.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "resnet.pth")
    with pytest.raises(BioembedInputError, match=r"resnet\.pth.*not a SubCell encoder checkpoint"):
        tiny(encoder_checkpoint=str(resnet))

    four_channel, _ = to_upstream(tiny(variant="rybg", stains={"r": "Tub", "y": "ER", "b": "DNA"}))
    path = save_zip(four_channel, tmp_path / "all_channels.pth")
    with pytest.raises(BioembedInputError, match=r"all_channels\.pth.*projection\.weight: file "
                                                 r"\(64, 4, 16, 16\) vs model \(64, 3, 16, 16\)"):
        tiny(encoder_checkpoint=str(path))  # an rybg file into the ybg variant

    enc_sd, _ = to_upstream(tiny())
    enc_path = save_zip(enc_sd, tmp_path / "ybg.pth")
    head = {k: torch.zeros(s) for k, s in upstream_head_shapes(128, (32, 16), classes=35).items()}
    head_path = save_zip(head, tmp_path / "head35.pth")
    with pytest.raises(BioembedInputError, match=r"head35\.pth.*4\.weight: file \(35, 16\)"):
        tiny(encoder_checkpoint=str(enc_path), classifier_checkpoints=[str(head_path)])

    with pytest.raises(BioembedInputError, match=r"nope\.pth.*not found"):
        tiny(encoder_checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(BioembedInputError, match=r"gone\.pth.*not found"):
        tiny(encoder_checkpoint=str(enc_path), classifier_checkpoints=[str(tmp_path / "gone.pth")])
    with pytest.raises(ValueError, match="need the encoder_checkpoint"):
        tiny(classifier_checkpoints=[str(head_path)])
    with pytest.raises(ValueError, match="list of paths"):
        tiny(encoder_checkpoint=str(enc_path), classifier_checkpoints=str(head_path))
    with pytest.raises(BioembedInputError, match="missing keys"):
        tiny(num_classifiers=1).load_state_dict(tiny().state_dict())  # strict: the head is missing


def test_bad_config_and_images_are_refused() -> None:
    with pytest.raises(ValueError, match=r"variant 'rbg' needs role 'r' \(microtubules\)"):
        tiny(variant="rbg")  # Cell Painting has no microtubule stain
    with pytest.raises(ValueError, match=r"role\(s\) \['r'\] that variant 'ybg' does not take"):
        tiny(stains={"r": "Tub", "y": "ER", "b": "DNA"})
    with pytest.raises(ValueError, match="must not map 'g'"):
        tiny(stains={"y": "ER", "b": "DNA", "g": "Mito"})
    with pytest.raises(ValueError, match="unknown SubCell channel variant 'gb'"):
        tiny(variant="gb")
    with pytest.raises(ValueError, match="duplicates"):
        tiny(protein=["Mito", "Mito"])
    with pytest.raises(ValueError, match="list of plate stain names"):
        tiny(protein="Mito")
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny(input_size=40)
    with pytest.raises(ValueError, match="minmax"):
        tiny(minmax="plate")
    with pytest.raises(KeyError, match="unknown SubCell preset"):
        tiny(preset="vit_huge")

    enc = tiny()
    with pytest.raises(ValueError, match=r"5 channels \['ER', 'DNA', 'Mito', 'AGP', 'RNA'\], got 4"):
        enc.embed(crops(1, c=4), cell_masks(1))
    with pytest.raises(ValueError, match="multiples of 16"):
        enc.embed(crops(1, size=40), cell_masks(1, 40))
    with pytest.raises(ValueError, match="needs the cell masks"):
        enc.embed(crops(1), None)
    with pytest.raises(ValueError, match="masks must be"):
        enc.embed(crops(2), cell_masks(1))
    # A plate without one of the needed stains: the engine's channel lookup names it.
    with pytest.raises(ValueError, match=r"missing \['Mito'\]"):
        channel_indices([c for c in CELL_PAINTING_CHANNELS if c != "Mito"], enc.spec.channels, "P1")


# -- optional: timm equivalence -----------------------------------------------------------------------


@pytest.mark.slow
def test_vit_matches_timm_vision_transformer() -> None:
    """Our HF-layout ViT equals timm's VisionTransformer under the documented HF -> timm key mapping."""
    from functools import partial

    from bioembed_assets.encoders.timm_compat import import_timm

    timm = import_timm()
    enc = tiny(input_size=64)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, in_chans=3, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0, qkv_bias=True,
        num_classes=0, global_pool="", norm_layer=partial(torch.nn.LayerNorm, eps=1e-12), act_layer=torch.nn.GELU,
    ).eval()
    p = {k.removeprefix("encoder."): v for k, v in enc.state_dict().items() if k.startswith("encoder.")}
    mapped = {
        "cls_token": p["embeddings.cls_token"], "pos_embed": p["embeddings.position_embeddings"],
        "patch_embed.proj.weight": p["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": p["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": p["layernorm.weight"], "norm.bias": p["layernorm.bias"],
    }  # fmt: skip
    for i in range(2):
        hf = f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            mapped[f"blocks.{i}.norm1.{part}"] = p[hf + f"layernorm_before.{part}"]
            mapped[f"blocks.{i}.norm2.{part}"] = p[hf + f"layernorm_after.{part}"]
            mapped[f"blocks.{i}.attn.qkv.{part}"] = torch.cat(
                [p[hf + f"attention.attention.{n}.{part}"] for n in ("query", "key", "value")])
            mapped[f"blocks.{i}.attn.proj.{part}"] = p[hf + f"attention.output.dense.{part}"]
            mapped[f"blocks.{i}.mlp.fc1.{part}"] = p[hf + f"intermediate.dense.{part}"]
            mapped[f"blocks.{i}.mlp.fc2.{part}"] = p[hf + f"output.dense.{part}"]
    vit.load_state_dict(mapped, strict=True)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (vit.forward_features(x) - enc.module.encoder(x)).abs().max() < 1e-5
