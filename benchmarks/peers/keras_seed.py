"""The seed's own Keras recipe on Fashion-MNIST: Conv 32-64-64 + max-pool, Dense 64, Dense 10, Adam, batch 32.

Runs in the benchmark's own virtual environment (tensorflow-cpu is never a cnntrain dependency).
Usage: python keras_seed.py [--epochs 5] [--images N]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import FASHION, read_idx, report  # noqa: E402


def main() -> None:
    import tensorflow as tf
    from tensorflow import keras
    from tensorflow.keras import layers

    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--images", type=int, default=60000)
    args = ap.parse_args()
    x = read_idx(FASHION / "train-images-idx3-ubyte.gz")[: args.images].reshape(-1, 28, 28, 1).astype("float32") / 255
    y = read_idx(FASHION / "train-labels-idx1-ubyte.gz")[: args.images]
    xt = read_idx(FASHION / "t10k-images-idx3-ubyte.gz").reshape(-1, 28, 28, 1).astype("float32") / 255
    yt = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    tf.random.set_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dense(10),
        ]
    )
    model.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    times: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)

    model.fit(x, y, epochs=args.epochs, batch_size=32, verbose=2, callbacks=[EpochTimer()])
    _, acc = model.evaluate(xt, yt, verbose=0)
    steady = times[1:] or times  # the first epoch includes graph tracing
    per_epoch = sum(steady) / len(steady)
    report(
        images_per_s=len(x) / per_epoch,
        seconds=per_epoch,
        train_seconds=sum(times),
        test_acc=float(acc),
        epochs=args.epochs,
    )


if __name__ == "__main__":
    main()
