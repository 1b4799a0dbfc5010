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

-- Scalar evaluation metrics: encoder, encoder_version, recipe, metric, value.
CREATE OR REPLACE VIEW metrics AS SELECT * FROM lake_metrics;

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
