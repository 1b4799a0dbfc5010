"""The `bioembed` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _report(outcome, ground_truth: Path | None = None) -> int:
    """Print the per-encoder metrics, catalog location, UI commands and an example query."""
    from bioembed_assets.pipeline import DEFAULT_ENCODERS
    from bioembed_assets.registry import EncoderRegistry
    from bioembed_assets.report import (
        GROUND_TRUTH_LABELS,
        format_metrics,
        format_table,
        ground_truth_table,
        metrics_table,
        run_example,
    )

    home = outcome.home
    print("\nPer encoder (raw = well medians, card = PCA on controls + per-plate scaling):")
    print(format_metrics(metrics_table(home.catalog_path)))
    print("  rep mAP / retrieved: replicate mAP vs negative controls / fraction with BH-FDR < 0.05;"
          " nonrep mAP: vs other perturbations")
    print("  NSC / NSCB: 1-NN MoA accuracy of treatment profiles, neighbours of other compounds (NSCB: also other"
          " batches); plate kNN: leave-one-out plate prediction of treated wells from other perturbations (lower ="
          " less plate effect; chance = 1/plates)")
    print("  Z': positive vs negative control wells on a cross-fitted 1-D projection (> 0.5 excellent)")
    if ground_truth is not None and ground_truth.exists():
        print("\nGround truth (synthetic): retrieval of truly active vs inactive perturbations")
        print(format_table(ground_truth_table(home.catalog_path, ground_truth), labels=GROUND_TRUTH_LABELS))
    registry = EncoderRegistry(home.mlflow_tracking_uri, home.mlflow_artifacts)
    versions = [registry.get(setup.name) for setup in DEFAULT_ENCODERS]
    print("\nEncoders (MLflow champion): " + "; ".join(v.describe() for v in versions if v is not None))
    if outcome.learning is not None:
        _report_learning(outcome)
    if outcome.failures:
        print(f"\nFailed: {outcome.failures}")
    sql, result = run_example(home.catalog_path, "top_similar_wells")
    print(f"\nDuckDB catalog: {home.catalog_path}  (open read-only)")
    print(f"Example query:\n{sql}\n{format_table(result)}")
    print(f"\nDagster UI:  DAGSTER_HOME={home.dagster_home} BIOEMBED_HOME={home.root} "
          "uv run dagster dev -m dagster_project.definitions")
    print(f"MLflow UI:   MLFLOW_DISABLE_TELEMETRY=true MPLCONFIGDIR={home.matplotlib_config} uv run mlflow ui "
          f"--backend-store-uri {home.mlflow_tracking_uri} --default-artifact-root {home.mlflow_artifacts}")
    print(f"\nFinished in {outcome.seconds:.0f} s.")
    return 1 if outcome.failures else 0


KEY_METRICS = ("replicate_map", "fraction_retrieved", "nonrep_map", "moa_map", "nsc_accuracy", "batch_knn_accuracy")


def _report_learning(outcome) -> None:
    import polars as pl

    from bioembed_assets.challenger import compare_table
    from bioembed_assets.registry import EncoderRegistry

    learning, home = outcome.learning, outcome.home
    registry = EncoderRegistry(home.mlflow_tracking_uri, home.mlflow_artifacts)
    versions = [("champion", registry.version(learning.encoder, learning.champion_version)),
                ("challenger", registry.version(learning.encoder, learning.challenger_version))]
    print(f"\nLearning loop ({learning.encoder}): champion v{learning.champion_version} (untrained) vs challenger "
          f"v{learning.challenger_version} (trained briefly on the demo plates); same plates, recipes and metrics")
    print(_versions_table(compare_table(home, versions).filter(pl.col("metric").is_in(KEY_METRICS))))
    print(f"Promotion rule: {learning.decision}")
    if learning.promoted:
        print("Promoted: `champion` moved to the challenger, the old one kept as `previous`; the registry sensor "
              "reported it and declarative automation re-materialized "
              + ", ".join(f"{k} ({n})" for k, n in learning.reembedded.items()))
    else:
        print("Not promoted: the rule kept the untrained champion, so nothing was re-embedded.")
    stages = {**outcome.stage_seconds, **learning.seconds}
    print("Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()))
    print(f"Full comparison: uv run bioembed compare --home {home.root} --encoder {learning.encoder}")


def _versions_table(table, fmt: str = "table") -> str:
    """`challenger.compare_table` (recipe, metric x one column per version) for the terminal."""
    from bioembed_assets.report import format_table

    gaps = {c: "this version has no value for that recipe and metric" for c in table.columns[2:]}
    return format_table(table, fmt, gaps=gaps)


@contextmanager
def _config_file(path: str | Path) -> Iterator[None]:
    """Name the config file in TOML syntax and validation errors, one line each."""
    import tomllib

    from pydantic import ValidationError

    try:
        yield
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config {path}: not valid TOML: {exc}") from exc
    except ValidationError as exc:
        raise ValueError(f"config {path}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    """An error's message on one line (pydantic's: `field: problem; ...`)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) else str(exc)
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


