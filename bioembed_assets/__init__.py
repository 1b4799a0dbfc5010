"""bioembed: image-based profiling library (plates -> crops -> embeddings -> profiles -> metrics).

This package never imports Dagster; every function is usable from a notebook.
"""

import os

__version__ = "0.1.0"

# MLflow's telemetry sends usage data and writes ~/.config/mlflow/telemetry.json. Every process that
# imports bioembed (CLI, `dagster dev`, the daemon, notebooks) turns it off before MLflow is imported;
# set MLFLOW_DISABLE_TELEMETRY=false to leave it on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
