"""Train a small Keras 3 CNN (torch backend) on the synthetic shapes and save it into the package.

Usage: ``nice -n 5 .venv/bin/python scripts/train_keras_synthetic.py [--init tinycnn|random] [--epochs N] [--out PATH]``

The model starts with ``Rescaling(1/255)``, so it takes pixel values 0-255 (as Keras image models usually
do) and lumos feeds it that range; then TinyCNN's layers (``lumos.synthetic.TinyCNN``) in Keras. Same data
as ``train_synthetic.py``: the benchmark images plus an easier share, mirrored at random.

``--init tinycnn`` (default) starts from the bundled TinyCNN's trained weights (conv kernels OIHW -> HWIO,
BatchNorm statistics, the head transposed; the script checks the Keras logits equal TinyCNN's) and fine-tunes
with ``model.fit``: one epoch takes ~5 CPU minutes on a busy 2-core machine. ``--init random`` trains from
scratch; on this machine it sat at chance (25 %) for its first two epochs (~6 s per batch of 64 under load),
the plateau ``train_synthetic.py`` describes, so it needs the 14 epochs TinyCNN had (about an hour here).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lumos.synthetic import load_tinycnn, make_dataset  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "lumos" / "synthetic" / "tinykeras.keras"


def build(num_classes: int = 4, size: int = 64) -> keras.Model:
    """Rescaling, four conv blocks (conv, BN, ReLU; pooling after the first two), GAP and a dense layer."""
    inp = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(inp)
    for i, (filters, pool) in enumerate([(16, True), (32, True), (64, False), (64, False)], start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(epsilon=1e-5, name=f"bn{i}")(x)  # torch's eps, as TinyCNN
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        if pool:
            x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inp, out, name="tinykeras")


def copy_tinycnn(model: keras.Model) -> None:
    """Put the bundled TinyCNN's weights into ``build()``'s layers (the same network, channels-last)."""
    state = load_tinycnn().state_dict()
    for i in range(1, 5):
        p = f"features.block{i}."
        model.get_layer(f"conv{i}").set_weights([state[p + "conv.weight"].permute(2, 3, 1, 0).numpy()])
        model.get_layer(f"bn{i}").set_weights([state[p + k].numpy() for k in
                                               ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")])
    model.get_layer("logits").set_weights([state["fc.weight"].T.numpy(), state["fc.bias"].numpy()])


def to_keras(images: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) in [0, 1] -> (n, H, W, 3) pixel values 0-255, float32."""
    return (images.permute(0, 2, 3, 1).numpy() * 255.0).astype(np.float32)


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    return float((model.predict(x, batch_size=256, verbose=0).argmax(1) == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--init", choices=["tinycnn", "random"], default="tinycnn")
    parser.add_argument("--epochs", type=int, default=None, help="default: 1 from TinyCNN, 14 from random")
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-easy", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="default: 3e-4 from TinyCNN, 3e-3 from random")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    keras.utils.set_random_seed(0)
    t0 = time.perf_counter()
    hard = make_dataset(args.n_train, seed=0)
    easy = make_dataset(args.n_easy, seed=10, max_distractors=0, background_contrast=0.25)
    x = np.concatenate([to_keras(hard.images), to_keras(easy.images)])
    y = np.concatenate([hard.labels.numpy(), easy.labels.numpy()])
    mirrored = np.random.default_rng(0).random(len(x)) < 0.5  # a mirror image keeps every class valid
    x[mirrored] = x[mirrored, :, ::-1]
    test = make_dataset(1000, seed=1)
    xt, yt = to_keras(test.images), test.labels.numpy()
    print(f"generated data in {time.perf_counter() - t0:.1f}s", flush=True)

    model = build(len(hard.class_names))
    epochs = args.epochs or (1 if args.init == "tinycnn" else 14)
    lr = args.lr or (3e-4 if args.init == "tinycnn" else 3e-3)
    if args.init == "tinycnn":
        copy_tinycnn(model)
        with torch.no_grad():
            ref = load_tinycnn()(test.images[:64])
        diff = (torch.as_tensor(model.predict(xt[:64], verbose=0)) - ref).abs().max().item()
        print(f"initialised from TinyCNN: max |keras logits - TinyCNN logits| = {diff:.2e}; "
              f"test acc {accuracy(model, xt, yt):.4f}", flush=True)
    steps = epochs * -(-len(x) // args.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(lr / 10, steps, warmup_target=lr, warmup_steps=steps // 10)
    model.compile(optimizer=keras.optimizers.Adam(schedule, weight_decay=1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    t1 = time.perf_counter()
    model.fit(x, y, epochs=epochs, batch_size=args.batch_size, shuffle=True, validation_data=(xt, yt),
              verbose=2)
    print(f"training took {time.perf_counter() - t1:.0f}s")
    held = make_dataset(200, seed=123)
    print(f"test acc (seed 1, n=1000) {accuracy(model, xt, yt):.4f}  "
          f"held-out acc (seed 123, n=200) {accuracy(model, to_keras(held.images), held.labels.numpy()):.4f}")
    plain = build(len(hard.class_names))  # saved without the optimizer's state: a smaller file
    plain.set_weights(model.get_weights())
    plain.save(args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
