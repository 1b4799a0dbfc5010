"""Run-configuration switches through the pipeline stages: illumination on/off, QC flags on the
cell table, the store compressor, border padding, tile mode, the Cellpose backend's clear error, TOML loading."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bioembed_assets import pipeline
from bioembed_assets.config import Home, RunConfig
from bioembed_assets.encoders import build_encoder
from bioembed_assets.images.store import open_plate_images
from bioembed_assets.registry import EncoderVersion
from bioembed_assets.sources.synthetic import generate_screen
from bioembed_assets.store.lake import Lake

from .conftest import TINY_SCREEN

ONE_PLATE = replace(TINY_SCREEN, n_plates=1)


@pytest.fixture()
def home(tmp_path: Path) -> tuple[Home, str]:
    home = Home(root=tmp_path / "home").ensure()
    (plate,) = generate_screen(home.raw_root, ONE_PLATE)
    return home, plate


def _prepare(home: Home, plate: str, cfg: RunConfig) -> None:
    pipeline.ingest_raw_plate(home, plate, cfg)
    pipeline.load_platemap(home, plate, cfg)
    pipeline.correct_illumination(home, plate, cfg)


def test_illumination_switch_and_qc_flags_on_cells(home) -> None:
    home, plate = home
    off = pipeline.default_run_config(home).model_copy(update={"illumination_correction": False})
    _prepare(home, plate, off)
    assert pipeline.analysis_store(home, plate, off) == home.image_store(plate)
    assert not home.corrected_store(plate).exists() and not home.illumination_file(plate).exists()
    on = pipeline.default_run_config(home)
    assert pipeline.correct_illumination(home, plate, on)["enabled"]
    assert home.corrected_store(plate).exists() and home.illumination_file(plate).exists()
    pipeline.segment_raw_plate(home, plate, on)
    summary = pipeline.crop_cells(home, plate, on)
    cells = Lake(home.lake).read("cells", plate=plate)
    assert {"qc_pass", "qc_flags"} <= set(cells.columns) and cells["qc_pass"].null_count() == 0
    assert summary["cells_on_qc_failed_sites"] == int((~cells["qc_pass"]).sum())


def test_store_compressor_switch_keeps_the_pixels(home) -> None:
    home, plate = home
    cfg = pipeline.default_run_config(home)
    stores = {}
    for compressor in ("none", "zstd"):
        pipeline.ingest_raw_plate(home, plate, cfg.model_copy(update={"store_compressor": compressor}))
        images = open_plate_images(home.image_store(plate))[0]
        assert [c.cname.value for c in images.field(0).compressors] == ([] if compressor == "none" else ["zstd"])
        stores[compressor] = images[:]
    np.testing.assert_array_equal(stores["none"], stores["zstd"])


def test_border_padding_keeps_more_cells_than_dropping(home) -> None:
    home, plate = home
    cfg = pipeline.default_run_config(home)
    _prepare(home, plate, cfg)
    pipeline.segment_raw_plate(home, plate, cfg)
    dropped = pipeline.crop_cells(home, plate, cfg)
    padded = pipeline.crop_cells(home, plate, cfg.model_copy(update={"crop_border": "pad", "mask_neighbors": True}))
    assert padded["kept"] == dropped["kept"] + dropped["dropped_border"]
    assert padded["padded_cells"] > 0


def test_tile_mode_embeds_and_profiles_tiles(home) -> None:
    home, plate = home
    cfg = pipeline.default_run_config(home).model_copy(update={"crop_mode": "tiles", "tile_size": 128})
    _prepare(home, plate, cfg)
    summary = pipeline.crop_cells(home, plate, cfg)
    n_fields = Lake(home.lake).read("images", plate=plate).height
    assert summary["tiles"] == 4 * n_fields  # 256 x 256 fields -> 2 x 2 tiles of 128
    version = EncoderVersion("ca_mae", "1", run_id="", tags={})
    pipeline.embed_plate(home, plate, build_encoder("ca_mae"), version)
    profiled = pipeline.profile_plate(home, plate, version)
    assert profiled["wells"] == ONE_PLATE.n_wells
    assert Lake(home.lake).read("well_profiles", plate=plate)["n_cells"].min() >= 1


def test_cellpose_backend_without_cellpose_is_a_clear_error(home) -> None:
    home, plate = home
    cfg = pipeline.default_run_config(home).model_copy(
        update={"segmentation_backend": "cellpose", "cellpose_model": str(home.root / "missing.pt")})
    _prepare(home, plate, cfg)
    with pytest.raises(Exception, match="(?i)cellpose|weights"):
        pipeline.segment_raw_plate(home, plate, cfg)


def test_toml_config_resolves_paths_and_round_trips(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "run.toml"
    path.write_text('layout = "regex"\nraw_root = "../data"\nchannels = ["DNA"]\n'
                    '[channel_map]\n"1" = "DNA"\n[layout_options]\npattern = "x"\n')
    cfg = RunConfig.load(path)
    assert cfg.raw_root == str((tmp_path / "data").resolve()) and cfg.config_dir == str(path.parent.resolve())
    home = Home(root=tmp_path / "home").ensure()
    pipeline.save_run_config(home, cfg)
    assert pipeline.load_run_config(home) == cfg
    with pytest.raises(ValueError, match="invalid plate name"):
        cfg.plate_dir("../escape")


def test_batches_and_compounds_reach_the_well_profiles(home) -> None:
    """`batches` (plate -> week) and a platemap `compound` column are carried to the well profiles."""
    home, plate = home
    cfg = pipeline.default_run_config(home)
    platemap = Path(pipeline.resolve_platemap_path(cfg.plate_dir(plate), cfg.platemap.path, plate))
    import polars as pl

    table = pl.read_csv(platemap)
    table.with_columns(pl.col(table.columns[1]).alias("Metadata_compound")).write_csv(platemap)
    cfg = cfg.model_copy(update={"batches": {plate: "week07"}})
    _prepare(home, plate, cfg)
    pipeline.segment_raw_plate(home, plate, cfg)
    pipeline.crop_cells(home, plate, cfg)
    version = EncoderVersion("classical", "1", run_id="", tags={})
    pipeline.embed_plate(home, plate, build_encoder("classical"), version)
    pipeline.profile_plate(home, plate, version)
    wells = Lake(home.lake).read("well_profiles", encoder="classical", version="1", plate=plate)
    assert wells["batch"].unique().to_list() == ["week07"]
    assert wells["compound"].null_count() == 0 and wells["compound"].n_unique() > 1


def test_unknown_keys_are_refused_with_the_closest_valid_name(tmp_path) -> None:
    from bioembed_assets.config import RunConfig

    path = tmp_path / "run.toml"
    path.write_text('channels = ["DNA"]\nencoderz = ["classical"]\n[channel_map]\nch1 = "DNA"\n'
                    '[platemap]\ncolums = {perturbation = "Compound"}\n[promotion]\nmetrik = "moa_map"\n'
                    '[encoder_options.classical]\nanything_goes = 1\n')
    with pytest.raises(ValueError) as err:
        RunConfig.load(path)
    message = str(err.value)
    assert message.startswith(f"run config {path}: ")
    assert "unknown key 'encoderz' (did you mean 'encoders'?)" in message
    assert "unknown key 'platemap.colums' (did you mean 'platemap.columns'?)" in message
    assert "unknown key 'promotion.metrik' (did you mean 'promotion.metric'?)" in message
    assert "anything_goes" not in message  # encoder options are the encoder's to check
    path.write_text('channels = ["DNA"]\n[channel_map]\nch1 = "DNA"\n[encoder_options.classical]\nanything = 1\n')
    assert RunConfig.load(path).encoder_options == {"classical": {"anything": 1}}


def test_cli_says_a_config_typo_in_one_line_shows_defaults_and_knows_its_version(tmp_path, capsys) -> None:
    from dagster_project.cli import main

    path = tmp_path / "run.toml"
    path.write_text('channels = ["DNA"]\nchanel_map = {ch1 = "DNA"}\n')
    assert main(["run", "--home", str(tmp_path / "home"), "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "unknown key 'chanel_map' (did you mean 'channel_map'?)" in err and str(path) in err
    with pytest.raises(ValueError, match="chanel_map"):  # --debug: the exception itself, traceback and all
        main(["--debug", "run", "--home", str(tmp_path / "home"), "--config", str(path)])
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "(default: 10000)" in capsys.readouterr().out  # --null-size
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    from importlib.metadata import version

    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"bioembed {version('bioembed')}"


def test_stages_report_progress_per_field(home) -> None:
    home, plate = home
    cfg = pipeline.default_run_config(home)
    calls: dict[str, list[tuple[int, int]]] = {}

    def recorder(stage: str):
        return lambda done, total: calls.setdefault(stage, []).append((done, total))

    fields = pipeline.ingest_raw_plate(home, plate, cfg, progress=recorder("ingest"))["fields"]
    pipeline.load_platemap(home, plate, cfg)
    pipeline.correct_illumination(home, plate, cfg, progress=recorder("illumination"))
    pipeline.segment_raw_plate(home, plate, cfg, progress=recorder("segmentation"))
    pipeline.crop_cells(home, plate, cfg, progress=recorder("crops"))
    assert set(calls) == {"ingest", "illumination", "segmentation", "crops"}
    for stage, seen in calls.items():
        done, total = seen[-1]
        assert done == total and [d for d, _ in seen] == sorted(d for d, _ in seen), stage
    assert calls["ingest"][-1] == (fields, fields) and calls["illumination"][-1][1] == fields
