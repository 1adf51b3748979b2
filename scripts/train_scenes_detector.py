"""Train TinyDetector on the synthetic multi-object scenes and save its weights into the package.

Usage: ``nice -n 5 .venv/bin/python scripts/train_scenes_detector.py [--epochs N] [--n-train N] [--out PATH]``

Loss: focal loss on every cell's class probabilities (a cell is positive for the class of an object whose
box centre is within a quarter of the object's size of the cell centre) plus L1 on the positive cells' box
centre (in cells) and log size.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lumos.synthetic.detector import STRIDE, TinyDetector
from lumos.synthetic.scenes import SyntheticScenes, make_scenes
from lumos.tasks import box_iou, detections

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "lumos" / "synthetic" / "tinydetector.pt"


def grid_targets(scenes: SyntheticScenes, cells: int, num_classes: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class targets (n, C, h, w), box targets (n, 4, h, w) = (cx, cy in cells, log w, log h) and positives."""
    n = len(scenes)
    cls = torch.zeros(n, num_classes, cells, cells)
    box = torch.zeros(n, 4, cells, cells)
    pos = torch.zeros(n, cells, cells, dtype=torch.bool)
    grid_y, grid_x = torch.meshgrid(torch.arange(cells), torch.arange(cells), indexing="ij")
    for i in range(n):
        for label, b, _ in scenes.objects(i):
            cx, cy = float(b[0] + b[2]) / 2 / STRIDE, float(b[1] + b[3]) / 2 / STRIDE
            # centre sampling: the centre cell and the cells whose centres lie within a quarter of the
            # object's size of its centre are positive (neighbouring cells are not forced to say "no")
            radius = max(0.25 * float(max(b[2] - b[0], b[3] - b[1])) / STRIDE, 0.5)
            near = ((grid_x + 0.5 - cx).abs() <= radius) & ((grid_y + 0.5 - cy).abs() <= radius)
            near[min(int(cy), cells - 1), min(int(cx), cells - 1)] = True
            cls[i, label][near] = 1
            pos[i][near] = True
            box[i][:, near] = torch.tensor([cx, cy, float(b[2] - b[0]) / (4 * STRIDE),
                                            float(b[3] - b[1]) / (4 * STRIDE)]).clamp_min(1e-3)[:, None]
    box[:, 2:] = box[:, 2:].log()
    return cls, box, pos


def loss_fn(model: TinyDetector, x: torch.Tensor, cls: torch.Tensor, box: torch.Tensor, pos: torch.Tensor
            ) -> torch.Tensor:
    raw = model.raw(x)
    logits = raw[:, 4:]
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, cls, reduction="none")
    pt = torch.where(cls > 0, p, 1 - p)
    alpha = torch.where(cls > 0, 0.75, 0.25)
    focal = (alpha * (1 - pt) ** 2 * ce).sum() / pos.sum().clamp_min(1)
    h, w = raw.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pred = torch.stack([xs + 0.5 + raw[:, 0].tanh(), ys + 0.5 + raw[:, 1].tanh(), raw[:, 2], raw[:, 3]], 1)
    reg = (pred - box).abs().sum(1)[pos].mean() if pos.any() else raw.sum() * 0
    return focal + reg


@torch.no_grad()
def recall_precision(model: TinyDetector, scenes: SyntheticScenes, score: float = 0.5) -> tuple[float, float]:
    """Objects found (IoU >= 0.5, right class) and detections that are right, at ``score``, after NMS."""
    model.eval()
    found = total = right = dets = 0
    for s in range(0, len(scenes), 256):
        out = model(scenes.images[s:s + 256])
        for i, (boxes, labels, _) in enumerate(detections(out, score, 0.3)):
            objs = scenes.objects(s + i)
            total += len(objs)
            dets += len(boxes)
            if not len(boxes) or not objs:
                continue
            gt = torch.stack([b for _, b, _ in objs])
            gl = torch.tensor([lab for lab, _, _ in objs])
            iou = box_iou(gt, boxes) * (gl[:, None] == labels[None]).float()
            found += int((iou.max(1).values >= 0.5).sum())
            right += int((iou.max(0).values >= 0.5).sum())
    return found / max(total, 1), right / max(dets, 1)


