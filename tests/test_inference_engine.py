"""The embedding engine on CPU: the same numbers as the plain path, bounded memory, clean failures, resume.

Real crops: 64 px windows of the six-channel pediatric-atlas Cell Painting field in ../shared/data
(uint16, as the microscope wrote them), stored at 48 px so every batch is resized on the way in.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import tifffile
import torch
import zarr

from bioembed_assets import pipeline
from bioembed_assets import schema as s
from bioembed_assets.config import Home
from bioembed_assets.encoders import build_encoder
from bioembed_assets.encoders.base import EMBEDDING
from bioembed_assets.inference import EmbeddingRun, EngineOptions, embed_crop_store, resize_crops
from bioembed_assets.inference.devices import batch_for_memory, is_out_of_memory, resolve_precision
from bioembed_assets.inference.reader import THREAD_PREFIX, NonFiniteCropsError
from bioembed_assets.registry import EncoderVersion
from bioembed_assets.store.lake import Lake, features_to_numpy

from .conftest import SHARED_DATA

FIELD = SHARED_DATA / "cellpainting-fields-cytodataframe/tests/data/cytotable/pediatric_cancer_atlas_profiling/images/orig"
STAINS = ["Brightfield", "ER", "AGP", "Mito", "DNA", "RNA"]  # ch1..ch6, per the data README
STORED = 48


def real_crops(n: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """`n` windows of the real field (the ones with most DNA signal), resized to STORED px, and DNA masks."""
    if not FIELD.is_dir():
        pytest.skip(f"{FIELD} is absent")
    field = np.stack([tifffile.imread(FIELD / f"r03c03f03p01-ch{c}sk1fk1fl1.tiff") for c in range(1, 7)])
    g = field.shape[-1] // size
    windows = field[:, : g * size, : g * size].reshape(6, g, size, g, size).transpose(1, 3, 0, 2, 4)
    windows = windows.reshape(g * g, 6, size, size)
    order = np.argsort(-windows[:, 4].mean(axis=(1, 2)), kind="stable")
    picked = np.ascontiguousarray(windows[order[: min(n, len(order))]])
    reps = -(-n // len(picked))
    picked = np.concatenate([picked] * reps)[:n]
    masks = picked[:, 4] > np.median(picked[:, 4], axis=(1, 2), keepdims=True)
    return resize_crops(picked, masks, STORED)


def write_store(path: Path, images: np.ndarray, masks: np.ndarray, channels: list[str], chunk: int = 16) -> Path:
    group = zarr.open_group(str(path), mode="w")
    n, c, h, w = images.shape
    group.create_array("images", shape=images.shape, chunks=(chunk, c, h, w), dtype=images.dtype)[:] = images
    group.create_array("masks", shape=masks.shape, chunks=(chunk, h, w), dtype="bool")[:] = masks
    group.attrs["channels"] = channels
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images, masks = real_crops(40)
    return write_store(tmp_path_factory.mktemp("engine") / "crops.zarr", images, masks, STAINS)


ENCODERS = {  # the families whose tensor path the engine drives, channel-agnostic and fixed-channel
    "ca_mae": dict(family="ca_mae", preset="demo"),
    "supervised_cnn": dict(family="supervised_cnn", channels=STAINS[1:], backbone="resnet18", input_size=64),
    "vqvae": dict(family="vqvae", channels=STAINS[1:], latent_dim=32, input_size=64),
    "timm": dict(family="timm", model_name="resnet18", channels=STAINS[1:4], input_size=64),
}


def make(name: str):
    kwargs = dict(ENCODERS[name])
    return build_encoder(kwargs.pop("family"), **kwargs)


def plain_path(encoder, store: Path, batch_size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The engine before: whole-store reads, host resize back to uint16, then the numpy `embed`."""
    group = zarr.open_group(str(store), mode="r")
    wanted = encoder.spec.channels
    idx = list(range(len(STAINS))) if wanted is None else [STAINS.index(c) for c in wanted]
    images, masks = group["images"][:][:, idx], group["masks"][:]
    names = getattr(encoder, "output_names", None) or {}
    embs, sides = [], {k: [] for k in names}
    for i in range(0, len(images), batch_size):
        imgs, msks = resize_crops(images[i:i + batch_size], masks[i:i + batch_size], encoder.spec.input_size)
        if names:
            emb, side = encoder.embed_with_outputs(imgs, msks)
            for k in names:
                sides[k].append(side[k])
        else:
            emb = encoder.embed(imgs, msks)
        embs.append(emb)
    return np.concatenate(embs), {k: np.concatenate(v) for k, v in sides.items()}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_engine_equals_the_plain_path_in_fp32(store: Path, name: str) -> None:
    encoder = make(name)
    expected, expected_side = plain_path(encoder, store, batch_size=16)
    run = EmbeddingRun(encoder, store, EngineOptions(batch_size=16, precision="fp32", workers=2))
    batches = list(run)
    assert [b.start for b in batches] == [0, 16, 32] and run.precision == "fp32"
    got = np.concatenate([b.embeddings for b in batches])
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    for key, values in expected_side.items():
        np.testing.assert_allclose(np.concatenate([b.outputs[key] for b in batches]), values, rtol=0, atol=1e-6)
    # a different batch size and reader count change nothing but the batching
    np.testing.assert_allclose(embed_crop_store(encoder, store, options=EngineOptions(batch_size=7, workers=1)),
                               expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["ca_mae", "supervised_cnn", "vqvae"])
