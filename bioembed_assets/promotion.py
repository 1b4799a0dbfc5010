"""The promotion rule: does the challenger beat the champion on the same plates, by the same metrics?

A rule names a primary metric and recipe (default: the cross-fitted replicate mAP on the card
recipe), the margin the challenger must win by, and guard metrics that may not get worse by more
than a tolerance. Metrics come from the `metrics` lake table that `feature_sets.evaluate_feature_set`
writes (the numbers in MLflow and in `bioembed compare` are the same rows). Applying a decision
moves `champion` to the challenger and keeps the old champion as `previous`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import polars as pl

from bioembed_assets import schema as s
from bioembed_assets.config import Home
from bioembed_assets.promotion_rule import LOWER_IS_BETTER, PromotionRule
from bioembed_assets.registry import CHALLENGER, CHAMPION, PREVIOUS, EncoderRegistry, EncoderVersion
from bioembed_assets.store.lake import Lake


@dataclass
class Decision:
    """The verdict of a rule on (challenger, champion), with every compared number."""

    promote: bool
    challenger: EncoderVersion
    champion: EncoderVersion
    rule: PromotionRule
    rows: list[dict] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def table(self) -> pl.DataFrame:
        return pl.DataFrame(self.rows)

    def summary(self) -> str:
        verdict = "PROMOTE" if self.promote else "KEEP CHAMPION"
        return (f"{verdict}: {self.challenger.name} v{self.challenger.version} vs champion v{self.champion.version} "
                f"- " + "; ".join(self.reasons))


def version_metrics(home: Home, version: EncoderVersion) -> pl.DataFrame:
    """(recipe, metric, value) rows of one evaluated version (empty if never evaluated)."""
    return Lake(home.lake).read("metrics", encoder=version.name, version=version.version)


def evaluated_plates(home: Home, version: EncoderVersion) -> set[str]:
    """Plates a version has well profiles for (what its metrics were computed on)."""
    return {p[s.PLATE] for p in Lake(home.lake).partitions("well_profiles", encoder=version.name,
                                                          version=version.version)}


def _value(metrics: pl.DataFrame, recipe: str, metric: str) -> float:
    row = metrics.filter((pl.col(s.RECIPE) == recipe) & (pl.col("metric") == metric))
    return float(row["value"][0]) if row.height else math.nan


def decide(home: Home, registry: EncoderRegistry, name: str, rule: PromotionRule,
           recipes: list[str] | tuple[str, ...]) -> Decision:
    """Apply `rule` to encoder `name`'s challenger and champion (both must be evaluated on the same plates)."""
    rule.check_names(recipes)
    challenger, champion = registry.get(name, CHALLENGER), registry.get(name, CHAMPION)
    if challenger is None:
        raise LookupError(f"encoder {name!r} has no version with alias {CHALLENGER!r}: train one first "
                          f"(bioembed train --encoder {name})")
    if champion is None:
        raise LookupError(f"encoder {name!r} has no champion to compare against")
    if challenger.version == champion.version:
        raise LookupError(f"{name} v{challenger.version} is already the champion")
    ours, theirs = version_metrics(home, challenger), version_metrics(home, champion)
    for v, m in ((challenger, ours), (champion, theirs)):
        if m.filter(pl.col(s.RECIPE) == rule.recipe).height == 0:
            raise LookupError(f"{name} v{v.version} has no evaluation for recipe {rule.recipe!r}; evaluate it first")
    plates_c, plates_p = evaluated_plates(home, challenger), evaluated_plates(home, champion)
    if plates_c != plates_p:
        raise LookupError(f"{name}: challenger v{challenger.version} was evaluated on plates {sorted(plates_c)} but "
                          f"the champion v{champion.version} on {sorted(plates_p)}; evaluate both on the same plates")
    decision = Decision(True, challenger, champion, rule)
    checks = [("primary", rule.metric, rule.min_margin)] + [("guard", m, tol) for m, tol in rule.guards.items()]
    for role, metric, threshold in checks:
        new, old = _value(ours, rule.recipe, metric), _value(theirs, rule.recipe, metric)
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        gain = sign * (new - old)  # > 0: the challenger is better
        if math.isnan(new) or math.isnan(old):
            passed = role == "guard"  # a guard the design cannot measure does not block; a primary must exist
            note = f"{metric} not measurable on these plates"
        elif role == "primary":
            passed = gain >= threshold
            note = f"{metric} {new:.3f} vs {old:.3f} (needs +{threshold:g})"
        else:
            passed = gain >= -threshold
            note = f"guard {metric} {new:.3f} vs {old:.3f} (may lose {threshold:g})"
        decision.rows.append({"role": role, "recipe": rule.recipe, "metric": metric, "champion": old,
                              "challenger": new, "delta": new - old, "required": threshold, "passed": passed})
        decision.reasons.append(f"{note}: {'ok' if passed else 'FAILED'}")
        decision.promote &= passed
    return decision


def apply_promotion(registry: EncoderRegistry, decision: Decision, force_reason: str | None = None) -> EncoderVersion:
    """Move `champion` to the challenger (if the decision says so, or forced with a reason).

    The old champion becomes `previous` and the `challenger` alias is removed. The reason
    (rule verdict or the forced reason) is recorded as tags on the new champion version.
    """
    if not decision.promote and not force_reason:
        raise ValueError(f"the promotion rule does not promote: {decision.summary()}")
    name, new, old = decision.challenger.name, decision.challenger.version, decision.champion.version
    how = "rule" if decision.promote else "forced"
    note = decision.summary() if decision.promote else f"forced: {force_reason} (rule said: {decision.summary()})"
    registry.client.set_model_version_tag(name, new, "promoted_by", how)
    registry.client.set_model_version_tag(name, new, "promotion_reason", note[:5000])
    registry.client.set_model_version_tag(name, new, "replaced_version", old)
    registry.set_alias(name, PREVIOUS, old)
    registry.set_alias(name, CHAMPION, new)
    registry.delete_alias(name, CHALLENGER)
    return registry.version(name, new)


def rollback(registry: EncoderRegistry, name: str) -> EncoderVersion:
    """Move `champion` back to the `previous` version (and `previous` to the one just replaced)."""
    previous, champion = registry.get(name, PREVIOUS), registry.get(name, CHAMPION)
    if previous is None or champion is None:
        raise LookupError(f"encoder {name!r} has no {PREVIOUS!r} version to roll back to")
    registry.set_alias(name, CHAMPION, previous.version)
    registry.set_alias(name, PREVIOUS, champion.version)
    registry.client.set_model_version_tag(name, previous.version, "promoted_by", "rollback")
    return registry.version(name, previous.version)
