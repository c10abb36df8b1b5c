"""train: fit the params-selected model on the balanced shards and save it to models/.

With pretrained weights the backbone is frozen first and the head trained;
`train.fine_tune` then unfreezes the top of the backbone at a lower rate.
With `train.strategy: multi_worker` every machine runs this script; they
train one model together and only the chief writes files and logs."""

from brainmri.core.backend import select_keras_backend

select_keras_backend()  # train.backend: before anything imports Keras, which reads it once

import hashlib
import json
import shutil
from functools import partial

import keras
import numpy as np

from brainmri.core.errors import DataError, run_entry_point
from brainmri.core.images import sha256_file
from brainmri.core.metrics import write_figures
from brainmri.core.params import Params, TrainParams, flatten, load_params
from brainmri.core.paths import HISTORY_IN_PROGRESS, MODEL_FILE, MODELS, PREPARED, TRAIN_HISTORY
from brainmri.core.shards import ShardIndex, Split
from brainmri.core.tracking import StageRun, stage_run
from brainmri.model.fitting import fit_phases, input_gate_statistics, prepare_for_inference, training_summary
from brainmri.model.models import model_from_params, save_model
from brainmri.model.multi_worker import check_workers_agree
from brainmri.model.training import Hardware, configure_hardware, scaled_lr


def load_shards(p: TrainParams, hardware: Hardware) -> ShardIndex:
    """The balance stage's shards, checked against the params (and, across machines, against every worker's)."""
    index = ShardIndex.load(PREPARED)
    if (index.image_size, index.channels) != (p.image_size, p.channels):
        raise DataError(f"{PREPARED} was written for another image size or channel count: rerun balance")
    if hardware.multi_worker:
        inputs = json.dumps([p.model_dump(), index.files, index.counts], sort_keys=True).encode()
        check_workers_agree(hardware.strategy, "train params and data/prepared", hashlib.sha256(inputs).hexdigest())
    return index


def read_splits(index: ShardIndex, run: StageRun) -> dict[str, Split]:
    """The training and validation splits, read once, logged as MLflow dataset inputs and shared by the
    loaders, batch-norm re-estimation and calibration."""
    splits = {part: index.arrays(part) for part in ("train", "val")}
    for part, context in (("train", "training"), ("val", "validation")):
        _, labels, paths = splits[part]
        run.log_split(index, part, labels, paths, context)
    return splits


def save_and_log(
    model: keras.Model,
    history: dict[str, list],
    calibration: dict[str, float],
    metadata: dict,
    params: Params,
    example: np.ndarray,
    run: StageRun,
) -> None:
    """models/, the history and metrics/train.json; the same figures and the model to MLflow."""
    save_model(model, MODELS, metadata)
    TRAIN_HISTORY.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(HISTORY_IN_PROGRESS, TRAIN_HISTORY)
    summary = training_summary(history, model.count_params(), calibration)
    write_figures("train", summary)
    run.log_metrics({f"final.{key}": value for key, value in summary.items()})
    run.log_artifact(str(MODELS / "model.json"), "model_meta")
    digest = sha256_file(MODELS / MODEL_FILE)
    run.log_keras_model(model, example=example, registered_name=params.tracking.registered_model, digest=digest)
    print(f"train: best epoch {summary['best_epoch']}, val accuracy {summary['best_val_accuracy']:.3f}")


def main() -> None:
    params = load_params()
    p = params.train
    hardware = configure_hardware(p)  # first: devices cannot change once TensorFlow runs

    with stage_run("train", params.tracking, flatten(p, "train"), log=hardware.chief) as run:
        keras.utils.set_random_seed(p.seed)
        index = load_shards(p, hardware)
        splits = read_splits(index, run)
        build = partial(model_from_params, p, len(index.classes))  # weights -> model
        with hardware.strategy.scope():
            model = build(p.weights)
        print(f"train: {p.model}, {model.count_params():,} parameters, {hardware.describe()}")
        for key, value in hardware.describe().items():
            run.set_tag(f"brainmri.train.{key}", str(value))
        global_batch = p.batch_size * hardware.replicas
        lr = scaled_lr(p.lr, global_batch, p.lr_scaling)
        print(f"train: learning rate {lr:g} at a global batch of {global_batch} (train.lr_scaling: {p.lr_scaling})")
        run.log_param("train.lr_scaled", lr)
        history = fit_phases(model, p, hardware, index, splits, run)
        model, calibration, validation = prepare_for_inference(model, build, p, hardware, splits)
        if not hardware.chief:
            print("train: done; the chief writes models/ and metrics/ and logs to MLflow")
            return
        metadata = {
            "classes": index.classes,
            "image_size": p.image_size,
            "channels": p.channels,
            "crop": index.crop,
            "model": p.model,
            "trained_precision": hardware.precision,
            "trained_backend": hardware.backend,
            "temperature": calibration["temperature"],
            "input_gate": input_gate_statistics(model, splits["train"], p.batch_size),
            **validation,
        }
        example = (splits["val"] if len(splits["val"].labels) else splits["train"]).images[:2]
        save_and_log(model, history, calibration, metadata, params, example, run)


if __name__ == "__main__":
    run_entry_point(main)
