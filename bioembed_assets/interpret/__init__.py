"""Interpretation of differentiable encoders: Grad-CAM / attention rollout (`gradcam`, `adapters`), the
Grad-CAMO score (`gradcamo`), linear probes such as the plate-label probe (`probe`), and the per-plate
entry (`plate`)."""
