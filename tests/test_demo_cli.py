"""`bioembed demo` end to end through the console script, twice on the same home; the README's demo
tables are the ones it produces."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bioembed_assets.config import Home
from bioembed_assets.report import README_BEGIN, README_END
from bioembed_assets.store.catalog import connect

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def _cli(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "BIOEMBED_HOME")}
    proc = subprocess.run([sys.executable, "-m", "dagster_project.cli", *args], capture_output=True, text=True,
                          env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _counts(home: Path) -> dict[str, int]:
    with connect(Home(root=home).catalog_path) as con:
        return {v: con.sql(f"SELECT count(*) FROM {v}").fetchone()[0]
                for v in ("cells", "embeddings", "profiles", "normalized_profiles", "metrics", "replicate_map")}


def test_demo_reports_matches_the_readme_and_is_safe_to_rerun(tmp_path: Path) -> None:
    home = tmp_path / "demo-home"
    out = _cli("demo", "--home", str(home))  # the README's demo: default plates, seed and training
    for expected in ("Per encoder", "ca_mae", "classical", "rep mAP", "nonrep mAP", "NSC", "plate kNN", "Ground truth",
                     "DuckDB catalog:", "Example query", "dagster dev", "mlflow ui", "Finished in", "untrained",
                     "Learning loop (ca_mae)", "challenger v2", "Promotion rule:", "Stage times:", "train "):
        assert expected in out, expected
    assert ("Promoted:" in out and "embeddings/ca_mae (4)" in out) or "Not promoted" in out
    assert "shape: (" not in out and "nan" not in out.lower().split()  # tables without polars' header or bare NaN
    readme = README.read_text()
    in_readme = readme[readme.index(README_BEGIN):readme.index(README_END) + len(README_END)]
    report = _cli("report", "--home", str(home), "--markdown").rstrip("\n")
    assert report == in_readme, ("README.md's demo tables are stale: regenerate them with "
                                 f"`bioembed report --markdown --home DIR --update-readme README.md`\n{report}")
    first = _counts(home)
    assert all(n > 0 for n in first.values()), first
    _cli("demo", "--home", str(home), "--no-train")  # the same plates again: every partition replaced, no duplicates
    assert _counts(home) == first
