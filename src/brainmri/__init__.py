"""brainmri: a DVC + MLflow pipeline that classifies brain MRI slices."""

import os

# TensorFlow's C++ INFO/WARNING lines (oneDNN, CPU features, CUDA probing) bury
# the stage output; errors still show. Users can override the variable.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
