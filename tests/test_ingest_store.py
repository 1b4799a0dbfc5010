"""The plate store's fast ingest path: TIFFs decoded in place into a reused per-thread buffer and chunks
written straight to files must give exactly what `tifffile.imread` reads, for every store compressor,
and every input the fast path does not take must fall back to the checked path (same errors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from bioembed_assets.images import store as store_module
from bioembed_assets.images.store import _read_tiff_into, ingest_plate, open_plate_images
from bioembed_assets.schema import BioembedInputError
from bioembed_assets.sources.layouts import FieldFiles
from tests.conftest import entries

RNG = np.random.default_rng(7)
STAINS = ["DNA", "ER", "RNA"]


def plane(dtype=np.uint16, shape=(40, 48)) -> np.ndarray:
    return RNG.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


def plate(folder: Path, n_fields: int = 9, dtype=np.uint16, shape=(40, 48), **imwrite) -> list[FieldFiles]:
    """`n_fields` fields (distinct pixels each) of len(STAINS) TIFFs; returns them as FieldFiles."""
    folder.mkdir(parents=True, exist_ok=True)
    fields = []
    for f in range(n_fields):
        paths = {}
        for s in STAINS:
            paths[s] = folder / f"f{f:02d}-{s}.tif"
            tifffile.imwrite(paths[s], plane(dtype, shape), **imwrite)
        fields.append(FieldFiles("P1", f"A{f + 1:02d}", 1, paths))
    return fields


TIFF_VARIANTS = {
    "plain": {},
    "lzw": {"compression": "lzw"},
    "zlib-predictor": {"compression": "zlib", "predictor": True},
    "big-endian": {"byteorder": ">"},
    "strips": {"rowsperstrip": 7},
    "tiled": {"tile": (16, 16)},
    "imagej": {"imagej": True},
    "ome": {"ome": True},
}


@pytest.mark.parametrize("variant", sorted(TIFF_VARIANTS))
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_in_place_decode_is_tifffile_imread(tmp_path: Path, variant: str, dtype) -> None:
    path = tmp_path / "x.tif"
    shape = (48, 64) if variant == "tiled" else (41, 53)
    tifffile.imwrite(path, plane(dtype, shape), **TIFF_VARIANTS[variant])
    expected = tifffile.imread(path)
    out = np.full(expected.shape, 3, expected.dtype)
    assert _read_tiff_into(path, out)  # every one-page 2-D TIFF of the buffer's shape and dtype takes the fast path
    np.testing.assert_array_equal(out, expected)


def test_in_place_decode_declines_what_it_does_not_match(tmp_path: Path) -> None:
    out = np.empty((20, 30), np.uint16)
    cases = {
        "other_shape.tif": plane(np.uint16, (30, 20)),
        "other_dtype.tif": plane(np.uint8, (20, 30)),
        "two_pages.tif": np.stack([plane(np.uint16, (20, 30))] * 2),
        "rgb.tif": plane(np.uint16, (20, 30, 3)),
    }
    for name, data in cases.items():
        tifffile.imwrite(tmp_path / name, data)
        assert not _read_tiff_into(tmp_path / name, out), name
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, plane(np.uint16, (20, 30)))
    (tmp_path / "truncated.tif").write_bytes(good.read_bytes()[:-100])
    (tmp_path / "garbage.tif").write_bytes(b"not a tiff at all")
    for name in ("truncated.tif", "garbage.tif", "missing.tif"):
        assert not _read_tiff_into(tmp_path / name, out), name


@pytest.mark.parametrize("compressor", ["none", "lz4", "zstd"])
@pytest.mark.parametrize("variant", ["plain", "lzw", "big-endian"])
def test_store_pixels_and_qc_are_the_files(tmp_path: Path, compressor: str, variant: str) -> None:
    fields = plate(tmp_path / "raw", n_fields=11, **TIFF_VARIANTS[variant])
    store = tmp_path / "stores" / "P1.zarr"
    table = ingest_plate(fields, store, STAINS, workers=3, compressor=compressor)
    images, channels = open_plate_images(store)
    assert channels == STAINS and images.shape == (11, 3, 40, 48) and images.dtype == np.uint16
    level0 = images.field(10)
    assert level0.chunks == (1, 40, 48) and level0.shards == (3, 40, 48)
    data = images[:]
    np.testing.assert_array_equal(images[7, 2], tifffile.imread(fields[7].paths["RNA"]))  # one chunk of a shard
    for i, f in enumerate(fields):  # each field its own pixels: no buffer reused too early
        expected = np.stack([tifffile.imread(f.paths[s]) for s in STAINS])
        np.testing.assert_array_equal(data[i], expected)
        row = table.row(i, named=True)
        assert row["field"] == i and row["well"] == f.well
        for c, s in enumerate(STAINS):
            assert row[f"qc_mean_{s}"] == pytest.approx(float(expected[c].mean(dtype=np.float64)), rel=1e-12)
        top = np.iinfo(np.uint16).max
        assert row["qc_saturated_fraction"] == pytest.approx(max(float((p == top).mean()) for p in expected))
    field_dir = store / images.paths[10].rsplit("/", 1)[0]  # e.g. 'D/1/1': a well's site
    for level, shape in enumerate([(3, 40, 48), (3, 20, 24), (3, 10, 12)]):  # the pyramid
        (sharding,) = json.loads((field_dir / str(level) / "zarr.json").read_text())["codecs"]
        assert sharding["name"] == "sharding_indexed"
        codecs = [c["name"] for c in sharding["configuration"]["codecs"]]
        assert codecs == (["bytes"] if compressor == "none" else ["bytes", "blosc"])
        assert sorted(p.name for p in (field_dir / str(level)).iterdir()) == ["c.0.0.0", "zarr.json"]  # one shard file
        np.testing.assert_array_equal(zarr.open_array(field_dir / str(level))[:], data[10][:, :: 2**level, :: 2**level])
        assert zarr.open_array(field_dir / str(level)).shape == shape
    if compressor != "none":
        assert level0.compressors[0].cname.value == compressor
    assert entries(store.parent) == ["P1.zarr"]  # no temporary folder left


def test_uint8_and_non_file_sources(tmp_path: Path) -> None:
    fields = plate(tmp_path / "raw", n_fields=4, dtype=np.uint8)

    class Mem:  # a FieldSource that is not files: the checked path
        def __init__(self, f: FieldFiles) -> None:
            self.plate, self.well, self.site, self.stains = f.plate, f.well, f.site, tuple(f.paths)
            self.f = f

        def read(self, stain: str) -> np.ndarray:
            return tifffile.imread(self.f.paths[stain])

        def header(self, stain: str):
            return self.read(stain).shape, self.read(stain).dtype

        def location(self, stain: str) -> str:
            return f"mem:{self.f.paths[stain].name}"

    mixed = [fields[0], Mem(fields[1]), fields[2], Mem(fields[3])]
    store = tmp_path / "s" / "P1.zarr"
    ingest_plate(mixed, store, STAINS[::-1], workers=2)
    data = open_plate_images(store)[0][:]
    assert data.dtype == np.uint8
    for i, f in enumerate(fields):
        np.testing.assert_array_equal(data[i], np.stack([tifffile.imread(f.paths[s]) for s in STAINS[::-1]]))


def test_fallbacks_raise_the_checked_errors_and_leave_no_store(tmp_path: Path) -> None:
    store = tmp_path / "stores" / "P1.zarr"
    cases = [
        (lambda p: tifffile.imwrite(p, plane(np.uint16, (30, 48))), "fields of different shapes"),
        (lambda p: tifffile.imwrite(p, plane(np.uint8)), "mixed bit depth"),
        (lambda p: tifffile.imwrite(p, np.stack([plane()] * 2)), "expected a 2-D uint8/uint16 image"),
        (lambda p: p.write_bytes(p.read_bytes()[:-500]), "cannot read TIFF"),
    ]
    for k, (spoil, needle) in enumerate(cases):
        fields = plate(tmp_path / f"raw{k}", n_fields=8)
        victim = fields[6].paths["ER"] if needle != "fields of different shapes" else None
        if victim is None:  # a whole field at another shape
            for p in fields[6].paths.values():
                spoil(p)
            victim = fields[6].paths["DNA"]
        else:
            spoil(victim)
        with pytest.raises(BioembedInputError) as e:
            ingest_plate(fields, store, STAINS, workers=3)
        msg = str(e.value)
        assert needle in msg and "plate=P1" in msg and "well=A07" in msg and victim.name in msg, msg
        assert not store.exists() and entries(store.parent) == []


def test_unknown_compressor_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    fields = plate(tmp_path / "raw", n_fields=2)
    with pytest.raises(ValueError, match="compressor"):
        ingest_plate(fields, tmp_path / "s" / "P1.zarr", STAINS, compressor="gzip")  # type: ignore[arg-type]
    assert not (tmp_path / "s").exists()


def test_reingest_replaces_the_store_whole(tmp_path: Path) -> None:
    store = tmp_path / "s" / "P1.zarr"
    ingest_plate(plate(tmp_path / "a", n_fields=5), store, STAINS, compressor="lz4")
    fields = plate(tmp_path / "b", n_fields=3)
    ingest_plate(fields, store, STAINS)
    images, _ = open_plate_images(store)
    assert images.shape[0] == 3 and not images.field(0).compressors
    np.testing.assert_array_equal(images[2, 1], tifffile.imread(fields[2].paths["ER"]))
    assert entries(tmp_path / "s") == ["P1.zarr"]


def test_plain_tiffs_take_the_in_place_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the first field (which fixes the shape and dtype) goes through the checked, allocating path."""
    calls: list[str] = []
    checked = store_module._read_field

    def counting(field, channels):
        calls.append(field.well)
        return checked(field, channels)

    monkeypatch.setattr(store_module, "_read_field", counting)
    ingest_plate(plate(tmp_path / "raw", n_fields=6), tmp_path / "s" / "P1.zarr", STAINS, workers=2)
    assert calls == ["A01"]
