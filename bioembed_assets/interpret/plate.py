"""Grad-CAMO for every cell of a plate: Grad-CAM maps from its crop store, scores, summaries, a gallery.

`gradcamo_plate(home, plate, encoder)` reads what `embed_plate` reads (the `cells` lake table sorted by
`crop_index`, the zarr crop store through `inference.channel_indices` / `resize_crops`), plus the
platemap (each cell's treatment) and the plate's mask store (the *other* cells' pixels inside each crop,
cut with the same windows `segment.crops.extract_crops` used). The encoder needs a classifier: a
supervised_cnn's own head, or any `adapters.classifier_for` encoder with a probe `head`.

Maps are computed at the encoder's input size (crops resized as for embedding) and the layer's map
(`CamResult.raw`) is upsampled to the crop store's size, so the score uses the stored masks as they are.
Nothing is written to the lake here: the caller stores `PlateGradCAMO.cells` and `.summary` (one
partition per encoder, version and plate) and logs `.metrics()` and the gallery (`log_to_mlflow`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import zarr
from skimage.segmentation import expand_labels

from bioembed_assets import schema as s
from bioembed_assets.config import Home
from bioembed_assets.inference import channel_indices, resize_crops
from bioembed_assets.interpret.adapters import classifier_for
from bioembed_assets.interpret.gradcam import PREDICTED, CamClassifier, grad_cam, upsample
from bioembed_assets.interpret.gradcamo import THRESHOLD, gradcamo_scores, summarize
from bioembed_assets.segment.crops import CROP_INDEX, crop_origin, window
from bioembed_assets.segment.plate import open_plate_masks
from bioembed_assets.store.atomic import atomic_file
from bioembed_assets.store.lake import Lake

TARGET_LABEL, TARGET_PREDICTED = "label", "predicted"
"""`target_source` values: the cell's own treatment (known to the classifier) or its top prediction."""
CELL_COLUMNS = (
    s.PLATE, s.WELL, s.SITE, s.FIELD, s.CELL_ID, CROP_INDEX, s.PERTURBATION, "target_class", "target_source",
    "predicted_class", "layer", "score", "chance", "enrichment", "neighbour_fraction", "reason",
)
SUMMARY_LEVELS = ("plate", "perturbation")


@dataclass
class PlateGradCAMO:
    """Grad-CAMO of one plate: `cells` (one row per cell, `CELL_COLUMNS` plus encoder columns when a
    version was given), `summary` (per plate, then per perturbation: `level` says which, see
    `gradcamo.summarize` for the columns), the `gallery_png` and the Grad-CAM `layer`."""

    cells: pl.DataFrame
    summary: pl.DataFrame
    gallery_png: bytes
    layer: str

    def metrics(self) -> dict[str, float]:
        """Headline numbers of the plate (for Dagster metadata / MLflow): fraction above 0.5, means."""
        row = self.summary.filter(pl.col("level") == "plate").row(0, named=True)
        keys = ("n_cells", "n_scored", "fraction_above", "mean_score", "mean_chance", "mean_enrichment",
                "mean_neighbour_fraction")
        return {f"gradcamo_{k}": float("nan") if row[k] is None else float(row[k]) for k in keys}

    def log_to_mlflow(self, client: object, run_id: str) -> None:
        """Log `metrics()` as `<name>/<plate>` and the gallery as artifact `gradcamo/<plate>.png` to the
        MLflow run `run_id` (e.g. the encoder version's run) through an `MlflowClient`."""
        import tempfile
        import time

        from mlflow.entities import Metric

        plate = str(self.cells[s.PLATE][0])
        now = int(time.time() * 1000)
        batch = [Metric(f"{k}/{plate}", v, now, 0) for k, v in self.metrics().items() if not np.isnan(v)]
        client.log_batch(run_id, metrics=batch)  # type: ignore[attr-defined]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{plate}.png"
            path.write_bytes(self.gallery_png)
            client.log_artifact(run_id, str(path), artifact_path="gradcamo")  # type: ignore[attr-defined]


