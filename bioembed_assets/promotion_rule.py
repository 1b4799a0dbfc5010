"""The promotion rule as configured (`[promotion]` in the run config): which metric decides, by how much."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

LOWER_IS_BETTER = frozenset({"batch_silhouette", "batch_knn_accuracy", "plate_silhouette", "plate_knn_accuracy"})
"""Plate- and batch-effect scores: lower means less effect. Every other metric is higher-is-better."""
RULE_METRICS = frozenset({
    "replicate_map", "fraction_retrieved", "nonrep_map", "nonrep_fraction_retrieved", "moa_map",
    "moa_fraction_retrieved", "nsc_accuracy", "nscb_accuracy", "relationship_recall_5", "relationship_recall_10",
    "batch_silhouette", "batch_knn_accuracy", "batch_knn_entropy", "batch_asw", "plate_silhouette",
    "plate_knn_accuracy", "plate_knn_entropy", "control_z_prime"})
"""Metrics a rule may name (what `evaluate_feature_set` computes; NaN where a design has none)."""


class PromotionRule(BaseModel):
    """`[promotion]` in the run config."""

    metric: str = "replicate_map"
    recipe: str = "card"
    min_margin: float = 0.01
    """The challenger's primary metric must exceed the champion's by at least this much."""
    guards: dict[str, float] = Field(default_factory=lambda: {"moa_map": 0.05, "nonrep_map": 0.05})
    """metric -> tolerance: how much worse than the champion each guard may get."""

    @model_validator(mode="after")
    def _known_metrics(self) -> PromotionRule:
        unknown = sorted({self.metric, *self.guards} - RULE_METRICS)
        if unknown:
            raise ValueError(f"promotion rule names unknown metric(s) {unknown}; known: {sorted(RULE_METRICS)}")
        return self

    def check_names(self, recipes: list[str] | tuple[str, ...]) -> None:
        """ValueError for a recipe that is not configured (metric names are checked on creation)."""
        if self.recipe not in ("raw", *recipes):
            raise ValueError(f"promotion rule names recipe {self.recipe!r}, which is not configured; "
                             f"configured: {['raw', *recipes]}")
