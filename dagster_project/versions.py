"""Who owns the assets and which revision of their logic produced a materialization (Dagster's
`owners` and `code_version`, shown on every asset page).

A stage's code version is `<bioembed version>.<revision>`: bump its revision here when what the stage
computes changes (not for refactors). The UI then marks its materializations, and what is downstream,
"code version changed" (stale) until they are re-materialized.
"""

from bioembed_assets import __version__

OWNERS = ["team:profiling"]
"""Owners of every bioembed asset (filterable in the asset catalog)."""

REVISIONS: dict[str, int] = {
    "raw_plate": 1, "platemap": 1, "illumination": 1, "segmentation": 1, "crops": 1,
    "encoder": 1, "embeddings": 1, "challenger": 1, "gradcamo": 1,
    "well_profiles": 1, "normalizer": 1, "normalized_profiles": 1, "evaluation": 1, "encoder_comparison": 1,
    "imported_profiles": 1, "imported_evaluation": 1,
}


def code_version(stage: str) -> str:
    """The code version of `stage`'s assets: the library version and the stage's revision."""
    return f"{__version__}.{REVISIONS[stage]}"


def owned(stage: str) -> dict:
    """`owners` and `code_version` of `stage`'s assets, as `@dg.asset(**owned(stage))` takes them."""
    return {"owners": OWNERS, "code_version": code_version(stage)}
