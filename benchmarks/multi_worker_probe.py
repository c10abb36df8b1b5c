"""Probe: does a custom training loop run under MultiWorkerMirroredStrategy with Keras 3?

    python benchmarks/multi_worker_probe.py [--steps-per-epoch 4] [--epochs 2]

`model.fit` under MultiWorkerMirroredStrategy fails in Keras 3.15
(keras-team/keras#20585), which is why `train.strategy` offers no
multi-worker choice. This starts two worker processes on 127.0.0.1 with
their own TF_CONFIG, trains the project's compact CNN (tiny) with
`strategy.run` and the Keras optimiser instead of `fit`, and compares the
workers' final variables. Prints one JSON line: each variable's largest
difference between the workers, grouped as trainable vs. batch-norm
statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

GLOBAL_BATCH = 16


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker(index: int, ports: list[int], out: str, epochs: int, steps: int) -> None:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                                          "task": {"type": "worker", "index": index}})
    import keras
    import tensorflow as tf

    from brainmri.models import build_model

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (GLOBAL_BATCH * steps, 32, 32, 1), dtype=np.uint8)
    targets = np.eye(4, dtype="float32")[np.arange(len(images)) % 4]
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((images, targets)).batch(GLOBAL_BATCH).with_options(options))
    keras.utils.set_random_seed(1)
    with strategy.scope():
        model = build_model("compact_cnn", 4, 32, 1, width=4)
        optimizer = keras.optimizers.AdamW(1e-3)
        optimizer.build(model.trainable_variables)
        per_example_loss = keras.losses.CategoricalCrossentropy(reduction=None)

    @tf.function
    def train_step(batch):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(per_example_loss(y, model(x, training=True)),
                                                  global_batch_size=GLOBAL_BATCH)
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                          model.trainable_variables))
            return loss
        return strategy.reduce("SUM", strategy.run(replica_step, args=batch), axis=None)

    for _ in range(epochs):
        for batch in data:
            train_step(batch)
    np.savez(out, **{variable.path.replace("/", "|"): variable.numpy() for variable in model.weights})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=4)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, [int(port) for port in args.ports.split(",")], args.out, args.epochs,
               args.steps_per_epoch)
        return

    ports = f"{free_port()},{free_port()}"
    with tempfile.TemporaryDirectory() as folder:
        outs = [str(Path(folder) / f"worker{index}.npz") for index in (0, 1)]
        processes = [subprocess.Popen(
            [sys.executable, __file__, "--worker", str(index), "--ports", ports, "--out", outs[index],
             "--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for index in (0, 1)]
        codes = []
        for process in processes:
            _, errors = process.communicate(timeout=300)
            codes.append(process.returncode)
            if process.returncode:
                print(errors[-3000:], file=sys.stderr)
        result = {"exit_codes": codes}
        if codes == [0, 0]:
            first, second = np.load(outs[0]), np.load(outs[1])
            difference = {name: float(np.abs(first[name] - second[name]).max()) for name in first.files}
            statistics = {name for name in difference if "moving_" in name}
            result["max_difference_trainable"] = max(v for k, v in difference.items() if k not in statistics)
            result["max_difference_batch_norm_statistics"] = max(difference[k] for k in statistics)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
