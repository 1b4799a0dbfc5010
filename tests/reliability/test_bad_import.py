"""Bad imports of external profile tables: names that collide with encoders or other feature sets,
non-numbers in feature columns, and per-column costs that grow with the number of columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from bioembed_assets import schema as s
from bioembed_assets.schema import BioembedInputError
from bioembed_assets.sources import profile_table as pt
from bioembed_assets.sources.profile_table import ProfileImportSpec, import_profiles, load_manifest
from bioembed_assets.store.lake import Lake, features_to_numpy, with_features

from ..test_profile_import import _table

pytestmark = pytest.mark.reliability


def _encoder_profiles(lake: Lake, encoder: str, version: str, plates: tuple[str, ...] = ("P1", "P2"),
                      table: str = "well_profiles") -> dict[Path, bytes]:
    """Write `table` partitions as an encoder would (one per plate); their paths -> bytes."""
    rng = np.random.default_rng(1)
    out = {}
    for plate in plates:
        meta = pl.DataFrame({s.PLATE: [plate] * 4, s.WELL: ["A01", "A02", "A03", "A04"],
                             s.PERTURBATION: ["DMSO", "DMSO", "c1", "c1"], s.CONTROL_TYPE: ["negative"] * 2 + ["treatment"] * 2,
                             s.MOA: [None] * 4, s.ENCODER: [encoder] * 4, s.ENCODER_VERSION: [version] * 4,
                             "n_cells": [10] * 4, s.SITE: [1] * 4, "cell_id": [f"c{i}" for i in range(4)]})
        cols = [c for c in lake.table(table).columns if c != s.FEATURES]
        path = lake.write(table, with_features(meta.select(cols), rng.random((4, 8), dtype=np.float32)),
                          encoder=encoder, version=version, plate=plate)
        out[path] = path.read_bytes()
    return out


def _lake_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in (root / "lake").rglob("*.parquet"))


# ---------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["classical", "Classical"])
def test_import_under_a_builtin_encoder_name_is_refused_and_its_partitions_stay(tmp_path: Path, name: str) -> None:
    home = tmp_path / "home"
    lake = Lake(home / "lake")
    before = _encoder_profiles(lake, "classical", "1")
    files = _lake_files(home)
    with pytest.raises(BioembedInputError, match=rf"'{name}' is a built-in encoder's name.*classical.*Choose another"):
        import_profiles(home, [_table(tmp_path / "t.csv", plate="P9")], ProfileImportSpec(name=name))
    assert {p: p.read_bytes() for p in before} == before  # both plates still there, byte for byte
    assert _lake_files(home) == files
    assert not (home / "feature_sets").exists()


@pytest.mark.parametrize("table", ["well_profiles", "embeddings"])
def test_import_under_the_name_of_a_feature_set_no_import_wrote_is_refused(tmp_path: Path, table: str) -> None:
    home = tmp_path / "home"
    before = _encoder_profiles(Lake(home / "lake"), "my_encoder", "1", table=table)
    files = _lake_files(home)
    with pytest.raises(BioembedInputError, match=rf"'my_encoder' is taken: the lake holds {table} version\(s\) \['1'\] "
                                                 r"under encoder=my_encoder that no import of 'my_encoder' wrote"):
        import_profiles(home, [_table(tmp_path / "t.csv")], ProfileImportSpec(name="my_encoder"))
    assert {p: p.read_bytes() for p in before} == before
    assert _lake_files(home) == files


def test_an_import_touches_only_its_own_feature_set_and_reimports_its_own_name(tmp_path: Path) -> None:
    home = tmp_path / "home"
    lake = Lake(home / "lake")
    other = _encoder_profiles(lake, "my_encoder", "1")
    a, b = _table(tmp_path / "a.csv"), _table(tmp_path / "b.csv", plate="P2")
    assert import_profiles(home, [a], ProfileImportSpec(name="t")).version == "1"
    assert import_profiles(home, [a], ProfileImportSpec(name="t")).version == "1"  # its own name: fine
    assert import_profiles(home, [a, b], ProfileImportSpec(name="t")).version == "2"
    assert {p: p.read_bytes() for p in other} == other
    assert {k["version"] for k in lake.partitions("well_profiles", encoder="t")} == {"1", "2"}


def test_an_import_killed_after_the_lake_swap_can_be_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dying between the lake swap and the manifest leaves a pending marker that still claims the version."""
    home, a = tmp_path / "home", _table(tmp_path / "a.csv")

    class Dies:
        @staticmethod
        def now(tz=None):
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(pt, "datetime", Dies)
    with pytest.raises(KeyboardInterrupt):
        import_profiles(home, [a], ProfileImportSpec(name="t"))
    monkeypatch.undo()
    folder = home / "feature_sets" / "t"
    assert (folder / "v1.pending").exists() and not (folder / "v1.json").exists()
    assert import_profiles(home, [a], ProfileImportSpec(name="t")).version == "1"
    assert sorted(p.name for p in folder.glob("v*")) == ["v1.json"]  # the marker is gone


