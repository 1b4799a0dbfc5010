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
    print("  rep mAP / retrieved: replicate mAP vs negative controls / fraction with BH-FDR < 0.05;"
          " nonrep mAP: vs other perturbations")
    print("  NSC: nearest-neighbour MoA accuracy, other compounds only; plate kNN: leave-one-out plate prediction"
          " of treated wells from other perturbations (lower = less plate effect; chance = 1/plates)")
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


def _pairs(values: list[str], flag: str) -> dict[str, list[str]]:
    """["COL=a,b", ...] -> {"COL": ["a", "b"]}."""
    out: dict[str, list[str]] = {}
    for v in values:
        col, sep, vals = v.partition("=")
        if not sep or not col or not vals:
            raise SystemExit(f"{flag} expects COLUMN=VALUE[,VALUE...], got {v!r}")
        out.setdefault(col, []).extend(vals.split(","))
    return out


def _import_profiles(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from bioembed_assets.report import format_metrics, metrics_table
    from dagster_project.demo import import_with_dagster

    recipes = {}
    for r in args.recipe or ["card=card"]:
        name, sep, spec = r.partition("=")
        recipes[name] = spec if sep else name
    config = {"name": args.name, "files": [str(Path(f).resolve()) for f in args.files], "plate_col": args.plate_col,
              "well_col": args.well_col, "perturbation_cols": args.perturbation.split(","),
              "canonical_perturbation": args.canonical_perturbation, "negative": _pairs(args.negative, "--negative"),
              "positive": _pairs(args.positive, "--positive"), "moa_col": args.moa, "recipes": recipes}
    home, imported = import_with_dagster(args.home, config, null_size=args.null_size)
    print(f"Imported feature set {imported['name']} v{imported['version']} into {home.lake}")
    table = metrics_table(home.catalog_path)
    print(format_metrics(table.filter((table["encoder"] == imported["name"])
                                      & (table["encoder_version"] == imported["version"]))))
    print(f"\nQuery it: uv run bioembed sql --home {home.root} "
          f"\"SELECT * FROM metrics WHERE encoder = '{imported['name']}'\"")
    return 0


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
    imp = sub.add_parser("import-profiles", help="import well-level profile tables (CSV/CSV.GZ/Parquet) as a "
                         "feature set, then normalize and evaluate it")
    imp.add_argument("files", nargs="+", help="profile tables: Metadata_* columns + numeric feature columns")
    imp.add_argument("--home", required=True, help="bioembed home folder (created if needed)")
    imp.add_argument("--name", required=True, help="feature-set name, e.g. lincs_cellprofiler")
    imp.add_argument("--plate-col", default="Metadata_Plate")
    imp.add_argument("--well-col", default="Metadata_Well")
    imp.add_argument("--perturbation", default="Metadata_broad_sample",
                     help="perturbation column(s), comma-separated (joined with ' @ ')")
    imp.add_argument("--canonical-perturbation", action="store_true",
                     help="match perturbation names case/punctuation-insensitively (U2-OS = U-2OS)")
    imp.add_argument("--negative", action="append", default=[], metavar="COL=VALUE[,VALUE]",
                     help="negative-control wells, e.g. Metadata_broad_sample=DMSO (repeatable)")
    imp.add_argument("--positive", action="append", default=[], metavar="COL=VALUE[,VALUE]")
    imp.add_argument("--moa", default=None, help="MoA column ('|' separates several MoAs)")
    imp.add_argument("--recipe", action="append", metavar="NAME[=STEPS]",
                     help="normalization recipe to fit and evaluate (repeatable; default: card)")
    imp.add_argument("--null-size", type=int, default=10000, help="permutations for mAP p-values")
    imp.set_defaults(func=_import_profiles)
    sql = sub.add_parser("sql", help="run a SQL query on a home's catalog (read-only)")
    sql.add_argument("query")
    sql.add_argument("--home", default="bioembed-home")
    sql.set_defaults(func=_sql)
    args = parser.parse_args(argv)
    if getattr(args, "home", None):  # caches (matplotlib's font list) live in the home, not in $HOME
        from bioembed_assets.config import Home

        os.environ.setdefault("MPLCONFIGDIR", str(Home(root=Path(args.home).expanduser().resolve()).matplotlib_config))
    try:
        return args.func(args)
    except (RuntimeError, LookupError, ValueError, OSError) as exc:  # bad input or a failed run: say why, no traceback
        print(f"bioembed {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
