"""The ground every other part stands on: params, paths, errors, image decoding, shards, manifests,
MLflow tracking, metrics files, figures, statistics and the Keras backend. Imports nothing above it."""
