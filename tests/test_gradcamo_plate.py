"""Grad-CAMO over a whole plate (a tiny synthetic plate through the library's ingest -> crops stages),
and the plate-label probe.

The known-answer check uses a classifier whose Grad-CAM map is, by construction, the ReLU of the
standardized DNA channel: the plate entry's scores must equal that map's mass on each stored cell mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import zarr
from torch import nn

from bioembed_assets import pipeline as pp
from bioembed_assets import schema as s
from bioembed_assets.config import Home
from bioembed_assets.encoders.base import build_encoder
from bioembed_assets.interpret.gradcam import CamClassifier, grad_cam
from bioembed_assets.interpret.plate import (
    CELL_COLUMNS,
    TARGET_LABEL,
    TARGET_PREDICTED,
    gallery_rows,
    gradcamo_plate,
)
from bioembed_assets.interpret.probe import embed_in_batches, fit_probe
from bioembed_assets.sources.synthetic import SyntheticScreenConfig, generate_screen
from bioembed_assets.store.lake import Lake

SCREEN = SyntheticScreenConfig(n_plates=1, n_rows=2, n_cols=4, sites_per_well=1, image_size=192, n_moas=1,
                               compounds_per_moa=1, n_inactive=1, replicates_per_plate=1, n_dmso_wells=2, seed=3)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plate_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Home, str]:
    """One small plate: ingested, mapped, illumination-corrected, segmented and cropped (64 px crops)."""
    home = Home(root=tmp_path_factory.mktemp("gradcamo-home")).ensure()
    (plate,) = generate_screen(home.raw_root, SCREEN)
    pp.ingest_raw_plate(home, plate)
    pp.load_platemap(home, plate)
    pp.correct_illumination(home, plate)
    pp.segment_raw_plate(home, plate)
    pp.crop_cells(home, plate)
    return home, plate


def stored_crops(home: Home, plate: str) -> tuple[np.ndarray, np.ndarray]:
    group = zarr.open_group(str(home.crop_store(plate)), mode="r")
    return np.asarray(group["images"][:]), np.asarray(group["masks"][:])


class FirstChannel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1]


def dna_classifier() -> CamClassifier:
    """logit_on = mean(ReLU(standardized DNA)), logit_off = -that: Grad-CAM of "on" at layer "1" is
    ReLU(w / HW * A) with A = ReLU(standardized DNA), i.e. proportional to A."""
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        head.bias.zero_()
    net = nn.Sequential(FirstChannel(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    return CamClassifier(net=net, classes=["on", "off"], default_layer="1")


def test_known_answer_scores_on_the_plate(plate_home, tmp_path: Path) -> None:
    home, plate = plate_home
    encoder = build_encoder("supervised_cnn", channels=list(s.CELL_PAINTING_CHANNELS), backbone="test_resnet",
                            input_size=64)  # only its spec (channels, input size) is used with `classifier`
    result = gradcamo_plate(home, plate, encoder, classifier=dna_classifier(), gallery_path=tmp_path / "g.png")
    cells = result.cells
    images, masks = stored_crops(home, plate)
    assert images.shape[-1] == 64 and cells.height == images.shape[0] > 10
    # the expected map from the stored crops: ReLU(instance-norm(DNA / 257 / 255)), biased variance, eps 1e-5
    dna = images[cells["crop_index"].to_numpy(), 0].astype(np.float64) / 257.0 / 255.0
    mu, var = dna.mean(axis=(1, 2), keepdims=True), dna.var(axis=(1, 2), keepdims=True)
    g = np.maximum((dna - mu) / np.sqrt(var + 1e-5), 0)
    m = masks[cells["crop_index"].to_numpy()]
    expected = (g * m).sum(axis=(1, 2)) / g.sum(axis=(1, 2))
    np.testing.assert_allclose(cells["score"].to_numpy(), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cells["chance"].to_numpy(), m.mean(axis=(1, 2)))
    np.testing.assert_allclose(cells["enrichment"].to_numpy(), expected / m.mean(axis=(1, 2)), rtol=1e-4)
    # attention on the DNA stain sits on nuclei: well above chance
    assert cells["enrichment"].median() > 1.5
    nf = cells["neighbour_fraction"].to_numpy()
    assert (nf >= 0).all() and (nf + cells["score"].to_numpy() <= 1 + 1e-9).all() and (nf > 0).any()
    # perturbations are not classes of this classifier: every target is its top prediction ("on")
    assert set(cells["target_source"]) == {TARGET_PREDICTED} and set(cells["target_class"]) == {"on"}
    assert result.layer == "1" and set(cells["layer"]) == {"1"}
    assert (tmp_path / "g.png").read_bytes() == result.gallery_png and result.gallery_png.startswith(PNG_MAGIC)


def test_supervised_cnn_plate_table_keys_and_summary(plate_home) -> None:
    home, plate = plate_home
    encoder = build_encoder("supervised_cnn", channels=list(s.CELL_PAINTING_CHANNELS), backbone="test_resnet",
                            input_size=64, classes=["DMSO", "CPD-001"])
    result = gradcamo_plate(home, plate, encoder, encoder_name="supervised_cnn", encoder_version="1",
                            batch_size=16, gallery_cells=4)
    cells = result.cells
    assert list(cells.columns) == [*CELL_COLUMNS, s.ENCODER, s.ENCODER_VERSION]
    lake_cells = Lake(home.lake).read("cells", plate=plate).sort("crop_index")
    keys = [s.PLATE, s.WELL, s.SITE, s.CELL_ID]
    assert cells.select(keys).equals(lake_cells.select(keys))  # the embeddings table's keys, in crop order
    known = cells.filter(pl.col(s.PERTURBATION).is_in(["DMSO", "CPD-001"]))
    assert set(known["target_source"]) == {TARGET_LABEL}
    assert known["target_class"].to_list() == known[s.PERTURBATION].to_list()
    other = cells.filter(~pl.col(s.PERTURBATION).is_in(["DMSO", "CPD-001"]))
    assert other.height > 0 and set(other["target_source"]) == {TARGET_PREDICTED}
    assert other["target_class"].to_list() == other["predicted_class"].to_list()
    assert result.layer == "backbone.layer4"
    scored = cells.filter(pl.col("score").is_not_nan())
    assert ((scored["score"] >= 0) & (scored["score"] <= 1)).all()
    # summaries: one plate row, one row per perturbation; numbers from the cell table by hand
    plate_row = result.summary.filter(pl.col("level") == "plate").row(0, named=True)
    assert (plate_row["plate"], plate_row["n_cells"], plate_row["n_scored"]) == (plate, cells.height, scored.height)
    assert plate_row["fraction_above"] == pytest.approx(float((scored["score"] > 0.5).mean()))
    assert plate_row["mean_score"] == pytest.approx(float(scored["score"].mean()))
    per_pert = result.summary.filter(pl.col("level") == "perturbation")
    assert sorted(per_pert[s.PERTURBATION].to_list()) == sorted(cells[s.PERTURBATION].unique().to_list())
    assert int(per_pert["n_cells"].sum()) == cells.height
    dmso = per_pert.filter(pl.col(s.PERTURBATION) == "DMSO").row(0, named=True)
    dmso_scores = scored.filter(pl.col(s.PERTURBATION) == "DMSO")["score"]
    assert dmso["mean_score"] == pytest.approx(float(dmso_scores.mean()))
    assert set(per_pert[s.ENCODER]) == {"supervised_cnn"}
    assert result.metrics()["gradcamo_n_cells"] == cells.height


def test_plate_errors_name_plate_and_layer(plate_home, tmp_path: Path) -> None:
    home, plate = plate_home
    encoder = build_encoder("supervised_cnn", channels=list(s.CELL_PAINTING_CHANNELS), backbone="test_resnet",
                            input_size=64, classes=["DMSO", "CPD-001"])
    with pytest.raises(ValueError, match=r"no layer 'backbone.layer5'; closest valid names: \[.*backbone.layer"):
        gradcamo_plate(home, plate, encoder, layer="backbone.layer5", max_cells=2)
    empty = Home(root=tmp_path / "empty").ensure()
    with pytest.raises(s.BioembedInputError, match=r"plate=SYN-P01.*no cells in the lake table 'cells'"):
        gradcamo_plate(empty, plate, encoder)
    untrained = build_encoder("supervised_cnn", channels=list(s.CELL_PAINTING_CHANNELS), backbone="test_resnet",
                              input_size=64)
    with pytest.raises(ValueError, match="no classifier head"):
        gradcamo_plate(home, plate, untrained, max_cells=2)


def test_gallery_rows_spread_over_scores() -> None:
    scores = np.array([0.9, np.nan, 0.1, 0.5, 0.3, 0.7])
    np.testing.assert_array_equal(gallery_rows(scores, 3), [2, 3, 1])  # lowest, middle, unscored last
    assert len(gallery_rows(scores, 10)) == 6 and len(gallery_rows(scores, 0)) == 0


# -- plate-label probe ---------------------------------------------------------------------------------


def synthetic_plate_crops(n: int, noise: float, seed: int) -> np.ndarray:
    """(n, 2, 64, 64) uint8: a bright round 'cell' at the centre on a noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    cell = 150 * np.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / (2 * 8.0**2))
    out = 30 + cell[None, None] * rng.uniform(0.7, 1.3, (n, 2, 1, 1)) + rng.normal(0, noise, (n, 2, 64, 64))
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("noise_b,above_chance", [(20.0, True), (4.0, False)])
def test_plate_probe_detects_a_plate_effect(noise_b: float, above_chance: bool) -> None:
    """Plate B's background is noisier (a batch effect outside the cells) or not; the probe is trained
    on half the crops of each plate and scored on the other half (chance = 0.5)."""
    encoder = build_encoder("supervised_cnn", num_channels=2, backbone="test_resnet", input_size=64, seed=0)
    a, b = synthetic_plate_crops(60, 4.0, seed=1), synthetic_plate_crops(60, noise_b, seed=2)
    train = np.concatenate([a[:30], b[:30]])
    test = np.concatenate([a[30:], b[30:]])
    labels = ["plate_A"] * 30 + ["plate_B"] * 30
    clf, probe = fit_probe(encoder, train, labels, batch_size=32, seed=0)
    held_out = probe.accuracy(embed_in_batches(encoder, test, None, 32), labels)
    if above_chance:
        assert held_out >= 0.9
    else:
        assert held_out <= 0.75
    assert probe.classes == ["plate_A", "plate_B"] and clf.classes == probe.classes
    maps = grad_cam(clf, test[[0, 1, 30, 31]], target=["plate_A", "plate_A", "plate_B", "plate_B"])
    assert maps.maps.shape == (4, 64, 64) and np.isfinite(maps.maps).all() and maps.maps.min() >= 0
    assert maps.layer == "backbone.layer4" and (maps.raw.reshape(4, -1).sum(1) > 0).any()


@pytest.mark.slow
def test_gallery_and_metrics_go_to_mlflow(plate_home, tmp_path: Path) -> None:
    from bioembed_assets.registry import EncoderRegistry

    home, plate = plate_home
    encoder = build_encoder("supervised_cnn", channels=list(s.CELL_PAINTING_CHANNELS), backbone="test_resnet",
                            input_size=64)
    result = gradcamo_plate(home, plate, encoder, classifier=dna_classifier(), max_cells=6, gallery_cells=3)
    registry = EncoderRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts")
    client = registry.client
    run = client.create_run(registry.experiment_id("gradcamo"))
    result.log_to_mlflow(client, run.info.run_id)
    logged = client.get_run(run.info.run_id).data.metrics
    assert logged[f"gradcamo_mean_score/{plate}"] == pytest.approx(float(result.cells["score"].mean()))
    assert logged[f"gradcamo_n_cells/{plate}"] == 6
    folder = Path(client.download_artifacts(run.info.run_id, "gradcamo", str(tmp_path / "dl")))
    assert (folder / f"{plate}.png").read_bytes() == result.gallery_png
