"""The train stage's work between the shards and the saved model: the training phases (a pretrained
backbone frozen, then its top fine-tuned), then what inference needs: float32, batch-norm statistics
of the final weights, calibration, validation confidences and the input gate's statistics."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import keras
import numpy as np

from brainmri.core.errors import DataError
from brainmri.core.params import TrainParams
from brainmri.core.paths import HISTORY_IN_PROGRESS, TENSORBOARD_LOGS
from brainmri.core.shards import ShardIndex, Split
from brainmri.core.tracking import StageRun, project_root
from brainmri.data.input_gate import fit_feature_gate, fit_gate
from brainmri.model.box_supervision import energy_log, supervision_boxes, training_model
from brainmri.model.calibration import calibrate_model
from brainmri.model.models import (
    APPLICATIONS,
    PRECISE_BN_IMAGES,
    class_probabilities,
    float32_copy,
    model_outputs,
    reestimate_batch_norm,
    set_backbone_trainable,
    with_pooled_features,
)
from brainmri.model.multi_worker import average_batch_norm_statistics, check_workers_agree, weights_digest
from brainmri.model.training import (
    Hardware,
    PhaseLog,
    callbacks,
    class_weights,
    compile_model,
    fit_model,
    steps_per_epoch,
    training_batches,
    validation_batches,
)


def tensorboard_folder() -> Path:
    """logs/tensorboard/<experiment or workspace>-<time> under the workspace, also from an experiment's temp copy."""
    name = os.environ.get("DVC_EXP_NAME") or "workspace"
    return project_root() / TENSORBOARD_LOGS / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def fit_phases(
    model: keras.Model,
    p: TrainParams,
    hardware: Hardware,
    index: ShardIndex,
    splits: dict[str, Split],
    run: StageRun,
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


def input_gate_statistics(model: keras.Model, train: Split, batch_size: int) -> dict:
    """What predict and serve compare their inputs with: the training inputs' statistics, and
    their place in the model's feature space (brainmri.data.input_gate)."""
    features, _ = model_outputs(with_pooled_features(model), train.images, batch_size)
    return {**fit_gate(train.images), "features": fit_feature_gate(np.asarray(features), train.labels)}


def supervision_summary(boxes: dict[str, np.ndarray] | None, p: TrainParams) -> str:
    if boxes is None:
        return "train: labels only (no box term)"
    boxed = int((boxes["train"][:, 2] > boxes["train"][:, 0]).sum())
    return f"train: box {p.localisation.term} term (weight {p.localisation.weight:g}) on {boxed} boxed training images"


def calibration_summary(calibration: dict, images: int) -> str:
    if calibration["temperature"] == calibration["temperature_fitted"]:
        return f"train: temperature {calibration['temperature']:.3f}, fitted on {images} validation images"
    return (
        f"train: temperature {calibration['temperature_fitted']:.3f} fitted on {images} validation images "
        "raised their calibration error: not applied"
    )


def prepare_for_inference(
    model: keras.Model, build: Callable, p: TrainParams, hardware: Hardware, splits: dict[str, Split]
) -> tuple[keras.Model, dict[str, float], dict[str, list]]:
    """What inference needs after training: float32, batch-norm statistics of the final weights,
    calibrated probabilities, the validation confidences an automatic review threshold is chosen
    from, and (across machines) proof that every worker holds the same model."""
    if hardware.multi_worker:
        average_batch_norm_statistics(model, hardware.strategy)  # each worker's follow only its own batches
    distributed = hardware.multi_worker or (hardware.backend == "jax" and hardware.strategy.distribution)
    # In float64 (train.deterministic: portable) the statistics and the temperature are fitted before
    # the float32 copy, so that they too are the same on every CPU.
    copy_last = hardware.precision == "float64" and not distributed
    if (hardware.precision != "float32" or distributed) and not copy_last:
        model = inference_copy(model, build, hardware)
    reestimate_statistics(model, p, splits["train"].images)
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
    if copy_last:
        model = inference_copy(model, build, hardware)
    if hardware.multi_worker:
        digest = weights_digest(model)
        check_workers_agree(hardware.strategy, "the trained weights", digest)
        print(f"train: every worker holds the same weights (sha256 {digest})")
    return model, calibration, validation


def inference_copy(model: keras.Model, build: Callable, hardware: Hardware) -> keras.Model:
    """The saved model computes in float32 whatever training used: exporters know no bfloat16 or
    float64. The copy is also free of any distribution strategy, so what follows runs locally."""
    keras.mixed_precision.set_global_policy("float32")
    if hardware.backend == "jax":
        keras.distribution.set_distribution(None)
    return float32_copy(model, build(None))


def reestimate_statistics(model: keras.Model, p: TrainParams, images: np.ndarray) -> None:
    """The compact CNN's batch-norm statistics, from the final weights."""
    if p.model == "compact_cnn" and p.norm == "batch":
        reestimate_batch_norm(model, images, p.batch_size, seed=p.seed)
        used = min(len(images), PRECISE_BN_IMAGES)
        print(f"train: batch-norm statistics re-estimated over {used} training images")


def training_summary(history: dict[str, list], parameters: int, calibration: dict[str, float]) -> dict:
    """metrics/train.json: the epoch with the lowest validation loss, its figures, the model's size,
    the temperature and, for a fine-tuned backbone, how many epochs each phase ran."""
    best = min(range(len(history["val_loss"])), key=history["val_loss"].__getitem__)
    summary = {
        "epochs_run": len(history["val_loss"]),
        "best_epoch": best + 1,
        "best_val_loss": history["val_loss"][best],
        "best_val_accuracy": history["val_accuracy"][best],
        "parameters": parameters,
        **calibration,
    }
    if "phase" in history:
        summary["epochs_frozen"] = history["phase"].count(1)
        summary["epochs_fine_tuned"] = history["phase"].count(2)
    return summary