def neighbour_masks(home: Home, plate: str, cells: pl.DataFrame, crop_size: int, grow: int) -> tuple[np.ndarray, np.ndarray]:
    """bool (N, S, S) twice: each cell's own pixels and the pixels of *other* cells in its crop window,
    from the plate's mask store.

    The segmentation is the one `extract_crops` cut the own masks from: whole-cell labels when the
    store has them, else nuclei grown by `grow` px. Rows follow `cells` (one field read at a time).
    """
    path = home.mask_store(plate)
    labels, cell_labels = open_plate_masks(path)
    top, left = crop_origin(cells["centroid_y"].to_numpy(), cells["centroid_x"].to_numpy(), crop_size)
    own = np.zeros((cells.height, crop_size, crop_size), dtype=bool)
    out = np.zeros_like(own)
    fields = cells[s.FIELD].to_numpy()
    own_labels = cells["label"].to_numpy()
    for f in np.unique(fields):
        rows = np.flatnonzero(fields == f)
        if cell_labels is not None:
            seg = np.asarray(cell_labels[int(f)])
        else:
            seg = np.asarray(labels[int(f)])
            seg = expand_labels(seg, distance=grow) if grow > 0 else seg
        for i in rows:
            crop = window(seg, int(top[i]), int(left[i]), crop_size)
            own[i] = crop == own_labels[i]
            out[i] = (crop > 0) & ~own[i]
    return own, out


def _plate_cells(lake: Lake, plate: str) -> pl.DataFrame:
    cells = lake.read("cells", plate=plate).sort(CROP_INDEX)
    if cells.height == 0:
        raise s.BioembedInputError("no cells in the lake table 'cells'; materialize `crops` first", plate=plate)
    missing = [c for c in ("label", "centroid_y", "centroid_x", s.FIELD) if c not in cells.columns]
    if missing:
        raise s.BioembedInputError(f"lake table 'cells' lacks columns {missing}", plate=plate)
    if (cells["label"] <= 0).all():
        raise s.BioembedInputError("the crop store holds whole-field tiles (no cell labels); Grad-CAMO needs "
                                   "single-cell crops with their masks", plate=plate)
    platemap = lake.read("platemap", plate=plate)
    if platemap.height == 0:
        raise s.BioembedInputError("no platemap (lake table 'platemap'); materialize `platemap` first", plate=plate)
    cells = cells.join(platemap.select(s.WELL, s.PERTURBATION), on=s.WELL, how="left")
    unmapped = cells.filter(pl.col(s.PERTURBATION).is_null())[s.WELL].unique().sort().to_list()
    if unmapped:
        raise s.BioembedInputError(f"wells with crops but no platemap entry: {unmapped}", plate=plate)
    return cells


