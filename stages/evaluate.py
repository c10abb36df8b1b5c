"""evaluate: score the trained model on the held-out test split."""

from pathlib import Path

import mlflow
import pandas as pd

from brainmri.evaluation import classification_metrics
from brainmri.manifest import write_manifest
from brainmri.metrics import write_json
from brainmri.models import class_probabilities, load_model
from brainmri.params import flatten, load_params
from brainmri.shards import ShardIndex
from brainmri.tracking import stage_run

CONFUSION = Path("metrics/confusion.csv")
PREDICTIONS = Path("reports/predictions.csv")

params = load_params()
with stage_run("evaluate", params.tracking.experiment, flatten(params.evaluate, "evaluate")):
    model, meta = load_model("models")
    index = ShardIndex.load("data/prepared")
    images, labels, paths = index.arrays("test")
    if len(labels) == 0:
        raise SystemExit("the test split is empty: raise split.test or add images")
    probabilities = class_probabilities(model, images, params.evaluate.batch_size)
    metrics = classification_metrics(labels, probabilities, meta["classes"])
    write_json(metrics, "metrics/evaluate.json")

    classes = meta["classes"]
    predicted = probabilities.argmax(axis=1)
    table = pd.DataFrame({
        "path": paths,
        "actual": [classes[i] for i in labels],
        "predicted": [classes[i] for i in predicted],
        "confidence": probabilities.max(axis=1),
        **{f"p_{name}": probabilities[:, i] for i, name in enumerate(classes)},
    }).sort_values("path", kind="mergesort")
    write_manifest(table, PREDICTIONS)
    write_manifest(table[["actual", "predicted"]], CONFUSION)

    mlflow.log_metrics({key: value for key, value in metrics.items() if value == value})  # NaN is not loggable
    mlflow.log_artifact(str(PREDICTIONS), artifact_path="evaluate")
    print(f"evaluate: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} on {len(labels)} images")
