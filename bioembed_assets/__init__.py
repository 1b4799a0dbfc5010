"""bioembed: image-based profiling library (plates -> crops -> embeddings -> profiles -> metrics).

This package never imports Dagster; every function is usable from a notebook.
"""

__version__ = "0.1.0"
