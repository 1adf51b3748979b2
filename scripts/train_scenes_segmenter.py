"""Train TinySegmenter on the synthetic multi-object scenes and save its weights into the package.

Usage: ``nice -n 5 .venv/bin/python scripts/train_scenes_segmenter.py [--epochs N] [--n-train N] [--out PATH]``

Loss: per-pixel cross-entropy over background + 4 shape classes (objects weighted up: they cover ~10%).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lumos.synthetic.scenes import make_scenes
from lumos.synthetic.segmenter import TinySegmenter

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "lumos" / "synthetic" / "tinysegmenter.pt"


@torch.no_grad()
def mean_iou(model: TinySegmenter, images: torch.Tensor, semantic: torch.Tensor) -> float:
    """Mean IoU over the shape classes (background left out)."""
    model.eval()
    pred = torch.cat([model(x).argmax(1) for x in images.split(256)])
    ious = []
    for c in range(1, 5):
        inter = ((pred == c) & (semantic == c)).sum()
        union = ((pred == c) | (semantic == c)).sum()
        ious.append(float(inter) / max(float(union), 1))
    return sum(ious) / len(ious)


def measure(model: TinySegmenter, n: int, method: str = "gradcam") -> dict[str, float]:
    """Per class present and predicted in a held-out scene (seed 123): the share of the class-region map's
    energy inside the class's ground-truth mask, against a uniform random map's."""
    import lumos
    from lumos.synthetic.scenes import energy_share
    from lumos.tasks import SegmentationTarget

    scenes = make_scenes(n, seed=123)
    gen = torch.Generator().manual_seed(0)
    own, rand, skipped = [], [], 0
    for i in range(n):
        x = scenes.images[i:i + 1]
        with torch.no_grad():
            pred = model(x).argmax(1)[0]
        for c in scenes.semantic[i].unique().tolist():
            if c == 0:
                continue
            if not (pred == c).any():
                skipped += 1
                continue
            maps = lumos.explain(model, x, method, target=SegmentationTarget(c), layer="features.block5").maps
            mask = (scenes.semantic[i] == c)[None]
            own.append(energy_share(maps, mask))
            rand.append(energy_share(torch.rand(maps.shape, generator=gen), mask))
    own_t, rand_t = torch.cat(own), torch.cat(rand)
    return {"scenes": n, "regions": len(own), "not_predicted": skipped, "energy": float(own_t.mean()),
            "random_energy": float(rand_t.mean()), "ratio": float(own_t.mean() / rand_t.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--measure", type=int, default=0, metavar="N",
                        help="only measure the shipped weights on N held-out scenes (seed 123)")
    args = parser.parse_args()
    if args.measure:
        from lumos.synthetic.segmenter import load_tinysegmenter
        torch.set_num_threads(1)
        model, held = load_tinysegmenter(), make_scenes(300, seed=1)
        print(f"test mIoU (300 scenes, seed 1): {mean_iou(model, held.images, held.semantic):.3f}")
        for method in ("gradcam", "hirescam", "layercam"):
            print(method, {k: round(v, 3) for k, v in measure(model, args.measure, method).items()}, flush=True)
        return

    torch.set_num_threads(1)  # 2 threads on a busy 2-core machine run ~4x slower
    torch.manual_seed(0)
    t0 = time.perf_counter()
    train = make_scenes(args.n_train, seed=0)
    test = make_scenes(300, seed=1)
    print(f"generated data in {time.perf_counter() - t0:.1f}s")
    model = TinySegmenter()
    weight = torch.tensor([0.3, 1.0, 1.0, 1.0, 1.0])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * -(-len(train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(train), generator=gen).split(args.batch_size):
            x, y = train.images[idx], train.semantic[idx]
            if torch.rand(1, generator=gen) < 0.5:
                x, y = x.flip(-1), y.flip(-1)
            loss = F.cross_entropy(model(x), y, weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        miou = mean_iou(model, test.images, test.semantic)
        print(f"epoch {epoch + 1}: loss {total / len(train):.3f}  test mIoU {miou:.3f}  "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    model.eval()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
