"""The engine's costs, as ratios measured in one run on this machine.

- Occlusion (window 16, stride 8, 224 x 224, one image) against Captum's ``Occlusion`` with the same batch size;
- RISE with N masks against N / batch plain batched forwards;
- ``lumos explain`` on a folder of 24 photos against decoding plus an ``Explainer`` on the same images
  (both in this process, model loading included in both).

Each ratio pairs every timed call with its reference timed right before it (the machine's speed drifts) and
reports the median over rounds. Run: ``.venv/bin/python benchmarks/bench_engine.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

import torch
from timing import ratio

import lumos
from lumos.io import load_image, sample_images
from lumos.zoo import load_model


def occlusion_row(model, x: torch.Tensor, rounds: int, batch: int) -> tuple[str, float, float]:
    from captum.attr import Occlusion

    target = int(model(x).argmax())
    ours = lumos.Occlusion(model, window=16, stride=8, batch_size=batch)
    theirs = Occlusion(model)

    def captum() -> None:
        with torch.no_grad():
            theirs.attribute(x, sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8), baselines=0, target=target,
                             perturbations_per_eval=batch)

    r, t = ratio(captum, lambda: ours(x, target), rounds)
    return f"occlusion 16/8, 729 windows, batch {batch} / Captum Occlusion", r, t


def rise_row(model, x: torch.Tensor, rounds: int, n: int, batch: int) -> tuple[str, float, float]:
    rise = lumos.RISE(model, n_masks=n, batch_size=batch)
    xb = x.repeat(batch, 1, 1, 1)

    def forwards() -> None:
        with torch.no_grad():
            for _ in range(n // batch):
                model(xb)

    r, t = ratio(forwards, lambda: rise(x), rounds)
    return f"rise {n} masks, batch {batch} / {n // batch} plain forwards of {batch}", r, t


def cli_row(rounds: int, method: str) -> tuple[str, float, float]:
    from lumos.cli import main
    from lumos.explainer import Explainer, ExplainSpec

    root = Path(tempfile.mkdtemp(prefix="lumos-bench-"))
    folder, out = root / "photos", root / "out"  # the output must not land in the folder being explained
    folder.mkdir()
    for k in range(4):
        for name, img in sample_images().items():
            img.save(folder / f"{name}_{k}.jpg", quality=90)
    files = sorted(folder.glob("*.jpg"))

    def cli() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["explain", str(folder), "--method", method, "--out", str(out)]) == 0

    def bare() -> None:
        explainer = Explainer(ExplainSpec(methods=(method,)))
        images = [load_image(f) for f in files]
        for i in range(0, len(images), 8):
            explainer(images[i:i + 8])

    r, t = ratio(bare, cli, rounds)
    return f"lumos explain, 24 photos, {method} / decode + Explainer", r, t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rise-masks", type=int, default=512)
    args = parser.parse_args()
    model = load_model("efficientnet_lite0").model.eval()
    x = load_model("efficientnet_lite0").preprocess([sample_images()["chelsea"]])
    rows = [cli_row(args.rounds, "gradcam"), rise_row(model, x, args.rounds, args.rise_masks, 32),
            occlusion_row(model, x, args.rounds, 32)]
    print(f"EfficientNet-Lite0, 224x224, {torch.get_num_threads()} threads; median of {args.rounds} paired rounds")
    print(f"{'what':<64} {'ratio':>7} {'seconds':>8}")
    for name, r, t in rows:
        print(f"{name:<64} {r:>7.2f} {t:>8.2f}")


if __name__ == "__main__":
    main()
