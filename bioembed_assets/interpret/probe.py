"""Linear probes on frozen embeddings, e.g. on *plate* labels: Grad-CAM of such a probe shows where in the
crop an encoder carries the batch effect (background, neighbours, or the cell itself).

The probe is multinomial logistic regression trained full-batch with Adam on standardized features; the
standardization is folded into the returned `nn.Linear`, so it acts on the raw embedding. With a
supervised CNN this is "fine-tuning only the head"; the backbone is never updated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bioembed_assets.encoders.autoencoder import seeded
from bioembed_assets.interpret.adapters import classifier_for
from bioembed_assets.interpret.gradcam import CamClassifier


@dataclass
class LinearProbe:
    """A trained probe: `head` (D -> len(classes)) on the raw embedding and its training accuracy."""

    head: nn.Linear
    classes: list[str]
    train_accuracy: float

    def predict(self, features: np.ndarray) -> list[str]:
        """Class names predicted for embeddings (N, D)."""
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=self.head.weight.device)
            return [self.classes[i] for i in self.head(x).argmax(1).cpu().tolist()]

    def accuracy(self, features: np.ndarray, labels: Sequence[str] | np.ndarray) -> float:
        """Top-1 accuracy on (held-out) embeddings and their labels; chance is about 1 / len(classes)."""
        truth = [str(v) for v in np.asarray(labels).tolist()]
        if len(truth) != len(features):
            raise ValueError(f"{len(features)} embeddings for {len(truth)} labels")
        return float(np.mean([p == t for p, t in zip(self.predict(features), truth)])) if truth else float("nan")


def train_linear_probe(
    features: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    *,
    classes: Sequence[str] | None = None,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> LinearProbe:
    """Fit a linear classifier of `labels` (names, e.g. plates) on `features` (N, D) float.

    `classes` fixes the output order (default: the sorted distinct labels); `weight_decay` is the L2
    penalty on the standardized-feature weights. Deterministic for a given `seed`.
    """
    X = np.asarray(features, dtype=np.float64)
    y_names = [str(v) for v in np.asarray(labels).tolist()]
    if X.ndim != 2 or X.shape[0] != len(y_names):
        raise ValueError(f"expected features (N, D) with N == {len(y_names)} labels, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"features hold {int((~np.isfinite(X)).sum())} NaN/inf values; a probe needs finite embeddings")
    names = [str(c) for c in classes] if classes is not None else sorted(set(y_names))
    unknown = sorted(set(y_names) - set(names))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not among the classes {names}")
    if len(set(y_names)) < 2:
        raise ValueError(f"a probe needs at least 2 distinct labels, got {sorted(set(y_names))}")
    index = {c: i for i, c in enumerate(names)}
    mu, sd = X.mean(axis=0), X.std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    Xs = torch.from_numpy((X - mu) / sd).float()
    y = torch.tensor([index[v] for v in y_names], dtype=torch.long)
    with seeded(seed):
        lin = nn.Linear(X.shape[1], len(names))
    opt = torch.optim.Adam(lin.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(lin(Xs), y) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((lin(Xs).argmax(1) == y).float().mean())
        head = nn.Linear(X.shape[1], len(names))
        w = lin.weight.double() / torch.from_numpy(sd)[None]
        head.weight.copy_(w.float())
        head.bias.copy_((lin.bias.double() - w @ torch.from_numpy(mu)).float())
    return LinearProbe(head.eval(), names, accuracy)


def embed_in_batches(encoder: object, images: np.ndarray, masks: np.ndarray | None, batch_size: int) -> np.ndarray:
    """`encoder.embed` over `images` in batches of `batch_size` -> float32 (N, D)."""
    n = len(images)
    parts = [
        np.asarray(encoder.embed(images[i : i + batch_size], None if masks is None else masks[i : i + batch_size]))  # type: ignore[attr-defined]
        for i in range(0, n, batch_size)
    ]
    return np.concatenate(parts).astype(np.float32, copy=False)


def fit_probe(
    encoder: object,
    images: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    masks: np.ndarray | None = None,
    *,
    batch_size: int = 64,
    **kwargs: object,
) -> tuple[CamClassifier, LinearProbe]:
    """Embed `images` with the frozen `encoder`, train a probe on `labels` and return it as a Grad-CAM
    classifier (see `adapters.classifier_for`) plus the probe. `kwargs` go to `train_linear_probe`."""
    features = embed_in_batches(encoder, np.asarray(images), masks, batch_size)
    probe = train_linear_probe(features, labels, **kwargs)  # type: ignore[arg-type]
    head = probe.head.to(getattr(encoder, "device", torch.device("cpu")))
    return classifier_for(encoder, head=head, classes=probe.classes), probe