def test_bf16_agrees_with_fp32_per_crop(store: Path, name: str) -> None:
    """bf16 autocast (the GPU default) against fp32 on real crops: cosine >= 0.999 for every crop."""
    encoder = make(name)
    fp32 = embed_crop_store(encoder, store, options=EngineOptions(batch_size=20, precision="fp32"))
    bf16 = embed_crop_store(encoder, store, options=EngineOptions(batch_size=20, precision="bf16"))
    assert not np.array_equal(fp32, bf16)  # bf16 really ran
    cos = (fp32 * bf16).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    assert cos.min() >= 0.999, f"{name}: worst per-crop cosine {cos.min():.5f}"


def test_precision_and_batch_size_choices() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int8", cpu)
    assert batch_for_memory(free_bytes=10 * 2**30, bytes_per_crop=50 * 2**20) == 136  # 0.7 * 10 GiB / 50 MiB
    assert batch_for_memory(free_bytes=2**20, bytes_per_crop=2**30) == 1
    assert batch_for_memory(free_bytes=2**40, bytes_per_crop=1) == 2048
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(ValueError("out of memory"))


class DeviceLimit:
    """A real encoder behind a memory limit: a forward of more than `limit` crops raises the
    out-of-memory error a GPU raises (there is no GPU here to exhaust)."""

    def __init__(self, encoder, limit: int) -> None:
        self.inner, self.limit, self.spec, self.calls = encoder, limit, encoder.spec, []

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def embed_tensors(self, images: torch.Tensor, masks: torch.Tensor | None) -> dict[str, torch.Tensor]:
        self.calls.append(images.shape[0])
        if images.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory trying a batch of {images.shape[0]}")
        return self.inner.embed_tensors(images, masks)


def test_a_batch_too_large_for_memory_is_split_not_failed(store: Path, caplog: pytest.LogCaptureFixture) -> None:
    encoder = make("ca_mae")
    expected = embed_crop_store(encoder, store, options=EngineOptions(batch_size=32))
    limited = DeviceLimit(encoder, limit=10)
    with caplog.at_level(logging.WARNING, logger="bioembed_assets.inference.engine"):
        got = embed_crop_store(limited, store, options=EngineOptions(batch_size=32))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert max(limited.calls[limited.calls.index(8):]) <= 10  # 32 -> 16 -> 8, then 8 for the rest
    assert "did not fit in cpu memory; continuing with 16" in caplog.text
    with pytest.raises(RuntimeError, match="one crop at 64 px does not fit in cpu memory"):
        embed_crop_store(DeviceLimit(encoder, limit=0), store, options=EngineOptions(batch_size=4))


def _failing_backend(graph, example_inputs):
    raise RuntimeError("this platform has no compiler for the graph")


def test_compile_runs_and_a_compile_failure_falls_back_to_eager(store: Path, caplog: pytest.LogCaptureFixture) -> None:
    encoder = make("ca_mae")
    expected = embed_crop_store(encoder, store, options=EngineOptions(batch_size=16))
    # aot_eager traces through AOTAutograd as inductor does, without needing a C++ toolchain
    compiled = EmbeddingRun(encoder, store, EngineOptions(batch_size=16, compile=True, compile_backend="aot_eager"))
    np.testing.assert_allclose(np.concatenate([b.embeddings for b in compiled]), expected, rtol=0, atol=1e-5)
    assert compiled.compiled  # the padded last batch (8 of 16) kept the compiled graph
    with caplog.at_level(logging.WARNING, logger="bioembed_assets.inference.engine"):
        run = EmbeddingRun(encoder, store, EngineOptions(batch_size=16, compile=True, compile_backend=_failing_backend))
        got = np.concatenate([b.embeddings for b in run])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert not run.compiled and "torch.compile failed" in caplog.text and "eager mode" in caplog.text


def _reader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


class FailsAt:
    """A real encoder that fails on its `n`-th batch (as a bad crop would)."""

    def __init__(self, encoder, n: int) -> None:
        self.inner, self.n, self.spec, self.seen = encoder, n, encoder.spec, 0

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def embed_tensors(self, images: torch.Tensor, masks: torch.Tensor | None) -> dict[str, torch.Tensor]:
        self.seen += 1
        if self.seen == self.n:
            raise ValueError("crop 2 of this batch is unreadable")
        return self.inner.embed_tensors(images, masks)


