"""`bioembed` user errors: one line on stderr naming the file, key or plate at fault, exit status 2, no
traceback (`--debug` raises it instead). Each case fails before any Dagster run starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from dagster_project.cli import main

pytestmark = pytest.mark.usefixtures("cli_env")

CHANNELS = 'channels = ["DNA"]\n[channel_map]\nch1 = "DNA"\n'


def _config(tmp_path: Path, text: str) -> Path:
    (tmp_path / "raw").mkdir(exist_ok=True)
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def _error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI quietly; the one line it printed on stderr (after asserting exit status 2)."""
    assert main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err.strip()


def _run(tmp_path: Path, config: Path) -> list[str]:
    return ["run", "--home", str(tmp_path / "home"), "--config", str(config)]


def test_missing_config_file(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.toml"
    err = _error(capsys, *_run(tmp_path, missing))
    assert err.startswith("bioembed run: ") and str(missing) in err and "No such file" in err


def test_config_that_is_not_toml(tmp_path: Path, capsys) -> None:
    path = _config(tmp_path, 'raw_root = "raw"\nchannels = [DNA\n')
    err = _error(capsys, *_run(tmp_path, path))
    assert f"config {path}: not valid TOML" in err and "line 2" in err


def test_demo_config_that_is_not_toml(tmp_path: Path, capsys) -> None:
    path = _config(tmp_path, "encoders = \n")
    err = _error(capsys, "demo", "--home", str(tmp_path / "home"), "--config", str(path))
    assert err.startswith(f"bioembed demo: config {path}: not valid TOML")


def test_unknown_config_key_names_the_closest_valid_one(tmp_path: Path, capsys) -> None:
    path = _config(tmp_path, 'raw_root = "raw"\nencoderz = ["classical"]\n' + CHANNELS)
    err = _error(capsys, *_run(tmp_path, path))
    assert str(path) in err and "unknown key 'encoderz' (did you mean 'encoders'?)" in err


def test_config_value_of_the_wrong_type_names_the_field(tmp_path: Path, capsys) -> None:
    path = _config(tmp_path, 'raw_root = "raw"\nchannels = 3\n[channel_map]\nch1 = "DNA"\n')
    err = _error(capsys, *_run(tmp_path, path))
    assert err.startswith(f"bioembed run: config {path}: channels: ") and "list" in err


def test_raw_root_that_is_not_a_folder(tmp_path: Path, capsys) -> None:
    path = _config(tmp_path, 'raw_root = "no-such-folder"\n' + CHANNELS)
    err = _error(capsys, *_run(tmp_path, path))
    assert f"raw_root {tmp_path / 'no-such-folder'} (from the config) is not a folder" in err


def test_plate_without_a_folder(tmp_path: Path, capsys) -> None:
    path = _config(tmp_path, 'raw_root = "raw"\nplates = ["P9"]\n' + CHANNELS)
    err = _error(capsys, *_run(tmp_path, path))
    assert "plate(s) P9 have no folder under raw_root" in err and str(tmp_path / "raw") in err


def test_bad_plate_name(tmp_path: Path, capsys) -> None:
    path = _config(tmp_path, 'raw_root = "raw"\nplates = ["../evil"]\n' + CHANNELS)
    err = _error(capsys, *_run(tmp_path, path))
    assert "invalid plate name '../evil'" in err


def test_unknown_encoder_lists_the_known_ones(tmp_path: Path, capsys) -> None:
    path = _config(tmp_path, 'raw_root = "raw"\nencoders = ["nope"]\n' + CHANNELS)
    err = _error(capsys, *_run(tmp_path, path))
    assert "unknown encoders ['nope']; known: [" in err and "'classical'" in err and not err.endswith('"')


def test_missing_profile_table(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "profiles.csv"
    err = _error(capsys, "import-profiles", str(missing), "--home", str(tmp_path / "home"), "--name", "x")
    assert err == f"bioembed import-profiles: profile table {missing} does not exist (or is not a file)"


def test_bad_sql_and_a_home_without_catalog(tmp_path: Path, capsys) -> None:
    err = _error(capsys, "sql", "--home", str(tmp_path / "home"), "SELECT 1")
    assert err.startswith("bioembed sql: no catalog at ") and str(tmp_path / "home") in err
    err = _error(capsys, "report", "--home", str(tmp_path / "home"))
    assert err.startswith("bioembed report: no catalog at ") and str(tmp_path / "home") in err


def test_debug_shows_the_exception_itself(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        main(["--debug", *_run(tmp_path, missing)])


def test_every_option_with_a_default_shows_it_in_help(capsys) -> None:
    import argparse

    from dagster_project import cli

    parser = cli.build_parser()
    for name, command in next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices.items():
        text = command.format_help()
        for action in command._actions:
            if not (action.required or action.default is None or action.default is False or action.default == []
                    or action.default is argparse.SUPPRESS):
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)
            assert action.help or action.dest == "help", (name, action.dest)  # every option explains itself