def gradcamo_plate(
    home: Home,
    plate: str,
    encoder: object,
    *,
    encoder_name: str | None = None,
    encoder_version: str | None = None,
    classifier: CamClassifier | None = None,
    layer: str | None = None,
    batch_size: int = 64,
    max_cells: int | None = None,
    gallery_cells: int = 16,
    gallery_path: str | Path | None = None,
    threshold: float = THRESHOLD,
    progress: Callable[[int, int], None] | None = None,
) -> PlateGradCAMO:
    """Grad-CAM and Grad-CAMO for the cells of `plate` under `encoder`'s classifier.

    `classifier` defaults to `classifier_for(encoder)` (a supervised_cnn's own head); pass one from
    `probe.fit_probe` for a probe (e.g. on plate labels) or another encoder. The explained class of a
    cell is its own perturbation when the classifier knows it (`target_source` "label"), else its top
    prediction ("predicted"). `layer` defaults to the adapter's default (e.g. `backbone.layer4`).
    `max_cells` keeps the first cells by crop index (a quick look). `encoder_name` / `encoder_version`
    become `encoder` / `encoder_version` columns. `gallery_path` also writes the PNG (atomically).
    Errors name the plate (and cell): missing tables or stores, tiles instead of cells, an unknown layer,
    an empty cell mask.
    """
    lake = Lake(home.lake)
    cells = _plate_cells(lake, plate)
    if max_cells is not None:
        cells = cells.head(max(int(max_cells), 0))
    clf = classifier if classifier is not None else classifier_for(encoder)
    spec = encoder.spec  # type: ignore[attr-defined]
    if int(spec.config.get("spatial_dims", 2)) != 2:
        raise s.BioembedInputError("this encoder takes z-stacks (spatial_dims=3); the plate's crop store holds "
                                   "2-D crops", plate=plate)
    store_path = home.crop_store(plate)
    try:
        group = zarr.open_group(str(store_path), mode="r")
        images, masks = group["images"], group["masks"]
    except (FileNotFoundError, KeyError) as exc:
        raise s.BioembedInputError("crop store missing or has no images/masks; materialize `crops` first",
                                   plate=plate, path=store_path) from exc
    channels = channel_indices(group.attrs["channels"], spec.channels, f"crop store {store_path}")
    size = int(images.shape[-1])
    known = set(clf.classes or ())
    wanted = [p if p in known else PREDICTED for p in cells[s.PERTURBATION].to_list()]
    index = cells[CROP_INDEX].to_numpy()
    ids = cells[s.CELL_ID].to_list()

    n = cells.height
    if n == 0:
        raise s.BioembedInputError("no cells to explain (max_cells=0?)", plate=plate)
    raws, targets, predicted, own, used_layer = [], [], [], [], layer
    for start in range(0, n, batch_size):
        rows = index[start : start + batch_size]
        imgs, msks = np.asarray(images.oindex[rows.tolist()])[:, channels], np.asarray(masks.oindex[rows.tolist()])
        small, _ = resize_crops(imgs, msks, spec.input_size)
        res = grad_cam(clf, small, layer=used_layer, target=wanted[start : start + batch_size])
        used_layer = res.layer
        raws.append(res.raw)
        targets.append(res.targets)
        predicted.append(res.predicted)
        own.append(msks.astype(bool))
        if progress is not None:
            progress(min(start + batch_size, n), n)
    raw = np.concatenate(raws)
    own_masks = np.concatenate(own)
    recut, neighbours = neighbour_masks(home, plate, cells, size, int(group.attrs.get("grow", 0)))
    stale = np.flatnonzero((recut != own_masks).any(axis=(1, 2)))
    if len(stale):
        raise s.BioembedInputError(
            f"cell {ids[stale[0]]!r} (and {len(stale) - 1} more): its crop-store mask differs from the mask store's "
            "segmentation; the crops are stale, materialize `crops` again", plate=plate, path=store_path)

    def maps_of(rows: slice | np.ndarray) -> np.ndarray:
        return upsample(torch.from_numpy(raw[rows]), (size, size)).numpy()

    try:  # scored a batch at a time: full-size float maps of a whole plate are never held at once
        parts = [gradcamo_scores(maps_of(slice(a, a + batch_size)), own_masks[a : a + batch_size],
                                 neighbours[a : a + batch_size], cell_ids=ids[a : a + batch_size]).to_frame()
                 for a in range(0, n, batch_size)]
    except ValueError as exc:
        raise s.BioembedInputError(str(exc), plate=plate, path=store_path) from exc

    target_idx, pred_idx = np.concatenate(targets), np.concatenate(predicted)
    table = cells.select(s.PLATE, s.WELL, s.SITE, s.FIELD, s.CELL_ID, CROP_INDEX, s.PERTURBATION).with_columns(
        pl.Series("target_class", [clf.class_name(int(i)) for i in target_idx], dtype=pl.Utf8),
        pl.Series("target_source", [TARGET_LABEL if w != PREDICTED else TARGET_PREDICTED for w in wanted]),
        pl.Series("predicted_class", [clf.class_name(int(i)) for i in pred_idx], dtype=pl.Utf8),
        pl.lit(used_layer).alias("layer"),
    ).hstack(pl.concat(parts))
    if encoder_name is not None:
        table = table.with_columns(pl.lit(encoder_name).alias(s.ENCODER),
                                   pl.lit(str(encoder_version or "")).alias(s.ENCODER_VERSION))
    summary = plate_summary(table, threshold)
    picks = gallery_rows(table["score"].to_numpy(), gallery_cells)
    crops = np.asarray(images.oindex[index[picks].tolist()])[:, channels]
    png = gallery_png(crops, maps_of(picks), own_masks[picks], table[picks],
                      title=f"Grad-CAMO {plate} ({used_layer})")
    if gallery_path is not None:
        with atomic_file(Path(gallery_path)) as tmp:
            Path(tmp).write_bytes(png)
    return PlateGradCAMO(table, summary, png, str(used_layer))


