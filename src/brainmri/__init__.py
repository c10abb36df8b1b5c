"""brainmri: a DVC + MLflow pipeline that classifies brain MRI slices."""

import os

# TensorFlow's C++ INFO/WARNING lines (oneDNN, CPU features, CUDA probing) bury
# the stage output; errors still show. Users can override the variable.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# MLflow's telemetry makes a DNS lookup; this package's modules import mlflow after this line.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__version__ = "0.1.0"