def test_workers_shut_down_on_an_error_and_the_error_names_the_crops(store: Path) -> None:
    before = _reader_threads()
    with pytest.raises(ValueError, match=r"crops\.zarr, crops 16\.\.23 \(the cells table's crop_index\): crop 2"):
        embed_crop_store(FailsAt(make("ca_mae"), 3), store, options=EngineOptions(batch_size=8, workers=3))
    assert _reader_threads() == before
    # a consumer that stops early also joins the workers
    run = iter(EmbeddingRun(make("ca_mae"), store, EngineOptions(batch_size=8, workers=3)))
    next(run)
    run.close()
    assert _reader_threads() == before


def test_nan_pixels_of_a_float_store_are_refused_naming_the_crops(tmp_path: Path) -> None:
    images, masks = real_crops(12)
    images = images.astype(np.float32) / 257.0
    images[5, 2, 3, 3] = np.nan
    images[9, 0, 0, 0] = np.inf
    path = write_store(tmp_path / "float.zarr", images, masks, STAINS, chunk=4)
    before = _reader_threads()
    with pytest.raises(NonFiniteCropsError, match=r"float\.zarr: crops \[5\] .*NaN or infinite pixels"):
        embed_crop_store(make("ca_mae"), path, options=EngineOptions(batch_size=8, workers=2))
    assert _reader_threads() == before
    images[5, 2, 3, 3], images[9, 0, 0, 0] = 1.0, 1.0  # clean float crops embed like their uint16 originals
    clean = write_store(tmp_path / "clean.zarr", images, masks, STAINS, chunk=4)
    assert np.isfinite(embed_crop_store(make("ca_mae"), clean, options=EngineOptions(batch_size=8))).all()


# -- the embeddings step: streaming into the lake, resume, crash -----------------------------------


def make_plate(home: Home, plate: str, n: int) -> None:
    images, masks = real_crops(n)
    write_store(home.crop_store(plate), images, masks, STAINS)
    wells = [f"A{1 + i % 4:02d}" for i in range(n)]
    cells = pl.DataFrame({
        s.PLATE: [plate] * n, s.WELL: wells, s.SITE: [1] * n, s.FIELD: [1] * n,
        s.CELL_ID: [f"{w}-s1-{i}" for i, w in enumerate(wells)], "label": list(range(1, n + 1)),
        "centroid_y": [32.0] * n, "centroid_x": [32.0] * n, "area": [100] * n, "crop_index": list(range(n))})
    Lake(home.lake).write("cells", cells, plate=plate)


def test_embed_plate_streams_rows_resumes_and_a_crash_leaves_no_rows(tmp_path: Path) -> None:
    home = Home(root=tmp_path / "home").ensure()
    lake = Lake(home.lake)
    for plate, n in (("P1", 24), ("P2", 40)):
        make_plate(home, plate, n)
    version = EncoderVersion("vqvae", "1", run_id="test", tags={})
    encoder = make("vqvae")
    options = EngineOptions(batch_size=16, workers=2)
    first = pipeline.embed_plate(home, "P1", encoder, version, engine=options)
    assert first["reused"] is False and first["cells"] == 24 and set(first["stages"]) >= {"read", "model", "write"}
    with pytest.raises(ValueError, match="crops 16..31"):  # P2 crashes on its second batch
        pipeline.embed_plate(home, "P2", FailsAt(encoder, 2), version, engine=options)
    assert lake.partitions("embeddings", plate="P2") == [] and lake.partitions("cell_outputs", plate="P2") == []
    assert not list((home.lake / "embeddings").rglob(".tmp-*"))
    # the resumed run skips the finished plate and embeds the crashed one whole
    summaries = {p: pipeline.embed_plate(home, p, encoder, version, engine=options) for p in ("P1", "P2")}
    assert summaries["P1"]["reused"] is True and summaries["P2"]["reused"] is False
    rows = lake.read("embeddings", encoder="vqvae", version="1", plate="P2")
    cells = lake.read("cells", plate="P2").sort("crop_index")
    assert rows[s.CELL_ID].to_list() == cells[s.CELL_ID].to_list()
    expected, side = plain_path(encoder, home.crop_store("P2"), batch_size=16)
    np.testing.assert_allclose(features_to_numpy(rows), expected, rtol=0, atol=1e-6)
    codes = lake.read("cell_outputs", encoder="vqvae", version="1", plate="P2")
    assert codes.height == 40 and codes["output"].unique().to_list() == ["vq_codes"]
    np.testing.assert_array_equal(features_to_numpy(codes, "values"), side["vq_codes"])
    # forcing (reuse=False) embeds again
    assert pipeline.embed_plate(home, "P1", encoder, version, engine=options, reuse=False)["reused"] is False
    stats = lake.read("embedding_stats", plate="P2")
    assert stats["batch_size"].to_list() == [16] and stats["precision"].to_list() == ["fp32"]


