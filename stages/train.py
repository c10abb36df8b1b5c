"""train: fit the params-selected model on the balanced shards and save it to models/.

With pretrained weights the backbone is frozen first and the head trained;
`train.fine_tune` then unfreezes the top of the backbone at a lower rate.
With `train.strategy: multi_worker` every machine runs this script; they
train one model together and only the chief writes files and logs."""

from brainmri.backend import select_keras_backend

select_keras_backend()  # train.backend: before anything imports Keras, which reads it once

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path

import keras
import numpy as np

from brainmri.box_supervision import energy_log, supervision_boxes, training_model
from brainmri.calibration import calibrate_model
from brainmri.errors import DataError, run_entry_point
from brainmri.images import sha256_file
from brainmri.input_gate import fit_feature_gate, fit_gate
from brainmri.metrics import write_json
from brainmri.models import (
    APPLICATIONS,
    PRECISE_BN_IMAGES,
    class_probabilities,
    float32_copy,
    model_from_params,
    model_outputs,
    reestimate_batch_norm,
    save_model,
    set_backbone_trainable,
    with_pooled_features,
)
from brainmri.multi_worker import average_batch_norm_statistics, check_workers_agree, weights_digest
from brainmri.params import Params, TrainParams, flatten, load_params
from brainmri.paths import (
    HISTORY_IN_PROGRESS,
    MODEL_FILE,
    MODELS,
    PREPARED,
    TENSORBOARD_LOGS,
    TRAIN_HISTORY,
    metrics_file,
)
from brainmri.shards import ShardIndex, Split
from brainmri.tracking import project_root, stage_run
from brainmri.training import (
    Hardware,
    PhaseLog,
    callbacks,
    class_weights,
    compile_model,
    configure_hardware,
    fit_model,
    scaled_lr,
    steps_per_epoch,
    training_batches,
    validation_batches,
)


def tensorboard_folder() -> Path:
    """logs/tensorboard/<experiment or workspace>-<time> under the workspace, also from an experiment's temp copy."""
    name = os.environ.get("DVC_EXP_NAME") or "workspace"
    return project_root() / TENSORBOARD_LOGS / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def load_shards(p: TrainParams, hardware: Hardware) -> ShardIndex:
    """The balance stage's shards, checked against the params (and, across machines, against every worker's)."""
    index = ShardIndex.load(PREPARED)
    if (index.image_size, index.channels) != (p.image_size, p.channels):
        raise DataError(f"{PREPARED} was written for another image size or channel count: rerun balance")
    if hardware.multi_worker:
        inputs = json.dumps([p.model_dump(), index.files, index.counts], sort_keys=True).encode()
        check_workers_agree(hardware.strategy, "train params and data/prepared", hashlib.sha256(inputs).hexdigest())
    return index


def model_builder(p: TrainParams, num_classes: int) -> Callable[[str | None], keras.Model]:
    """Builds the params' model with the given weights (None: random, as for a float32 copy)."""
    return partial(model_from_params, p, num_classes)


def read_splits(index: ShardIndex) -> dict[str, Split]:
    """The training and validation splits, read once and shared by the dataset log, the loaders,
    batch-norm re-estimation and calibration."""
    return {part: index.arrays(part) for part in ("train", "val")}


