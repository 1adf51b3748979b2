"""Deletion AUC cost vs plain forwards: one 224 x 224 image, 100 steps, EfficientNet-Lite0.

The target (issue 4): deletion costs <= 1.5x the time of 100 plain forward passes batched the same way.
Each round times the plain forwards right before the deletion metric; the ratio of the medians is printed.

    .venv/bin/python benchmarks/bench_evaluate.py [--rounds 5] [--batch-size 25] [--threads 0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lumos.evaluate import Deletion, Insertion
from lumos.zoo import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave the default)")
    ap.add_argument("--insertion", action="store_true", help="also time insertion")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, preprocess, _ = load_model("efficientnet_lite0")
    from lumos import explain
    from lumos.io import sample_images

    x = preprocess([sample_images()["chelsea"]])  # the cat photo shipped with scikit-image
    maps = explain(model, x, method="gradcam").maps
    n, bs = args.steps, args.batch_size
    metric = Deletion(steps=n, batch_size=bs)
    ins = Insertion(steps=n, batch_size=bs)

    def plain() -> None:
        with torch.inference_mode():
            for lo in range(0, n, bs):
                model(x.expand(min(bs, n - lo), -1, -1, -1).contiguous())

    plain()
    metric(model, x, maps)  # warm-up
    t_plain, t_del, t_ins = [], [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        plain()
        t1 = time.perf_counter()
        auc = metric(model, x, maps).mean_auc
        t2 = time.perf_counter()
        t_plain.append(t1 - t0)
        t_del.append(t2 - t1)
        if args.insertion:
            t3 = time.perf_counter()
            ins(model, x, maps)
            t_ins.append(time.perf_counter() - t3)
    mp, md = statistics.median(t_plain), statistics.median(t_del)
    print(f"threads={torch.get_num_threads()} steps={n} batch_size={bs} rounds={args.rounds}")
    print(f"{n} plain forwards: {mp:.3f} s (median)")
    print(f"deletion ({n + 1} points, AUC {auc:.3f}): {md:.3f} s (median)")
    if t_ins:
        print(f"insertion: {statistics.median(t_ins):.3f} s (median)")
    print(f"ratio deletion / plain = {md / mp:.3f} (target <= 1.5)")


if __name__ == "__main__":
    main()