def plate_summary(cells: pl.DataFrame, threshold: float = THRESHOLD) -> pl.DataFrame:
    """`summarize` per plate and per (plate, perturbation), stacked with `level` and `perturbation`
    (null on plate rows), plus encoder columns when `cells` has them."""
    extra = [c for c in (s.ENCODER, s.ENCODER_VERSION) if c in cells.columns]
    per_plate = summarize(cells, by=(*extra, s.PLATE), threshold=threshold).with_columns(
        pl.lit(None, dtype=pl.Utf8).alias(s.PERTURBATION), pl.lit("plate").alias("level"))
    per_pert = summarize(cells, by=(*extra, s.PLATE, s.PERTURBATION), threshold=threshold).with_columns(
        pl.lit("perturbation").alias("level"))
    cols = ["level", *extra, s.PLATE, s.PERTURBATION]
    return pl.concat([per_plate.select(*cols, pl.exclude(cols)), per_pert.select(*cols, pl.exclude(cols))])


def gallery_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Up to `k` row indices spread evenly over the score ranking (lowest to highest; unscored last)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(np.where(np.isnan(scores), np.inf, scores), kind="stable")
    if k <= 0 or len(order) == 0:
        return order[:0]
    if len(order) <= k:
        return order
    return order[np.unique(np.linspace(0, len(order) - 1, k).round().astype(int))]


def _display(crop: np.ndarray) -> np.ndarray:
    """(C, H, W) crop -> (H, W) grey image in 0..1: mean over channels, 1st-99th percentile stretch."""
    img = np.asarray(crop, dtype=np.float64).mean(axis=0)
    lo, hi = np.percentile(img, [1, 99])
    return np.clip((img - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(img)


def gallery_png(
    crops: np.ndarray, maps: np.ndarray, masks: np.ndarray, cells: pl.DataFrame, title: str = "Grad-CAMO",
    columns: int = 8,
) -> bytes:
    """A grid of crops (channel mean, grey) with their Grad-CAM maps (inferno, scaled per crop for display
    only) and the centre cell's outline, titled with the cell id, Grad-CAMO score and chance level."""
    from matplotlib.figure import Figure

    from bioembed_assets.evaluate.plots import _png

    n = len(crops)
    if not n == len(maps) == len(masks) == cells.height:
        raise ValueError(f"gallery needs as many crops, maps, masks and cells: {n}, {len(maps)}, {len(masks)}, "
                         f"{cells.height}")
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(1.6 * cols, 1.8 * rows + 0.4))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.4 / (1.8 * rows + 0.4), wspace=0.05,
                        hspace=0.35)
    fig.suptitle(title, fontsize=9)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        if i >= n:
            continue
        row = cells.row(i, named=True)
        ax.imshow(_display(crops[i]), cmap="gray", vmin=0, vmax=1)
        m = np.asarray(maps[i], dtype=np.float64)
        top = m.max()
        ax.imshow(m / top if top > 0 else m, cmap="inferno", alpha=0.45, vmin=0, vmax=1)
        ax.contour(np.asarray(masks[i], dtype=float), levels=[0.5], colors="cyan", linewidths=0.8)
        score = row.get("score")
        label = "zero map" if score is None or np.isnan(score) else f"{score:.2f} (chance {row['chance']:.2f})"
        ax.set_title(f"{row.get(s.CELL_ID, i)}\n{label}", fontsize=7)
    return _png(fig)
