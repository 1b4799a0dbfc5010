"""Quick-look figures as PNG bytes (matplotlib Agg, no pyplot global state)."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

MAX_LEGEND = 20


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def pca_2d(X: np.ndarray) -> np.ndarray:
    """First two principal-component scores of X (float64, numpy SVD)."""
    X = np.asarray(X, dtype=np.float64)
    Xc = X - X.mean(axis=0)
    _, _, vt = np.linalg.svd(Xc, full_matrices=False)
    Y = Xc @ vt[:2].T
    return np.pad(Y, ((0, 0), (0, 2 - Y.shape[1])))


def embedding_map_png(X: np.ndarray, colour_by: dict[str, np.ndarray], title: str) -> bytes:
    """2-D PCA scatter of X, one panel per colouring; categorical legends list up to 20 values."""
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"X must be a non-empty 2-D array, got shape {X.shape}")
    Y = pca_2d(X)
    panels = colour_by or {"": np.zeros(X.shape[0])}
    fig = Figure(figsize=(6.5 * len(panels), 4.8), layout="constrained")
    for i, (name, values) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        v = np.asarray(values)
        if v.shape != (X.shape[0],):
            raise ValueError(f"colour_by[{name!r}] needs one value per row ({X.shape[0]}), got {v.shape}")
        s = max(2.0, min(20.0, 4000 / X.shape[0]))
        if np.issubdtype(v.dtype, np.number) and len(np.unique(v)) > MAX_LEGEND:
            sc = ax.scatter(Y[:, 0], Y[:, 1], c=v, s=s, cmap="viridis", linewidths=0)
            fig.colorbar(sc, ax=ax, label=name)
        else:
            cats, inv, cnt = np.unique(v.astype(str), return_inverse=True, return_counts=True)
            palette = colormaps["tab10" if len(cats) <= 10 else "tab20"]
            inv = inv.reshape(-1)
            ax.scatter(Y[:, 0], Y[:, 1], s=s, c=palette(inv % palette.N), linewidths=0)
            top = np.sort(np.argsort(-cnt, kind="stable")[:MAX_LEGEND])
            handles = [
                Line2D([], [], ls="", marker="o", ms=5, color=palette(j % palette.N), label=str(cats[j])) for j in top
            ]
            leg = ax.legend(handles=handles, fontsize=7, title=name or None, loc="upper left", bbox_to_anchor=(1.0, 1.0))
            if len(cats) > MAX_LEGEND:
                leg.set_title(f"{name} ({len(cats) - MAX_LEGEND} more not listed)")
        ax.set_title(name)
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
    fig.suptitle(title)
    return _png(fig)


def map_vs_pvalue_png(map_df: pl.DataFrame, threshold: float = 0.05, title: str = "mAP vs significance") -> bytes:
    """Scatter of mean_average_precision vs -log10(p_value), coloured by below_corrected_p."""
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    if map_df.height:
        x = map_df["mean_average_precision"].to_numpy()
        y = -np.log10(map_df["p_value"].to_numpy())
        hit = map_df["below_corrected_p"].to_numpy().astype(bool)
        ax.scatter(x[~hit], y[~hit], s=10, color="0.6", label="not significant")
        ax.scatter(x[hit], y[hit], s=10, color="C3", label=f"BH q < {threshold:g}")
        ax.axhline(-np.log10(threshold), color="0.3", lw=0.8, ls="--")
        ax.legend(fontsize=8)
    ax.set_xlabel("mean average precision")
    ax.set_ylabel("-log10 p-value")
    ax.set_title(f"{title} ({map_df.height} groups)")
    return _png(fig)