def _demo(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from dataclasses import replace

    from dagster_project.cli_progress import StageProgress
    from dagster_project.demo import DEMO_SCREEN, run_demo

    screen = replace(DEMO_SCREEN, n_plates=args.plates, seed=args.seed)
    overrides = None
    if args.config:
        import tomllib

        with _config_file(args.config):
            overrides = tomllib.loads(Path(args.config).read_text())
    progress = StageProgress(args.plates)
    try:
        outcome = run_demo(args.home, screen, null_size=args.null_size, learn=not args.no_train, overrides=overrides,
                           log=progress)
    finally:
        progress.close()
    return _report(outcome, outcome.home.raw_root / "ground_truth.csv")


def _run(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from bioembed_assets.config import RunConfig
    from dagster_project.cli_progress import StageProgress
    from dagster_project.demo import run_with_config

    with _config_file(args.config):
        config = RunConfig.load(args.config)
    if missing := [p for p in config.plates or [] if not config.plate_dir(p).is_dir()]:  # fail before any run starts
        raise FileNotFoundError(f"config {args.config}: plate(s) {', '.join(missing)} have no folder under "
                                f"raw_root {config.raw_root}")
    progress = StageProgress(len(config.plates or []) or None)  # None: every folder under raw_root, counted as they run
    try:
        outcome = run_with_config(args.home, config, null_size=args.null_size, log=progress)
    finally:
        progress.close()
    return _report(outcome)


def _pairs(values: list[str], flag: str) -> dict[str, list[str]]:
    """["COL=a,b", ...] -> {"COL": ["a", "b"]}."""
    out: dict[str, list[str]] = {}
    for v in values:
        col, sep, vals = v.partition("=")
        if not sep or not col or not vals:
            raise SystemExit(f"{flag} expects COLUMN=VALUE[,VALUE...], got {v!r}")
        out.setdefault(col, []).extend(vals.split(","))
    return out


def _import_summary(manifest: dict) -> str:
    """What an import kept and left out, from its manifest (older manifests lack some keys)."""
    non_numeric, ignored = manifest.get("dropped_non_numeric", []), manifest.get("ignored_columns", [])
    lines = [f"  {manifest['rows']} wells on {len(manifest['plates'])} plate(s), {len(manifest['features'])} features; "
             f"dropped: {manifest['dropped_features']} not in every file, {len(non_numeric)} holding non-numbers"]
    for title, names in (("dropped non-numeric feature columns", non_numeric),
                         ("ignored text columns (no numeric value)", ignored)):
        if names:
            more = f" (+{len(names) - 10} more)" if len(names) > 10 else ""
            lines.append(f"  {title}: {', '.join(names[:10])}{more}")
    return "\n".join(lines)


def _import_profiles(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from bioembed_assets.report import format_metrics, metrics_table
    from bioembed_assets.sources.profile_table import load_manifest
    from dagster_project.demo import import_with_dagster

    recipes = {}
    for r in args.recipe or ["card=card"]:
        name, sep, spec = r.partition("=")
        recipes[name] = spec if sep else name
    def names(values: list[str] | None) -> list[str]:  # repeatable, comma-separated
        return [n.strip() for v in values or [] for n in v.split(",") if n.strip()]

    if bool(args.metadata) != bool(args.on):
        raise ValueError("--metadata FILE and --on COL[,COL] go together (the table to join and its key columns)")
    for kind, paths in (("profile table", args.files), ("--metadata table", args.metadata)):
        if missing := [f for f in paths if not Path(f).is_file()]:
            raise FileNotFoundError(f"{kind} {', '.join(missing)} does not exist (or is not a file)")
    config = {"name": args.name, "files": [str(Path(f).resolve()) for f in args.files], "plate_col": args.plate_col,
              "well_col": args.well_col, "perturbation_cols": names([args.perturbation] if args.perturbation else []),
              "canonical_perturbation": args.canonical_perturbation, "negative": _pairs(args.negative, "--negative"),
              "positive": _pairs(args.positive, "--positive"), "moa_col": args.moa, "batch_col": args.batch,
              "compound_col": args.compound, "features": names(args.features) or None,
              "metadata_prefixes": list(dict.fromkeys(["Metadata_", *args.metadata_prefix])),
              "metadata_cols": names(args.metadata_cols), "metadata_files": [str(Path(f).resolve()) for f in args.metadata],
              "metadata_on": names(args.on), "non_numeric": args.non_numeric, "recipes": recipes}
    config |= {"crossfit": args.crossfit, "nsc_aggregate": args.nsc_aggregate}
    home, imported, failure = import_with_dagster(args.home, config, null_size=args.null_size)
    print(f"Imported feature set {imported['name']} v{imported['version']} into {home.lake}")
    print(_import_summary(load_manifest(home.root, imported["name"], imported["version"])))
    table = metrics_table(home.catalog_path)
    print(format_metrics(table.filter((table["encoder"] == imported["name"])
                                      & (table["encoder_version"] == imported["version"]))))
    print(f"\nQuery it: uv run bioembed sql --home {home.root} "
          f"\"SELECT * FROM metrics WHERE encoder = '{imported['name']}'\"")
    if failure:
        print(f"\nbioembed import-profiles: {failure}\n  (the other recipes' results are stored; see "
              f"SELECT * FROM recipe_status WHERE status = 'failed')", file=sys.stderr)
        return 1
    return 0


def _train_config(args: argparse.Namespace):
    from bioembed_assets.training.loop import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_epochs=args.warmup_epochs,
                       patience=args.patience, seed=args.seed, device=args.device, num_workers=args.workers,
                       max_steps_per_epoch=args.max_steps)


def _train(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from bioembed_assets import challenger
    from bioembed_assets.pipeline import load_run_config
    from bioembed_assets.training.run import train_challenger
    from dagster_project.cli_progress import TqdmProgress
    from dagster_project.demo import use_home
    from dagster_project.resources import BioembedHome

    home = use_home(args.home)
    resource = BioembedHome(root=str(home.root), device=args.device, null_size=args.null_size)
    registry, run_config = resource.registry(), load_run_config(home)
    champion = resource.champion(args.encoder)
    plates = args.plates.split(",") if args.plates else challenger.evaluation_plates(home, champion)
    base = registry.load_version(champion)
    outcome = train_challenger(home, registry, args.encoder, base, champion, plates, _train_config(args),
                               resume=args.resume, progress=TqdmProgress())
    if not args.no_evaluate:
        challenger.evaluate_against_champion(home, registry, champion, outcome.version, run_config.recipes,
                                             device=args.device, null_size=args.null_size, crossfit=run_config.crossfit)
        print(_versions_table(challenger.compare_table(home, [("champion", champion), ("challenger", outcome.version)])))
        print(f"\nNext: uv run bioembed promote --home {home.root} --encoder {args.encoder}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from bioembed_assets import challenger
    from bioembed_assets.config import Home
    from bioembed_assets.pipeline import load_run_config
    from bioembed_assets.promotion import decide
    from bioembed_assets.registry import CHALLENGER, CHAMPION, PREVIOUS, EncoderRegistry
    from bioembed_assets.report import format_table

    home = Home(root=Path(args.home).expanduser().resolve())
    registry = EncoderRegistry(home.mlflow_tracking_uri, home.mlflow_artifacts)
    if args.encoder is None:
        from bioembed_assets.encoder_comparison import compare_encoders

        table = compare_encoders(home, registry)
        if table.height == 0:
            raise LookupError(f"no encoder is registered in {home.mlflow_db}; run the pipeline first")
        print(format_table(table, args.format, gaps={"recipe": "never evaluated", "crops_per_s": "not measured"}))
        if args.format != "table":
            return 0
        print("weights: trained / untrained (random init) / none (parameter-free); crops_per_s: measured while "
              "embedding the plates; metrics per recipe as in `bioembed sql \"SELECT * FROM metrics\"`")
        return 0
    versions = [(a, v) for a in (CHAMPION, CHALLENGER, PREVIOUS) if (v := registry.get(args.encoder, a)) is not None]
    if not versions:
        raise LookupError(f"encoder {args.encoder!r} is not registered in {home.mlflow_db}")
    evaluated = [(a, v) for a, v in versions if challenger.version_metrics(home, v).height]
    print(_versions_table(challenger.compare_table(home, evaluated), args.format))
    if args.format == "table" and any(a == CHALLENGER for a, _ in evaluated):
        run_config = load_run_config(home)
        print(decide(home, registry, args.encoder, run_config.promotion, list(run_config.recipes)).summary())
    return 0


def _promote(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from bioembed_assets.config import Home
    from bioembed_assets.pipeline import load_run_config
    from bioembed_assets.promotion import apply_promotion, decide, rollback
    from bioembed_assets.registry import EncoderRegistry
    from bioembed_assets.report import format_table

    home = Home(root=Path(args.home).expanduser().resolve())
    registry = EncoderRegistry(home.mlflow_tracking_uri, home.mlflow_artifacts)
    if args.rollback:
        version = rollback(registry, args.encoder)
        print(f"{args.encoder}: champion moved back to v{version.version}")
        return 0
    if args.force is not None and not args.force.strip():
        raise ValueError("--force needs a reason, e.g. --force 'validated on the external plate set'")
    run_config = load_run_config(home)
    decision = decide(home, registry, args.encoder, run_config.promotion, list(run_config.recipes))
    print(format_table(decision.table()))
    print(decision.summary())
    if not decision.promote and args.force is None:
        print("Not promoted (use --force REASON to override; the reason is recorded on the version).")
        return 1
    version = apply_promotion(registry, decision, force_reason=args.force)
    print(f"{args.encoder}: champion is now v{version.version} ({version.tags.get('promoted_by')}); "
          f"v{decision.champion.version} is `previous`. The registry sensor re-embeds its plates in Dagster.")
    return 0


def _sql(args: argparse.Namespace) -> int:
    """Print a query's result: every row and column as a table (lists abbreviated), or CSV (`--csv`);
    `--limit N` keeps the first N rows. A DuckDB error (bad SQL, unknown table) is one line on stderr."""
    import shutil
    import tempfile

    import duckdb
    import polars as pl

    from bioembed_assets.config import Home
    from bioembed_assets.store.catalog import connect

    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit needs a number of rows >= 0, got {args.limit}")
    with connect(Home(root=Path(args.home).resolve()).catalog_path) as con:
        try:
            rel = con.sql(args.query)
            if rel is None:  # a statement without a result (SET, PRAGMA ...)
                return 0
            if args.limit is not None:
                rel = rel.limit(args.limit)
            if args.csv:  # DuckDB writes every type (lists, structs, intervals) as CSV text
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "result.csv"
                    rel.write_csv(str(path))
                    with open(path, encoding="utf-8") as f:
                        shutil.copyfileobj(f, sys.stdout)
            else:
                try:
                    df = rel.pl()
                except pl.exceptions.PolarsError:  # a type polars cannot hold (INTERVAL, UNION): print it as text
                    quoted = ['"' + c.replace('"', '""') + '"' for c in rel.columns]
                    df = rel.select(*[duckdb.ColumnExpression(q).cast(duckdb.sqltype("VARCHAR")).alias(c)
                                      for q, c in zip(quoted, rel.columns)]).pl()
                with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=65535, fmt_str_lengths=65535):
                    print(df)
        except duckdb.Error as exc:  # the message's first paragraph, without the SQL excerpt and caret
            message = " ".join(line.strip() for line in str(exc).split("\n\n")[0].splitlines())
            print(f"bioembed sql: {message}", file=sys.stderr)
            return 2
    return 0


def _report_command(args: argparse.Namespace) -> int:
    """Print a home's headline metrics (and, for the demo, its ground-truth check) in `--format`; with
    `--update-readme FILE`, rewrite FILE's generated block with the markdown."""
    from bioembed_assets.config import Home
    from bioembed_assets.report import (
        GROUND_TRUTH_LABELS,
        demo_report_markdown,
        format_metrics,
        format_table,
        ground_truth_table,
        metrics_table,
        replace_readme_block,
    )

    home = Home(root=Path(args.home).expanduser().resolve())
    if not home.catalog_path.exists():
        raise FileNotFoundError(f"no catalog at {home.catalog_path}; run `bioembed demo` or `bioembed run` first")
    ground_truth = home.raw_root / "ground_truth.csv"
    if args.update_readme or args.format == "markdown":
        block = demo_report_markdown(home.catalog_path, ground_truth)
        if args.update_readme:
            readme = Path(args.update_readme)
            readme.write_text(replace_readme_block(readme.read_text(), block))
            print(f"Updated the generated block of {readme}")
        else:
            print(block)
        return 0
    print(format_metrics(metrics_table(home.catalog_path), args.format))
    if args.format == "table" and ground_truth.exists():
        print("\nGround truth (synthetic): retrieval of truly active vs inactive perturbations")
        print(format_table(ground_truth_table(home.catalog_path, ground_truth), labels=GROUND_TRUTH_LABELS))
    return 0


def _export(args: argparse.Namespace) -> int:
    """Write a feature set's profiles (raw or one recipe's) as h5ad, parquet or csv."""
    from bioembed_assets.export import load_export, write_export

    data = load_export(args.home, args.feature_set, args.version, args.recipe)
    path = write_export(data, args.format, args.out)
    print(f"Wrote {path}: {data.X.shape[0]} wells x {data.X.shape[1]} features of feature set {data.name} "
          f"v{data.version} ({data.recipe})")
    return 0


def _quiet_libraries() -> None:
    """Keep the terminal for bioembed's own report: no beta/backfill warnings, no MLflow bars."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", message=".*backfill_policy.*")
    warnings.filterwarnings("ignore", message=".*varying BackfillPolicies.*")
    warnings.filterwarnings("ignore", message=".*include_sources.*")
    warnings.filterwarnings("ignore", message=".*dataset source can be interpreted in multiple ways.*")
    logging.getLogger("dagster.automation_condition_tester").setLevel(logging.WARNING)
    import mlflow  # noqa: F401  (configures its logger on import; quiet it afterwards)

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in --help when it has a meaningful one (not None/False/[], not required)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is False or action.default == [] \
                or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _add_format(parser: argparse.ArgumentParser) -> None:
    from bioembed_assets.report import FORMATS

    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="table: aligned text; csv / json: full precision for scripts; markdown: for docs")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bioembed")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """Every command and option of `bioembed`."""
    parser = argparse.ArgumentParser(prog="bioembed", description=__doc__)
    parser.add_argument("--version", action="version", version=f"bioembed {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or progress lines on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate a synthetic screen and materialize the whole graph")
    demo.add_argument("--home", default="bioembed-home", help="bioembed home folder (created if needed)")
    demo.add_argument("--plates", type=int, default=4, help="number of synthetic plates")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic screen")
    demo.add_argument("--null-size", type=int, default=10000, help="permutations for mAP p-values")
    demo.add_argument("--no-train", action="store_true", help="skip the train -> evaluate -> promote loop")
    demo.add_argument("--config", default=None, help="TOML of run-config fields over the synthetic defaults, e.g. "
                      "encoders and encoder_options (deploy/configs/demo-zoo.toml)")
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="train an encoder on the home's plates and register it as challenger, "
                           "then evaluate it against the champion")
    train.add_argument("--home", required=True, help="bioembed home folder")
    train.add_argument("--encoder", required=True, help="registered encoder name, e.g. ca_mae")
    train.add_argument("--plates", default="", help="comma-separated plates to train on (default: the champion's "
                       "plates); the evaluation always uses the champion's plates")
    train.add_argument("--epochs", type=int, default=10, help="maximum training epochs")
    train.add_argument("--batch-size", type=int, default=64, help="crops per step")
    train.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    train.add_argument("--warmup-epochs", type=int, default=1, help="linear warm-up before the cosine decay")
    train.add_argument("--patience", type=int, default=3, help="early stopping (epochs without a better val loss)")
    train.add_argument("--seed", type=int, default=0, help="seed of the split, shuffling and initialisation")
    train.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps")
    train.add_argument("--workers", type=int, default=1, help="data-loading worker processes")
    train.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch")
    train.add_argument("--resume", action="store_true", help="continue the last run from its checkpoint")
    train.add_argument("--no-evaluate", action="store_true", help="register the challenger without evaluating it")
    train.add_argument("--null-size", type=int, default=10000, help="permutations for mAP p-values")
    train.set_defaults(func=_train)
    compare = sub.add_parser("compare", help="every registered encoder version side by side (dims, throughput, "
                             "headline metrics per recipe); with --encoder: its champion vs challenger (and previous)")
    compare.add_argument("--home", required=True, help="bioembed home folder")
    compare.add_argument("--encoder", default=None, help="compare one encoder's aliased versions on every metric")
    _add_format(compare)
    compare.set_defaults(func=_compare)
    promote = sub.add_parser("promote", help="apply the promotion rule: challenger -> champion if it wins")
    promote.add_argument("--home", required=True, help="bioembed home folder")
    promote.add_argument("--encoder", required=True, help="registered encoder name, e.g. ca_mae")
    promote.add_argument("--force", metavar="REASON", default=None, help="promote even if the rule says no")
    promote.add_argument("--rollback", action="store_true", help="move champion back to `previous`")
    promote.set_defaults(func=_promote)
    run = sub.add_parser("run", help="run the whole graph on real plates described by a TOML config")
    run.add_argument("--home", required=True, help="bioembed home folder (created if needed)")
    run.add_argument("--config", required=True, help="run configuration (TOML; see README)")
    run.add_argument("--null-size", type=int, default=10000, help="permutations for mAP p-values")
    run.set_defaults(func=_run)
    imp = sub.add_parser("import-profiles", help="import well-level profile tables (CSV/CSV.GZ/Parquet) as a "
                         "feature set, then normalize and evaluate it")
    imp.add_argument("files", nargs="+", help="profile tables: metadata columns (Metadata_*, --metadata-prefix, "
                     "--metadata-cols) + numeric feature columns")
    imp.add_argument("--home", required=True, help="bioembed home folder (created if needed)")
    imp.add_argument("--name", required=True, help="feature-set name, e.g. lincs_cellprofiler; unique across "
                     "encoders and imports (an encoder's name, e.g. classical, is refused)")
    imp.add_argument("--plate-col", default="Metadata_Plate", help="plate column of the profile tables")
    imp.add_argument("--well-col", default="Metadata_Well", help="well column of the profile tables")
    imp.add_argument("--perturbation", default=None,
                     help="perturbation column(s), comma-separated (joined with ' @ '); default: the --compound "
                     "column, else Metadata_broad_sample")
    imp.add_argument("--canonical-perturbation", action="store_true",
                     help="match perturbation names case/punctuation-insensitively (U2-OS = U-2OS)")
    imp.add_argument("--negative", action="append", default=[], metavar="COL=VALUE[,VALUE]",
                     help="negative-control wells, e.g. Metadata_broad_sample=DMSO (repeatable)")
    imp.add_argument("--positive", action="append", default=[], metavar="COL=VALUE[,VALUE]",
                     help="positive-control wells, e.g. Metadata_pert_type=control (repeatable)")
    imp.add_argument("--moa", default=None, help="MoA column ('|' separates several MoAs)")
    imp.add_argument("--batch", default=None, metavar="COL", help="batch column, stored as `batch` (e.g. "
                     "Metadata_Batch_Number; default: each plate is its own batch)")
    imp.add_argument("--compound", default=None, metavar="COL", help="compound column, stored as `compound` (one "
                     "compound at several doses; default: the perturbation)")
    imp.add_argument("--metadata", action="append", default=[], metavar="FILE",
                     help="metadata table to join (CSV/TSV/Parquet, e.g. a platemap or image table; repeatable: "
                     "stacked); each profile row must match exactly one of its rows; its columns are metadata")
    imp.add_argument("--on", action="append", default=[], metavar="COL[,COL]",
                     help="join keys for --metadata: COL (same name in both) or PROFILE_COL=METADATA_COL, "
                     "comma-separated, e.g. Metadata_Plate_Map_Name=plate_map_name,Metadata_Well=well_position")
    imp.add_argument("--metadata-prefix", action="append", default=[], metavar="PREFIX",
                     help="more metadata column prefixes besides Metadata_, e.g. Image_Metadata_ (repeatable)")
    imp.add_argument("--metadata-cols", action="append", default=[], metavar="COL[,COL]",
                     help="more metadata columns, named (numeric ones too: never features)")
    imp.add_argument("--features", action="append", default=[], metavar="PATTERNS",
                     help="feature columns: names and/or globs, comma-separated, e.g. 'Cells_*,Nuclei_AreaShape_*' "
                     "(default: every numeric non-metadata column)")
    imp.add_argument("--non-numeric", choices=["error", "drop"], default="error",
                     help="feature columns holding a non-number (e.g. one 'abc' cell): fail naming file, row and "
                     "column (default), or drop those columns (listed in the output and the manifest)")
    imp.add_argument("--recipe", action="append", metavar="NAME[=STEPS]",
                     help="normalization recipe to fit and evaluate (repeatable; default: card)")
    imp.add_argument("--null-size", type=int, default=10000, help="permutations for mAP p-values")
    imp.add_argument("--crossfit", default="auto", help="how a recipe's replicate mAP is cross-fitted: auto (2 folds "
                     "when each plate keeps 4 controls per fold, else in-sample), off, or a number of folds (README: "
                     "Evaluation metrics)")
    imp.add_argument("--nsc-aggregate", choices=["mean", "median"], default="mean",
                     help="NSC / NSCB treatment profiles: mean (default) or median of the replicate wells")
    imp.set_defaults(func=_import_profiles)
    sql = sub.add_parser("sql", help="run a SQL query on a home's catalog (read-only); prints every row")
    sql.add_argument("query", help="DuckDB SQL over the catalog's views (plates, metrics, profiles, ...)")
    sql.add_argument("--home", default="bioembed-home", help="bioembed home folder")
    sql.add_argument("--limit", type=int, default=None, metavar="N", help="print only the first N rows")
    sql.add_argument("--csv", action="store_true", help="print CSV (header + rows) instead of a table")
    sql.set_defaults(func=_sql)
    export = sub.add_parser("export", help="write a feature set's profiles as AnnData (.h5ad) or a pycytominer-style "
                            "wide table (Metadata_* + one column per feature; parquet or csv)")
    export.add_argument("--home", required=True, help="bioembed home folder")
    export.add_argument("--feature-set", required=True, help="an import's or an encoder's name, e.g. lincs or ca_mae")
    export.add_argument("--version", default=None, help="feature-set version (default: the latest)")
    export.add_argument("--recipe", default="raw", help="raw (the well profiles, default) or a fitted recipe, e.g. card")
    export.add_argument("--format", choices=["h5ad", "parquet", "csv"], default=None,
                        help="default: from the --out suffix, else parquet")
    export.add_argument("--out", default=None, metavar="PATH",
                        help="output file or folder (default: <set>_v<version>_<recipe>.<format> here)")
    export.set_defaults(func=_export)
    report = sub.add_parser("report", help="a home's headline metrics per feature set and recipe (and the "
                            "synthetic ground-truth check); --markdown: the README's generated demo tables")
    report.add_argument("--home", default="bioembed-home", help="bioembed home folder")
    _add_format(report)
    report.add_argument("--markdown", dest="format", action="store_const", const="markdown",
                        help="same as --format markdown: the block between README.md's `bioembed report` markers")
    report.add_argument("--update-readme", metavar="FILE", default=None,
                        help="rewrite FILE's block between the `bioembed report` markers with the markdown")
    report.set_defaults(func=_report_command)
    for command in sub.choices.values():  # every option's default in its --help
        command.formatter_class = _HelpWithDefaults
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dagster_project import cli_progress

    cli_progress.QUIET = args.quiet
    if getattr(args, "home", None):  # caches (matplotlib's font list) live in the home, not in $HOME
        from bioembed_assets.config import Home

        os.environ.setdefault("MPLCONFIGDIR", str(Home(root=Path(args.home).expanduser().resolve()).matplotlib_config))
    try:
        return args.func(args)
    except (RuntimeError, LookupError, ValueError, OSError) as exc:  # bad input or a failed run: say why, no traceback
        if args.debug:
            raise
        print(f"bioembed {args.command}: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