def fit_phases(
    model: keras.Model,
    p: TrainParams,
    hardware: Hardware,
    index: ShardIndex,
    splits: dict[str, Split],
    run,
) -> dict[str, list]:
    """Train (a pretrained backbone frozen), then fine-tune its top when asked; the whole history."""
    global_batch = p.batch_size * hardware.replicas
    # Where every worker or device needs a share of every training batch, the last partial one is dropped.
    drop_remainder = hardware.equal_batches
    if drop_remainder and index.size("train") < global_batch:
        raise DataError(
            f"the train split has {index.size('train')} images, fewer than one global batch "
            f"({p.batch_size} x {hardware.replicas} replicas): lower train.batch_size"
        )
    steps = steps_per_epoch(index, global_batch, drop_remainder)
    boxes = supervision_boxes(index, p)
    print(supervision_summary(boxes, p))
    train_boxes, val_boxes = (None, None) if boxes is None else (boxes["train"], boxes["val"])
    train_data = training_batches(index, splits["train"], p, hardware, global_batch, drop_remainder, train_boxes)
    val_data = validation_batches(index, splits["val"], hardware, global_batch, val_boxes)
    num_classes = len(index.classes)
    measures = () if boxes is None else (energy_log(model, splits, boxes, num_classes),)
    with hardware.strategy.scope():
        if p.model in APPLICATIONS and p.weights is not None:
            set_backbone_trainable(model, False)
        trainer = training_model(model, p, boxes)  # shares the model's weights
        compile_model(trainer, p, num_classes, steps_per_epoch=steps, global_batch=global_batch)
    weight_per_class = class_weights(index, p.class_weight)
    logs = tensorboard_folder() if p.tensorboard else None

    def phase_callbacks(phase: int) -> list:
        # Two phases: each epoch says which, in the history and in MLflow.
        marked = (*measures, PhaseLog(phase)) if p.fine_tune.epochs else measures
        return callbacks(p, HISTORY_IN_PROGRESS, run.keras_callbacks(), phase == 2, hardware.chief, logs, marked)

    history = fit_model(trainer, hardware, train_data, val_data, p.epochs, phase_callbacks(1), weight_per_class)
    if p.fine_tune.epochs:
        done = len(history["val_loss"])
        with hardware.strategy.scope():
            set_backbone_trainable(model, True, top_layers=p.fine_tune.layers)
            compile_model(
                trainer,
                p,
                num_classes,
                lr_value=p.fine_tune.lr,
                epochs=p.fine_tune.epochs,
                steps_per_epoch=steps,
                warmup_epochs=0,
                global_batch=global_batch,
            )
        last = done + p.fine_tune.epochs
        tuned = fit_model(trainer, hardware, train_data, val_data, last, phase_callbacks(2), weight_per_class, done)
        history = {key: history[key] + tuned.get(key, []) for key in history}
    return history


def input_gate(model: keras.Model, train: Split, batch_size: int) -> dict:
    """What predict and serve compare their inputs with: the training inputs' statistics, and
    their place in the model's feature space (brainmri.input_gate)."""
    features, _ = model_outputs(with_pooled_features(model), train.images, batch_size)
    return {**fit_gate(train.images), "features": fit_feature_gate(np.asarray(features), train.labels)}


def supervision_summary(boxes: dict[str, np.ndarray] | None, p: TrainParams) -> str:
    if boxes is None:
        return "train: labels only (no box term)"
    boxed = int((boxes["train"][:, 2] > boxes["train"][:, 0]).sum())
    return f"train: box energy term (weight {p.localisation.weight:g}) on {boxed} boxed training images"


def calibration_summary(calibration: dict, images: int) -> str:
    if calibration["temperature"] == calibration["temperature_fitted"]:
        return f"train: temperature {calibration['temperature']:.3f}, fitted on {images} validation images"
    return (
        f"train: temperature {calibration['temperature_fitted']:.3f} fitted on {images} validation images "
        "raised their calibration error: not applied"
    )


def finish(
    model: keras.Model, build: Callable, p: TrainParams, hardware: Hardware, splits: dict[str, Split]
) -> tuple[keras.Model, dict[str, float], dict[str, list]]:
    """What inference needs after training: float32, batch-norm statistics of the final weights,
    calibrated probabilities, the validation confidences an automatic review threshold is chosen
    from, and (across machines) proof that every worker holds the same model."""
    if hardware.multi_worker:
        average_batch_norm_statistics(model, hardware.strategy)  # each worker's follow only its own batches
    distributed = hardware.multi_worker or (hardware.backend == "jax" and hardware.strategy.distribution)
    if hardware.precision != "float32" or distributed:
        # The saved model computes in float32 whatever training used: the same
        # answers on every machine, and exporters that know no bfloat16. The copy
        # is also free of any distribution strategy, so what follows runs locally.
        keras.mixed_precision.set_global_policy("float32")
        if hardware.backend == "jax":
            keras.distribution.set_distribution(None)
        model = float32_copy(model, build(None))
    if p.model == "compact_cnn" and p.norm == "batch":
        images = splits["train"].images
        reestimate_batch_norm(model, images, p.batch_size, seed=p.seed)
        used = min(len(images), PRECISE_BN_IMAGES)
        print(f"train: batch-norm statistics re-estimated over {used} training images")
    calibration, validation = {"temperature": 1.0}, {}
    if len(splits["val"].labels):
        images, labels, _ = splits["val"]
        if p.calibrate:
            calibration = calibrate_model(model, images, labels, p.batch_size)
            print(calibration_summary(calibration, len(labels)))
        probabilities = class_probabilities(model, images, p.batch_size)
        validation = {
            "validation_confidence": [round(float(c), 6) for c in probabilities.max(axis=1)],
            "validation_correct": [bool(c) for c in probabilities.argmax(axis=1) == labels],
        }
    if hardware.multi_worker:
        digest = weights_digest(model)
        check_workers_agree(hardware.strategy, "the trained weights", digest)
        print(f"train: every worker holds the same weights (sha256 {digest})")
    return model, calibration, validation


