"""Bad raw plate input: every defect is a clear BioembedInputError (or a reason string from the folder
check) naming the plate and the file, never a crash, and one bad plate folder never stops the others.

Already covered elsewhere (not repeated here): a missing channel (tests/test_layouts.py
test_missing_channel_for_one_site, tests/test_sensor.py), images of different shapes / mixed bit depth
(test_layouts.py test_shapes_bit_depths_and_dtypes_leave_no_store), truncated TIFFs (test_layouts.py
test_corrupt_and_truncated_images_leave_no_store, test_sources.py test_ingest_errors_and_qc), non-UTF-8
image names in list_fields (test_layouts.py test_non_utf8_file_name), `..`/absolute plate names
(test_layouts.py test_missing_folder_empty_folder_and_bad_plate_names,
test_check_plate_folder_with_config_and_names), duplicate wells and no negative controls in the platemap
(test_sources.py test_platemap_errors, test_layouts.py test_platemap_join_and_control_mapping).
"""

from __future__ import annotations

import logging
import os
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import tifffile
import zarr

from bioembed_assets.config import Home, RunConfig
from bioembed_assets.images.store import ingest_plate
from bioembed_assets.schema import BioembedInputError, parse_well, validate_plate_name
from bioembed_assets.sources.layouts import MAX_IMAGE_PIXELS, canonical_well, list_fields
from bioembed_assets.sources.platemap import platemap_from_frame, read_platemap
from bioembed_assets.sources.synthetic import SYNTHETIC_CHANNEL_MAP, SyntheticScreenConfig, generate_screen
from bioembed_assets.sources.validate import check_plate_folder, default_config
from dagster_project.partitions import plates

from ..test_layouts import fails, write_hcs
from ..test_sensor import new_plate_sensor

pytestmark = pytest.mark.reliability

TINY = SyntheticScreenConfig(
    n_plates=1, n_rows=2, n_cols=1, sites_per_well=1, image_size=64, n_moas=1, compounds_per_moa=1,
    n_inactive=0, replicates_per_plate=1, n_dmso_wells=1, seed=5, plate_prefix="REL-P",
)
CHANNELS = [SYNTHETIC_CHANNEL_MAP[k] for k in sorted(SYNTHETIC_CHANNEL_MAP)]
CMAP3 = {"DNA": "DNA", "ER": "ER", "RNA": "RNA"}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid synthetic Phenix plate (2 wells x 1 site x 5 channels of 64 x 64 uint16)."""
    root = tmp_path_factory.mktemp("template")
    (name,) = generate_screen(root, TINY)
    assert check_plate_folder(root / name) is None
    return root / name


def copy_plate(template: Path, dst: Path) -> Path:
    return Path(shutil.copytree(template, dst))


def an_image(plate: Path) -> Path:
    return sorted((plate / "Images").glob("*.tiff"))[0]


def reason(folder: Path, *needles: str, config: RunConfig | None = None, plate: str | None = None) -> str:
    """The folder check's reason for `folder`; it holds every needle and is printable UTF-8."""
    got = check_plate_folder(folder, config, plate=plate)
    assert got is not None, f"{folder} passed the folder check"
    for needle in needles:
        assert needle in got, f"{needle!r} not in {got!r}"
    got.encode("utf-8")
    return got


# -- 5: a self-looping Images folder; one bad folder never stops the others ----------------------
def test_self_looping_images_folder_is_a_reason(template: Path, tmp_path: Path) -> None:
    loop = tmp_path / "LOOP"
    loop.mkdir()
    os.symlink("Images", loop / "Images")
    reason(loop, "plate=LOOP", f"file={loop / 'Images'}", "symbolic link")
    fails(lambda: list_fields("phenix", loop, "LOOP", SYNTHETIC_CHANNEL_MAP), "plate=LOOP", "LOOP/Images")


