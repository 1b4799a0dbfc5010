"""Benchmarks (marker `benchmark`): ratios against a peer or a limit measured in the same run."""

from __future__ import annotations

import json
from pathlib import Path


def save_results(results: list | dict, out: Path, table: str) -> None:
    """Write `results` as JSON to `out` and print the table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(table)
    print(f"\nwrote {out}")
