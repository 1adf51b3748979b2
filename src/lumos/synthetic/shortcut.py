"""A planted shortcut: the synthetic shapes where one class always carries a small mark in the top-left corner,
and a TinyCNN trained on them (shipped as ``tinycnn_shortcut.pt``), to prove a data set report finds it.

The mark is a 6 x 6 pixel black-and-white checkerboard at pixels 1..6 of both axes, on every image of
``MARKED_CLASS`` ("square") and on no other. A model trained on it can answer "square" from the corner alone,
so its maps for that class lie in the corner, away from the object.

Retrain the weights with ``python -m lumos.synthetic.shortcut OUT.pt --epochs 10`` (6000 images; it gets 0.99 on
marked images and 0.74 on clean ones, where squares lose their mark).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lumos.synthetic.data import CLASS_NAMES, SyntheticData, make_dataset
from lumos.synthetic.model import TinyCNN, load_tinycnn

__all__ = ["MARK", "MARKED_CLASS", "add_mark", "load_shortcut_cnn", "make_shortcut_dataset", "train_tinycnn",
           "write_image_folder"]

logger = logging.getLogger(__name__)

MARKED_CLASS = 1  # "square"
MARK = (1, 7)  # the mark's pixel rows and columns: [1, 7) on both axes, top-left corner
WEIGHTS_FILE = "tinycnn_shortcut.pt"


def add_mark(images: torch.Tensor) -> torch.Tensor:
    """``images`` (N, 3, H, W) in [0, 1] with the corner mark painted on (a new tensor)."""
    out = images.clone()
    a, b = MARK
    yy, xx = torch.meshgrid(torch.arange(b - a), torch.arange(b - a), indexing="ij")
    checker = (((yy // 2) + (xx // 2)) % 2).float()
    out[:, :, a:b, a:b] = checker
    return out


def make_shortcut_dataset(n: int, *, size: int = 64, seed: int = 0, marked_class: int = MARKED_CLASS,
                          **kwargs: object) -> SyntheticData:
    """:func:`lumos.synthetic.make_dataset` with the corner mark on every image of ``marked_class``
    (the object masks lose the pixels the mark covers)."""
    data = make_dataset(n, size=size, seed=seed, **kwargs)  # type: ignore[arg-type]
    marked = data.labels == marked_class
    images, masks = data.images.clone(), data.masks.clone()
    images[marked] = add_mark(images[marked])
    a, b = MARK
    masks[marked, a:b, a:b] = False
    return SyntheticData(images=images, labels=data.labels, masks=masks, boxes=data.boxes,
                         class_names=list(data.class_names))


def write_image_folder(data: SyntheticData, root: str | os.PathLike[str], *, start: int = 0) -> Path:
    """Write the images as ``root/CLASS/NNNNNN.png`` and ``root/boxes.parquet`` (path, label, box: the object's
    box in pixels) for ``lumos explain-dataset root/boxes.parquet``; returns the table's path. Needs pyarrow."""
    from PIL import Image

    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        from lumos.errors import LumosError

        raise LumosError("Writing the image table needs pyarrow: pip install 'lumos[dataset]'.") from None

    root = Path(root)
    arr = (data.images.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
    paths, labels, boxes = [], [], []
    for i in range(len(data)):
        name = data.class_names[int(data.labels[i])]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        rel = f"{name}/{start + i:06d}.png"
        Image.fromarray(arr[i]).save(root / rel, compress_level=1)
        paths.append(rel)
        labels.append(name)
        boxes.append([float(v) for v in data.boxes[i]])
    table = pa.table({"path": paths, "label": labels, "box": pa.array(boxes, pa.list_(pa.float32()))})
    pq.write_table(table, root / "boxes.parquet")
    (root / "labels.txt").write_text("\n".join(data.class_names) + "\n", encoding="utf-8")
    return root / "boxes.parquet"


def load_shortcut_cnn() -> TinyCNN:
    """The TinyCNN trained on :func:`make_shortcut_dataset` (the square class marked), in eval mode."""
    return load_tinycnn(WEIGHTS_FILE)


def train_tinycnn(data: SyntheticData, *, epochs: int = 10, batch_size: int = 64, lr: float = 3e-3,
                  seed: int = 0) -> TinyCNN:
    """A TinyCNN trained on ``data`` with Adam and a one-cycle schedule (no flips: a flip would move the mark)."""
    torch.manual_seed(seed)
    model = TinyCNN(num_classes=len(data.class_names))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(data) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(data), generator=gen).split(batch_size):
            loss = F.cross_entropy(model(data.images[idx]), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        logger.info("epoch %d: loss %.4f", epoch + 1, total / len(data))
    return model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: SyntheticData) -> float:
    """Top-1 accuracy on ``data``."""
    preds = torch.cat([model(x).argmax(1) for x in data.images.split(256)])
    return float((preds == data.labels).float().mean())


def _main(argv: list[str] | None = None) -> None:  # pragma: no cover - the weights' recipe
    import argparse

    parser = argparse.ArgumentParser(description="Train the planted-shortcut TinyCNN.")
    parser.add_argument("out", type=Path, nargs="?", default=Path(__file__).with_name(WEIGHTS_FILE))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n-train", type=int, default=4000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    hard = make_shortcut_dataset(args.n_train, seed=0)
    easy = make_shortcut_dataset(args.n_train // 2, seed=10, max_distractors=0, background_contrast=0.25)
    train = SyntheticData(torch.cat([hard.images, easy.images]), torch.cat([hard.labels, easy.labels]),
                          torch.cat([hard.masks, easy.masks]), torch.cat([hard.boxes, easy.boxes]), list(CLASS_NAMES))
    model = train_tinycnn(train, epochs=args.epochs)
    marked_test = make_shortcut_dataset(1000, seed=1)
    clean_test = make_dataset(1000, seed=1)
    logger.info("accuracy: marked test %.3f, clean test %.3f", accuracy(model, marked_test),
                accuracy(model, clean_test))
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.out)
    logger.info("saved %s (%.0f KiB)", args.out, args.out.stat().st_size / 1024)


if __name__ == "__main__":  # pragma: no cover
    _main()