def _evaluate(root: Path) -> tuple[dg.SensorResult, list[str]]:
    """One real evaluation of `new_plate_sensor` on the home at `root`; (result, warnings logged)."""
    from dagster_project.resources import BioembedHome

    warnings: list[str] = []

    class Spy(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    with dg.DagsterInstance.ephemeral() as instance:
        context = dg.build_sensor_context(instance=instance, resources={"bioembed": BioembedHome(root=str(root))})
        context.log.addHandler(Spy())
        result = new_plate_sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result, warnings


def _registered(result: dg.SensorResult) -> list[str]:
    (request,) = result.dynamic_partitions_requests
    assert request.partitions_def_name == plates.name
    assert [r.partition_key for r in result.run_requests] == list(request.partition_keys)
    return list(request.partition_keys)


def test_sensor_registers_valid_plate_next_to_bad_folders(template: Path, tmp_path: Path) -> None:
    """A self-looping Images folder, a plate named 'IP0\\n' and a non-UTF-8 folder name are reported and
    skipped; the valid plate is registered in the same tick."""
    home = Home(root=tmp_path / "home").ensure()
    good = copy_plate(template, home.raw_root / template.name).name
    loop = home.raw_root / "LOOP"
    loop.mkdir()
    os.symlink("Images", loop / "Images")
    copy_plate(template, home.raw_root / "IP0\n")
    copy_plate(template, Path(os.fsdecode(os.fsencode(home.raw_root) + b"/P\xff")))
    result, warnings = _evaluate(home.root)
    assert _registered(result) == [good]
    assert any("LOOP" in w and "symbolic link" in w for w in warnings), warnings
    assert any("invalid plate name 'IP0\\n'" in w for w in warnings), warnings
    assert any("P\\xff" in w for w in warnings), warnings
    for w in warnings:
        w.encode("utf-8")


def test_sensor_survives_unexpected_errors_per_folder(template: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Any exception for one folder (here: `is_dir` raising, the check raising) is a warning, not a failed tick."""
    import dagster_project.sensors as sensors

    home = Home(root=tmp_path / "home").ensure()
    good = copy_plate(template, home.raw_root / template.name).name
    copy_plate(template, home.raw_root / "BOOM")
    (home.raw_root / "NOSTAT").mkdir()
    real_is_dir, real_check = Path.is_dir, sensors.check_plate_folder

    def is_dir(self: Path) -> bool:
        if self.name == "NOSTAT":
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_dir(self)

    def check(folder: Path, *args: object, **kwargs: object) -> str | None:
        if folder.name == "BOOM":
            raise RuntimeError("boom")
        return real_check(folder, *args, **kwargs)

    monkeypatch.setattr(Path, "is_dir", is_dir)
    monkeypatch.setattr(sensors, "check_plate_folder", check)
    result, warnings = _evaluate(home.root)
    assert _registered(result) == [good]
    assert any("NOSTAT" in w and "PermissionError" in w for w in warnings), warnings
    assert any("BOOM" in w and "RuntimeError: boom" in w for w in warnings), warnings


# -- 9: OME-Zarr ----------------------------------------------------------------------------------
def _zplate(tmp_path: Path, zarr_format: int = 3, **kwargs: object) -> tuple[Path, Path]:
    """A 2-well x 2-field x 3-channel OME-Zarr plate BADP; (plate folder, store)."""
    folder = tmp_path / "BADP"
    store = folder / "BADP.zarr"
    write_hcs(store, zarr_format, nz=1, **kwargs)
    return folder, store


def _edit(group: Path, key: str, edit: Callable[[dict], object]) -> None:
    """Apply `edit` to the NGFF `key` metadata (a dict, changed in place) of the group at `group`."""
    node = zarr.open_group(group, mode="a")
    attrs = dict(node.attrs)
    ome = attrs.get("ome", attrs)
    edit(ome[key])
    node.attrs.put(attrs)


def _wells(edit: Callable[[list], object]) -> Callable[[Path], None]:
    return lambda store: _edit(store, "plate", lambda meta: edit(meta["wells"]))


def _set(entry: dict, key: str, value: object) -> None:
    entry[key] = value


@pytest.mark.parametrize(("name", "mutate", "needle"), [
    ("well ../../", _wells(lambda w: _set(w[0], "path", "../../")), "leaves the store"),
    ("well absolute", _wells(lambda w: _set(w[0], "path", "/tmp")), "leaves the store"),
    ("well A/../../x", _wells(lambda w: _set(w[0], "path", "A/../../x")), "leaves the store"),
    ("image ..", lambda s: _edit(s / "A" / "1", "well", lambda m: _set(m["images"][0], "path", "..")),
     "leaves the store"),
    ("dataset ../../..", lambda s: _edit(s / "A" / "1" / "0", "multiscales",
                                         lambda m: _set(m[0]["datasets"][0], "path", "../../../B/3/0/0")),
     "leaves the store"),
    ("link outside", lambda s: (shutil.move(s / "A", s.parent.parent / "A-outside"),
                                os.symlink(s.parent.parent / "A-outside", s / "A")), "resolves outside the store"),
])
def test_omezarr_paths_are_confined_to_the_store(tmp_path: Path, name: str, mutate: Callable[[Path], object],
                                                 needle: str) -> None:
    folder, store = _zplate(tmp_path)
    mutate(store)
    fails(lambda: list_fields("omezarr", folder, "BADP", CMAP3), "plate=BADP", "BADP.zarr", needle)


@pytest.mark.parametrize(("name", "mutate", "needles"), [
    ("rowIndex out of range", _wells(lambda w: _set(w[1], "rowIndex", 7)), ["rowIndex 7", "expected 0..1"]),
    ("rowIndex negative", _wells(lambda w: _set(w[0], "rowIndex", -1)), ["rowIndex -1"]),
    ("rowIndex not an int", _wells(lambda w: _set(w[0], "rowIndex", "0")), ["rowIndex '0'"]),
    ("columnIndex a float", _wells(lambda w: _set(w[0], "columnIndex", 0.0)), ["columnIndex 0.0"]),
    ("well without path", _wells(lambda w: w[0].pop("path")), ["plate.wells entry without a 'path'"]),
    ("wells not a list", lambda s: _edit(s, "plate", lambda m: _set(m, "wells", {"path": "A/1"})),
     ["plate.wells must be a list of objects"]),
    ("row without name", lambda s: _edit(s, "plate", lambda m: m["rows"][0].pop("name")),
     ["every plate.rows entry needs a 'name'"]),
    ("column 999", lambda s: _edit(s, "plate", lambda m: _set(m["columns"][0], "name", "999")),
     ["invalid well row 'A' / column '999'", "columns 1-99"]),
    ("image without path", lambda s: _edit(s / "B" / "3", "well", lambda m: m["images"][1].pop("path")),
     ["well.images entry without a 'path'", "well=B03"]),
    ("image a string", lambda s: _edit(s / "B" / "3", "well", lambda m: _set(m, "images", ["0"])),
     ["well.images must be a list of objects", "well=B03"]),
    ("dataset without path", lambda s: _edit(s / "A" / "1" / "1", "multiscales",
                                             lambda m: m[0]["datasets"][0].pop("path")),
     ["multiscales[0].datasets entry without a 'path'", "well=A01"]),
    ("axis without name", lambda s: _edit(s / "A" / "1" / "0", "multiscales", lambda m: m[0]["axes"][0].pop("name")),
     ["multiscales axis needs a 'name'"]),
    ("omero channels not a list", lambda s: _edit(s / "A" / "1" / "0", "omero", lambda m: _set(m, "channels", 3)),
     ["omero.channels must be a list"]),
])
def test_omezarr_malformed_metadata(tmp_path: Path, name: str, mutate: Callable[[Path], object],
                                    needles: list[str]) -> None:
    folder, store = _zplate(tmp_path)
    mutate(store)
    fails(lambda: list_fields("omezarr", folder, "BADP", CMAP3), "plate=BADP", "BADP.zarr", *needles)


def _v2_slash(store: Path) -> None:
    """Rewrite field B/3/1's array as zarr v2 with '/' chunk keys (`0/1/0/0/0`)."""
    field = zarr.open_group(store / "B" / "3" / "1", mode="a")
    data = field["0"][:]
    field.create_array("0", data=data, chunks=(1, 1, 1, 16, 16), overwrite=True,
                       chunk_key_encoding={"name": "v2", "separator": "/"})


@pytest.mark.parametrize(("variant", "zarr_format", "chunk"), [
    ("v3", 3, "c/0/1/0/0/0"),
    ("v2 '.'", 2, "0.1.0.0.0"),
    ("v2 '/'", 2, "0/1/0/0/0"),
    ("v3 sharded", 3, "c/0/0/0/0/0"),
])
def test_omezarr_missing_chunk_is_an_error(tmp_path: Path, variant: str, zarr_format: int, chunk: str) -> None:
    """A deleted chunk (channel ER = c 1 of well B03 site 2) is an error, not a plane of zeros."""
    folder, store = _zplate(tmp_path, zarr_format)
    if variant == "v2 '/'":
        _v2_slash(store)
    if variant == "v3 sharded":
        field = zarr.open_group(store / "B" / "3" / "1", mode="a")
        field.create_array("0", data=field["0"][:], chunks=(1, 1, 1, 8, 8), shards=(1, 3, 1, 16, 16), overwrite=True)
    array = store / "B" / "3" / "1" / "0"
    assert (array / chunk).is_file()
    (array / chunk).unlink()
    fields = list_fields("omezarr", folder, "BADP", CMAP3)
    site = next(f for f in fields if (f.well, f.site) == ("B03", 2))
    needles = ["plate=BADP", "well=B03", "BADP.zarr/B/3/1/0", "missing chunk", repr(chunk)]
    fails(lambda: site.read("ER"), *needles, "site 2 channel ER (c=1)")
    if variant != "v3 sharded":  # there the shard (every channel) is gone
        assert site.read("DNA").shape == (16, 16)
        needles.append("site 2 channel ER (c=1)")
    config = RunConfig(layout="omezarr", channels=["DNA", "ER", "RNA"], channel_map=CMAP3)
    reason(folder, *needles, config=config)
    out = tmp_path / "out" / "BADP.zarr"
    fails(lambda: ingest_plate(fields, out, ["DNA", "ER", "RNA"]), *needles, store=out)


def test_omezarr_out_of_range_t_and_z_options(tmp_path: Path) -> None:
    folder, _ = _zplate(tmp_path)
    for option, needle in (({"t": 3}, "option t 3 is out of range"), ({"z": 2}, "option z 2 is out of range")):
        (first, *_) = list_fields("omezarr", folder, "BADP", CMAP3, **option)
        fails(lambda first=first: first.header("DNA"), "plate=BADP", "well=A01", "BADP.zarr/A/1/0/0", needle)


# -- 10: platemap wells, plate names, image sizes ------------------------------------------------
@pytest.mark.parametrize("well", ["ZZ999", "A100", "A00", "A0", "", "A1\n1"])
def test_platemap_impossible_well_names_plate_file_and_row(tmp_path: Path, well: str) -> None:
    path = tmp_path / "platemap.csv"
    pl.DataFrame({"well": ["A01", well, "B01"], "perturbation": ["DMSO", "x", "y"],
                  "control_type": ["negative", "treatment", "treatment"]}).write_csv(path)
    fails(lambda: read_platemap(path, "PM-1"), "plate=PM-1", f"file={path}", "platemap row 2", "invalid well id")
    frame = pl.DataFrame({"Metadata_Well": ["A01", "B02", well], "perturbation": ["DMSO", "x", "y"],
                          "control_type": ["negative", "treatment", "treatment"]})
    fails(lambda: platemap_from_frame(frame, "PM-1", source="upload.csv"), "plate=PM-1", "file=upload.csv",
          "platemap row 3")


def test_platemap_row_and_column_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "platemap.csv"
    path.write_text("row,column,perturbation,control_type\nA,1,DMSO,negative\nB,999,x,treatment\n")
    fails(lambda: read_platemap(path, "PM-1"), "plate=PM-1", "platemap.csv", "platemap row 2",
          "invalid well row 'B' / column '999'")
    fails(lambda: canonical_well("A100", plate="PM-1", path="x.png"), "plate=PM-1", "file=x.png", "invalid well id")


def test_platemap_row_numbers_in_other_row_errors(tmp_path: Path) -> None:
    path = tmp_path / "platemap.csv"
    path.write_text("plate,well,perturbation,control_type\nOTHER,A01,x,treatment\nPM-1,A01,DMSO,negative\n"
                    "PM-1,A02,x,weird\n")
    fails(lambda: read_platemap(path, "PM-1"), "plate=PM-1", "well=A02", "platemap row 3", "unknown control_type")
    path.write_text("well,perturbation,control_type\nA01,DMSO,negative\nB01,x,treatment\nA1,y,treatment\n")
    fails(lambda: read_platemap(path, "PM-1"), "duplicate wells ['A01']", "rows [1, 3]", "plate=PM-1", "platemap.csv")


@pytest.mark.parametrize("name", ["IP0\n", "IP0\r", "\nIP0", "IP0 ", "IP0\t"])
def test_plate_names_with_trailing_whitespace_are_refused(template: Path, name: str) -> None:
    fails(lambda: validate_plate_name(name), "invalid plate name")
    reason(template, "invalid plate name", plate=name)
    with pytest.raises(BioembedInputError, match="invalid plate name"):
        Home(root=template.parent).raw_plate_dir(name)


def test_well_ids_with_a_trailing_newline_are_refused() -> None:
    for bad in ("A01\n", "A01\r\n", " A01"):
        with pytest.raises(BioembedInputError, match="invalid well id"):
            parse_well(bad)
    assert parse_well("P24") == (16, 24)


def huge_tiff(path: Path, side: int = 100_000) -> None:
    """A 64 x 64 uint16 TIFF whose header claims side x side (a few KB on disk)."""
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16), metadata=None)
    with tifffile.TiffFile(path, mode="r+") as tif:
        tags = tif.pages.first.tags
        for tag in ("ImageWidth", "ImageLength", "RowsPerStrip"):
            tags[tag].overwrite(side)
    assert tifffile.TiffFile(path).pages.first.shape == (side, side) and path.stat().st_size < 10_000


