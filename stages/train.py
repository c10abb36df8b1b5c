"""train: fit the params-selected model on the balanced shards and save it to models/."""

from pathlib import Path

import keras

from brainmri.metrics import write_json
from brainmri.models import build_model, save_model
from brainmri.params import flatten, load_params
from brainmri.shards import ShardIndex
from brainmri.tracking import stage_run
from brainmri.training import callbacks, compile_model, labelled_batches

MODELS = Path("models")
HISTORY = Path("metrics/train_history.csv")
CHECKPOINT = Path("build/checkpoints/best.keras")  # scratch space, not a DVC output

params = load_params()
p = params.train
with stage_run("train", params.tracking, flatten(p, "train")) as run:
    keras.utils.set_random_seed(p.seed)
    index = ShardIndex.load("data/prepared")
    if (index.image_size, index.channels) != (p.image_size, p.channels):
        raise SystemExit("data/prepared was written for another image size or channel count: rerun balance")
    model = build_model(p.model, len(index.classes), p.image_size, p.channels, p.width, p.dropout)
    compile_model(model, p, len(index.classes))
    history = model.fit(
        labelled_batches(index, "train", p.batch_size, shuffle_seed=p.seed),
        validation_data=labelled_batches(index, "val", p.batch_size),
        epochs=p.epochs,
        callbacks=callbacks(p, HISTORY, CHECKPOINT, run.keras_callbacks()),
        verbose=2,
    )

    metadata = {"classes": index.classes, "image_size": p.image_size, "channels": p.channels, "model": p.model}
    save_model(model, MODELS, metadata)
    best = min(range(len(history.history["val_loss"])), key=history.history["val_loss"].__getitem__)
    summary = {
        "epochs_run": len(history.history["val_loss"]),
        "best_epoch": best + 1,
        "best_val_loss": history.history["val_loss"][best],
        "best_val_accuracy": history.history["val_accuracy"][best],
        "parameters": model.count_params(),
    }
    write_json(summary, "metrics/train.json")
    run.log_metrics({f"final.{key}": value for key, value in summary.items()})
    run.log_artifact(str(MODELS / "model.json"), "model_meta")
    run.log_keras_model(model, example=next(iter(index.dataset("val").batch(2)))[0].numpy())
    print(f"train: best epoch {best + 1}, val accuracy {summary['best_val_accuracy']:.3f}")
