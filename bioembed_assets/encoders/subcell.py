"""SubCell (Lundberg lab / CZI): a ViT-B/16 with a gated-attention pooler, loading the published weights: family "subcell".

Written from the notes in `reference/seeds_systems.md` section 2 (no upstream code). The network is plain
torch with Hugging Face ViT parameter names (`encoder.embeddings.*`, `encoder.encoder.layer.<i>.*`,
`encoder.layernorm.*`), the pooler as `pool_model.*` and the localization MLP heads as `classifiers.<i>.*`,
so SubCell's encoder and classifier files load strictly (`load_subcell_checkpoint`).

Per crop and per pass (one pass per `protein` stain; SubCell's JUMP analysis runs `ybg` on [ER, DNA, X]):
1. select the pass's channels in r, y, b, g order (r microtubules, y ER, b DNA, g protein);
2. neighbour masking (`mask_neighbours`): pixels outside the crop's own cell mask are set to 0 *before*
   normalisation, so a bright neighbour cannot compress the cell's range and the background maps to 0
   (an all-False mask blanks the crop);
3. min-max to [0, 1], (x - min) / (max - min + 1e-6): `minmax="cell"` jointly over the pass's channels
   (SubCell training, portable v1), `"channel"` per channel (portable v2/v3);
4. ViT (position embeddings bicubic-interpolated when the patch grid differs from the native one), final
   LayerNorm, gated attention pooler over all tokens incl. CLS -> `pool_op` (1536-d for ViT-B).
The embedding concatenates the passes' `pool_op`s in `protein` order. With classifier heads loaded,
`embed_with_outputs` adds the 31 localization probabilities per pass: per-class sigmoids averaged over
the heads (raw, not softmaxed). Inference only (`spec.trainable` is False).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bioembed_assets.encoders.autoencoder import eval_mode, float32_region, seeded
from bioembed_assets.encoders.base import (
    EMBEDDING,
    EncoderSpec,
    TensorEncoderMixin,
    autocast,
    register_family,
    without_autograd,
)
from bioembed_assets.encoders.camae import to_0_255
from bioembed_assets.encoders.checkpoints import (
    StateDict,
    check_state_dict,
    load_checked,
    load_state_dict_file,
    strip_wrapper_prefixes,
)
from bioembed_assets.schema import BioembedInputError

LN_EPS = 1e-12
MINMAX_EPS = 1e-6
MINMAX_SCOPES = ("cell", "channel")

ROLES: dict[str, str] = {"r": "microtubules", "y": "ER", "b": "DNA/nucleus", "g": "protein"}
"""SubCell's input channels, in the order the network takes them."""
VARIANTS = ("rybg", "rbg", "ybg", "bg")
CELL_PAINTING_STAINS: dict[str, str] = {"y": "ER", "b": "DNA"}
"""Default role -> plate stain mapping (Cell Painting has no microtubule stain)."""
CELL_PAINTING_PROTEINS: tuple[str, ...] = ("Mito", "AGP", "RNA")
"""Default "protein" stains, one pass each (as SubCell's JUMP analysis)."""

LOCALIZATION_CLASSES: tuple[str, ...] = (
    "Actin filaments", "Aggresome", "Cell Junctions", "Centriolar satellite", "Centrosome",
    "Cytokinetic bridge", "Cytoplasmic bodies", "Cytosol", "ER", "Endosomes", "Focal adhesion sites", "Golgi",
    "Intermediate filaments", "Lipid droplets", "Lysosomes", "Microtubules", "Midbody", "Mitochondria",
    "Mitotic chromosome", "Mitotic spindle", "Nuclear bodies", "Nuclear membrane", "Nuclear speckles", "Nucleoli",
    "Nucleoli fibrillar center", "Nucleoli rim", "Nucleoplasm", "Peroxisomes", "Plasma membrane", "Vesicles",
    "Negative",
)  # fmt: skip
"""The released classifier heads' 31 outputs, 0-based index order."""


