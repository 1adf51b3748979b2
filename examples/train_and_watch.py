"""Train a small CNN on lumos' synthetic shapes and watch its Grad-CAMs learn where to look.

    .venv/bin/python examples/train_and_watch.py            # ~1-2 min on 2 CPU cores
    tensorboard --logdir runs/lumos-example                  # then open http://localhost:6006 -> Images

Every epoch (and once before training) an ExplanationLogger explains 6 fixed validation images with
Grad-CAM (for the true class) and shows the top feature maps of the first conv block, written to
TensorBoard. At the end the Grad-CAMs of all epochs are drawn as one picture (rows = epochs, columns =
probe images).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from lumos.render import gallery
from lumos.synthetic import TinyCNN, make_dataset
from lumos.track import ExplanationLogger, MemorySink, TensorBoardSink


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--picture-every", type=int, default=2, help="epochs between the picture's rows")
    ap.add_argument("--size", type=int, default=32, help="image side (pixels)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--logdir", default="runs/lumos-example")
    ap.add_argument("--out", default="docs/images/cams_across_epochs.png")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(1)  # a model this small trains fastest on one thread (no thread hand-offs)
    torch.manual_seed(args.seed)
    # an easier variant of the benchmark (one distractor, softer backgrounds) so a few epochs suffice
    easy = {"size": args.size, "max_distractors": 1, "background_contrast": 0.5}
    train = make_dataset(args.n_train, seed=args.seed, **easy)
    images, labels = train.images, train.labels
    val = make_dataset(200, seed=123, **easy)
    probe = make_dataset(6, seed=77, **easy)

    model = TinyCNN(num_classes=len(train.class_names))
    memory = MemorySink()
    logger = ExplanationLogger(
        probe.images, probe.labels, methods=["gradcam", "features"], layer="features.block4",
        feature_layer="features.block1", target="true", class_names=probe.class_names,
        sinks=[TensorBoardSink(args.logdir), memory], masks=probe.masks, metrics=["pointing"],
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * -(-len(labels) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()

    logger.log(model, 0)  # step 0 = before training; epoch k is logged at step k
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(labels))
        total = 0.0
        for lo in range(0, len(order), args.batch_size):
            idx = order[lo:lo + args.batch_size]
            x = images[idx]
            flip = torch.rand(len(idx)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = loss_fn(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            acc = (model(val.images).argmax(1) == val.labels).float().mean()
        logger.log(model, epoch + 1)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {total / len(labels):.3f}  val acc {acc:.1%}  "
              f"({time.perf_counter() - start:.0f} s)")
    logger.close()

    tags = [f"lumos/gradcam/{i:02d}" for i in range(len(probe.labels))]
    hits = dict(memory.scalars["lumos/gradcam/pointing_game"])
    steps = [s for s, _, _ in memory.images[tags[0]] if s % args.picture_every == 0 or s == args.epochs]
    cells = [[dict((s, im) for s, im, _ in memory.images[t])[step] for t in tags] for step in steps]
    titles = [f"{'init' if s == 0 else f'epoch {s}'}\npointing {hits[s]:.0%}" for s in steps]
    out = Path(args.out)
    gallery(None, cells, row_titles=titles, out=out, cell_size=2.0, dpi=80)
    Image.open(out).convert("RGB").quantize(256).save(out, optimize=True)  # a palette keeps the file small
    print(f"Wrote {out}")
    print(f"Open TensorBoard with:  tensorboard --logdir {args.logdir}   (then the Images tab)")


if __name__ == "__main__":
    main()
