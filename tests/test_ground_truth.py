"""The synthetic ground truth is recovered: active perturbations are retrieved far above inactive
ones, and the card normalization lowers the plate effect (classical features, library stages)."""

from __future__ import annotations

import polars as pl
import pytest

from bioembed_assets import feature_sets, pipeline
from bioembed_assets.config import Home
from bioembed_assets.encoders import build_encoder
from bioembed_assets.registry import EncoderVersion
from bioembed_assets.sources.synthetic import SyntheticScreenConfig, generate_screen, ground_truth

SCREEN = SyntheticScreenConfig(n_plates=3, n_rows=8, n_cols=8, sites_per_well=1, n_dmso_wells=24, seed=3)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[feature_sets.Evaluation, pl.DataFrame]:
    home = Home(root=tmp_path_factory.mktemp("gt")).ensure()
    plates = generate_screen(home.raw_root, SCREEN)
    version = EncoderVersion("classical", "1", run_id="", tags={})
    encoder = build_encoder("classical")
    for plate in plates:
        pipeline.ingest_raw_plate(home, plate)
        pipeline.load_platemap(home, plate)
        pipeline.correct_illumination(home, plate)
        pipeline.segment_raw_plate(home, plate)
        pipeline.crop_cells(home, plate)
        pipeline.embed_plate(home, plate, encoder, version)
        pipeline.profile_plate(home, plate, version)
    feature_sets.fit_normalizer(home, version)
    for plate in plates:
        feature_sets.normalize_plate(home, plate, version)
    return feature_sets.evaluate_feature_set(home, version, null_size=2000), ground_truth(SCREEN)


def test_active_perturbations_are_retrieved_far_above_inactive(evaluated) -> None:
    result, truth = evaluated
    rep = (result.groups.filter((pl.col("kind") == "replicate") & (pl.col("recipe") == "card"))
           .join(truth, left_on="group", right_on="perturbation"))
    active, inactive = rep.filter(pl.col("active")), rep.filter(~pl.col("active"))
    assert active.height == 16 and inactive.height == 4
    assert active["mean_average_precision"].mean() > inactive["mean_average_precision"].mean() + 0.25
    assert active["below_corrected_p"].mean() >= 0.6
    assert inactive["below_corrected_p"].sum() == 0


def test_normalization_lowers_the_plate_effect(evaluated) -> None:
    result, _ = evaluated
    raw = result.value("raw", "batch_knn_accuracy")
    card = result.value("card", "batch_knn_accuracy")
    assert raw > result.value("raw", "batch_chance") + 0.2  # the synthetic batch effect is visible
    assert card < raw - 0.1


def test_moa_retrieval_beats_chance(evaluated) -> None:
    result, _ = evaluated
    assert result.value("card", "moa_map") > 0.5

