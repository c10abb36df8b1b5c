"""The exceptions the library raises, and the one place that turns them into
what a user sees: a one-line message and a non-zero exit status.

Library code raises; only entry points (each stage's `main()`, the `brainmri`
command) end the process, so a long-running server can catch the same
errors and keep serving."""

from __future__ import annotations

import sys
from collections.abc import Callable


class BrainMRIError(Exception):
    """A problem the user can fix; the message names the key, file or folder at fault."""


class InputRejected(ValueError):
    """An input file refused by a limit or a setting. `plain` says why in plain words (what the web
    page shows); `setting` names the params.yaml key that decides it, added to the message that
    ingest and `brainmri predict` report."""

    def __init__(self, plain: str, setting: str | None = None) -> None:
        self.plain, self.setting = plain, setting
        super().__init__(f"{plain} ({setting})" if setting else plain)


class ParamsError(BrainMRIError):
    """A bad ``params.yaml``: an unknown or misspelt key, a wrong type or value."""

    def __init__(self, message: str) -> None:
        super().__init__(f"params error: {message}")


class DataError(BrainMRIError):
    """Input data that cannot be used: a missing folder or file, too few images, a bad layout."""


class ModelError(BrainMRIError):
    """A model that cannot be built, trained, loaded, explained or exported as asked."""


class TrackingError(BrainMRIError):
    """The MLflow tracking store cannot be used."""


def run_entry_point(main: Callable[[], object]) -> None:
    """Run a stage's `main()`; a BrainMRIError ends the process with its message and exit status 1."""
    try:
        main()
    except BrainMRIError as error:
        sys.exit(str(error))
    except KeyboardInterrupt:  # Ctrl-C, or `kill` during a tracked stage
        sys.exit("interrupted: the stage's outputs are incomplete, run it again")
