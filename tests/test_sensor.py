"""`new_plate_sensor`: registers valid new plate folders only, once, with the home's run-config layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest

from bioembed_assets.config import Home, RunConfig
from bioembed_assets.pipeline import save_run_config
from bioembed_assets.sources.synthetic import SyntheticScreenConfig, generate_screen
from bioembed_assets.sources.validate import check_plate_folder
from dagster_project.definitions import GRAPH
from dagster_project.partitions import plates
from dagster_project.resources import BioembedHome
from dagster_project.sensors import build_plate_sensor

from .conftest import BBBC013_DIR

REPO = Path(__file__).resolve().parents[1]
new_plate_sensor = build_plate_sensor(GRAPH)

ONE_SMALL_PLATE = SyntheticScreenConfig(
    n_plates=1, n_rows=2, n_cols=3, sites_per_well=1, image_size=64, n_moas=1, compounds_per_moa=1,
    n_inactive=0, replicates_per_plate=1, n_dmso_wells=1, seed=3, plate_prefix="SENS-P",
)
MISSING_CHANNEL = "SENS-MISSING"
BAD_NAME = "SENS P02"  # a space is not allowed in a plate name


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Home, str]:
    home = Home(root=tmp_path_factory.mktemp("sensor-home")).ensure()
    (good,) = generate_screen(home.raw_root, ONE_SMALL_PLATE)
    for name in (MISSING_CHANNEL, BAD_NAME):
        shutil.copytree(home.raw_root / good, home.raw_root / name)
    images = sorted((home.raw_root / MISSING_CHANNEL / "Images").glob("*-ch3sk1fk1fl1.tiff"))
    images[0].unlink()
    return home, good


def _evaluate(instance: dg.DagsterInstance, root: Path) -> dg.SensorResult:
    context = dg.build_sensor_context(instance=instance, resources={"bioembed": BioembedHome(root=str(root))})
    return new_plate_sensor(context)


def test_sensor_registers_only_valid_new_plates(home: tuple[Home, str]) -> None:
    home, good = home
    assert check_plate_folder(home.raw_root / good) is None
    assert "missing channel" in check_plate_folder(home.raw_root / MISSING_CHANNEL)
    assert "invalid plate name" in check_plate_folder(home.raw_root / BAD_NAME)
    with dg.DagsterInstance.ephemeral() as instance:
        result = _evaluate(instance, home.root)
        assert isinstance(result, dg.SensorResult)
        (request,) = result.dynamic_partitions_requests
        assert isinstance(request, dg.AddDynamicPartitionsRequest)
        assert request.partitions_def_name == plates.name
        assert list(request.partition_keys) == [good]
        assert [r.partition_key for r in result.run_requests] == [good]
        assert result.run_requests[0].run_key == f"new-plate-{good}"
        # the sensor itself does not write to the instance: the daemon applies the request
        assert instance.get_dynamic_partitions(plates.name) == []

        instance.add_dynamic_partitions(plates.name, list(request.partition_keys))
        again = _evaluate(instance, home.root)
        assert not again.run_requests
        assert not again.dynamic_partitions_requests
        assert again.skip_reason is not None
        assert instance.get_dynamic_partitions(plates.name) == [good]
        assert MISSING_CHANNEL not in instance.get_dynamic_partitions(plates.name)
        assert BAD_NAME not in instance.get_dynamic_partitions(plates.name)


def test_sensor_follows_the_run_config_layout_on_a_real_plate(tmp_path: Path) -> None:
    """With a saved non-Phenix run config (the BBBC013 regex layout), the sensor validates plate
    folders with that layout: the real plate is registered, a copy missing one well's DNA image is not."""
    if not BBBC013_DIR.is_dir():
        pytest.skip(f"real BBBC013 plate not present at {BBBC013_DIR}")
    home = Home(root=tmp_path / "home").ensure()
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "BBBC013").symlink_to(BBBC013_DIR, target_is_directory=True)
    broken = raw / "BBBC013-NO-DNA-B07"
    broken.mkdir()
    for path in BBBC013_DIR.iterdir():
        if path.name != "Channel2-19-B-07.tif":
            (broken / path.name).symlink_to(path)
    config = RunConfig.load(REPO / "deploy" / "configs" / "bbbc013.toml")
    config = config.model_copy(update={"raw_root": str(raw), "plates": None})
    save_run_config(home, config)
    assert "B07" in check_plate_folder(broken, config)
    with dg.DagsterInstance.ephemeral() as instance:
        result = _evaluate(instance, home.root)
        (request,) = result.dynamic_partitions_requests
        assert list(request.partition_keys) == ["BBBC013"]
        assert [r.partition_key for r in result.run_requests] == ["BBBC013"]
