"""Training loops for trainable encoders: data from crop stores, the loop, and MLflow tracking."""
