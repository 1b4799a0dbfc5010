"""Grad-CAM (Selvaraju et al. 2017) and attention rollout (Abnar & Zuidema 2020) for classifiers over crops.

Own implementation in plain torch (the maintained `grad-cam` package is only a test reference). A
`CamClassifier` is a differentiable view "raw crops -> logits" plus what the methods need to know about
it (input normalization, class names, default layer, token layout, attention taps); `adapters.py`
builds one for bioembed's encoders.

Grad-CAM of layer L for target class c: A = L's output, w_k = spatial mean of d logit_c / d A_k,
map = ReLU(sum_k w_k A_k), upsampled (bi-/trilinear, align_corners=False) to the crop size. Conv layers
give (B, K, H', W') or, for z-stacks, (B, K, Z', H', W'); a net that runs each channel as its own image
(timm's per-channel strategies: (B*C, K, H', W')) gets one Grad-CAM map per channel image (its own
weights), averaged over the channels. Transformer layers give tokens (B, N, D): the
`prefix_tokens` (CLS, registers) are dropped, the patch tokens reshaped to the patch grid, and a
channel-agnostic ViT's channel-major groups (C x grid) averaged into one map. Maps are returned
un-normalised (no min-max rescale), as Grad-CAMO needs.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bioembed_assets.encoders.autoencoder import eval_mode
from bioembed_assets.encoders.camae import self_standardize, to_0_255

Target = int | str | Sequence[int | str] | np.ndarray
PREDICTED = "predicted"


@dataclass(frozen=True)
class TokenLayout:
    """How a transformer's token sequence maps onto the image: `prefix_tokens` first, then patches of
    `patch_size` pixels, row-major, possibly in several channel-major groups (CA-MAE: C x grid)."""

    prefix_tokens: int
    patch_size: int


@dataclass(frozen=True)
class AttentionTap:
    """Where one attention layer's queries and keys can be read: the outputs of modules `q` and `k`
    (shape (B, heads, N, d) if `heads_first`, else (B, N, heads, d)); logits are q.k * `scale`."""

    q: nn.Module
    k: nn.Module
    heads_first: bool
    scale: float


@dataclass
class CamClassifier:
    """A differentiable classifier over crops.

    `net(normalize(x))` -> logits (B, K) for float32 crops `x` in 0-255 units (B, C, *spatial);
    layer names are `net`'s module names. `check(shape)` validates raw crops (e.g. an encoder's
    `check_images`). `tokens` is set for transformers, `attention` lists their attention layers in
    order (for `attention_rollout`), `rollout_query` says what the logits read: the CLS token ("cls")
    or the mean of the patch tokens ("mean").
    """

    net: nn.Module
    normalize: Callable[[torch.Tensor], torch.Tensor] = self_standardize
    classes: list[str] | None = None
    default_layer: str | None = None
    tokens: TokenLayout | None = None
    attention: tuple[AttentionTap, ...] = ()
    rollout_query: Literal["cls", "mean"] = "mean"
    check: Callable[[Sequence[int]], None] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        """Raw crops (uint8/uint16/float 0-255) -> float32 0-255 tensor on the net's device (checked)."""
        images = np.asarray(images)
        if self.check is not None:
            self.check(images.shape)
        if images.ndim < 4:
            raise ValueError(f"expected crops (B, C, H, W) or z-stacks (B, C, Z, H, W), got shape {images.shape}")
        return torch.from_numpy(to_0_255(images)).to(self.device)

    def class_name(self, index: int) -> str:
        return self.classes[index] if self.classes is not None else str(index)


@dataclass
class CamResult:
    """Maps for a batch: `maps` (B, *crop spatial) float32 >= 0, `raw` at the layer's resolution, the
    explained class per crop `targets`, the argmax class `predicted`, the `logits`, and the `layer`."""

    maps: np.ndarray
    raw: np.ndarray
    targets: np.ndarray
    predicted: np.ndarray
    logits: np.ndarray
    layer: str


def layer_names(net: nn.Module) -> list[str]:
    """Every named submodule of `net` (the valid `layer=` values)."""
    return [name for name, _ in net.named_modules() if name]


def resolve_layer(net: nn.Module, name: str) -> nn.Module:
    """The submodule called `name`; a ValueError lists the closest valid names otherwise."""
    modules = dict(net.named_modules())
    if name and name in modules:
        return modules[name]
    names = layer_names(net)
    close = difflib.get_close_matches(name, names, n=6, cutoff=0.5)
    top = sorted({n.split(".")[0] for n in names})
    hint = f"closest valid names: {close}" if close else f"top-level modules: {top}"
    raise ValueError(f"{type(net).__name__} has no layer {name!r}; {hint}")


def _is_pool(module: nn.Module) -> bool:
    return "pool" in type(module).__name__.lower()