@dataclass(frozen=True)
class SubCellArch:
    """Network sizes. `image_size` is the native crop side (position table of (image_size/patch_size)**2 + 1 rows)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    pool_dim: int
    pool_heads: int
    classifier_dims: tuple[int, ...]
    num_classes: int = len(LOCALIZATION_CLASSES)

    @property
    def pool_size(self) -> int:
        """Width of one pass's `pool_op`: the heads' weighted token sums concatenated."""
        return self.pool_heads * self.hidden_size


PRESETS: dict[str, SubCellArch] = {
    # The published ViT-B/16 models: 785 tokens at 448 px, 1536-d pool_op, 1536-512-256-31 heads.
    "vit_base_patch16_448": SubCellArch(768, 12, 12, 3072, 448, 16, 512, 2, (512, 256)),
    # CPU tests and the demo.
    "tiny": SubCellArch(64, 2, 2, 256, 64, 16, 32, 2, (32, 16)),
}


# -- the network (Hugging Face ViT names) ------------------------------------------------------------


def interpolate_pos_encoding(position_embeddings: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """The (1, 1 + G*G, D) table for a grid_h x grid_w patch grid: CLS row kept, patch rows bicubic-resized.

    The native square grid returns the table itself (as Hugging Face's `interpolate_pos_encoding`).
    """
    n = position_embeddings.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position_embeddings must hold 1 + a square number of rows, got {n + 1}")
    if grid_h == grid_w == side:
        return position_embeddings
    dim = position_embeddings.shape[-1]
    grid = position_embeddings[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return torch.cat([position_embeddings[:, :1], grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)], dim=1)


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, num_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(num_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x).flatten(2).transpose(1, 2)


class ViTEmbeddings(nn.Module):
    """Patch tokens behind a CLS token, plus (interpolated) learned position embeddings."""

    def __init__(self, arch: SubCellArch, num_channels: int) -> None:
        super().__init__()
        if arch.image_size % arch.patch_size:
            raise ValueError(f"image_size {arch.image_size} is not a multiple of patch_size {arch.patch_size}")
        self.patch_size = arch.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, arch.hidden_size))
        grid = arch.image_size // arch.patch_size
        self.position_embeddings = nn.Parameter(torch.zeros(1, grid * grid + 1, arch.hidden_size))
        self.patch_embeddings = ViTPatchEmbeddings(num_channels, arch.hidden_size, arch.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = self.patch_embeddings(x)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        return tokens + interpolate_pos_encoding(self.position_embeddings, h // self.patch_size, w // self.patch_size)


class ViTSelfAttention(nn.Module):
    """Multi-head self-attention with separate biased query/key/value projections."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        shape = (b, n, self.num_heads, d // self.num_heads)
        q, k, v = (proj(x).reshape(shape).transpose(1, 2) for proj in (self.query, self.key, self.value))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


class ViTDense(nn.Module):
    """One `dense` Linear (HF's `attention.output` and `output` containers)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class ViTAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.attention = ViTSelfAttention(hidden_size, num_heads)
        self.output = ViTDense(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(x))


class ViTIntermediate(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)
        self.act = nn.GELU()  # exact (erf), as HF's "gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class ViTLayer(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then + MLP(LN(.))."""

    def __init__(self, arch: SubCellArch) -> None:
        super().__init__()
        d = arch.hidden_size
        self.layernorm_before = nn.LayerNorm(d, eps=LN_EPS)
        self.attention = ViTAttention(d, arch.num_heads)
        self.layernorm_after = nn.LayerNorm(d, eps=LN_EPS)
        self.intermediate = ViTIntermediate(d, arch.intermediate_size)
        self.output = ViTDense(arch.intermediate_size, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output(self.intermediate(self.layernorm_after(x)))


class ViTLayers(nn.Module):
    """HF's `ViTEncoder`: the stack of layers (parameter path `encoder.encoder.layer.<i>`)."""

    def __init__(self, arch: SubCellArch) -> None:
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(arch) for _ in range(arch.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class ViT(nn.Module):
    """HF `ViTModel` without pooler: images (B, C, H, W), H and W multiples of the patch size ->
    final-LayerNorm'd tokens (B, 1 + H*W/patch**2, D) (`last_hidden_state`)."""

    def __init__(self, arch: SubCellArch, num_channels: int) -> None:
        super().__init__()
        self.embeddings = ViTEmbeddings(arch, num_channels)
        self.encoder = ViTLayers(arch)
        self.layernorm = nn.LayerNorm(arch.hidden_size, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layernorm(self.encoder(self.embeddings(x)))


class GatedAttentionPooler(nn.Module):
    """Gated attention pooling: logits = W (tanh(V x) * GELU(U x)) per token and head, softmax over all
    tokens (CLS included); the heads' weighted token sums are concatenated (B, num_heads * dim)."""

    def __init__(self, dim: int, int_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attention_v = nn.Sequential(nn.Linear(dim, int_dim), nn.Tanh())
        self.attention_u = nn.Sequential(nn.Linear(dim, int_dim), nn.GELU())
        self.attention = nn.Linear(int_dim, num_heads)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, N, D) -> (pool_op (B, num_heads * D), attention weights (B, num_heads, N))."""
        logits = self.attention(self.attention_v(tokens) * self.attention_u(tokens))  # (B, N, heads)
        weights = logits.transpose(1, 2).softmax(dim=-1)
        return (weights @ tokens).flatten(1), weights


def classifier_mlp(arch: SubCellArch) -> nn.Sequential:
    """One localization head: pool_op -> Linear/ReLU per hidden width -> num_classes logits (keys 0, 2, 4, ...)."""
    dims = [arch.pool_size, *arch.classifier_dims]
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], arch.num_classes))
    return nn.Sequential(*layers)


class SubCellModel(nn.Module):
    """SubCell's `ViTPoolClassifier`: `encoder` (ViT), `pool_model` (gated pooler), `classifiers` (MLP heads)."""

    def __init__(self, arch: SubCellArch, num_channels: int, num_classifiers: int = 0) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = ViT(arch, num_channels)
        self.pool_model = GatedAttentionPooler(arch.hidden_size, arch.pool_dim, arch.pool_heads)
        self.classifiers = nn.ModuleList(classifier_mlp(arch) for _ in range(num_classifiers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images -> (pool_op (B, pool_size), pooler weights (B, pool_heads, N) incl. CLS)."""
        return self.pool_model(self.encoder(x).float())

    def probabilities(self, pool_op: torch.Tensor) -> torch.Tensor:
        """Per-class sigmoids averaged over the heads (B, num_classes); multi-label, not softmaxed."""
        if not len(self.classifiers):
            raise ValueError("this SubCell model has no classifier heads (pass classifier_checkpoints)")
        return torch.stack([head(pool_op).sigmoid() for head in self.classifiers]).mean(dim=0)


def build_subcell_model(
    arch: SubCellArch | str, num_channels: int, num_classifiers: int = 0, seed: int = 0
) -> SubCellModel:
    """A randomly initialised `SubCellModel` (deterministic in `seed`, global RNG untouched), in eval mode."""
    if isinstance(arch, str):
        if arch not in PRESETS:
            raise KeyError(f"unknown SubCell preset {arch!r}; known: {sorted(PRESETS)}")
        arch = PRESETS[arch]
    with seeded(seed):
        model = SubCellModel(arch, num_channels, num_classifiers)
        emb = model.encoder.embeddings
        nn.init.trunc_normal_(emb.cls_token, std=0.02)
        nn.init.trunc_normal_(emb.position_embeddings, std=0.02)
    return model.eval()


# -- upstream checkpoint files -----------------------------------------------------------------------

_ENCODER_KEY = re.compile(r"(?:^|\.)((?:encoder|pool_model)\..*)$")
_UPSTREAM_POOLER = re.compile(r"^(pool_model\.attention_[uv])\.1\.")  # a Dropout sat at index 0 in training
_UPSTREAM_HEAD = {"3": "2", "6": "4"}  # Dropouts at 2 and 5 in training


def encoder_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None) -> StateDict:
    """An upstream encoder file's keys -> this module's `encoder.*` / `pool_model.*` names.

    Keeps the keys from their first `encoder.` / `pool_model.` component on (other keys, e.g. projection
    or decoder heads, are dropped) and renames `pool_model.attention_{v,u}.1.` to `.0.`.
    """
    sd = strip_wrapper_prefixes(state_dict)
    out: StateDict = {}
    for key, value in sd.items():
        found = _ENCODER_KEY.search(key)
        if found:
            out[_UPSTREAM_POOLER.sub(r"\1.0.", found.group(1))] = value
    if not out:
        raise BioembedInputError(
            f"no encoder./pool_model. keys: not a SubCell encoder checkpoint (keys start {sorted(sd)[:5]})", path=path
        )
    return out


def classifier_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None) -> StateDict:
    """An upstream classifier file (`Sequential` keys `0.*, 3.*, 6.*`) -> keys `0.*, 2.*, 4.*`."""
    sd = strip_wrapper_prefixes(state_dict)
    out: StateDict = {}
    for key, value in sd.items():
        index, dot, rest = key.partition(".")
        out[f"{_UPSTREAM_HEAD.get(index, index)}{dot}{rest}"] = value
    if len(out) != len(sd):
        raise BioembedInputError(f"classifier keys collide after renaming 3.->2., 6.->4.: {sorted(sd)}", path=path)
    return out


def _encoder_part(model: SubCellModel) -> nn.Module:
    """A view holding the model's `encoder` and `pool_model` (what an encoder file fills)."""
    part = nn.Module()
    part.encoder, part.pool_model = model.encoder, model.pool_model
    return part


def load_subcell_checkpoint(
    encoder_file: str | Path,
    classifier_files: Sequence[str | Path] = (),
    model: SubCellModel | None = None,
) -> StateDict:
    """Read SubCell's encoder file and classifier files -> one state dict in `SubCellModel` names.

    Files are read with `weights_only=True` (never unpickling code). With `model`, each file is checked
    strictly against its part (encoder + pooler, or classifier head i) and an error names the file and
    the missing, unexpected or wrongly shaped keys; `model` needs one head per classifier file.
    """
    if isinstance(classifier_files, (str, Path)):
        raise ValueError(f"classifier_files must be a list of paths, got the single path {classifier_files!r}")
    if model is not None and len(model.classifiers) != len(classifier_files):
        raise ValueError(f"model has {len(model.classifiers)} classifier heads, got {len(classifier_files)} files")
    sd = encoder_state_dict(load_state_dict_file(encoder_file), encoder_file)
    if model is not None:
        check_state_dict(sd, _encoder_part(model), encoder_file)
    for i, file in enumerate(classifier_files):
        head = classifier_state_dict(load_state_dict_file(file), file)
        if model is not None:
            check_state_dict(head, model.classifiers[i], file)
        sd.update({f"classifiers.{i}.{k}": v for k, v in head.items()})
    return sd


# -- preprocessing -----------------------------------------------------------------------------------


def preprocess(images: torch.Tensor, masks: torch.Tensor | None, minmax: str = "cell") -> torch.Tensor:
    """Crops (B, C, H, W) -> float32 in [0, 1]: zero pixels outside `masks` (B, H, W) if given, then min-max.

    `minmax="cell"`: one min and max per crop over all its channels; `"channel"`: per crop and channel.
    Both divide by (max - min + 1e-6), so a constant crop or channel becomes 0.
    """
    if minmax not in MINMAX_SCOPES:
        raise ValueError(f"minmax must be one of {list(MINMAX_SCOPES)}, got {minmax!r}")
    x = images.float()
    if masks is not None:
        x = x * masks[:, None].to(x.dtype)
    dims = (1, 2, 3) if minmax == "cell" else (2, 3)
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo + MINMAX_EPS)


# -- channel variants and passes ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pass:
    """One forward pass: the protein stain used as "g" and the input's indices into `spec.channels`."""

    protein: str
    indices: tuple[int, ...]


def _stain_list(value: Any, what: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{what} must be a list of plate stain names, got {value!r}")
    names = [str(v) for v in value]
    if not names or any(not n for n in names):
        raise ValueError(f"{what} must name at least one stain, each non-empty; got {names}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what} must be distinct, got duplicates {dupes}")
    return names


def resolve_passes(
    variant: str, stains: Mapping[str, str] | None, protein: Sequence[str] | None
) -> tuple[dict[str, str], list[str], tuple[str, ...], list[Pass]]:
    """-> (role -> stain mapping, protein stains, the distinct plate stains needed, the passes).

    The plate stains are ordered r, y, b, then the proteins; each pass feeds the variant's roles in
    r, y, b, g order. Defaults: `CELL_PAINTING_STAINS` (restricted to the variant) and `CELL_PAINTING_PROTEINS`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown SubCell channel variant {variant!r}; known: {list(VARIANTS)} "
                         f"(letters: {', '.join(f'{k} = {v}' for k, v in ROLES.items())})")
    roles = [r for r in variant if r != "g"]
    if stains is None:
        stains = {r: CELL_PAINTING_STAINS[r] for r in roles if r in CELL_PAINTING_STAINS}
    if not isinstance(stains, Mapping):
        raise ValueError(f"stains must map roles {roles} to plate stain names, got {stains!r}")
    mapping = {str(k): str(v) for k, v in stains.items()}
    if "g" in mapping:
        raise ValueError("stains must not map 'g': the protein channel comes from `protein` (one pass per stain)")
    unused = sorted(set(mapping) - set(roles))
    if unused:
        raise ValueError(f"stains maps role(s) {unused} that variant {variant!r} does not take (it takes {roles} + g)")
    for role in roles:
        if not mapping.get(role):
            raise ValueError(f"variant {variant!r} needs role {role!r} ({ROLES[role]}) mapped to a plate stain in "
                             f"`stains`, got {mapping}")
    proteins = _stain_list(list(CELL_PAINTING_PROTEINS) if protein is None else protein, "protein")
    ordered = {mapping[r]: None for r in roles} | {p: None for p in proteins}
    channels = tuple(ordered)
    passes = [Pass(p, tuple(channels.index(s) for s in [*(mapping[r] for r in roles), p])) for p in proteins]
    return {r: mapping[r] for r in roles}, proteins, channels, passes


# -- the encoder --------------------------------------------------------------------------------------


class SubCellEncoder(TensorEncoderMixin):
    """`Encoder` adapter around a `SubCellModel`: one pass per protein stain, embeddings concatenated.

    `feature_names` names the embedding columns (`SubCell_<protein>_0000` ...); with classifier heads,
    `output_names` maps "localization" (one pass) or "localization_<protein>" to the 31 class names.
    """

    def __init__(self, module: SubCellModel, spec: EncoderSpec, passes: Sequence[Pass]) -> None:
        self.module, self.spec, self.passes = module.eval(), spec, list(passes)
        self.minmax: str = spec.config["minmax"]
        self.mask_neighbours: bool = spec.config["mask_neighbours"]
        width = module.arch.pool_size
        self.feature_names: list[str] = [f"SubCell_{p.protein}_{j:04d}" for p in self.passes for j in range(width)]
        self.output_names: dict[str, list[str]] = {}
        if len(module.classifiers):
            single = len(self.passes) == 1
            self.output_names = {
                "localization" if single else f"localization_{p.protein}": list(LOCALIZATION_CLASSES)
                for p in self.passes
            }

    @property
    def device(self) -> torch.device:
        return self.module.encoder.embeddings.cls_token.device

    def _check(self, images: torch.Tensor, masks: torch.Tensor | None) -> None:
        channels = self.spec.channels or ()
        if images.ndim != 4:
            raise ValueError(f"subcell encoder expects crops (B, C, H, W), got shape {tuple(images.shape)}")
        if images.shape[1] != len(channels):
            raise ValueError(f"subcell encoder expects {len(channels)} channels {list(channels)}, "
                             f"got {images.shape[1]}")
        patch = self.module.arch.patch_size
        if images.shape[2] % patch or images.shape[3] % patch or images.shape[2] < patch:
            raise ValueError(f"subcell encoder needs crop sides that are multiples of {patch}, "
                             f"got {images.shape[2]}x{images.shape[3]} (resize to {self.spec.input_size})")
        if not self.mask_neighbours:
            return
        if masks is None:
            raise ValueError("subcell encoder masks neighbours (mask_neighbours=True) and needs the cell masks "
                             "(B, H, W); got None")
        if tuple(masks.shape) != (images.shape[0], *images.shape[2:]):
            raise ValueError(f"subcell masks must be (B, H, W) = {(images.shape[0], *images.shape[2:])}, "
                             f"got {tuple(masks.shape)}")

    def _infer(
        self, x: torch.Tensor, masks: torch.Tensor | None, outputs: bool = False, attention: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """0-255 crops on the device -> (embeddings (B, D), {key: (B, 31)} if `outputs`, pooler maps
        (B, passes, heads, h, w) if `attention`); the pooling and heads run in float32."""
        self._check(x, masks)
        b, _, h, w = x.shape
        patch, arch = self.module.arch.patch_size, self.module.arch
        m = masks.bool() if self.mask_neighbours and masks is not None else None
        embeddings, maps, probs = [], [], {}
        keys = list(self.output_names) or [None] * len(self.passes)
        with eval_mode(self.module), without_autograd():
            for p, key in zip(self.passes, keys):
                tokens = self.module.encoder(preprocess(x[:, list(p.indices)], m, self.minmax))
                with float32_region(x.device):
                    pool_op, weights = self.module.pool_model(tokens.float())
                    embeddings.append(pool_op)
                    if outputs and key is not None:
                        probs[key] = self.module.probabilities(pool_op)
                if attention:
                    maps.append(weights[:, :, 1:].reshape(b, arch.pool_heads, h // patch, w // patch))
        return torch.cat(embeddings, dim=1), probs, torch.stack(maps, dim=1) if attention else None

    def embed_tensors(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """0-255 crops (B, C, H, W) in `spec.channels` order and masks on the device ->
        {EMBEDDING: (B, D), key of `output_names`: localization probabilities (B, 31)} ({} without heads)."""
        emb, probs, _ = self._infer(images, masks, outputs=True)
        return {EMBEDDING: emb, **probs}

    def attention_maps(self, images: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
        """The pooler's token weights per cell, CLS dropped: float32 (B, passes, pool_heads, H/16, W/16)."""
        x = torch.from_numpy(to_0_255(np.asarray(images))).to(self.device)
        m = None if masks is None else torch.from_numpy(np.asarray(masks, dtype=bool)).to(self.device)
        with torch.inference_mode(), autocast(self.device):
            maps = self._infer(x, m, attention=True)[2]
        assert maps is not None
        return maps.float().cpu().numpy()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> Any:
        """Strict load in this module's names (`encoder.*`, `pool_model.*`, `classifiers.<i>.*`)."""
        return load_checked(self.module, state_dict)

    def to(self, device: str | torch.device) -> SubCellEncoder:
        self.module.to(device)
        return self


def _checkpoint_path(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise BioembedInputError(f"SubCell {what} not found", path=p)
    return p


@register_family("subcell")
def build_subcell(
    variant: str = "ybg",
    stains: Mapping[str, str] | None = None,
    protein: Sequence[str] | None = None,
    preset: str = "vit_base_patch16_448",
    input_size: int | None = None,
    minmax: str = "cell",
    mask_neighbours: bool = True,
    encoder_checkpoint: str | None = None,
    classifier_checkpoints: Sequence[str] = (),
    num_classifiers: int | None = None,
    weights_source: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> SubCellEncoder:
    """A SubCell encoder; with `encoder_checkpoint` (and `classifier_checkpoints`) the published weights.

    `variant` is the channel subset (rybg, rbg, ybg, bg); `stains` maps its roles r/y/b to plate stains
    (default {y: ER, b: DNA}) and each `protein` stain (default Mito, AGP, RNA) is the g channel of one
    pass. `input_size` (default the preset's 448) is the crop side the engine resizes to, a multiple of 16.
    Checkpoints are local files (torch zip read with weights_only=True, or safetensors). `spec.config`
    records `num_classifiers` and, as `weights_source`, the files read, but not as paths to re-read:
    `build_from_spec(spec, state_dict)` takes the weights from the state dict.
    """
    roles, proteins, channels, passes = resolve_passes(variant, stains, protein)
    if preset not in PRESETS:
        raise KeyError(f"unknown SubCell preset {preset!r}; known: {sorted(PRESETS)}")
    arch = PRESETS[preset]
    size = arch.image_size if input_size is None else int(input_size)
    if size < arch.patch_size or size % arch.patch_size:
        raise ValueError(f"input_size must be a positive multiple of {arch.patch_size}, got {input_size}")
    if minmax not in MINMAX_SCOPES:
        raise ValueError(f"minmax must be one of {list(MINMAX_SCOPES)}, got {minmax!r}")
    if isinstance(classifier_checkpoints, (str, Path)):
        raise ValueError(f"classifier_checkpoints must be a list of paths, got {classifier_checkpoints!r}")
    heads = [_checkpoint_path(p, "classifier checkpoint") for p in classifier_checkpoints]
    if heads and encoder_checkpoint is None:
        raise ValueError("classifier_checkpoints need the encoder_checkpoint their heads were trained on")
    n_heads = len(heads) if num_classifiers is None else int(num_classifiers)
    if heads and n_heads != len(heads):
        raise ValueError(f"num_classifiers={num_classifiers} but {len(heads)} classifier_checkpoints were given")
    if n_heads < 0:
        raise ValueError(f"num_classifiers must be >= 0, got {num_classifiers}")

    module = build_subcell_model(arch, len(variant), n_heads, seed)
    source = dict(weights_source) if weights_source is not None else None
    if encoder_checkpoint is not None:
        path = _checkpoint_path(encoder_checkpoint, "encoder checkpoint")
        module.load_state_dict(load_subcell_checkpoint(path, heads, module), strict=True)
        source = {"encoder_checkpoint": str(path), "classifier_checkpoints": [str(p) for p in heads]}
    config: dict[str, Any] = dict(
        variant=variant, stains=roles, protein=proteins, preset=preset, input_size=size, minmax=minmax,
        mask_neighbours=bool(mask_neighbours), num_classifiers=n_heads, seed=int(seed),
    )
    if source is not None:
        config["weights_source"] = source
    spec = EncoderSpec(
        family="subcell", embedding_dim=len(passes) * arch.pool_size, input_size=size, channels=channels,
        per_cell=True, trainable=False, config=config,
    )
    return SubCellEncoder(module, spec, passes)
