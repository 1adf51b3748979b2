"""Pixel-method speed on EfficientNet-Lite0, as ratios to a plain no-grad forward of a batch of 8.

Every round times that plain forward right before the method; the table reports the median of the
per-round ratios. Then the wall time lumos (default settings) and Captum's IntegratedGradients (steps
doubled from 50 until the error is small enough) need to reach 1% completeness error on photos.
Run: ``.venv/bin/python benchmarks/bench_pixel.py [--rounds 5]`` (check ``uptime`` first: the machine is shared).
"""

from __future__ import annotations

import argparse
import warnings

import torch
from captum.attr import IntegratedGradients as CaptumIG
from timing import ratio, timed_result

import lumos
from lumos.io import sample_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--photos", default="chelsea,coffee", help="photos for the time-to-1%% comparison, or 'all'")
    ap.add_argument("--max-steps", type=int, default=800, help="largest Captum step count tried")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    model, pre, _ = lumos.load_model("efficientnet_lite0")
    photos = sample_images()
    x8 = pre((list(photos.values()) * 2)[:8])
    x1 = x8[:1]
    target1 = int(model(x1).argmax())

    def forward() -> None:
        with torch.no_grad():
            model(x8)

    def plain_grad() -> None:
        xg = x8.clone().requires_grad_(True)
        torch.autograd.grad(model(xg).max(1).values.sum(), xg)

    batch = 8
    cases = {
        "plain input gradient (torch)": plain_grad,
        "gradients (lumos)": lambda: lumos.explain(model, x8, method="gradients"),
        "guided_backprop": lambda: lumos.explain(model, x8, method="guided_backprop"),
        "deconvnet": lambda: lumos.explain(model, x8, method="deconvnet"),
        "IG 1 image, 50 points, gausslegendre (lumos)": lambda: lumos.IntegratedGradients(
            model, steps=50, method="gausslegendre", batch_size=batch)(x1, target1),
        "IG 1 image, 50 points, adaptive (lumos)": lambda: lumos.IntegratedGradients(
            model, steps=50, tolerance=None, batch_size=batch)(x1, target1),
        "IG 1 image, 50 points, gausslegendre (Captum)": lambda: CaptumIG(model).attribute(
            x1, target=target1, n_steps=50, method="gausslegendre", internal_batch_size=batch),
        "  the same, Captum's default batching (all 50)": lambda: CaptumIG(model).attribute(
            x1, target=target1, n_steps=50, method="gausslegendre"),
    }
    print(f"EfficientNet-Lite0, 224x224, {torch.get_num_threads()} threads, median of {args.rounds} rounds; "
          "ratio = method / plain no-grad forward of 8 images timed right before it")
    print(f"| {'method':46s} | {'seconds':>8s} | {'x forward(8)':>12s} |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 14}|")
    ratios = {}
    for name, fn in cases.items():
        r, t = ratio(forward, fn, args.rounds)
        ratios[name] = r
        print(f"| {name:46s} | {t:8.3f} | {r:12.2f} |", flush=True)
    plain = ratios["plain input gradient (torch)"]
    for name in ("gradients (lumos)", "guided_backprop", "deconvnet"):
        print(f"{name} / plain input gradient: {ratios[name] / plain:.2f}")

    print("\nwall time to reach 1% completeness error (zero baseline, predicted class)")
    print(f"| {'photo':10s} | {'lumos default':>24s} | {'Captum gausslegendre':>30s} | {'lumos / Captum':>14s} |")
    print(f"|{'-' * 12}|{'-' * 26}|{'-' * 32}|{'-' * 16}|")
    for name in list(photos) if args.photos == "all" else args.photos.split(","):
        x = pre([photos[name]])
        target = int(model(x).argmax())
        ig = lumos.IntegratedGradients(model)
        t_lumos, ex = timed_result(lambda ig=ig, x=x, target=target: ig(x, target))
        err = float(ex.params["delta"].abs() / ex.params["gap"].abs())
        lumos_cell = f"{t_lumos:6.2f} s {int(ex.params['points'][0]):4d} pts {err:5.2%}"
        with torch.no_grad():
            gap = float(model(x)[0, target] - model(torch.zeros_like(x))[0, target])
        steps, captum_cell, t_captum = 50, "not reached", float("nan")
        while steps <= args.max_steps:
            t, (_, delta) = timed_result(lambda steps=steps, x=x, target=target: CaptumIG(model).attribute(
                x, target=target, n_steps=steps, method="gausslegendre", internal_batch_size=batch,
                return_convergence_delta=True))
            c_err = abs(float(delta)) / abs(gap)
            if c_err <= 0.01:
                t_captum, captum_cell = t, f"{t:6.2f} s {steps:4d} steps {c_err:5.2%}"
                break
            steps *= 2
        print(f"| {name:10s} | {lumos_cell:>24s} | {captum_cell:>30s} | {t_lumos / t_captum:14.2f} |", flush=True)


if __name__ == "__main__":
    main()
