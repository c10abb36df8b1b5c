import pandas as pd
from mlflow import MlflowClient

from brainmri.core.tracking import MODEL_DIGEST_TAG
from brainmri.model.champion import CHAMPION, beats, update_champion


def predictions(wrong: range) -> pd.DataFrame:
    """200 test images of two classes, every prediction right except those in `wrong`."""
    actual = ["glioma", "pituitary"] * 100
    flipped = {"glioma": "pituitary", "pituitary": "glioma"}
    predicted = [flipped[label] if i in wrong else label for i, label in enumerate(actual)]
    return pd.DataFrame({"path": [f"{i}.jpg" for i in range(200)], "actual": actual, "predicted": predicted})


def test_beating_the_champion_takes_more_than_noise_on_the_same_images():
    held = predictions(range(40))
    assert not beats(held, held)[0]
    assert not beats(predictions(range(38)), held)[0]  # two more right: noise
    better, why = beats(predictions(range(10)), held)  # thirty more right
    assert better and why.startswith("beats it: macro-F1 +0.15")
    elsewhere, why = beats(held.assign(path=held["path"].str.replace(".jpg", ".png")), held)
    assert not elsewhere and why.startswith("not comparable: A and B were scored on different test images")


def test_the_champion_alias_moves_only_on_a_significant_improvement(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("runs", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_registered_model("classifier")

    def scored(digest: str, table: pd.DataFrame) -> str:
        """A registered version with this model digest, and an evaluate run that logged its predictions."""
        train = client.create_run(experiment).info.run_id
        client.create_model_version("classifier", str(tmp_path), train, tags={MODEL_DIGEST_TAG: digest})
        table.to_csv(tmp_path / "predictions.csv", index=False)
        evaluate = client.create_run(experiment).info.run_id
        client.log_artifact(evaluate, str(tmp_path / "predictions.csv"), "evaluate")
        return update_champion(client, "classifier", digest, table, evaluate, "test macro-F1 0.9 [0.8, 1.0]")

    first = scored("a", predictions(range(40)))
    assert first.message == "classifier: version 1 is the first champion" and first.is_champion
    assert client.get_model_version("classifier", "1").description.startswith("test macro-F1 0.9 [0.8, 1.0] (evaluate")
    challenger = scored("b", predictions(range(38)))
    assert "does not beat it" in challenger.message and (challenger.version, challenger.champion_version) == ("2", "1")
    assert not challenger.is_champion
    assert str(client.get_model_version_by_alias("classifier", CHAMPION).version) == "1"
    better = scored("c", predictions(range(10)))
    assert "is the champion now" in better.message and better.is_champion
    assert str(client.get_model_version_by_alias("classifier", CHAMPION).version) == "3"
    unknown = update_champion(client, "classifier", "never-registered", predictions(range(0)), "run", "")
    assert "not a registered version" in unknown.message and unknown.version is None and not unknown.is_champion
