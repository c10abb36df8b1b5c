"""Which Keras backend the train and evaluate stages run on.

Keras reads its backend once, when it is first imported, so those stage
scripts call `select_keras_backend` before anything imports Keras. With
`train.backend: auto` Keras decides as usual ($KERAS_BACKEND, else its config
file, else TensorFlow); `tensorflow` or `jax` sets it for the stage.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from brainmri.core.errors import ModelError

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


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send what native code writes to file descriptor 2 to /dev/null for the duration; Python's
    own `sys.stderr` and exceptions come back as soon as the block ends."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def start_tensorflow_quietly() -> None:
    """Import TensorFlow and probe its devices with its native start-up lines (oneDNN, CUDA probing)
    silenced: TensorFlow writes them through absl before any log level applies. For commands whose
    output is their own; nothing happens where TensorFlow is absent or already loaded."""
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow" or "tensorflow" in sys.modules:
        return
    if importlib.util.find_spec("tensorflow") is None:
        return
    with native_stderr_silenced():
        import tensorflow as tf

        tf.config.list_physical_devices()
