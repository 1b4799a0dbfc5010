"""Benchmark: a new import into a home that already holds earlier imports costs what it costs alone.

Data: the synthetic screen of the standard kind (`generate_screen`: 8 plates, 6 DMSO wells per plate,
compound x dose, weekly batches) with 600 treated wells and 500 raw features, written as CSV; six
recipes (card, tvn, mad, mad by batch, standardize, jump). Through Dagster (`import_with_dagster`, the
path of `bioembed import-profiles`), each case best of `--repeats`:

- `alone`: the import into an empty home (import, 6 recipes fitted, applied and scored);
- `after_3`: the same import into a home holding 3 earlier imports (their evaluations are skipped:
  nothing of theirs changed);
- `all_4`: what re-evaluating every import costs (the earlier behaviour), measured as 4 x the library
  time of one feature set's normalize + evaluate.

The test asserts `after_3 / alone` <= 1.5 (the earlier imports are not recomputed; the old code
re-evaluated all four, ~4x) — a ratio in the same run, never an absolute time. Writes
`bench-results/import_evaluation.json`. Run::

    uv run --frozen python tests/benchmarks/bench_import_evaluation.py       # about two minutes on 2 cores
    uv run --frozen pytest -m benchmark tests/benchmarks/bench_import_evaluation.py -s
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import pytest

from tests.benchmarks import save_results

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench-results" / "import_evaluation.json"
RECIPES = {"card": "card", "tvn": "tvn", "mad": "mad", "mad_batch": "mad_robustize(by=batch)",
           "standardize": "standardize", "jump": "jump"}
MAX_RATIO = 1.5


def _config(name: str, csv: Path) -> dict:
    return {"name": name, "files": [str(csv)], "perturbation_cols": ["Metadata_broad_sample", "Metadata_dose"],
            "compound_col": "Metadata_broad_sample", "batch_col": "Metadata_Batch", "moa_col": "Metadata_moa",
            "negative": {"Metadata_broad_sample": ["DMSO"]}, "recipes": RECIPES}


def run(workdir: Path, repeats: int, null_size: int) -> dict:
    from bioembed_assets import feature_sets
    from bioembed_assets.sources.synthetic_profiles import SyntheticScreenConfig, write_screen_csv
    from dagster_project.demo import import_with_dagster

    screen = SyntheticScreenConfig(n_compounds=50, n_doses=4, replicates=3, n_features=500)
    csv = write_screen_csv(workdir / "screen.csv", screen)
    cases: dict[str, list[float]] = {"alone": [], "after_3": [], "evaluate_one": []}
    for i in range(repeats):
        t0 = time.perf_counter()
        home, imported, failure = import_with_dagster(workdir / f"alone-{i}", _config("screen", csv), null_size)
        cases["alone"].append(time.perf_counter() - t0)
        assert failure is None, failure
        busy = workdir / f"busy-{i}"
        for k in range(3):
            import_with_dagster(busy, _config(f"earlier{k}", csv), null_size)
        t0 = time.perf_counter()
        import_with_dagster(busy, _config("screen", csv), null_size)
        cases["after_3"].append(time.perf_counter() - t0)
        fs = feature_sets.FeatureSetRef(imported["name"], imported["version"])
        t0 = time.perf_counter()
        feature_sets.normalize_feature_set(home, fs, RECIPES)
        feature_sets.evaluate_feature_set(home, fs, RECIPES, null_size=null_size)
        cases["evaluate_one"].append(time.perf_counter() - t0)
    best = {k: round(min(v), 2) for k, v in cases.items()}
    return {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "wells": screen.n_compounds * screen.n_doses * screen.replicates + screen.n_plates * screen.controls_per_plate,
            "features": screen.n_features, "recipes": len(RECIPES), "null_size": null_size, **best,
            "all_4_estimate": round(4 * best["evaluate_one"], 2),
            "after_3_vs_alone": round(best["after_3"] / best["alone"], 2),
            "runs": {k: [round(x, 2) for x in v] for k, v in cases.items()}}


def table(r: dict) -> str:
    return (f"{r['wells']} wells x {r['features']} features, {r['recipes']} recipes, null size {r['null_size']}\n"
            f"  import + evaluate alone:            {r['alone']:7.2f} s\n"
            f"  the same after 3 earlier imports:   {r['after_3']:7.2f} s   ({r['after_3_vs_alone']:.2f}x alone)\n"
            f"  normalize + evaluate one set:       {r['evaluate_one']:7.2f} s   "
            f"(re-evaluating all 4: ~{r['all_4_estimate']:.1f} s)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--null-size", type=int, default=10000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-import-eval-") as tmp:
        results = run(Path(tmp), a.repeats, a.null_size)
    save_results(results, a.out, table(results))
    return results


@pytest.mark.benchmark
@pytest.mark.timeout(900)
def test_a_new_import_does_not_recompute_earlier_ones(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BIOEMBED_FSYNC", "0")
    results = main(["--repeats", "1", "--out", str(tmp_path / "r.json")])
    assert results["after_3_vs_alone"] <= MAX_RATIO


if __name__ == "__main__":
    main()
