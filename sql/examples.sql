-- Example queries (the README shows them; tests/test_sql_examples.py executes every one).

-- name: cells_per_well
SELECT plate, well, perturbation, n_cells FROM wells ORDER BY plate, well LIMIT 5;

-- name: metrics_by_encoder
SELECT encoder, encoder_version, recipe, metric, round(value, 3) AS value
FROM metrics
WHERE metric IN ('replicate_map', 'fraction_retrieved', 'moa_map', 'batch_knn_accuracy')
ORDER BY encoder, recipe, metric;

-- name: top_similar_wells
-- The 5 wells most similar to the first treated well of the first plate (CA-MAE, card recipe).
SELECT * FROM similar_wells(
    (SELECT min(plate) FROM normalized_profiles),
    (SELECT min(well) FROM normalized_profiles
      WHERE control_type = 'treatment' AND plate = (SELECT min(plate) FROM normalized_profiles)),
    'ca_mae', 'card', 5);

-- name: most_active_perturbations
SELECT encoder, recipe, "group" AS perturbation, round(mean_average_precision, 3) AS map,
       corrected_p_value
FROM replicate_map WHERE kind = 'replicate' AND recipe = 'card'
ORDER BY mean_average_precision DESC LIMIT 5;
