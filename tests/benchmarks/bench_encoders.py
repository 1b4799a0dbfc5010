"""Embedding throughput per encoder family: the engine (pipeline) vs the bare model on the same batches.

For each family, on the same N random uint16 crops (5 stains, 64 px, a disk mask per crop), in one
process, interleaved over `--rounds` (best round kept):
- `pipeline`: `inference.embed_crop_store_with_outputs` from a zarr crop store, as `pipeline.embed_plate`
  runs it (chunked reads on a background thread, channel selection, resize to the encoder's input size,
  side outputs such as SubCell's localization);
- `embed`: the encoder's own `embed(images, masks)` on in-memory batches already at its input size
  (its preprocessing + forward, no store, resize or side outputs);
- `forward` (trainable families): the torch module's forward on standardized batches already on the
  device (`encoder._features`, inference mode), the floor any engine can reach.
The ratios pipeline/embed and pipeline/forward (crops/s over crops/s, < 1 = slower) are the engine's
overhead; absolute crops/s are of this machine and noisy. Plain torch + the library (no Dagster), so it
runs on a GPU machine as it is:

    uv run --frozen python tests/benchmarks/bench_encoders.py [--device cuda] [--crops 512] [--families vae,mae]
    uv run --frozen pytest -m benchmark tests/benchmarks/bench_encoders.py -s

Writes `bench-results/encoders.json`.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from bioembed_assets.encoders import build_encoder
from bioembed_assets.encoders.base import Encoder
from bioembed_assets.inference import embed_crop_store_with_outputs, resize_crops, resolve_device
from tests.benchmarks import save_results

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench-results" / "encoders.json"
STAINS = ["DNA", "ER", "RNA", "AGP", "Mito"]
SIZE = 64
FAMILIES: dict[str, dict] = {  # name -> build_encoder kwargs (the DEFAULT_ENCODERS settings, small presets)
    "classical": {"family": "classical", "channels": STAINS},
    "ca_mae": {"family": "ca_mae", "preset": "demo", "decoder": "demo"},
    "ae": {"family": "ae", "channels": STAINS, "latent_dim": 64, "input_size": SIZE},
    "vae": {"family": "vae", "channels": STAINS, "latent_dim": 64, "input_size": SIZE},
    "vqvae": {"family": "vqvae", "channels": STAINS, "latent_dim": 64, "input_size": SIZE},
    "mae": {"family": "mae", "channels": STAINS, "preset": "tiny"},
    "supervised_cnn": {"family": "supervised_cnn", "channels": STAINS, "backbone": "resnet18", "input_size": SIZE},
    "timm_resnet18": {"family": "timm", "model_name": "resnet18", "channels": STAINS, "input_size": SIZE},
    "subcell_tiny": {"family": "subcell", "preset": "tiny", "num_classifiers": 2},
    "subcell_vit_b": {"family": "subcell", "num_classifiers": 1},  # the published architecture, 448 px
    "shape_embed": {"family": "shape_embed"},
}
DEFAULT = [f for f in FAMILIES if f != "subcell_vit_b"]


def write_crop_store(root: Path, n: int, seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray]:
    """A crop store of `n` random uint16 crops with disk masks, as `segment.crops` writes one."""
    import zarr

    rng = np.random.default_rng(seed)
    images = rng.integers(100, 4000, size=(n, len(STAINS), SIZE, SIZE), dtype=np.uint16)
    yy, xx = np.mgrid[:SIZE, :SIZE] - SIZE / 2
    radius = rng.uniform(10, 24, size=(n, 1, 1))
    masks = (yy**2 + xx**2)[None] < radius**2
    path = root / "crops.zarr"
    group = zarr.open_group(str(path), mode="w")
    group.create_array("images", data=images, chunks=(64, len(STAINS), SIZE, SIZE))
    group.create_array("masks", data=masks, chunks=(64, SIZE, SIZE))
    group.attrs["channels"] = STAINS
    return path, images, masks


def _best(fn: Callable[[], object], n: int, rounds: int) -> float:
    """Best crops/s of `rounds` calls of `fn`, each over `n` crops."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return n / best