def test_huge_tiff_header_is_refused_before_allocating(template: Path, tmp_path: Path) -> None:
    plate = copy_plate(template, tmp_path / "HUGE")
    victim = an_image(plate)
    huge_tiff(victim)
    needles = ["plate=HUGE", victim.name, "100000 x 100000 = 10,000,000,000 pixels", "max_image_pixels = 67,108,864",
               "raise max_image_pixels"]
    reason(plate, *needles)
    fields = list_fields("phenix", plate, "HUGE", SYNTHETIC_CHANNEL_MAP)
    out = tmp_path / "out" / "HUGE.zarr"
    for listed in (fields, fields[::-1]):  # the huge image in field 0 (checked path), then in the last field
        tracemalloc.start()
        try:
            fails(lambda listed=listed: ingest_plate(listed, out, CHANNELS), *needles, store=out)
            assert tracemalloc.get_traced_memory()[1] < 64 * 2**20  # no 18.6 GiB buffer was attempted
        finally:
            tracemalloc.stop()
    # the limit is a setting: raised, the size passes (and the plate then fails on its mixed shapes)
    raised = default_config().model_copy(update={"max_image_pixels": 10**10})
    assert "images of different shapes" in reason(plate, "plate=HUGE", config=raised)
    small = copy_plate(template, tmp_path / "SMALL")
    assert check_plate_folder(small, default_config().model_copy(update={"max_image_pixels": 64 * 64})) is None
    reason(small, "64 x 64 = 4,096 pixels", "max_image_pixels = 4,095",
           config=default_config().model_copy(update={"max_image_pixels": 64 * 64 - 1}))
    fields = list_fields("phenix", small, "SMALL", SYNTHETIC_CHANNEL_MAP)
    fails(lambda: ingest_plate(fields, out, CHANNELS, max_image_pixels=4095), "max_image_pixels = 4,095", store=out)