PEAK_RSS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import pyarrow.parquet as pq
    from pathlib import Path
    from bioembed_assets import pipeline
    from bioembed_assets.config import Home
    from bioembed_assets.encoders import build_encoder
    from bioembed_assets.inference import EmbeddingRun, EngineOptions
    from bioembed_assets.registry import EncoderVersion
    from bioembed_assets.store.lake import Lake
    home, plate, n, mode = Home(root=Path(sys.argv[1])).ensure(), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    encoder = build_encoder("ca_mae", preset="demo", channelwise=True, num_channels=6, img_size=16, embed_dim=256)
    options = EngineOptions(batch_size=256, workers=2)
    if mode == "stream":
        pipeline.embed_plate(home, plate, encoder, EncoderVersion("wide", "1", run_id="t", tags={}), engine=options)
        path = Lake(home.lake).partition_path("embeddings", encoder="wide", version="1", plate=plate)
        assert pq.ParquetFile(path).metadata.num_rows == n  # counted, not loaded
    else:  # the peer: the same engine, the plate's embeddings held in memory
        held = np.concatenate([b.embeddings for b in EmbeddingRun(encoder, home.crop_store(plate), options)])
        assert held.shape[0] == n
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps(peak))
""")


def _tiny_plate(home: Home, plate: str, n: int) -> None:
    rng = np.random.default_rng(0)
    base, masks = real_crops(64)
    base = base[:, :, :16, :16]
    images = np.concatenate([base] * (n // 64))
    images = (images + rng.integers(0, 50, size=images.shape, dtype=np.uint16)).astype(np.uint16)
    write_store(home.crop_store(plate), images, np.concatenate([masks[:, :16, :16]] * (n // 64)), STAINS, chunk=256)
    cells = pl.DataFrame({s.PLATE: [plate] * n, s.WELL: ["A01"] * n, s.SITE: [1] * n, s.FIELD: [1] * n,
                          s.CELL_ID: [f"c{i}" for i in range(n)], "label": [1] * n, "centroid_y": [0.0] * n,
                          "centroid_x": [0.0] * n, "area": [1] * n, "crop_index": list(range(n))})
    Lake(home.lake).write("cells", cells, plate=plate)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
def test_peak_memory_does_not_grow_with_the_plate(tmp_path: Path) -> None:
    """Peak RSS of the embeddings step on a plate of 2,048 and of 32,768 crops, each in a fresh process,
    against a peer in the same run: the same engine holding the plate's embeddings in memory.

    The embedding is 6 x 256 = 1,536 float32 per crop, so holding the larger plate's rows takes at least
    30,720 x 6 KiB = 180 MiB more (measured: ~400 MiB, the batches and their concatenation). Streaming
    holds a few batches of 256 rows: its growth must stay under 30 % of the peer's (the rest is the larger
    cells table and allocator noise, up to ~45 MiB on a busy 2-core machine)."""
    home = Home(root=tmp_path / "home").ensure()
    sizes = {"SMALL": 2048, "LARGE": 32768}
    for plate, n in sizes.items():
        _tiny_plate(home, plate, n)
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}  # fewer per-thread malloc arenas: less RSS noise
    peaks: dict[str, dict[str, int]] = {"stream": {}, "hold": {}}
    for mode in peaks:
        for plate, n in sizes.items():
            out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(home.root), plate, str(n), mode],
                                 capture_output=True, text=True, timeout=600, check=False, env=env)
            assert out.returncode == 0, out.stderr[-2000:]
            peaks[mode][plate] = json.loads(out.stdout.strip().splitlines()[-1])
    growth = {mode: p["LARGE"] - p["SMALL"] for mode, p in peaks.items()}
    assert growth["hold"] > 180 * 2**20, f"the peer should hold >= 180 MiB more on the larger plate: {peaks}"
    assert growth["stream"] < 0.3 * growth["hold"], (
        f"peak RSS grew {growth['stream'] / 2**20:.1f} MiB streaming vs {growth['hold'] / 2**20:.1f} MiB "
        f"holding the plate, from 2,048 to 32,768 crops: {peaks}")


def test_tensor_outputs_carry_the_embedding_key(store: Path) -> None:
    encoder = make("vqvae")
    x = torch.rand(2, 5, 64, 64) * 255
    with torch.inference_mode():
        out = encoder.embed_tensors(x, None)
    assert set(out) == {EMBEDDING, "vq_codes"} and out[EMBEDDING].shape == (2, encoder.spec.embedding_dim)
