"""Training throughput: the training loop vs the bare forward+backward+step of the same model.

For the CA-MAE ViT-S/16 preset (OpenPhenom's encoder + decoder, 256 px crops) and the demo preset,
measures in one process, interleaved:
- `bare`: one fixed batch already on the device, `zero_grad / forward / backward / optimizer.step`
  (timm AdamW) repeated, no data loading, no scheduler, no checkpoints;
- `loop`: `training.loop.fit` on crop stores written to a temporary home (chunk-window reads from
  zarr, resize, worker process, scheduler, autocast on CUDA), crops/s over the training steps.
The ratio loop/bare is the loop's overhead. Plain torch + the library (no Dagster), so it runs on a
GPU machine as it is:

    uv run --frozen python tests/benchmarks/bench_training.py [--device cuda] [--out bench-results/training.json]

Also collected by pytest with `-m benchmark` (CPU, small step counts).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from bioembed_assets.config import Home
from bioembed_assets.encoders import build_encoder
from bioembed_assets.inference import resolve_device
from bioembed_assets.store.lake import Lake
from bioembed_assets.training.data import load_crop_set
from bioembed_assets.training.loop import Callbacks, TrainConfig, fit

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
PRESETS = {  # name -> (encoder config, crop size, batch, steps) on CPU; GPU uses larger batches
    "vit_small_patch16_256": ({"preset": "vit_small_patch16_256", "decoder": "openphenom"}, 256, 2, 3),
    "demo": ({"preset": "demo", "decoder": "demo"}, 64, 64, 12),
}


def write_crop_home(root: Path, size: int, n_cells: int, n_plates: int = 2, seed: int = 0) -> tuple[Home, list[str]]:
    """A home with `n_plates` crop stores of random uint16 crops and their cell/platemap tables."""
    import zarr

    home, rng, plates = Home(root=root).ensure(), np.random.default_rng(seed), []
    for p in range(n_plates):
        plate = f"BENCH-P{p + 1}"
        group = zarr.open_group(str(home.crop_store(plate)), mode="w")
        images = group.create_array("images", shape=(n_cells, len(CHANNELS), size, size),
                                    chunks=(64, len(CHANNELS), size, size), dtype="uint16")
        images[:] = rng.integers(0, 4000, size=images.shape, dtype=np.uint16)
        group.create_array("masks", shape=(n_cells, size, size), chunks=(64, size, size), dtype="bool")
        group.attrs["channels"] = CHANNELS
        wells = [f"{'ABCDEFGH'[i % 8]}{i // 8 + 1:02d}" for i in range(16)]
        cells = pl.DataFrame({"plate": plate, "well": [wells[i % 16] for i in range(n_cells)], "site": 1, "field": 0,
                              "cell_id": [f"c{i}" for i in range(n_cells)], "label": 1, "centroid_y": 0.0,
                              "centroid_x": 0.0, "area": 100, "crop_index": np.arange(n_cells)})
        lake = Lake(home.lake)
        lake.write("cells", cells, plate=plate)
        lake.write("platemap", pl.DataFrame({"plate": plate, "well": wells, "perturbation": [f"cpd{i % 4}" for i in
                                                                                              range(16)],
                                             "control_type": "treatment", "moa": None}), plate=plate)
        plates.append(plate)
    return home, plates


class _StepClock(Callbacks):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        if device_sync is not None:
            device_sync()
        self.times.append(time.perf_counter())


device_sync = None


def bare_crops_per_s(encoder, batch: torch.Tensor, steps: int) -> float:
    from timm.optim import create_optimizer_v2

    module = encoder.training_module(["a", "b"]).to(batch.device)
    module.train()
    opt = create_optimizer_v2(module, opt="adamw", lr=1e-4, weight_decay=0.05)
    labels = torch.zeros(batch.shape[0], dtype=torch.long, device=batch.device)
    from bioembed_assets.training.loop import autocast

    def step() -> None:
        with autocast(batch.device):
            loss = module(batch, labels)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocations, kernels)
    if device_sync:
        device_sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device_sync:
        device_sync()
    return steps * batch.shape[0] / (time.perf_counter() - t0)


def loop_crops_per_s(encoder, home: Home, plates: list[str], batch: int, steps: int, device: str,
                     workers: int) -> float:
    crop_set = load_crop_set(home, plates, val_fraction=0.0)
    config = TrainConfig(epochs=1, batch_size=batch, max_steps_per_epoch=steps + 1, warmup_epochs=0, patience=0,
                         device=device, num_workers=workers, val_fraction=0.0)
    clock = _StepClock()
    with tempfile.TemporaryDirectory() as ckpt:
        fit(encoder, crop_set, config, ckpt, callbacks=clock)
    # the first step (worker start-up, warm-up) is left out, as for the bare loop
    return steps * batch / (clock.times[-1] - clock.times[0])


def run(presets: list[str], device: str, rounds: int, workers: int, gpu_scale: int) -> dict:
    global device_sync
    dev = resolve_device(device)
    device_sync = torch.cuda.synchronize if dev.type == "cuda" else None
    out = {"device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(), "presets": {}}
    for name in presets:
        config, size, batch, steps = PRESETS[name]
        if dev.type == "cuda":
            batch, steps = batch * gpu_scale, steps * 4
        with tempfile.TemporaryDirectory() as tmp:
            home, plates = write_crop_home(Path(tmp), size, n_cells=max(2 * batch * (steps + 2), 128))
            rows = []
            for _ in range(rounds):  # interleaved: each round measures both on the same machine state
                enc = build_encoder("ca_mae", seed=0, **config)
                x = torch.rand(batch, len(CHANNELS), size, size, device=dev) * 255
                bare = bare_crops_per_s(enc.to(dev), x, steps)
                loop = loop_crops_per_s(build_encoder("ca_mae", seed=0, **config), home, plates, batch, steps,
                                        str(dev), workers)
                rows.append({"bare_crops_per_s": bare, "loop_crops_per_s": loop, "ratio": loop / bare})
        best = max(rows, key=lambda r: r["ratio"])
        out["presets"][name] = {"batch": batch, "steps": steps, "crop_size": size, "rounds": rows,
                                "median_ratio": float(np.median([r["ratio"] for r in rows])), "best": best}
        print(f"{name} on {dev}: bare {best['bare_crops_per_s']:.1f} crops/s, loop {best['loop_crops_per_s']:.1f} "
              f"crops/s, loop/bare {best['ratio']:.2f} (median {out['presets'][name]['median_ratio']:.2f} over "
              f"{rounds} rounds, batch {batch})", flush=True)
    return out


@pytest.mark.benchmark
def test_training_loop_overhead_is_small() -> None:
    result = run(["demo"], "cpu", rounds=2, workers=1, gpu_scale=1)
    assert result["presets"]["demo"]["best"]["ratio"] > 0.5  # a ratio, never an absolute time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="demo,vit_small_patch16_256")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--gpu-scale", type=int, default=16, help="batch multiplier on CUDA")
    parser.add_argument("--out", default="bench-results/training.json")
    args = parser.parse_args()
    result = run(args.presets.split(","), args.device, args.rounds, args.workers, args.gpu_scale)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
