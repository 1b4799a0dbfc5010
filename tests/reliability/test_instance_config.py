"""Every Dagster instance bioembed writes or ships monitors runs and frees the slots of dead ones."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from dagster_project.demo import write_instance_config
from dagster_project.run_health import INSTANCE_SETTINGS, MonitoredRunLauncher

pytestmark = pytest.mark.reliability
DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "dagster.yaml"


def _assert_monitored(instance: dg.DagsterInstance) -> None:
    assert instance.run_monitoring_enabled
    assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0
    assert isinstance(instance.run_launcher, MonitoredRunLauncher)
    assert instance.run_launcher.supports_check_run_worker_health


def test_the_local_instance_monitors_runs(tmp_path: Path) -> None:
    write_instance_config(tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        _assert_monitored(instance)
        assert instance.event_log_storage.get_concurrency_info("gpu").limit == 1  # one GPU step at a time


def test_an_older_home_gets_run_monitoring_and_keeps_its_own_settings(tmp_path: Path) -> None:
    old = {"concurrency": {"pools": {"default_limit": 2}}, "telemetry": {"enabled": False}}
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(old))
    write_instance_config(tmp_path / "dagster.yaml")
    config = yaml.safe_load((tmp_path / "dagster.yaml").read_text())
    assert config["concurrency"] == old["concurrency"]
    assert {k: config[k] for k in INSTANCE_SETTINGS} == INSTANCE_SETTINGS


def test_the_shipped_deployment_instance_monitors_runs() -> None:
    config = yaml.safe_load(DEPLOY.read_text())
    assert {k: config[k] for k in INSTANCE_SETTINGS} == INSTANCE_SETTINGS
