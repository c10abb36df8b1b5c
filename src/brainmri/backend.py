"""Which Keras backend the train and evaluate stages run on.

Keras reads its backend once, when it is first imported, so those stage
scripts call `select_keras_backend` before anything imports Keras. With
`train.backend: auto` Keras decides as usual ($KERAS_BACKEND, else its config
file, else TensorFlow); `tensorflow` or `jax` sets it for the stage.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from brainmri.errors import ModelError

BACKENDS = ("tensorflow", "jax")


def select_keras_backend(params_file: str | Path = "params.yaml") -> None:
    """Point Keras at params.yaml's `train.backend`, if Keras has not been imported yet.

    Lenient on purpose: a missing or malformed params file is left for the
    stage's `main()` to report as a one-line error, and `check_backend`
    catches a Keras that was already running on another backend."""
    try:
        wanted = yaml.safe_load(Path(params_file).read_text())["train"]["backend"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return
    if wanted in BACKENDS:
        use_keras_backend(wanted)


def use_keras_backend(name: str) -> None:
    """Point Keras at `name`, if Keras has not been imported yet (it reads $KERAS_BACKEND once)."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = name


def check_backend(wanted: str) -> str:
    """The backend Keras runs on; ModelError if `train.backend` asked for another or the stage cannot use it."""
    import keras

    running = keras.backend.backend()
    if wanted != "auto" and running != wanted:
        raise ModelError(
            f"train.backend is {wanted}, but Keras already runs on {running} in this process "
            "(Keras reads its backend once, at import)"
        )
    if running not in BACKENDS:
        raise ModelError(f"Keras runs on {running}: the train and evaluate stages run on {' or '.join(BACKENDS)}")
    return running
