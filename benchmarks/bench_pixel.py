"""Pixel-method timings on EfficientNet-Lite0, as ratios to a plain no-grad forward of a batch of 8.

Each method is timed right after its own reference forward (median of ``--rounds``). Also: the wall
time lumos and Captum's IntegratedGradients need to reach 1% completeness error on one photo.
Run: ``python benchmarks/bench_pixel.py [--rounds 3]`` (check ``uptime`` first: the machine is shared).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from captum.attr import IntegratedGradients as CaptumIG
from timing import median_time

import lumos
from lumos.io import sample_images


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=512)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    model, pre, labels = lumos.load_model("efficientnet_lite0")
    photos = sample_images()
    x8 = pre([photos[n] for n in ["chelsea", "coffee", "astronaut", "rocket", "china", "flower"]] * 2)[:8]
    x1 = x8[:1]

    def forward() -> None:
        with torch.no_grad():
            model(x8)

    def plain_grad() -> None:
        xg = x8.clone().requires_grad_(True)
        out = model(xg)
        torch.autograd.grad(out.max(1).values.sum(), xg)

    cases = {
        "plain input gradient (torch)": plain_grad,
        "gradients (lumos)": lambda: lumos.explain(model, x8, method="gradients"),
        "guided_backprop": lambda: lumos.explain(model, x8, method="guided_backprop"),
        "deconvnet": lambda: lumos.explain(model, x8, method="deconvnet"),
        "IG 1 image, 50 steps, gausslegendre (lumos)": lambda: lumos.IntegratedGradients(
            model, steps=50, method="gausslegendre", batch_size=50)(x1),
        "IG 1 image, 50 steps, adaptive (lumos)": lambda: lumos.IntegratedGradients(model, steps=50)(x1),
        "IG 1 image, 50 steps, gausslegendre (Captum)": lambda: CaptumIG(model).attribute(
            x1, target=281, n_steps=50, method="gausslegendre"),
    }
    print(f"{'method':48s} {'seconds':>8s} {'x forward(8)':>12s}")
    ratios = {}
    for name, fn in cases.items():
        ref = median_time(forward, args.rounds)
        t = median_time(fn, args.rounds)
        ratios[name] = t / ref
        print(f"{name:48s} {t:8.3f} {t / ref:12.2f}", flush=True)
    base = ratios["gradients (lumos)"]
    for name in ("guided_backprop", "deconvnet"):
        print(f"{name} / gradients: {ratios[name] / base:.2f}")

    print("\nwall time to reach 1% completeness error (chelsea, zero baseline)")
    target = int(model(x1).argmax())
    steps = 32
    while steps <= args.max_steps:
        t = time.perf_counter()
        ex = lumos.IntegratedGradients(model, steps=steps)(x1, target)
        dt = time.perf_counter() - t
        err = float(ex.params["delta"].abs() / ex.params["gap"].abs())
        print(f"lumos  adaptive steps={steps:4d}: {dt:7.2f} s, error {err:.2%}", flush=True)
        if err <= 0.01:
            break
        steps *= 2
    steps = 50
    while steps <= args.max_steps:
        t = time.perf_counter()
        attr, delta = CaptumIG(model).attribute(x1, target=target, n_steps=steps, method="gausslegendre",
                                                internal_batch_size=50, return_convergence_delta=True)
        dt = time.perf_counter() - t
        with torch.no_grad():
            gap = float(model(x1)[0, target] - model(torch.zeros_like(x1))[0, target])
        err = abs(float(delta)) / abs(gap)
        print(f"Captum gausslegendre steps={steps:4d}: {dt:7.2f} s, error {err:.2%}", flush=True)
        if err <= 0.01:
            break
        steps *= 2


if __name__ == "__main__":
    main()