def save_and_log(
    model: keras.Model,
    history: dict[str, list],
    calibration: dict[str, float],
    validation: dict[str, list],
    params: Params,
    hardware: Hardware,
    index: ShardIndex,
    example: np.ndarray,
    input_gate: dict,
    run,
) -> None:
    """models/, the history and metrics/train.json; the same figures and the model to MLflow."""
    p = params.train
    metadata = {
        "classes": index.classes,
        "image_size": p.image_size,
        "channels": p.channels,
        "crop": index.crop,
        "model": p.model,
        "trained_precision": hardware.precision,
        "trained_backend": hardware.backend,
        "temperature": calibration["temperature"],
        "input_gate": input_gate,
        **validation,
    }
    save_model(model, MODELS, metadata)
    TRAIN_HISTORY.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(HISTORY_IN_PROGRESS, TRAIN_HISTORY)
    best = min(range(len(history["val_loss"])), key=history["val_loss"].__getitem__)
    summary = {
        "epochs_run": len(history["val_loss"]),
        "best_epoch": best + 1,
        "best_val_loss": history["val_loss"][best],
        "best_val_accuracy": history["val_accuracy"][best],
        "parameters": model.count_params(),
        **calibration,
    }
    if "phase" in history:  # a pretrained backbone, fine-tuned: how long each phase ran
        summary["epochs_frozen"] = history["phase"].count(1)
        summary["epochs_fine_tuned"] = history["phase"].count(2)
    write_json(summary, metrics_file("train"))
    run.log_metrics({f"final.{key}": value for key, value in summary.items()})
    run.log_artifact(str(MODELS / "model.json"), "model_meta")
    run.log_keras_model(
        model,
        example=example,
        registered_name=params.tracking.registered_model,
        digest=sha256_file(MODELS / MODEL_FILE),
    )
    print(f"train: best epoch {best + 1}, val accuracy {summary['best_val_accuracy']:.3f}")


def log_datasets(index: ShardIndex, splits: dict[str, Split], run) -> None:
    """The training and validation images as MLflow dataset inputs: the same data has one name
    wherever its folder lies."""
    for part, context in (("train", "training"), ("val", "validation")):
        _, labels, paths = splits[part]
        run.log_split(index, part, labels, paths, context)


def main() -> None:
    params = load_params()
    p = params.train
    hardware = configure_hardware(p)  # first: devices cannot change once TensorFlow runs

    with stage_run("train", params.tracking, flatten(p, "train"), log=hardware.chief) as run:
        keras.utils.set_random_seed(p.seed)
        index = load_shards(p, hardware)
        splits = read_splits(index)
        log_datasets(index, splits, run)
        build = model_builder(p, len(index.classes))
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
        model, calibration, validation = finish(model, build, p, hardware, splits)
        if hardware.chief:
            example = (splits["val"] if len(splits["val"].labels) else splits["train"]).images[:2]
            gate = input_gate(model, splits["train"], p.batch_size)
            save_and_log(model, history, calibration, validation, params, hardware, index, example, gate, run)
        else:
            print("train: done; the chief writes models/ and metrics/ and logs to MLflow")


if __name__ == "__main__":
    run_entry_point(main)
