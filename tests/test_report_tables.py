"""The shared table formatter of the CLI and the README block: aligned, rounded, missing values explained."""

import json

import polars as pl
import pytest

from bioembed_assets.report import MISSING, README_BEGIN, README_END, format_metrics, format_table, replace_readme_block


def _metrics() -> pl.DataFrame:
    return pl.DataFrame({"encoder": ["classical", "cp"], "encoder_version": ["1", "2"], "recipe": ["raw", "card"],
                         "replicate_map": [0.312345678, 0.5], "control_z_prime": [float("nan"), None]})


def test_text_table_rounds_aligns_and_explains_missing_values() -> None:
    lines = format_metrics(_metrics()).splitlines()
    assert lines[0].split() == ["encoder", "version", "recipe", "rep", "mAP", "retrieved", "nonrep", "mAP", "MoA", "mAP",
                                "MoA", "retr.", "NSC", "NSCB", "plate", "kNN", "Z'"]
    assert len({len(line) for line in lines[:4]}) == 1  # header, rule and rows share the column widths
    assert "0.3123" in lines[2] and "0.5000" in lines[3] and "nan" not in "".join(lines).lower()
    assert lines[2].rstrip().endswith(MISSING)
    assert f"{MISSING} in Z': no positive (or no negative) control wells" in lines
    assert f"{MISSING} in rep mAP" not in "\n".join(lines)  # only columns with a gap get a footnote


def test_machine_formats_keep_precision_and_leave_missing_empty() -> None:
    df = _metrics().select("encoder", "replicate_map", "control_z_prime")
    assert format_table(df, "csv").splitlines()[1] == "classical,0.312345678,"
    assert json.loads(format_table(df, "json"))[0] == {"encoder": "classical", "replicate_map": 0.312345678,
                                                        "control_z_prime": None}
    markdown = format_table(df, "markdown").splitlines()
    assert markdown[1] == "|-----------|--------------:|----------------:|" and markdown[2].endswith(f" {MISSING} |")
    with pytest.raises(ValueError, match="unknown table format 'xlsx'"):
        format_table(df, "xlsx")


def test_readme_block_is_replaced_between_its_markers_only() -> None:
    text = f"before\n{README_BEGIN}\nold\n{README_END}\nafter\n"
    assert replace_readme_block(text, f"{README_BEGIN}\nnew\n{README_END}") == \
        f"before\n{README_BEGIN}\nnew\n{README_END}\nafter\n"
    with pytest.raises(LookupError, match="bioembed report"):
        replace_readme_block("no markers", "x")