@pytest.mark.usefixtures("cli_env")
def test_the_cli_refuses_an_encoder_name_without_registering_the_import(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dagster_project.cli import main

    home = tmp_path / "home"
    before = _encoder_profiles(Lake(home / "lake"), "classical", "1")
    rc = main(["import-profiles", str(_table(tmp_path / "t.csv")), "--home", str(home), "--name", "classical",
               "--null-size", "100"])
    assert rc == 2
    assert "'classical' is a built-in encoder's name" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before
    assert not (home / "feature_sets" / "classical").exists()  # not registered: "Materialize all" still works


# ---------------------------------------------------------------------------------------- non-numbers


def _screen_csv(path: Path, bad: bool = True) -> Path:
    """One 12-well plate the evaluation accepts (4 DMSO wells), with "abc" in data row 4 of `Cytoplasm_c`
    (unless not `bad`)."""
    rng = np.random.default_rng(2)
    values = [f"{v:.3f}" for v in rng.random(12)]
    if bad:
        values[3] = "abc"
    pl.DataFrame({"Metadata_Plate": ["P1"] * 12, "Metadata_Well": [f"A{i + 1:02d}" for i in range(12)],
                  "Metadata_broad_sample": ["DMSO"] * 4 + [f"c{i // 2}" for i in range(8)],
                  "Cells_a": rng.random(12), "Nuclei_b": rng.random(12), "Cytoplasm_c": values}).write_csv(path)
    return path


def _bad_csv(path: Path, plate: str = "P1", bad_row: int = 3) -> Path:
    """A table whose float column `Cytoplasm_c` holds "abc" in data row `bad_row + 1` (0-based `bad_row`)."""
    values = [f"{v:.3f}" for v in np.linspace(0.1, 0.6, 6)]
    values[bad_row] = "abc"
    return _table(path, plate=plate, Cytoplasm_c=values)


def test_a_non_number_in_a_feature_column_fails_naming_file_row_and_column(tmp_path: Path) -> None:
    bad = _bad_csv(tmp_path / "bad.csv", bad_row=3)
    assert "abc" in bad.read_text().splitlines()[4]  # data row 4 = line 5 of the file
    spec = ProfileImportSpec(name="t")
    with pytest.raises(BioembedInputError, match=r"\[file=.*bad\.csv\] feature column 'Cytoplasm_c' holds a value that "
                                                 r"is not a number: 'abc' in data row 4 \(line 5 of the file, counting "
                                                 r"the header line\).*--non-numeric drop"):
        import_profiles(tmp_path / "h", [_table(tmp_path / "good.csv", plate="P2"), bad], spec)
    assert not (tmp_path / "h" / "lake" / "well_profiles").exists()
    with pytest.raises(BioembedInputError, match=r"'Cytoplasm_c' holds .* in data row 4"):  # listed features too
        import_profiles(tmp_path / "h", [bad], spec.model_copy(update={"features": ["Cells_a", "Cytoplasm_c"]}))


def test_the_error_names_the_first_bad_row_top_down_and_counts_the_other_columns(tmp_path: Path) -> None:
    df = pl.read_csv(_bad_csv(tmp_path / "one.csv", bad_row=4)).with_columns(
        pl.Series("Cells_z", ["1", "2", "n/a", "4", "5", "6"]))
    df.write_parquet(tmp_path / "two.parquet")
    with pytest.raises(BioembedInputError, match=r"two\.parquet\] feature column 'Cells_z' holds a value that is not a "
                                                 r"number: 'n/a' in row 3; 1 more column\(s\) hold non-numbers too: "
                                                 r"\['Cytoplasm_c'\]"):
        import_profiles(tmp_path / "h", [tmp_path / "two.parquet"], ProfileImportSpec(name="t"))


def test_non_numeric_drop_drops_and_reports_the_column_in_every_file(tmp_path: Path) -> None:
    a = _table(tmp_path / "a.csv", Cytoplasm_c=np.arange(6.0))
    b = _bad_csv(tmp_path / "b.csv", plate="P2")
    result = import_profiles(tmp_path / "h", [a, b], ProfileImportSpec(name="t", non_numeric="drop"))
    assert result.features == ["Cells_a", "Nuclei_b"]
    assert result.dropped_non_numeric == ["Cytoplasm_c"] and result.dropped_features == 0
    manifest = load_manifest(tmp_path / "h", "t", result.version)
    assert manifest["dropped_non_numeric"] == ["Cytoplasm_c"] and manifest["dropped_features"] == 0
    df = Lake(tmp_path / "h" / "lake").read("well_profiles", encoder="t").sort("plate", "well")
    src = pl.concat([pl.read_csv(a), pl.read_csv(b)], how="diagonal_relaxed")
    np.testing.assert_array_equal(features_to_numpy(df), src.select(result.features).to_numpy().astype(np.float32))


def test_text_columns_are_ignored_and_numbers_stored_as_text_are_features(tmp_path: Path) -> None:
    df = pl.read_csv(_table(tmp_path / "a.csv")).with_columns(
        pl.Series("Image_FileName_DNA", [f"r01c0{i}f01.tiff" for i in range(6)]),
        pl.Series("Cells_t", ["0.5", "1e-3", "NaN", None, "-2", "inf"]))
    df.write_parquet(tmp_path / "a.parquet")
    result = import_profiles(tmp_path / "h", [tmp_path / "a.parquet"], ProfileImportSpec(name="t"))
    assert result.features == ["Cells_a", "Nuclei_b", "Cells_t"]
    assert result.ignored_columns == ["Image_FileName_DNA"] and result.dropped_non_numeric == []
    assert load_manifest(tmp_path / "h", "t", "1")["ignored_columns"] == ["Image_FileName_DNA"]
    X = features_to_numpy(Lake(tmp_path / "h" / "lake").read("well_profiles", encoder="t").sort("well"))
    np.testing.assert_array_equal(X[:, 2], np.array([0.5, 1e-3, np.nan, np.nan, -2, np.inf], dtype=np.float32))


@pytest.mark.usefixtures("cli_env")
def test_the_cli_drops_non_numeric_columns_on_request_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dagster_project.cli import main

    bad, home = _screen_csv(tmp_path / "bad.csv"), tmp_path / "home"
    args = ["import-profiles", str(bad), "--home", str(home), "--name", "t", "--negative",
            "Metadata_broad_sample=DMSO", "--null-size", "100"]
    assert main(args) == 2
    assert "bad.csv] feature column 'Cytoplasm_c' holds a value that is not a number: 'abc' in data row 4" in (
        capsys.readouterr().err)
    assert main([*args, "--non-numeric", "drop"]) == 0
    out = capsys.readouterr().out
    assert "2 features; dropped: 0 not in every file, 1 holding non-numbers" in out
    assert "dropped non-numeric feature columns: Cytoplasm_c" in out


# ---------------------------------------------------------------------------------------- registered only once imported


def _in_lake(home: Path, name: str) -> list[Path]:
    return [p for p in (home / "lake").rglob("*.parquet") if f"encoder={name}" in str(p)]


@pytest.mark.usefixtures("cli_env")
def test_a_failed_import_is_not_registered_and_a_later_import_works(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Registering before importing made every later import re-run the bad one and fail."""
    from dagster_project.cli import main

    home = tmp_path / "home"

    def args(table: Path, name: str) -> list[str]:
        return ["import-profiles", str(table), "--home", str(home), "--name", name, "--negative",
                "Metadata_broad_sample=DMSO", "--null-size", "100"]

    assert main(args(_screen_csv(tmp_path / "bad.csv"), "broken")) == 2
    assert "feature column 'Cytoplasm_c' holds a value that is not a number" in capsys.readouterr().err
    assert not (home / "feature_sets" / "broken").exists()  # no import.json, no manifest, no pending marker
    assert _in_lake(home, "broken") == []
    assert main(args(_screen_csv(tmp_path / "good.csv", bad=False), "good")) == 0
    assert "Imported feature set good v1" in capsys.readouterr().out
    assert sorted(p.parent.name for p in (home / "feature_sets").glob("*/import.json")) == ["good"]
    # a bad join is refused before anything is saved too
    platemap = tmp_path / "platemap.csv"
    pl.DataFrame({"well": [f"A{i + 1:02d}" for i in range(11)], "dose": ["1"] * 11}).write_csv(platemap)
    assert main([*args(_screen_csv(tmp_path / "good2.csv", bad=False), "joined"), "--metadata", str(platemap),
                 "--on", "Metadata_Well=well"]) == 2
    assert "1 of 12 profile row(s) match no row of the metadata table(s)" in capsys.readouterr().err
    assert not (home / "feature_sets" / "joined").exists() and _in_lake(home, "joined") == []


def test_a_registered_import_that_now_fails_does_not_stop_the_others(tmp_path: Path) -> None:
    """Materializing without config re-runs each registered import on its own and fails at the end naming
    the failed ones (a file that turned bad, an unreadable import.json); the others are imported."""
    import dagster as dg

    from bioembed_assets.sources.profile_table import SavedImport, latest_version, save_import
    from dagster_project.assets import imported_profiles
    from dagster_project.resources import BioembedHome

    home = tmp_path / "home"
    tables = {name: _table(tmp_path / f"{name}.csv", plate=plate) for name, plate in (("a_turned_bad", "P1"),
                                                                                       ("b_fine", "P2"))}
    for name, table in tables.items():
        spec = ProfileImportSpec(name=name)
        import_profiles(home, [table], spec)
        save_import(home, SavedImport(spec=spec, files=[str(table)]))
    _bad_csv(tables["a_turned_bad"])  # the file changed: now it holds "abc"
    _table(tables["b_fine"], plate="P2", Cytoplasm_c=np.arange(6.0))  # changed too, still good: a new version
    (home / "feature_sets" / "c_garbled").mkdir()
    (home / "feature_sets" / "c_garbled" / "import.json").write_text("{not json")
    result = dg.materialize([imported_profiles], resources={"bioembed": BioembedHome(root=str(home))},
                            raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    message = failure.message if failure.cause is None else failure.message + str(failure.cause)
    assert "2 registered import(s) failed (the others were imported): a_turned_bad: BioembedInputError:" in message
    assert "'Cytoplasm_c' holds a value that is not a number" in message and "c_garbled: unreadable" in message
    assert latest_version(home, "b_fine") == "2" and latest_version(home, "a_turned_bad") == "1"


# ---------------------------------------------------------------------------------------- cost per column


def test_schema_lookups_do_not_grow_with_the_number_of_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each `DataFrame.schema` builds the whole schema; once per column made 20k columns take 1,346 s."""
    calls = []
    schema = pl.DataFrame.schema
    monkeypatch.setattr(pl.DataFrame, "schema", property(lambda self: calls.append(1) or schema.fget(self)))

    def lookups(n_features: int) -> int:
        extra = {f"Cells_f{j}": np.arange(6.0) + j for j in range(n_features)}
        files = [_table(tmp_path / f"{n_features}-{p}.csv", plate=p, **extra) for p in ("P1", "P2")]
        calls.clear()
        result = import_profiles(tmp_path / f"h{n_features}", files, ProfileImportSpec(name="t"))
        assert len(result.features) == n_features + 2
        return len(calls)

    assert lookups(400) == lookups(20)
