"""Benchmark: `import_profiles` time against the number of feature columns (it must scale linearly).

Data: two CSV profile tables (plates P1 and P2, 48 wells each, 96 rows in all) with `Metadata_Plate`,
`Metadata_Well`, `Metadata_broad_sample` and 1k / 5k / 20k float feature columns, written once per
size into a temporary folder. Each size is imported into a fresh home (read, map, intersect, write the
lake partitions and the manifest), best of `--repeats` runs. The table shows seconds and microseconds
per feature column; the test asserts only that the time per column at 20k is at most 3x the time per
column at 1k (a per-column cost that grows with the column count, as the quadratic schema lookups
before did: 1k 0.9 s, 2k 3.8 s, 20k 1,346 s, fails it). Writes `bench-results/import.json`. Run::

    uv run --frozen python tests/benchmarks/bench_import.py                 # about a minute on 2 cores
    uv run --frozen python tests/benchmarks/bench_import.py --sizes 1k,2k
    uv run --frozen pytest -m benchmark tests/benchmarks/bench_import.py -s
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.benchmarks import save_results

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench-results" / "import.json"
SIZES = {"1k": 1_000, "2k": 2_000, "5k": 5_000, "20k": 20_000}
ROWS_PER_FILE = 48
MAX_PER_COLUMN_GROWTH = 3.0


def write_tables(folder: Path, n_features: int, seed: int = 0) -> list[Path]:
    """Two CSV profile tables (one plate each) with `n_features` float columns."""
    rng = np.random.default_rng(seed)
    names = [f"Cells_Feature_{j}" for j in range(n_features)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for plate in ("P1", "P2"):
        meta = pl.DataFrame({
            "Metadata_Plate": [plate] * ROWS_PER_FILE,
            "Metadata_Well": [f"{'ABCD'[i // 12]}{i % 12 + 1:02d}" for i in range(ROWS_PER_FILE)],
            "Metadata_broad_sample": ["DMSO" if i % 6 == 0 else f"c{i % 6}" for i in range(ROWS_PER_FILE)],
        })
        X = pl.DataFrame(rng.normal(size=(ROWS_PER_FILE, n_features)).astype(np.float32), schema=names)
        path = folder / f"{plate}.csv"
        meta.hstack(X.get_columns()).write_csv(path)
        paths.append(path)
    return paths


def time_import(paths: list[Path], workdir: Path, repeats: int) -> dict:
    """Best wall time of `repeats` imports of `paths`, each into a fresh home."""
    from bioembed_assets.sources.profile_table import ProfileImportSpec, import_profiles

    spec = ProfileImportSpec(name="bench", negative={"Metadata_broad_sample": ["DMSO"]})
    walls = []
    for i in range(repeats):
        t0 = time.perf_counter()
        result = import_profiles(workdir / f"home-{i}", paths, spec)
        walls.append(time.perf_counter() - t0)
    return {"rows": result.rows, "features": len(result.features), "import_s": round(min(walls), 3),
            "import_s_all": [round(w, 3) for w in walls]}


def run(sizes: list[str], workdir: Path, repeats: int = 3) -> dict:
    from bioembed_assets.sources.profile_table import check_feature_set_name

    check_feature_set_name(workdir, "bench")  # imports the encoder registry (torch) once, outside the timings
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "polars": pl.__version__, "platform": platform.platform()}, "cases": []}
    for size in sizes:
        t0 = time.perf_counter()
        paths = write_tables(workdir / size / "tables", SIZES[size])
        data_s = time.perf_counter() - t0
        res = time_import(paths, workdir / size, repeats) | {"size": size, "columns": SIZES[size],
                                                             "data_s": round(data_s, 2)}
        res["us_per_column"] = round(res["import_s"] / SIZES[size] * 1e6, 1)
        results["cases"].append(res)
        print(f"[{size}] import {res['import_s']} s ({res['us_per_column']} us/column), data {res['data_s']} s",
              flush=True)
    base = results["cases"][0]
    for c in results["cases"]:
        c["per_column_vs_first"] = round(c["us_per_column"] / base["us_per_column"], 2)
    return results


def table(results: dict) -> str:
    rows = [f"{'columns':>8s} {'rows':>5s} {'import s':>9s} {'us/column':>10s} {'per column vs first':>20s}"]
    rows += [f"{c['columns']:>8,d} {c['rows']:>5d} {c['import_s']:>9.3f} {c['us_per_column']:>10.1f} "
             f"{c['per_column_vs_first']:>19.2f}x" for c in results["cases"]]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1k,5k,20k", help=f"comma-separated, from {list(SIZES)}")
    ap.add_argument("--repeats", type=int, default=3, help="imports per size (best kept)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    sizes = [s.strip().lower() for s in a.sizes.split(",") if s.strip()]
    if unknown := [s for s in sizes if s not in SIZES]:
        ap.error(f"unknown sizes {unknown}; known: {list(SIZES)}")
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        results = run(sizes, Path(tmp), a.repeats)
    save_results(results, a.out, table(results))
    return results


@pytest.mark.benchmark
@pytest.mark.timeout(600)
def test_bench_import_scales_linearly_in_columns() -> None:
    results = main(["--sizes", "1k,5k,20k"])
    by = {c["size"]: c for c in results["cases"]}
    assert by["20k"]["features"] == 20_000 and by["20k"]["rows"] == 2 * ROWS_PER_FILE
    growth = by["20k"]["us_per_column"] / by["1k"]["us_per_column"]
    assert growth <= MAX_PER_COLUMN_GROWTH, f"time per column grew {growth:.1f}x from 1k to 20k columns"


if __name__ == "__main__":
    main()
