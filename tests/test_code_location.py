"""The Dagster code location loads without the heavy libraries: torch, MLflow and scikit-learn are
imported by the assets that run them, not by `dagster dev` building the graph (structural, no timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bioembed_assets.config import HOME_ENV_VAR, Home, RunConfig
from bioembed_assets.run_config import default_run_config, save_run_config

HEAVY = ("torch", "timm", "mlflow", "sklearn")

# What `dagster dev -m dagster_project.definitions` does: import the module and resolve its `defs`.
LOAD = f"""
import json, sys
import dagster_project.definitions as d
repo = d.defs.get_repository_def()
print(json.dumps({{"assets": len(repo.asset_graph.get_all_asset_keys()), "jobs": len(repo.get_all_jobs()),
                   "sensors": len(repo.sensor_defs), "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def load_in_fresh_process(home: Path) -> dict:
    env = {**os.environ, HOME_ENV_VAR: str(home)}
    out = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("encoders", [None, ["classical", "supervised_cnn", "vae", "timm:resnet18"]],
                         ids=["default-config", "trainable-and-interpretable"])
def test_code_location_loads_without_torch_mlflow_sklearn(tmp_path: Path, encoders: list[str] | None) -> None:
    home = Home(root=tmp_path / "home").ensure()
    if encoders is not None:  # challenger/ and gradcamo/ assets (supervised_cnn) and a timm: name are built too
        config: RunConfig = default_run_config(home).model_copy(update={"encoders": encoders})
        save_run_config(home, config)
    loaded = load_in_fresh_process(home.root)
    assert loaded["assets"] > 0 and loaded["jobs"] > 0 and loaded["sensors"] > 0
    assert loaded["loaded"] == [], f"the code location imported {loaded['loaded']} at load time"
