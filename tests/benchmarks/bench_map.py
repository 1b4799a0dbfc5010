"""Benchmark: activity mAP with p-values (ours, `evaluate.pairs` + `evaluate.nulls`) against copairs 0.5.5.

Data: `generate_profiles` (peers.md §5.1 layout: 1536-well plates with 300 controls, 4 replicates
per perturbation on different plates, 2 % dropout; 384 float32 features) at 10k / 50k / 200k / 1M
nominal wells, generated once into a temporary folder (features as .npy, metadata as parquet).

Each case runs in a fresh subprocess that loads the data and times only the library calls
("op"): for ours `activity_average_precision` (reference-index recipe, negatives = controls of
the query's plate or all controls) + `mean_average_precision_by` (null_size 10,000, default
"exact" null); for copairs `assign_reference_index` + `average_precision` +
`mean_average_precision` (cache_dir in a temporary folder). Peak RSS is the child's
VmHWM (data included; loading 1M x 384 float32 alone holds ~1.6 GB) and, separately, the
peak sampled every 5 ms during the op. Cases: ours and copairs at 10k (plate and all-controls
negatives) and 50k (plate negatives), ours alone at 50k all-controls, 200k and 1M (plate
negatives); `--full` adds ours at 200k with all controls (~1-2 min). copairs with all-controls
negatives is never run at 50k (it fails after ~9 minutes, peers.md §5.3).

At 10k it also reports the agreement with copairs: max |ΔAP| (float32 features: near-ties only),
identical n_pos/n_total/NaN rows, and how many mAP p-values of our `null="copairs"` mode equal
copairs' bit for bit. Writes `bench-results/map.json` and prints a table. Run::

    uv run --frozen python tests/benchmarks/bench_map.py            # ~5-8 minutes on 2 cores
    uv run --frozen python tests/benchmarks/bench_map.py --sizes 10k 50k   # the copairs comparisons only
    uv run --frozen pytest tests/benchmarks/bench_map.py -m benchmark -p no:logging -s
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench-results" / "map.json"
SIZES = {"10k": 10_000, "50k": 50_000, "200k": 200_000, "1m": 1_000_000}
NULL_SIZE = 10_000
CASES = [  # (impl, size, negatives)
    ("ours", "10k", "plate"), ("copairs", "10k", "plate"),
    ("ours", "10k", "all"), ("copairs", "10k", "all"),
    ("ours", "50k", "plate"), ("copairs", "50k", "plate"),
    ("ours", "50k", "all"),
    ("ours", "200k", "plate"),
    ("ours", "1m", "plate"),
]  # fmt: skip
FULL_CASES = [("ours", "200k", "all")]
CASE_TIMEOUT_S = 600


# --------------------------------------------------------------------------- child process


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _hwm_mb() -> float:
    """Peak RSS of this process image (VmHWM; unlike ru_maxrss it does not carry the parent's
    peak over fork + exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1e3


class _PeakSampler:
    """Peak RSS of this process while the `with` block runs (sampled every 5 ms)."""

    def __enter__(self) -> _PeakSampler:
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())