def _forward_fn(encoder: Encoder, batches: list[np.ndarray]) -> Callable[[], object] | None:
    """The bare module forward over standardized device batches, for adapters that implement `_features`."""
    from bioembed_assets.encoders.autoencoder import TrainableAdapter, eval_mode

    if not isinstance(encoder, TrainableAdapter) or type(encoder)._features is TrainableAdapter._features:
        return None  # its forward needs more than images (e.g. ShapeEmbed's masks): `embed` is its floor
    features, module = encoder._features, encoder.module
    from bioembed_assets.encoders.camae import self_standardize, to_0_255

    device = encoder.device
    prepared = [self_standardize(torch.from_numpy(to_0_255(b)).to(device)) for b in batches]

    def forward() -> None:
        with eval_mode(module), torch.inference_mode():
            for x in prepared:
                features(x)
    return forward


def bench_family(name: str, store: Path, images: np.ndarray, masks: np.ndarray, device: torch.device,
                 batch_size: int, rounds: int) -> dict:
    kwargs = dict(FAMILIES[name])
    encoder = build_encoder(kwargs.pop("family"), **kwargs)
    if hasattr(encoder, "to"):
        encoder.to(device)
    n = images.shape[0]
    size = encoder.spec.input_size
    channels = [STAINS.index(c) for c in encoder.spec.channels] if encoder.spec.channels else list(range(len(STAINS)))
    batches = [resize_crops(images[i:i + batch_size][:, channels], masks[i:i + batch_size], size)
               for i in range(0, n, batch_size)]
    pipeline = lambda: embed_crop_store_with_outputs(encoder, store, batch_size=batch_size)  # noqa: E731
    embed = lambda: [encoder.embed(b, m) for b, m in batches]  # noqa: E731
    forward = _forward_fn(encoder, [b for b, _ in batches])
    pipeline()  # warm-up (allocations, cuDNN autotune, lazy imports)
    timings = {"pipeline": [], "embed": [], "forward": []}
    for _ in range(rounds):  # interleaved, so machine noise hits all alike
        timings["pipeline"].append(_best(pipeline, n, 1))
        timings["embed"].append(_best(embed, n, 1))
        if forward is not None:
            timings["forward"].append(_best(forward, n, 1))
    row = {"family": name, "dim": encoder.spec.embedding_dim, "input_size": size, "crops": n,
           "pipeline_crops_per_s": max(timings["pipeline"]), "embed_crops_per_s": max(timings["embed"]),
           "forward_crops_per_s": max(timings["forward"]) if forward is not None else None}
    row["pipeline_over_embed"] = row["pipeline_crops_per_s"] / row["embed_crops_per_s"]
    row["pipeline_over_forward"] = (row["pipeline_crops_per_s"] / row["forward_crops_per_s"]
                                    if forward is not None else None)
    return row


def run(families: list[str], device: str = "auto", crops: int = 256, batch_size: int = 64, rounds: int = 3) -> dict:
    torch.manual_seed(0)
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        store, images, masks = write_crop_store(Path(tmp), crops)
        rows = [bench_family(f, store, images, masks, dev, batch_size, rounds) for f in families]
    return {"device": str(dev), "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
            "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "batch_size": batch_size, "rows": rows}


def format_table(result: dict) -> str:
    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [f"device {result['device']} {result['gpu'] or ''} ({result['threads']} threads), "
             f"batch {result['batch_size']}",
             "| family | dim | input | pipeline crops/s | embed crops/s | forward crops/s | pipeline/embed "
             "| pipeline/forward |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['family']} | {r['dim']} | {r['input_size']} | {r['pipeline_crops_per_s']:.0f} "
                     f"| {r['embed_crops_per_s']:.0f} | {fmt(r['forward_crops_per_s'], '.0f')} "
                     f"| {r['pipeline_over_embed']:.2f} | {fmt(r['pipeline_over_forward'], '.2f')} |")
    return "\n".join(lines)


@pytest.mark.benchmark
def test_pipeline_overhead_per_family() -> None:
    result = run(["vae", "vqvae", "shape_embed", "subcell_tiny"], "cpu", crops=128, batch_size=64, rounds=2)
    print(format_table(result))
    for row in result["rows"]:  # ratios only, never an absolute time
        assert row["pipeline_over_embed"] > 0.3, row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(DEFAULT), help=f"of {list(FAMILIES)}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--crops", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.families.split(","), args.device, args.crops, args.batch_size, args.rounds)
    save_results(result, args.out, format_table(result))


if __name__ == "__main__":
    main()
