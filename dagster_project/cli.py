"""The `bioembed` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path


def _report(outcome, ground_truth: Path | None = None) -> int:
    """Print the per-encoder metrics, catalog location, UI commands and an example query."""
    from bioembed_assets.pipeline import DEFAULT_ENCODERS
    from bioembed_assets.registry import EncoderRegistry
    from bioembed_assets.report import format_metrics, ground_truth_table, metrics_table, run_example

    home = outcome.home
    print("\nPer encoder (raw = well medians, card = PCA on controls + per-plate scaling):")
    print(format_metrics(metrics_table(home.catalog_path)))
    print("  rep mAP / retrieved: replicate mAP vs negative controls / fraction with BH-FDR < 0.05")
    print("  plate kNN acc: leave-one-out plate prediction of treated wells (lower = less plate effect;"
          " chance = 1/plates)")
    print("  Z': positive vs negative control wells on a cross-fitted 1-D projection (> 0.5 excellent)")
    if ground_truth is not None and ground_truth.exists():
        print("\nGround truth (synthetic): retrieval of truly active vs inactive perturbations")
        print(ground_truth_table(home.catalog_path, ground_truth))
    registry = EncoderRegistry(home.mlflow_tracking_uri, home.mlflow_artifacts)
    versions = [registry.get(setup.name) for setup in DEFAULT_ENCODERS]
    print("\nEncoders (MLflow champion): " + "; ".join(v.describe() for v in versions if v is not None))
    if outcome.failures:
        print(f"\nFailed plates: {outcome.failures}")
    sql, result = run_example(home.catalog_path, "top_similar_wells")
    print(f"\nDuckDB catalog: {home.catalog_path}  (open read-only)")
    print(f"Example query:\n{sql}\n{result}")
    print(f"\nDagster UI:  DAGSTER_HOME={home.dagster_home} BIOEMBED_HOME={home.root} "
          "uv run dagster dev -m dagster_project.definitions")
    print(f"MLflow UI:   uv run mlflow ui --backend-store-uri {home.mlflow_tracking_uri} "
          f"--default-artifact-root {home.mlflow_artifacts}")
    print(f"\nFinished in {outcome.seconds:.0f} s.")
    return 1 if outcome.failures else 0


def _demo(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from dataclasses import replace

    from dagster_project.demo import DEMO_SCREEN, run_demo

    screen = replace(DEMO_SCREEN, n_plates=args.plates, seed=args.seed)
    outcome = run_demo(args.home, screen, null_size=args.null_size)
    return _report(outcome, outcome.home.raw_root / "ground_truth.csv")


def _run(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from bioembed_assets.config import RunConfig
    from dagster_project.demo import run_with_config

    return _report(run_with_config(args.home, RunConfig.load(args.config), null_size=args.null_size))


def _sql(args: argparse.Namespace) -> int:
    from bioembed_assets.config import Home
    from bioembed_assets.store.catalog import connect

    with connect(Home(root=Path(args.home).resolve()).catalog_path) as con:
        print(con.sql(args.query))
    return 0


def _quiet_libraries() -> None:
    """Keep the terminal for bioembed's own report: no beta/backfill warnings, no MLflow bars."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", message=".*backfill_policy.*")
    warnings.filterwarnings("ignore", message=".*varying BackfillPolicies.*")
    import mlflow  # noqa: F401  (configures its logger on import; quiet it afterwards)

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bioembed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate a synthetic screen and materialize the whole graph")
    demo.add_argument("--home", default="bioembed-home", help="bioembed home folder (created if needed)")
    demo.add_argument("--plates", type=int, default=4, help="number of synthetic plates")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--null-size", type=int, default=10000, help="permutations for mAP p-values")
    demo.set_defaults(func=_demo)
    run = sub.add_parser("run", help="run the whole graph on real plates described by a TOML config")
    run.add_argument("--home", required=True, help="bioembed home folder (created if needed)")
    run.add_argument("--config", required=True, help="run configuration (TOML; see README)")
    run.add_argument("--null-size", type=int, default=10000, help="permutations for mAP p-values")
    run.set_defaults(func=_run)
    sql = sub.add_parser("sql", help="run a SQL query on a home's catalog (read-only)")
    sql.add_argument("query")
    sql.add_argument("--home", default="bioembed-home")
    sql.set_defaults(func=_sql)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
