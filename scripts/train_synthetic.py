"""Train TinyCNN on the synthetic shapes data set and save its weights into the package.

Usage: ``.venv/bin/python scripts/train_synthetic.py [--epochs N] [--n-train N] [--out PATH]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lumos.synthetic import SyntheticData, TinyCNN, make_dataset

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "lumos" / "synthetic" / "tinycnn.pt"


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on a data set."""
    model.eval()
    preds = torch.cat([model(x).argmax(1) for x in images.split(256)])
    return (preds == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-easy", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    # The benchmark images plus an easier share (plain backgrounds, no distractors): without the
    # easy share the GAP network sits on a long plateau near chance before it finds the objects.
    hard = make_dataset(args.n_train, seed=0)
    easy = make_dataset(args.n_easy, seed=10, max_distractors=0, background_contrast=0.25)
    train = SyntheticData(
        images=torch.cat([hard.images, easy.images]),
        labels=torch.cat([hard.labels, easy.labels]),
        masks=torch.cat([hard.masks, easy.masks]),
        boxes=torch.cat([hard.boxes, easy.boxes]),
    )
    test = make_dataset(1000, seed=1)
    held = make_dataset(200, seed=123)  # the set tests/test_synthetic.py checks
    print(f"generated data in {time.perf_counter() - t0:.1f}s")

    model = TinyCNN(num_classes=len(train.class_names))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * -(-len(train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    t1 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        total = 0.0
        for idx in perm.split(args.batch_size):
            x, y = train.images[idx], train.labels[idx]
            if torch.rand((), generator=gen) < 0.5:  # a mirror image keeps every class valid
                x = x.flip(3)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(
            f"epoch {epoch + 1:2d}  loss {total / len(train):.4f}  "
            f"test acc {accuracy(model, test.images, test.labels):.4f}  ({time.perf_counter() - t1:.0f}s)",
            flush=True,
        )
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.out)

    train_acc = accuracy(model, hard.images, hard.labels)
    test_acc = accuracy(model, test.images, test.labels)
    held_acc = accuracy(model, held.images, held.labels)
    print(
        f"train acc {train_acc:.4f}  test acc (seed 1, n=1000) {test_acc:.4f}  "
        f"held-out acc (seed 123, n=200) {held_acc:.4f}"
    )
    print(f"training took {time.perf_counter() - t1:.0f}s")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
