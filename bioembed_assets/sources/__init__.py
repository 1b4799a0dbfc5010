"""Readers from acquisition layouts to bioembed's canonical inputs (one module per layout), plus the
synthetic Cell Painting screen generator.

- `phenix`: Opera Phenix / Cell Painting Gallery folders (`rRRcCCfFFpPP-chKsk1fk1fl1.tiff`) -> `FieldFiles`.
- `platemap`: platemap CSV/TSV -> validated table with `schema.PLATEMAP_COLUMNS`.
- `synthetic`: a deterministic synthetic screen written in the Phenix layout, with ground truth.
"""