def test_max_image_pixels_setting() -> None:
    assert RunConfig.model_fields["max_image_pixels"].default == MAX_IMAGE_PIXELS == 2**26
    assert RunConfig(channels=["DNA"], channel_map={"1": "DNA"}, max_image_pixels=10**9).max_image_pixels == 10**9
    with pytest.raises(ValueError, match="max_image_pixels"):
        RunConfig(channels=["DNA"], channel_map={"1": "DNA"}, max_image_pixels=0)


def test_huge_omezarr_array_is_refused_by_the_folder_check(tmp_path: Path) -> None:
    """A 100000 x 100000 level-0 array (metadata only): refused on its size, before its chunks are listed."""
    folder, store = _zplate(tmp_path)
    field = zarr.open_group(store / "A" / "1" / "0", mode="a")
    field.create_array("0", shape=(1, 3, 1, 100_000, 100_000), chunks=(1, 1, 1, 16, 16), dtype=np.uint16,
                       overwrite=True)
    config = RunConfig(layout="omezarr", channels=["DNA", "ER", "RNA"], channel_map=CMAP3)
    reason(folder, "plate=BADP", "well=A01", "BADP.zarr/A/1/0/0", "100000 x 100000", "max_image_pixels", config=config)


# -- bad inputs that were already handled: keep them so ------------------------------------------
def _write(array: np.ndarray, **kwargs: object) -> Callable[[Path], object]:
    return lambda path: tifffile.imwrite(path, array, **kwargs)