def matched_boxes(model: TinyDetector, scenes: SyntheticScenes, i: int, score: float = 0.5
                  ) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """Scene ``i``'s objects the detector found (IoU >= 0.5, right class): (detected box, label, object mask)."""
    with torch.no_grad():
        (boxes, labels, _), = detections(model(scenes.images[i:i + 1]), score, 0.3)
    found = []
    for label, box, mask in scenes.objects(i):
        if len(boxes):
            iou = box_iou(box[None], boxes)[0] * (labels == label).float()
            j = int(iou.argmax())
            if iou[j] >= 0.5:
                found.append((boxes[j], label, mask))
    return found


SETTINGS = {"occlusion": {"window": 8, "stride": 4}, "rise": {"n_masks": 500, "cell": 8}}


def measure(model: TinyDetector, scenes: SyntheticScenes, method: str = "gradcam") -> dict[str, float]:
    """Per-box energy inside the explained object's mask (vs a uniform random map's) and, over ordered pairs
    of found objects in one scene, how often box A's map puts more energy on object A than on object B."""
    import lumos
    from lumos.synthetic.scenes import energy_share
    from lumos.tasks import DetectionTarget

    gen = torch.Generator().manual_seed(0)
    own, rand, wins, pairs, boxes_found, objects = [], [], 0, 0, 0, 0
    for i in range(len(scenes)):
        objects += len(scenes.objects(i))
        found = matched_boxes(model, scenes, i)
        boxes_found += len(found)
        if not found:
            continue
        target = DetectionTarget(torch.stack([b for b, _, _ in found]), [lab for _, lab, _ in found])
        maps = lumos.explain(model, scenes.images[i:i + 1], method, target=target, layer="features.block5",
                             **SETTINGS.get(method, {})).maps
        masks = torch.stack([m for _, _, m in found])
        own.append(energy_share(maps, masks))
        rand.append(energy_share(torch.rand(maps.shape, generator=gen), masks))
        for a in range(len(found)):
            for b in range(len(found)):
                if a != b:
                    pairs += 1
                    on_a = energy_share(maps[a:a + 1], masks[a:a + 1])
                    wins += int(on_a > energy_share(maps[a:a + 1], masks[b:b + 1]))
    own_t, rand_t = torch.cat(own), torch.cat(rand)
    return {"scenes": len(scenes), "objects": objects, "boxes": boxes_found, "energy": float(own_t.mean()),
            "random_energy": float(rand_t.mean()), "ratio": float(own_t.mean() / rand_t.mean()),
            "boxes_at_2x": float((own_t >= 2 * rand_t).float().mean()), "pairs": pairs,
            "pair_wins": wins / max(pairs, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--measure", type=int, default=0, metavar="N",
                        help="only measure the shipped weights on N held-out scenes (seed 123)")
    args = parser.parse_args()
    if args.measure:
        from lumos.synthetic.detector import load_tinydetector
        torch.set_num_threads(1)
        model, held = load_tinydetector(), make_scenes(args.measure, seed=123)
        print("recall, precision at 0.5:", recall_precision(model, held))
        for method in ("gradcam", "gradcam++", "hirescam", "layercam", "xgradcam", "scorecam", "occlusion", "rise"):
            print(method, {k: round(v, 3) for k, v in measure(model, held, method).items()}, flush=True)
        return

    torch.set_num_threads(1)  # 2 threads on a busy 2-core machine run ~4x slower
    torch.manual_seed(0)
    t0 = time.perf_counter()
    train = make_scenes(args.n_train, seed=0)
    test = make_scenes(300, seed=1)
    model = TinyDetector()
    cells = 64 // STRIDE
    cls, box, pos = grid_targets(train, cells, model.num_classes)
    print(f"generated data in {time.perf_counter() - t0:.1f}s")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * -(-len(train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        total = 0.0
        for idx in order.split(args.batch_size):
            x = train.images[idx]
            if torch.rand(1, generator=gen) < 0.5:  # horizontal flip (boxes follow through the targets)
                x, c, b, p = x.flip(-1), cls[idx].flip(-1), box[idx].flip(-1), pos[idx].flip(-1)
                b = b.clone()
                b[:, 0] = cells - b[:, 0]
            else:
                c, b, p = cls[idx], box[idx], pos[idx]
            loss = loss_fn(model, x, c, b, p)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        rec, prec = recall_precision(model, test)
        print(f"epoch {epoch + 1}: loss {total / len(train):.3f}  test recall {rec:.3f} precision {prec:.3f}  "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    model.eval()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
