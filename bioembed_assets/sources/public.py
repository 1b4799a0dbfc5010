"""Platemaps of well-known public data sets, whose metadata files need a little knowledge to read.

- `bbbc013_platemap`: BBBC013 / CellProfiler ExampleSBS (`1049_Metadata.csv`), whose file carries only
  dose indices and control flags; the compounds come from the BBBC013 description.
- `jump_platemap`: a JUMP-Target / JUMP-MOA platemap TSV joined with its perturbation metadata TSV,
  as JUMP's profiling recipe does, giving the `Metadata_*` columns JUMP profiles carry.

Both return tables that `platemap.platemap_from_frame` / `read_platemap` validate.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from bioembed_assets.schema import CONTROL_TYPE, MOA, PERTURBATION, BioembedInputError, ControlType
from bioembed_assets.sources.platemap import platemap_from_frame

BBBC013_COMPOUNDS: dict[str, str] = {**dict.fromkeys("ABCD", "Wortmannin"), **dict.fromkeys("EFGH", "LY294002")}
"""Plate row -> compound of the dose series, per the BBBC013 description (not in the metadata file)."""
BBBC013_MOA = "PI3K inhibitor"
BBBC013_NEGATIVE = "vehicle"
"""Perturbation name of BBBC013's negative-control wells (dose index 0, no compound; shared by both rows groups)."""
BBBC013_CONTROLS: dict[str, str] = {"-1": ControlType.NEGATIVE, "1": ControlType.POSITIVE, "0": ControlType.TREATMENT}
"""`SBS_Controls` value -> control type."""


def bbbc013_platemap(path: str | Path, plate: str) -> pl.DataFrame:
    """The validated platemap of the BBBC013 plate from its `1049_Metadata.csv`.

    The file has `Row` (A-H), `Column` (01-12), `SBS_Doses` (dose index 0-10) and `SBS_Controls`
    (-1 negative, +1 positive, 0 dose series). Rows A-D are a Wortmannin dose series and rows E-H an
    LY294002 series (both PI3K inhibitors; the compound is not in the file). Perturbation is
    ``f"{compound}_dose{NN}"`` (e.g. ``Wortmannin_dose03``; the positive controls are the top dose,
    ``..._dose10``) with moa "PI3K inhibitor"; negative-control wells (dose 0, no compound) are
    ``"vehicle"`` with no moa. Controls map -1/+1/0 to negative/positive/treatment.
    """
    path = Path(path)
    if not path.is_file():
        raise BioembedInputError("BBBC013 metadata file does not exist", plate=plate, path=path)
    raw = pl.read_csv(path, infer_schema=False)
    need = {"Row", "Column", "SBS_Doses", "SBS_Controls"}
    if not need <= set(raw.columns):
        raise BioembedInputError(f"expected columns {sorted(need)} (found {raw.columns})", plate=plate, path=path)
    unknown_rows = sorted(set(raw["Row"].str.strip_chars().to_list()) - set(BBBC013_COMPOUNDS))
    if unknown_rows:
        raise BioembedInputError(f"rows {unknown_rows} are not in the BBBC013 layout (A-H)", plate=plate, path=path)
    compound = pl.col("Row").str.strip_chars().replace_strict(BBBC013_COMPOUNDS)
    dose = pl.col("SBS_Doses").str.strip_chars().cast(pl.Int64)
    negative = pl.col("SBS_Controls").str.strip_chars().cast(pl.Int64) == -1
    frame = raw.select(
        pl.col("Row").alias("row"),
        pl.col("Column").alias("column"),
        pl.when(negative).then(pl.lit(BBBC013_NEGATIVE))
        .otherwise(pl.format("{}_dose{}", compound, dose.cast(pl.Utf8).str.zfill(2))).alias(PERTURBATION),
        pl.col("SBS_Controls").alias(CONTROL_TYPE),
        pl.when(negative).then(pl.lit(None, pl.Utf8)).otherwise(pl.lit(BBBC013_MOA)).alias(MOA),
    )
    return platemap_from_frame(frame, plate, controls=BBBC013_CONTROLS, source=str(path))


def jump_platemap(platemap_tsv: str | Path, metadata_tsv: str | Path) -> pl.DataFrame:
    """A JUMP platemap (`well_position`, `broad_sample`[, `solvent`]) joined with its metadata TSV on
    `broad_sample`, with JUMP's `Metadata_` column names (every column as text), sorted by well.

    As in JUMP's pandas-based recipe, an empty `broad_sample` in the platemap matches the metadata row
    whose `broad_sample` is "NA" or empty: in the compound sets that is DMSO (pert_type control,
    control_type negcon), and its `broad_sample` becomes its `pert_iname` ("DMSO"). Wells left without
    metadata (the empty wells of the ORF/CRISPR maps) get `broad_sample`, `pert_type` and
    `control_type` "empty": drop them, or map "empty" with `controls`. Feed the result to
    `platemap_from_frame` (or write it as the plate's platemap) with e.g.
    ``columns={"perturbation": "Metadata_broad_sample", "control_type": "Metadata_control_type"}`` and
    ``controls={"NA": "treatment", "": "treatment"}`` (JUMP writes "NA" or nothing for treatments).
    """
    pm = pl.read_csv(platemap_tsv, separator="\t", infer_schema=False)
    meta = pl.read_csv(metadata_tsv, separator="\t", infer_schema=False)
    for name, df, col in (("platemap", pm, "well_position"), ("platemap", pm, "broad_sample"),
                          ("metadata", meta, "broad_sample")):
        if col not in df.columns:
            raise BioembedInputError(f"JUMP {name} lacks column {col!r} (found {df.columns})",
                                     path=platemap_tsv if name == "platemap" else metadata_tsv)
    key = "_join_key"
    sample = pl.col("broad_sample").fill_null("").str.strip_chars()
    pm = pm.with_columns(pl.when(sample == "").then(pl.lit("NA")).otherwise(sample).alias(key)).drop("broad_sample")
    meta = meta.with_columns(pl.when(sample == "").then(pl.lit("NA")).otherwise(sample).alias(key))
    meta = meta.unique(key, keep="first", maintain_order=True)
    meta = meta.drop([c for c in meta.columns if c in pm.columns and c != key])
    joined = pm.join(meta, on=key, how="left")
    unmatched = pl.col("broad_sample").is_null()
    name = pl.col("pert_iname") if "pert_iname" in joined.columns else pl.lit(None, pl.Utf8)
    fixes = [
        pl.when(unmatched).then(pl.lit("empty"))
        .when(pl.col(key) == "NA").then(pl.coalesce(name, pl.lit("NA")))
        .otherwise(pl.col("broad_sample")).alias("broad_sample")
    ]
    fixes += [pl.when(unmatched).then(pl.lit("empty")).otherwise(pl.col(c)).alias(c)
              for c in ("pert_type", "control_type") if c in joined.columns]
    joined = joined.with_columns(fixes).drop(key)
    renames = {"well_position": "Metadata_Well"} | {c: f"Metadata_{c}" for c in joined.columns if c != "well_position"}
    return joined.rename(renames).sort("Metadata_Well")


__all__ = ["BBBC013_COMPOUNDS", "BBBC013_CONTROLS", "BBBC013_MOA", "BBBC013_NEGATIVE", "bbbc013_platemap", "jump_platemap"]
