"""A home's run configuration: the saved one (`bioembed run`), else the synthetic screen's default."""

from __future__ import annotations

from pathlib import Path

from bioembed_assets import schema as s
from bioembed_assets.config import Home, RunConfig
from bioembed_assets.store.atomic import atomic_file


def default_run_config(home: Home) -> RunConfig:
    """The synthetic screen's configuration: Phenix layout under `<home>/raw`, five stains. Its 64 px crops
    drop ~44 % of the cells of a 256 px site at the border by geometry alone, so its border-loss limit is 0.6."""
    from bioembed_assets.sources.synthetic import SYNTHETIC_CHANNEL_MAP  # scipy: only for the default

    return RunConfig(layout="phenix", raw_root=str(home.raw_root), channels=list(s.CELL_PAINTING_CHANNELS),
                     channel_map={str(k): v for k, v in SYNTHETIC_CHANNEL_MAP.items()}, max_border_loss_fraction=0.6)


def load_run_config(home: Home) -> RunConfig:
    """The RunConfig saved in the home by `save_run_config`, else the synthetic default."""
    if home.run_config_path.exists():
        return RunConfig.model_validate_json(home.run_config_path.read_text())
    return default_run_config(home)


def save_run_config(home: Home, config: RunConfig) -> Path:
    """Make `config` this home's run configuration (read by every stage and the sensor)."""
    with atomic_file(home.run_config_path) as tmp:
        tmp.write_text(config.model_dump_json(indent=2))
    return home.run_config_path
