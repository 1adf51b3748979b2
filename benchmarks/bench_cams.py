"""CAM speed on EfficientNet-Lite0: each method's time / a plain no-grad forward of the same batch.

This machine's speed drifts, so every round times a plain forward right before the method and the
table reports the median of the per-round ratios. Run: ``.venv/bin/python benchmarks/bench_cams.py``.
"""

from __future__ import annotations

import argparse

import torch
from timing import ratio

import lumos
from lumos.io import sample_images
from lumos.zoo import load_model


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--skip-full-scorecam", action="store_true", help="skip the all-channel reference")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, preprocess, labels = load_model("efficientnet_lite0")
    photos = list(sample_images().values())
    x = preprocess((photos * 2)[:8])
    x1 = x[:1]

    def plain() -> None:
        with torch.no_grad():
            model(x)

    rows = []
    for name in ["gradcam", "gradcam++", "layercam", "xgradcam", "hirescam", "cam", "eigencam"]:
        cam = lumos.method_class(name)(model)
        r, t = ratio(plain, lambda cam=cam: cam(x), args.rounds)
        rows.append((name, "8", r, t, ""))

    try:
        from captum.attr import LayerGradCam

        captum = LayerGradCam(model, model._act1)
        r, t = ratio(plain, lambda: captum.attribute(x, target=0), args.rounds)
        rows.append(("captum LayerGradCam", "8", r, t, "reference"))
    except ImportError:
        pass

    scorecam = lumos.ScoreCAM(model)
    r, t = ratio(plain, lambda: scorecam(x1), max(3, args.rounds // 2))
    note = ""
    if not args.skip_full_scorecam:
        full = lumos.ScoreCAM(model, max_channels=None, batch_size=64)(x1)
        note = f"corr with all-channel Score-CAM {corr(scorecam(x1).maps, full.maps):.3f}"
    rows.append((f"scorecam (max_channels={scorecam.max_channels})", "1", r, t, note))

    print(f"EfficientNet-Lite0, 224x224, {torch.get_num_threads()} threads; ratio = method / plain no-grad "
          f"forward of a batch of 8 (median of {args.rounds} rounds)")
    print(f"{'method':<34} {'batch':>5} {'ratio':>7} {'seconds':>8}  note")
    for name, batch, r, t, note in rows:
        print(f"{name:<34} {batch:>5} {r:>7.2f} {t:>8.3f}  {note}")


if __name__ == "__main__":
    main()
