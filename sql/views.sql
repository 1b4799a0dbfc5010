-- bioembed catalog: user-facing views over the lake.
-- The catalog builder first defines one `lake_<table>` view per lake table
-- (read_parquet over that table's partition files), then runs this file.

-- One row per plate: fields, wells and cells.
CREATE OR REPLACE VIEW plates AS
SELECT i.plate,
       count(DISTINCT i.well)                                    AS n_wells,
       count(*)                                                  AS n_fields,
       (SELECT count(*) FROM lake_cells c WHERE c.plate = i.plate) AS n_cells
FROM lake_images i
GROUP BY i.plate;

-- One row per well: the platemap annotation plus its cell count.
CREATE OR REPLACE VIEW wells AS
SELECT p.plate, p.well, p.perturbation, p.control_type, p.moa,
       coalesce(c.n_cells, 0) AS n_cells
FROM lake_platemap p
LEFT JOIN (SELECT plate, well, count(*) AS n_cells FROM lake_cells GROUP BY ALL) c
  USING (plate, well);

-- One row per segmented single cell.
CREATE OR REPLACE VIEW cells AS SELECT * FROM lake_cells;

-- Per-cell embeddings, every encoder and version side by side.
CREATE OR REPLACE VIEW embeddings AS SELECT * FROM lake_embeddings;

-- The names of each encoder version's embedding columns (output = 'features') and side outputs
-- (e.g. SubCell's 'localization' classes); feature_index is 0-based (features[feature_index + 1] in SQL).
CREATE OR REPLACE VIEW feature_names AS SELECT * FROM lake_feature_names;

-- One row per cell and *named* feature (encoders that name their columns, e.g. the classical
-- encoder's CellProfiler names): WHERE feature = 'AreaShape_Area'.
CREATE OR REPLACE VIEW cell_features AS
SELECT e.plate, e.well, e.site, e.cell_id, e.encoder, e.encoder_version, n.feature,
       e.features[n.feature_index + 1] AS value
FROM lake_embeddings e
JOIN lake_feature_names n
  ON n.encoder = e.encoder AND n.encoder_version = e.encoder_version AND n.output = 'features';

-- Per-cell side outputs stored beside the embedding, one row per cell, output and named value.
CREATE OR REPLACE VIEW cell_outputs AS
SELECT o.plate, o.well, o.site, o.cell_id, o.encoder, o.encoder_version, o.output, n.feature AS name,
       o."values"[n.feature_index + 1] AS value
FROM lake_cell_outputs o
JOIN lake_feature_names n
  ON n.encoder = o.encoder AND n.encoder_version = o.encoder_version AND n.output = o.output;

-- SubCell localization: per cell, pass ('localization' or 'localization_<protein stain>') and class,
-- the raw sigmoid probability averaged over the loaded classifier heads.
CREATE OR REPLACE VIEW localization AS
SELECT plate, well, site, cell_id, encoder, encoder_version, output AS pass, name AS location,
       value AS probability
FROM cell_outputs WHERE output LIKE 'localization%';

-- Embedding throughput per encoder version: crops per second over every plate it embedded.
CREATE OR REPLACE VIEW embedding_throughput AS
SELECT encoder, encoder_version, count(*) AS n_plates, sum(cells) AS cells, sum(seconds) AS seconds,
       sum(cells) / nullif(sum(seconds), 0) AS crops_per_second, any_value(device) AS device
FROM lake_embedding_stats GROUP BY ALL;

-- Per-well profiles (cell -> well aggregation), per encoder and version.
CREATE OR REPLACE VIEW profiles AS SELECT * FROM lake_well_profiles;

-- Feature sets: every encoder version and imported profile table with well profiles in the lake.
CREATE OR REPLACE VIEW feature_sets AS
SELECT encoder AS feature_set, encoder_version AS version, count(DISTINCT plate) AS n_plates,
       count(*) AS n_wells, max(len(features)) AS n_features
FROM lake_well_profiles
GROUP BY ALL;

-- Normalized well profiles, per encoder (feature set), version and recipe (name + recipe_steps).
CREATE OR REPLACE VIEW normalized_profiles AS SELECT * FROM lake_normalized_profiles;

-- Grad-CAMO per cell (Gopalakrishnan et al. 2024): the share of the Grad-CAM map on the cell's own mask
-- (score; chance = mask area / crop area; enrichment = score / chance) and on other cells' masks.
CREATE OR REPLACE VIEW gradcamo_cells AS SELECT * FROM lake_gradcamo_cells;

-- Grad-CAMO per plate (level = 'plate') and per perturbation within a plate (level = 'perturbation'):
-- fraction of scored cells with score > 0.5, mean score, chance, enrichment and neighbour fraction.
CREATE OR REPLACE VIEW gradcamo_summary AS SELECT * FROM lake_gradcamo_summary;

-- Scalar evaluation metrics: encoder, encoder_version, recipe, metric, value. Grad-CAMO aggregates over
-- every plate's cells come in as recipe 'raw' (per cell, before any normalization).
CREATE OR REPLACE VIEW metrics AS
SELECT * FROM lake_metrics
UNION ALL BY NAME
SELECT encoder, encoder_version, 'raw' AS recipe, unnest(['gradcamo_fraction_above', 'gradcamo_mean_score',
       'gradcamo_mean_enrichment', 'gradcamo_mean_neighbour_fraction']) AS metric,
       unnest([avg(CASE WHEN score > 0.5 THEN 1.0 ELSE 0.0 END) FILTER (isfinite(score)),
               avg(score) FILTER (isfinite(score)), avg(enrichment) FILTER (isfinite(score)),
               avg(neighbour_fraction) FILTER (isfinite(score))]) AS value
FROM lake_gradcamo_cells GROUP BY encoder, encoder_version;

-- Per-perturbation (kind = 'replicate') and per-MoA (kind = 'moa') mAP with p-values.
CREATE OR REPLACE VIEW replicate_map AS SELECT * FROM lake_replicate_map;

-- Per feature set and recipe: ok or failed (stage and error), and how replicate mAP was cross-fitted.
CREATE OR REPLACE VIEW recipe_status AS SELECT * FROM lake_recipe_status;

-- Batch removal vs biology preservation, side by side per recipe (Arevalo et al. 2024's two axes):
-- batch mixing of treated wells (batch ASW, kNN batch entropy; higher = better mixed) next to
-- replicate / MoA retrieval and NSC / NSCB.
CREATE OR REPLACE VIEW batch_vs_biology AS
SELECT encoder, encoder_version, recipe,
       max(value) FILTER (metric = 'batch_asw')          AS batch_asw,
       max(value) FILTER (metric = 'batch_knn_entropy')  AS batch_knn_entropy,
       max(value) FILTER (metric = 'batch_knn_accuracy') AS batch_knn_accuracy,
       max(value) FILTER (metric = 'replicate_map')      AS replicate_map,
       max(value) FILTER (metric = 'moa_map')            AS moa_map,
       max(value) FILTER (metric = 'nsc_accuracy')       AS nsc,
       max(value) FILTER (metric = 'nscb_accuracy')      AS nscb
FROM lake_metrics GROUP BY ALL ORDER BY ALL;

-- The k wells most similar (cosine) to one well, within one feature set.
CREATE OR REPLACE MACRO similar_wells(q_plate, q_well, q_encoder, q_recipe, k) AS TABLE
SELECT o.plate, o.well, o.perturbation, o.moa,
       list_cosine_similarity(q.features, o.features) AS cosine_similarity
FROM normalized_profiles q
JOIN normalized_profiles o
  ON o.encoder = q.encoder AND o.encoder_version = q.encoder_version AND o.recipe = q.recipe
 AND NOT (o.plate = q.plate AND o.well = q.well)
WHERE q.plate = q_plate AND q.well = q_well AND q.encoder = q_encoder AND q.recipe = q_recipe
ORDER BY cosine_similarity DESC
LIMIT k;
