"""Readers from acquisition layouts to bioembed's canonical inputs (one module per layout), plus the
synthetic Cell Painting screen generator.

- `layouts`: the `FieldSource` protocol (one site: read a stain's 2-D image, its header, its location),
  `FieldFiles`, and `list_fields(layout, plate_dir, plate, channel_map, **options)` over `LAYOUTS`:
  - `phenix`: Opera Phenix / Cell Painting Gallery folders (`rRRcCCfFFpPP-chKsk1fk1fl1.tiff`);
  - `imagexpress`: MetaXpress `<name>_<well>_s<site>_w<channel>[<uuid>].tif` and `<name>_<well>f<ff>d<c>.tif`;
  - `loaddata`: a CellProfiler LoadData CSV (`FileName_<X>`, `PathName_<X>`, `Metadata_Well`, ...);
  - `rxrx`: Recursion RxRx PNGs (`<well>_s<site>_w<channel>.png`);
  - `omezarr`: an OME-Zarr (NGFF 0.4 / 0.5) HCS plate (`ZarrField`);
  - `regex`: any naming, described by a regular expression with named groups.
- `platemap`: platemap CSV/TSV -> validated table with `schema.PLATEMAP_COLUMNS` (column and control
  mappings), and `validate_platemap_join` (wells with images vs wells in the platemap).
- `public`: platemaps of public sets that need knowledge beyond their files (BBBC013, JUMP).
- `validate`: `check_plate_folder`, the cheap check before a folder becomes a partition.
- `synthetic`: a deterministic synthetic screen written in the Phenix layout, with ground truth.
"""