def run_case(impl: str, size: str, neg: str, data: Path, save: Path | None) -> dict:
    """One case in this process (called in a fresh subprocess by `run`)."""
    import polars as pl

    meta = pl.read_parquet(data / size / "meta.parquet")
    X = np.load(data / size / "X.npy")
    loaded = _rss_mb()
    neg_sameby = ["plate"] if neg == "plate" else []
    out: dict = {"impl": impl, "size": size, "negatives": neg, "rows": meta.height, "loaded_rss_mb": round(loaded)}
    if impl == "ours":
        from bioembed_assets.evaluate.pairs import activity_average_precision
        from bioembed_assets.evaluate.retrieval import mean_average_precision_by

        with _PeakSampler() as mem:
            t0 = time.perf_counter()
            ap = activity_average_precision(meta, X, "perturbation", pl.col("control_type") == "negative",
                                            neg_sameby=neg_sameby)
            t1 = time.perf_counter()
            res = mean_average_precision_by(ap, ["perturbation"], NULL_SIZE, seed=0)
            t2 = time.perf_counter()
        ap_v, n_pos, n_total = (ap[c].to_numpy() for c in ("average_precision", "n_pos_pairs", "n_total_pairs"))
        perts, below = res["perturbation"].to_list(), res["below_corrected_p"].to_numpy()
        maps = res["mean_average_precision"].to_numpy()
        if save is not None:  # copairs-mode p-values for the agreement check (not timed)
            cop = mean_average_precision_by(ap, ["perturbation"], NULL_SIZE, seed=0, null="copairs")
            np.save(save / f"ours_{size}_{neg}_p_copairs.npy", cop["p_value"].to_numpy())
    else:
        from copairs import map as cmap
        from copairs.matching import assign_reference_index

        pm = meta.to_pandas()
        with tempfile.TemporaryDirectory() as cache, _PeakSampler() as mem:
            t0 = time.perf_counter()
            m = assign_reference_index(pm, "control_type == 'negative'", reference_col="ref", default_value=-1)
            ap = cmap.average_precision(m, X, ["perturbation", "ref"], [], neg_sameby, ["perturbation", "ref"],
                                        progress_bar=False)
            t1 = time.perf_counter()
            res = cmap.mean_average_precision(ap, ["perturbation"], NULL_SIZE, 0.05, 0, progress_bar=False, cache_dir=cache)
            t2 = time.perf_counter()
        res = res.sort_values("perturbation")
        ap_v, n_pos, n_total = (ap[c].to_numpy() for c in ("average_precision", "n_pos_pairs", "n_total_pairs"))
        perts, below = res["perturbation"].tolist(), res["below_corrected_p"].to_numpy()
        maps = res["mean_average_precision"].to_numpy()
        if save is not None:
            np.save(save / f"copairs_{size}_{neg}_p.npy", res["p_value"].to_numpy())
    if save is not None:
        np.save(save / f"{impl}_{size}_{neg}_ap.npy", np.stack([ap_v.astype(np.float64), n_pos, n_total]))
    active = dict(zip(meta["perturbation"].to_list(), meta["active"].to_list()))
    act = np.array([active[p] for p in perts])
    confs = np.unique(np.stack([n_pos, n_total], 1)[(n_pos > 0) & ~np.isnan(ap_v.astype(float))], axis=0)
    out |= {
        "op_s": round(t2 - t0, 3), "ap_s": round(t1 - t0, 3), "map_s": round(t2 - t1, 3),
        "peak_rss_mb": round(_hwm_mb()),
        "op_peak_rss_mb": round(mem.peak), "pairs": int((n_pos.sum() + (n_total - n_pos).sum()) // 2),
        "null_configs": len(confs), "groups": len(perts), "mean_map": round(float(np.mean(maps)), 4),
        "retrieved_active": round(float(below[act].mean()), 3), "retrieved_inactive": round(float(below[~act].mean()), 3),
    }  # fmt: skip
    return out


# --------------------------------------------------------------------------- driver


def _make_data(root: Path, size: str) -> None:
    import polars as pl

    from bioembed_assets.sources.synthetic_profiles import SyntheticProfilesConfig, generate_profiles

    (root / size).mkdir(parents=True, exist_ok=True)
    meta, X = generate_profiles(SyntheticProfilesConfig(n_rows=SIZES[size]))
    meta.with_columns(pl.col("moa").cast(pl.String)).write_parquet(root / size / "meta.parquet")
    np.save(root / size / "X.npy", X)


def _agreement(save: Path, neg: str) -> dict:
    ours, ref = np.load(save / f"ours_10k_{neg}_ap.npy"), np.load(save / f"copairs_10k_{neg}_ap.npy")
    a, r = ours[0], ref[0]
    p_ours, p_ref = np.load(save / f"ours_10k_{neg}_p_copairs.npy"), np.load(save / f"copairs_10k_{neg}_p.npy")
    return {"negatives": neg, "max_abs_dAP": float(np.nanmax(np.abs(a - r))),
            "queries_with_dAP_gt_1e-9": int(np.nansum(np.abs(a - r) > 1e-9)), "queries": int(np.sum(~np.isnan(r))),
            "same_nan_rows": bool((np.isnan(a) == np.isnan(r)).all()),
            "same_n_pos_n_total": bool((ours[1:] == ref[1:]).all()),
            "p_values_equal_copairs_mode": f"{int((p_ours == p_ref).sum())}/{p_ref.size}"}  # fmt: skip


def run(sizes: list[str] | None = None, full: bool = False, out: Path = RESULTS) -> dict:
    cases = [c for c in CASES + (FULL_CASES if full else []) if sizes is None or c[1] in sizes]
    results, agreement = [], []
    with tempfile.TemporaryDirectory(prefix="bench-map-") as tmp:
        data, save = Path(tmp) / "data", Path(tmp) / "save"
        save.mkdir()
        for size in dict.fromkeys(c[1] for c in cases):  # in a subprocess: this process stays small
            t = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--make-data", size, "--data", str(data)], check=True, cwd=REPO)
            print(f"data {size}: {time.perf_counter() - t:.1f} s", flush=True)
        for impl, size, neg in cases:
            cmd = [sys.executable, __file__, "--case", impl, size, neg, "--data", str(data)]
            if size == "10k":
                cmd += ["--save", str(save)]
            t = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CASE_TIMEOUT_S, cwd=REPO)
                if proc.returncode:
                    raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, RuntimeError) as e:
                res = {"impl": impl, "size": size, "negatives": neg, "status": f"failed: {e}"[:200]}
            res["process_wall_s"] = round(time.perf_counter() - t, 1)
            results.append(res)
            print(json.dumps(res), flush=True)
        for neg in ("plate", "all"):
            if all((save / f"{i}_10k_{neg}_ap.npy").exists() for i in ("ours", "copairs")):
                agreement.append(_agreement(save, neg))
    ratios = []
    for r in results:
        peer = next((c for c in results if c["impl"] == "copairs" and c["size"] == r["size"]
                     and c["negatives"] == r["negatives"] and "op_s" in c), None)  # fmt: skip
        if r["impl"] == "ours" and peer and "op_s" in r:
            ratios.append({"size": r["size"], "negatives": r["negatives"], "speedup": round(peer["op_s"] / r["op_s"], 1),
                           "peak_rss_ratio": round(r["peak_rss_mb"] / peer["peak_rss_mb"], 3),
                           "op_peak_rss_ratio": round(r["op_peak_rss_mb"] / peer["op_peak_rss_mb"], 3)})  # fmt: skip
    report = {
        "benchmark": "activity mAP + p-values (null_size 10,000): ours vs copairs 0.5.5, synthetic profiles x 384",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "cases": results, "ratios_vs_copairs": ratios, "agreement_10k": agreement,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    _print_table(report)
    return report


def _print_table(report: dict) -> None:
    cols = ["impl", "size", "negatives", "rows", "pairs", "null_configs", "ap_s", "map_s", "op_s", "peak_rss_mb",
            "op_peak_rss_mb", "mean_map", "retrieved_active", "retrieved_inactive"]  # fmt: skip
    print("\n" + " | ".join(cols))
    for r in report["cases"]:
        print(" | ".join(str(r.get(c, r.get("status", "-") if c == "ap_s" else "-")) for c in cols))
    for r in report["ratios_vs_copairs"]:
        print(f"{r['size']} {r['negatives']}: {r['speedup']}x faster than copairs, peak RSS x{r['peak_rss_ratio']} "
              f"(during op x{r['op_peak_rss_ratio']})")
    for a in report["agreement_10k"]:
        print(f"10k {a['negatives']}: max |dAP| {a['max_abs_dAP']:.2g} ({a['queries_with_dAP_gt_1e-9']} of {a['queries']} "
              f"queries differ), same pair counts: {a['same_n_pos_n_total']}, p-values equal (copairs mode): "
              f"{a['p_values_equal_copairs_mode']}")


@pytest.mark.benchmark
def test_bench_map(tmp_path: Path) -> None:
    report = run(out=RESULTS)
    by = {(r["impl"], r["size"], r["negatives"]): r for r in report["cases"]}
    assert all("op_s" in r for r in report["cases"] if r["impl"] == "ours"), "an ours case failed"
    for a in report["agreement_10k"]:
        assert a["same_n_pos_n_total"] and a["same_nan_rows"] and a["max_abs_dAP"] < 1e-3
    plate50 = next(r for r in report["ratios_vs_copairs"] if r["size"] == "50k" and r["negatives"] == "plate")
    assert plate50["speedup"] > 3 and plate50["peak_rss_ratio"] < 1  # lenient: the machine is shared
    assert by[("ours", "1m", "plate")]["peak_rss_mb"] < 24_000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), help="only cases of these sizes")
    ap.add_argument("--full", action="store_true", help="also ours at 200k with all-controls negatives")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--case", nargs=3, metavar=("IMPL", "SIZE", "NEG"), help=argparse.SUPPRESS)
    ap.add_argument("--make-data", choices=list(SIZES), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(*args.case, args.data, args.save)))
        return 0
    if args.make_data:
        _make_data(args.data, args.make_data)
        return 0
    run(args.sizes, args.full, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
