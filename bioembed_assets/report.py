"""Text summaries of a home's results, read from the DuckDB catalog (read-only)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import polars as pl

from bioembed_assets.store.catalog import connect, example_queries

_METRICS_SQL = """
SELECT encoder, encoder_version, recipe, metric, value FROM metrics
WHERE metric IN ('replicate_map', 'fraction_retrieved', 'nonrep_map', 'moa_map', 'moa_fraction_retrieved',
                 'nsc_accuracy', 'nscb_accuracy', 'plate_knn_accuracy', 'plate_silhouette', 'plate_chance',
                 'batch_knn_accuracy', 'batch_silhouette', 'batch_chance', 'batch_asw', 'control_z_prime')
"""

_GROUND_TRUTH_SQL = """
SELECT m.encoder, m.encoder_version AS version, m.recipe, g.active,
       count(*) AS perturbations,
       avg(m.mean_average_precision) AS mean_map,
       avg(CASE WHEN m.below_corrected_p THEN 1.0 ELSE 0.0 END) AS fraction_retrieved
FROM replicate_map m
JOIN read_csv_auto(?) g ON g.perturbation = m."group"
WHERE m.kind = 'replicate'
GROUP BY ALL ORDER BY m.encoder, m.encoder_version, m.recipe, g.active DESC
"""


def metrics_table(catalog: Path) -> pl.DataFrame:
    """One row per encoder version and recipe, one column per headline metric."""
    with connect(catalog) as con:
        long = con.sql(_METRICS_SQL).pl()
    if long.height == 0:
        return long
    return long.pivot(on="metric", index=["encoder", "encoder_version", "recipe"], values="value").sort(
        "encoder", pl.col("encoder_version").cast(pl.Int64, strict=False), pl.col("recipe").replace({"raw": "0", "card": "1"}))


def ground_truth_table(catalog: Path, ground_truth_csv: Path) -> pl.DataFrame:
    """Retrieval of truly active vs truly inactive perturbations (synthetic screens)."""
    with connect(catalog) as con:
        return con.execute(_GROUND_TRUTH_SQL, [str(ground_truth_csv)]).pl()


def run_example(catalog: Path, name: str) -> tuple[str, pl.DataFrame]:
    """The SQL text of example `name` from sql/examples.sql and its result."""
    sql = example_queries()[name]
    with connect(catalog) as con:
        return sql, con.sql(sql).pl()


METRIC_LABELS = {"replicate_map": "rep mAP", "fraction_retrieved": "retrieved", "nonrep_map": "nonrep mAP",
                 "moa_map": "MoA mAP", "moa_fraction_retrieved": "MoA retr.", "nsc_accuracy": "NSC",
                 "nscb_accuracy": "NSCB", "plate_knn_accuracy": "plate kNN", "control_z_prime": "Z'"}
"""The headline metrics of `format_metrics`, in order, with their column headers."""

METRIC_GAPS = {"nonrep_map": "no treated perturbation has two wells",
               "moa_map": "fewer than 2 MoAs annotated on treated wells",
               "moa_fraction_retrieved": "fewer than 2 MoAs annotated on treated wells",
               "nsc_accuracy": "fewer than 2 MoAs annotated on treated wells",
               "nscb_accuracy": "fewer than 2 MoAs annotated, or fewer than 2 batches",
               "control_z_prime": "no positive (or no negative) control wells"}
"""Why a headline metric can be missing (see `feature_sets.evaluate_profiles`' design checks)."""

MISSING = "\u2013"
"""How a missing value (null, NaN) is shown in text tables."""

FORMATS = ("table", "csv", "json", "markdown")

README_BEGIN, README_END = "<!-- bioembed report: begin -->", "<!-- bioembed report: end -->"
"""The markers around the block of README.md that `demo_report_markdown` writes."""


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell(value: object, decimals: int) -> str:
    """A value for humans: floats to `decimals` places (whole numbers >= 10 without), lists abbreviated."""
    if _missing(value):
        return MISSING
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 10 else f"{value:.{decimals}f}"
    if isinstance(value, list) and len(value) > 6:
        return "[" + ", ".join(_cell(v, decimals) for v in value[:3]) + f", ... ({len(value)} items)]"
    return str(value)


def format_table(df: pl.DataFrame, fmt: str = "table", labels: Mapping[str, str] | None = None,
                 gaps: Mapping[str, str] | None = None, decimals: int = 4) -> str:
    """`df` as aligned text (`table`), `markdown`, `csv` or `json` (records). In text and markdown, floats
    are rounded to `decimals`, missing values show as `MISSING`, and each column in `gaps` that has one
    gets a footnote with its reason; csv and json keep full precision (missing: empty / null).
    `labels` renames column headers."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; formats: {', '.join(FORMATS)}")
    named = df.with_columns(pl.col(pl.Float32, pl.Float64).fill_nan(None)).rename(
        {c: labels[c] for c in df.columns if labels and c in labels})
    if fmt == "csv":
        return named.write_csv().rstrip("\n")
    if fmt == "json":
        rows = [{k: None if _missing(v) else v for k, v in r.items()} for r in named.iter_rows(named=True)]
        return json.dumps(rows, indent=1, default=str)
    headers = named.columns
    rows = [[_cell(v, decimals) for v in r] for r in named.iter_rows()]
    numeric = [dtype.is_numeric() for dtype in df.dtypes]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return "| " + " | ".join(padded) + " |" if fmt == "markdown" else "  ".join(padded).rstrip()

    rule = ("|" + "|".join("-" * (w + 1) + ":" if num else "-" * (w + 2) for w, num in zip(widths, numeric)) + "|"
            if fmt == "markdown" else "  ".join("-" * w for w in widths))
    lines = [line(headers), rule, *(line(r) for r in rows)]
    notes = [f"{MISSING} in {labels.get(c, c) if labels else c}: {reason}" for c, reason in (gaps or {}).items()
             if c in df.columns and any(_missing(v) for v in df[c].to_list())]
    if notes:
        lines += ["", *(f"- {n}" for n in notes)] if fmt == "markdown" else notes
    return "\n".join(lines)


def format_metrics(df: pl.DataFrame, fmt: str = "table") -> str:
    """`metrics_table`'s headline metrics, one row per feature-set version and recipe."""
    cols = ["encoder", "encoder_version", "recipe", *METRIC_LABELS]
    if df.height == 0:
        df = pl.DataFrame(schema={c: (pl.Float64 if c in METRIC_LABELS else pl.Utf8) for c in cols})
    present = df.with_columns(pl.lit(None, pl.Float64).alias(c) for c in METRIC_LABELS if c not in df.columns)
    return format_table(present.select(cols), fmt, labels={"encoder_version": "version", **METRIC_LABELS},
                        gaps=METRIC_GAPS)


GROUND_TRUTH_LABELS = {"mean_map": "mean mAP", "fraction_retrieved": "retrieved"}


def demo_report_markdown(catalog: Path, ground_truth_csv: Path | None = None) -> str:
    """The README's generated block: headline metrics per feature set and recipe, and (synthetic screens)
    retrieval of truly active vs inactive perturbations, between `README_BEGIN` and `README_END`."""
    parts = [README_BEGIN, "", format_metrics(metrics_table(catalog), "markdown")]
    if ground_truth_csv is not None and ground_truth_csv.exists():
        parts += ["", "Against the synthetic ground truth (replicate mAP of truly active vs inactive compounds):", "",
                  format_table(ground_truth_table(catalog, ground_truth_csv), "markdown", labels=GROUND_TRUTH_LABELS)]
    return "\n".join([*parts, "", README_END])


def replace_readme_block(text: str, block: str) -> str:
    """`text` with the part from `README_BEGIN` to `README_END` (inclusive) replaced by `block`."""
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise LookupError(f"no {README_BEGIN} ... {README_END} block to replace")
    return text[:start] + block + text[end + len(README_END):]