def find_cam_layer(net: nn.Module, x: torch.Tensor) -> str:
    """The last non-pooling module with a spatial output (B, K, H', W') / (B, K, Z', H', W') that
    completes before the first module with a flat (B, F) output (the global pooling / head).

    Found by running `x` once with hooks on every module, in order of completion. Pooling modules
    ("...Pool..." classes: the global pool's inner pool, a shortcut's avg-pool) are never picked, so
    a tiny late grid is not mistaken for the end of the network. Containers complete after their
    children, so a stage (`backbone.layer4`) wins over its last block. Transformers (token outputs
    (B, N, D) after the last spatial module, as a ViT's patch embedding) need an explicit layer.
    """
    order: list[tuple[str, nn.Module, tuple[int, ...]]] = []

    def record(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, _inputs: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                order.append((name, mod, tuple(out.shape)))

        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in net.named_modules() if name]
    try:
        with torch.no_grad(), eval_mode(net):
            net(x)
    finally:
        for h in hooks:
            h.remove()
    best: str | None = None
    tokens_after = False
    for name, mod, shape in order:
        if len(shape) == 2:
            break
        if len(shape) == x.ndim and not _is_pool(mod):
            best, tokens_after = name, False
        elif best is not None and len(shape) == 3:
            tokens_after = True
    if best is None or tokens_after:
        why = "it outputs tokens: name a transformer block" if tokens_after else "no spatial layer found"
        raise ValueError(
            f"cannot pick a Grad-CAM layer of {type(net).__name__} automatically ({why}); pass layer=<module name>"
        )
    return best


def resolve_targets(target: Target, logits: torch.Tensor, classes: Sequence[str] | None) -> torch.Tensor:
    """Class index per crop (B,) from "predicted" (argmax), one class (index or name) for all crops, or
    one per crop (a name, an index, or "predicted" for that crop's argmax)."""
    b, k = logits.shape
    predicted = logits.argmax(dim=1)
    if isinstance(target, str) and target == PREDICTED:
        return predicted
    items = [target] if isinstance(target, (int, str, np.integer)) else list(target)
    if len(items) == 1:
        items = items * b
    if len(items) != b:
        raise ValueError(f"got {len(items)} targets for a batch of {b} crops")
    out = []
    for i, t in enumerate(items):
        if isinstance(t, str) and t == PREDICTED:
            out.append(int(predicted[i]))
        elif isinstance(t, str):
            if classes is None or t not in classes:
                known = list(classes) if classes else "none named"
                raise ValueError(f"unknown target class {t!r} (crop {i}); classes: {known}")
            out.append(list(classes).index(t))
        else:
            if not 0 <= int(t) < k:
                raise ValueError(f"target class index {int(t)} (crop {i}) outside 0..{k - 1}")
            out.append(int(t))
    return torch.tensor(out, dtype=torch.long, device=logits.device)


def upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, *grid) -> (B, *size): bilinear for 2-D, trilinear for 3-D grids (align_corners=False)."""
    mode = {2: "bilinear", 3: "trilinear"}[maps.ndim - 1]
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode=mode, align_corners=False)[:, 0]


def tokens_to_grid(tokens: torch.Tensor, layout: TokenLayout, image_hw: Sequence[int]) -> torch.Tensor:
    """Patch tokens (B, N, D) -> (B, groups, H/p, W/p, D), prefix tokens dropped."""
    h, w = (int(s) // layout.patch_size for s in image_hw)
    b, n, d = tokens.shape
    n_patch = n - layout.prefix_tokens
    if h * w == 0 or n_patch <= 0 or n_patch % (h * w):
        raise ValueError(f"{n} tokens do not fit {layout.prefix_tokens} prefix tokens + groups of a {h}x{w} patch grid")
    return tokens[:, layout.prefix_tokens :].reshape(b, n_patch // (h * w), h, w, d)


def _cam(
    acts: torch.Tensor, grads: torch.Tensor, x: torch.Tensor, layout: TokenLayout | None, layer: str
) -> torch.Tensor:
    """ReLU(sum_k mean(grad_k) A_k) at the layer's resolution: (B, *grid)."""
    if acts.ndim == x.ndim:  # conv feature map (B, K, *spatial), or (B*G, K, *spatial): G sub-images per crop
        dims = tuple(range(2, acts.ndim))
        weights = grads.mean(dim=dims, keepdim=True)
        cam = F.relu((weights * acts).sum(dim=1))
        b = x.shape[0]
        if cam.shape[0] != b:
            if cam.shape[0] % b:
                raise ValueError(f"layer {layer!r} output batch {cam.shape[0]} is not a multiple of {b} crops")
            cam = cam.reshape(b, cam.shape[0] // b, *cam.shape[1:]).mean(dim=1)
        return cam
    if acts.ndim == 3 and x.ndim == 4:  # tokens (B, N, D)
        if layout is None:
            raise ValueError(f"layer {layer!r} outputs tokens {tuple(acts.shape)}; the classifier has no token layout")
        a, g = tokens_to_grid(acts, layout, x.shape[2:]), tokens_to_grid(grads, layout, x.shape[2:])
        weights = g.mean(dim=(1, 2, 3), keepdim=True)
        return F.relu((weights * a).sum(dim=-1)).mean(dim=1)
    raise ValueError(
        f"layer {layer!r} output {tuple(acts.shape)} is neither a feature map nor tokens for input {tuple(x.shape)}"
    )


def grad_cam(
    classifier: CamClassifier, images: np.ndarray, layer: str | None = None, target: Target = PREDICTED
) -> CamResult:
    """Grad-CAM maps of `layer` (default: `classifier.default_layer`, else `find_cam_layer`) for `target`.

    Runs in float32 with the net in eval mode (train/eval flags restored); parameter gradients are not
    touched. The hooked layer must run exactly once per forward.
    """
    net = classifier.net
    x = classifier.prepare(images)
    if x.shape[0] == 0:
        raise ValueError("grad_cam needs at least one crop")
    if layer is None:
        layer = classifier.default_layer or find_cam_layer(net, classifier.normalize(x[:1]))
    module = resolve_layer(net, layer)
    seen: list[torch.Tensor] = []

    def keep(_m: nn.Module, _i: Any, out: Any) -> Any:
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"layer {layer!r} returns {type(out).__name__}, not a tensor")
        seen.append(out)
        return out.clone()  # later in-place ops (e.g. ReLU(inplace)) then leave `out` intact

    handle = module.register_forward_hook(keep)
    try:
        with torch.enable_grad(), eval_mode(net), torch.autocast(x.device.type, enabled=False):
            logits = net(classifier.normalize(x.requires_grad_(True)))
    finally:
        handle.remove()
    if len(seen) != 1:
        raise ValueError(f"layer {layer!r} ran {len(seen)} times in one forward pass; Grad-CAM needs exactly one")
    if logits.ndim != 2:
        raise ValueError(f"the classifier returned {tuple(logits.shape)}, expected logits (B, classes)")
    targets = resolve_targets(target, logits, classifier.classes)
    (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), seen[0])
    with torch.no_grad():
        raw = _cam(seen[0].detach().float(), grads.float(), x, classifier.tokens, layer)
        if all(int(s) == 1 for s in raw.shape[-2:]):
            raise ValueError(
                f"layer {layer!r} has a 1x1 grid for {tuple(x.shape[2:])} crops, so its Grad-CAM map is uniform; "
                "pick an earlier layer or a larger input size"
            )
        maps = upsample(raw, x.shape[2:])
    return CamResult(
        maps=maps.cpu().numpy(), raw=raw.cpu().numpy(), targets=targets.cpu().numpy(),
        predicted=logits.argmax(1).cpu().numpy(), logits=logits.detach().float().cpu().numpy(), layer=layer,
    )