@pytest.mark.parametrize(("case", "mutate", "check_needle", "ingest_needle"), [
    ("zero-byte TIFF", lambda p: p.write_bytes(b""), "unreadable image header", "cannot read TIFF"),
    ("float32 TIFF", _write(np.ones((64, 64), np.float32)), "dtype float32", "non-integer pixel type float32"),
    ("3-D TIFF", _write(np.ones((3, 64, 64), np.uint16)), "shape (3, 64, 64)", "got shape (3, 64, 64)"),
    ("RGB TIFF", _write(np.ones((64, 64, 3), np.uint8), photometric="rgb"), "shape (64, 64, 3)",
     "got shape (64, 64, 3)"),
])
def test_bad_image_files_name_plate_well_and_file(template: Path, tmp_path: Path, case: str,
                                                   mutate: Callable[[Path], object], check_needle: str,
                                                   ingest_needle: str) -> None:
    plate = copy_plate(template, tmp_path / "BADIMG")
    victim = an_image(plate)
    mutate(victim)
    reason(plate, "plate=BADIMG", "well=A01", victim.name, check_needle)
    fields = list_fields("phenix", plate, "BADIMG", SYNTHETIC_CHANNEL_MAP)
    out = tmp_path / "out" / "BADIMG.zarr"
    fails(lambda: ingest_plate(fields, out, CHANNELS), "plate=BADIMG", "well=A01", victim.name, ingest_needle,
          store=out)


def test_non_utf8_names_are_clear_errors_or_skipped(template: Path, tmp_path: Path) -> None:
    """An image with a non-UTF-8 name: a printable reason; any other such file: skipped; a plate folder with
    such a name: an invalid plate name, printable."""
    plate = copy_plate(template, tmp_path / "NAMES")
    images = os.fsencode(plate / "Images")
    os.close(os.open(images + b"/notes-\xff.txt", os.O_CREAT | os.O_WRONLY, 0o644))
    assert check_plate_folder(plate) is None  # not an image: ignored
    os.close(os.open(images + b"/r01c01f01p01-ch1\xfe.tiff", os.O_CREAT | os.O_WRONLY, 0o644))
    reason(plate, "plate=NAMES", "not valid UTF-8", r"r01c01f01p01-ch1\xfe.tiff")
    odd = copy_plate(template, Path(os.fsdecode(os.fsencode(tmp_path) + b"/P\xff")))
    reason(odd, "invalid plate name", r"P\udcff")
