"""Explanations: Grad-CAM heatmaps and how well they point at annotated lesions. Imports only core, data
and model."""
