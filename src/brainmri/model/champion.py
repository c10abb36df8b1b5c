"""The `champion` alias of the registered model: moved only by a real improvement.

Every trained model becomes a new version of `tracking.registered_model`,
tagged with the SHA-256 of its `model.keras`. When the evaluate stage has
scored a model, it tags that version with the evaluate run, whose
`evaluate/predictions.csv` holds its test predictions, and asks whether the
version should become the champion: the first one scored does; a later one
only when its macro-F1 beats the champion's on the same test images by more
than the noise (the paired bootstrap interval of the difference lies above
zero, as `brainmri compare` computes it). `models:/<name>@champion` then
names the best model so far in predict and serve.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd

from brainmri.core.errors import DataError
from brainmri.core.paths import PREDICTIONS
from brainmri.core.tracking import MODEL_DIGEST_TAG
from brainmri.model.compare import compare_predictions

CHAMPION = "champion"
EVALUATE_RUN_TAG = "brainmri.evaluate_run"


@dataclass(frozen=True)
class Standing:
    """Where the evaluated model stands against `@champion`, for the log and the model card."""

    registered_model: str
    version: str | None  # None: not a registered version (trained without tracking)
    champion_version: str | None  # the version `@champion` names after the evaluation
    message: str

    @property
    def is_champion(self) -> bool:
        return self.version is not None and self.version == self.champion_version

    def as_dict(self) -> dict:
        return {**asdict(self), "is_champion": self.is_champion}


def untracked_standing(name: str) -> Standing:
    """The standing of a model evaluated without MLflow tracking: never compared."""
    return Standing(name, None, None, "not registered (tracking was off), so not compared with @champion")


def beats(challenger: pd.DataFrame, champion: pd.DataFrame, seed: int = 0) -> tuple[bool, str]:
    """Does `challenger` beat `champion`'s macro-F1 on the same test images by more than the noise?"""
    try:
        comparison = compare_predictions(champion, challenger, seed)
    except DataError as error:
        return False, f"not comparable: {error}"
    _, _, difference, low, high = comparison.metrics["macro_f1"]
    verdict = "beats" if low > 0 else "does not beat"
    return low > 0, f"{verdict} it: macro-F1 {difference:+.3f} [{low:+.3f}, {high:+.3f}] on {comparison.images} images"


def registered_version(client, name: str, digest: str):
    """The registered version of `name` whose model file has this digest, or None."""
    for version in client.search_model_versions(f"name='{name}'"):
        if version.tags.get(MODEL_DIGEST_TAG) == digest:
            return version
    return None


def _champion(client, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # MLflow raises when the alias is not set
        return None


def _predictions_of(client, version) -> pd.DataFrame | None:
    run_id = version.tags.get(EVALUATE_RUN_TAG)
    if not run_id:
        return None
    return pd.read_csv(client.download_artifacts(run_id, f"evaluate/{PREDICTIONS.name}"))


def update_champion(
    client, name: str, digest: str, predictions: pd.DataFrame, evaluate_run: str, headline: str
) -> Standing:
    """Tag the version with its evaluate run, describe it by its `headline` test figures, and move
    the alias when it has earned it; says what happened."""
    version = registered_version(client, name, digest)
    if version is None:
        return Standing(name, None, None, f"{name}: this model is not a registered version; champion unchanged")
    mine = str(version.version)
    client.set_model_version_tag(name, mine, EVALUATE_RUN_TAG, evaluate_run)
    client.update_model_version(name, mine, description=f"{headline} (evaluate run {evaluate_run})")
    current = _champion(client, name)
    if current is None:
        client.set_registered_model_alias(name, CHAMPION, mine)
        return Standing(name, mine, mine, f"{name}: version {mine} is the first champion")
    held_by = str(current.version)
    if held_by == mine:
        return Standing(name, mine, mine, f"{name}: version {mine} is the champion")
    held = _predictions_of(client, current)
    if held is None:
        why = f"champion version {held_by} has no evaluated predictions; champion unchanged"
        return Standing(name, mine, held_by, f"{name}: {why}")
    better, why = beats(predictions, held)
    if better:
        client.set_registered_model_alias(name, CHAMPION, mine)
        return Standing(name, mine, mine, f"{name}: version {mine} {why} of version {held_by}, and is the champion now")
    return Standing(
        name, mine, held_by, f"{name}: version {mine} {why} of champion version {held_by}; champion unchanged"
    )