def attention_rollout(
    classifier: CamClassifier, images: np.ndarray, head_fusion: Literal["mean", "max"] = "mean"
) -> CamResult:
    """Gradient-free attention rollout: R = prod_l normalize(0.5 A_l + 0.5 I), A_l = heads fused.

    The map is the rollout row of the token the logits read (`rollout_query`: CLS, or the mean of the
    patch rows), restricted to the patch tokens, on the patch grid (channel groups averaged), upsampled.
    Queries and keys are read from the `classifier.attention` taps, so fused (SDPA) attention works.
    """
    taps = classifier.attention
    if not taps or classifier.tokens is None:
        raise ValueError("attention rollout needs a transformer classifier with attention taps (timm ViT, CA-MAE)")
    if head_fusion not in ("mean", "max"):
        raise ValueError(f"head_fusion must be 'mean' or 'max', got {head_fusion!r}")
    x = classifier.prepare(images)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for i, tap in enumerate(taps):
        for j, mod in enumerate((tap.q, tap.k)):
            hooks.append(mod.register_forward_hook(
                lambda _m, _i, out, key=2 * i + j: captured.__setitem__(key, out.detach().float())))
    try:
        with torch.no_grad(), eval_mode(classifier.net), torch.autocast(x.device.type, enabled=False):
            logits = classifier.net(classifier.normalize(x))
    finally:
        for h in hooks:
            h.remove()
    if len(captured) != 2 * len(taps):
        raise ValueError(f"captured {len(captured) // 2} of {len(taps)} attention layers: taps do not match the net")
    rollout: torch.Tensor | None = None
    for i, tap in enumerate(taps):
        q, k = captured[2 * i], captured[2 * i + 1]
        if not tap.heads_first:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        attn = torch.softmax(q @ k.transpose(-2, -1) * tap.scale, dim=-1)
        a = attn.mean(dim=1) if head_fusion == "mean" else attn.amax(dim=1)
        eye = torch.eye(a.shape[-1], device=a.device)
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    assert rollout is not None
    p = classifier.tokens.prefix_tokens
    # the row of the token the logits read (all N columns; tokens_to_grid drops the prefix columns)
    relevance = rollout[:, 0, :] if classifier.rollout_query == "cls" else rollout[:, p:, :].mean(dim=1)
    grid = tokens_to_grid(relevance[..., None], classifier.tokens, x.shape[2:])[..., 0].mean(dim=1)
    predicted = logits.argmax(1)
    return CamResult(
        maps=upsample(grid, x.shape[2:]).cpu().numpy(), raw=grid.cpu().numpy(), targets=predicted.cpu().numpy(),
        predicted=predicted.cpu().numpy(), logits=logits.float().cpu().numpy(), layer="attention_rollout",
    )
