"""Text summaries of a home's results, read from the DuckDB catalog (read-only)."""

from __future__ import annotations

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


def format_metrics(df: pl.DataFrame) -> str:
    """A compact text table of `metrics_table` for terminals."""
    cols = {"replicate_map": "rep mAP", "fraction_retrieved": "retrieved", "nonrep_map": "nonrep mAP",
            "moa_map": "MoA mAP", "moa_fraction_retrieved": "MoA retr.", "nsc_accuracy": "NSC",
            "nscb_accuracy": "NSCB", "plate_knn_accuracy": "plate kNN", "control_z_prime": "Z'"}
    wide = max([7, *(len(str(r)) + 1 for r in (df["recipe"] if df.height else []))])  # e.g. jump_harmony
    name = max([12, *(len(str(e)) + 1 for e in (df["encoder"] if df.height else []))])  # e.g. timm_resnet18
    header = f"{'encoder':<{name}}{'ver':>4}  {'recipe':<{wide}}" + "".join(f"{v:>11}" for v in cols.values())
    lines = [header, "-" * len(header)]
    for r in df.iter_rows(named=True):
        vals = "".join(f"{r.get(k) if r.get(k) is not None else float('nan'):>11.3f}" for k in cols)
        lines.append(f"{r['encoder']:<{name}}{r['encoder_version']:>4}  {r['recipe']:<{wide}}{vals}")
    return "\n".join(lines)
