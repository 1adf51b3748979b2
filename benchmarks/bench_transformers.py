"""Transformer speed: torchvision ``vit_b_16`` (random weights), batch 8, 224 x 224.

The classifier head, zero in torchvision's initialisation, gets random weights (else every gradient is zero).
Grad-CAM at the automatic layer (a token layer; an explicit layer and layout if the automatic choice fails),
attention rollout and gradient-weighted attention rollout, each as a ratio to a plain no-grad forward of the
same batch, measured in the same run (each method call paired with its own plain forward; medians).
Targets: Grad-CAM <= 1.3x, rollout <= 1.5x, gradient-weighted rollout <= 3x.
Run: ``.venv/bin/python benchmarks/bench_transformers.py``.
"""

from __future__ import annotations

import argparse

import torch
from timing import ratio
from torchvision.models import vit_b_16

import lumos
from lumos.attention import capture_attention

TARGETS = {"gradcam": 1.3, "rollout": 1.5, "grad_rollout": 3.0}


def tokens_to_map(t: torch.Tensor) -> torch.Tensor:
    """B x 197 x D -> B x D x 14 x 14 (class token dropped): the explicit layout."""
    return t[:, 1:].transpose(1, 2).reshape(t.shape[0], t.shape[2], 14, 14)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 on a busy 2-core box crawl)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = vit_b_16(weights=None).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts the head at zero: no gradient
    x = torch.rand(8, 3, 224, 224)

    def plain() -> None:
        with torch.no_grad():
            model(x)

    with torch.no_grad():  # the capture leaves the output bit-identical
        reference = model(x)
        with capture_attention(model) as rec:
            captured = model(x)
    identical = torch.equal(reference, captured) and len(rec.probs) == 12

    try:
        gradcam = lumos.GradCAM(model)
        gradcam(x[:1])
        where = f"auto: {gradcam.sites(x)[0].name}"
    except lumos.LumosError:
        gradcam = lumos.GradCAM(model, "encoder.layers.encoder_layer_11.ln_1", layout=tokens_to_map)
        where = "explicit: encoder.layers.encoder_layer_11.ln_1 + layout"
    methods = {"gradcam": (gradcam, where), "rollout": (lumos.method_class("rollout")(model), "12 blocks, mean"),
               "grad_rollout": (lumos.method_class("grad_rollout")(model), "12 blocks")}
    rows = []
    for name, (method, note) in methods.items():
        r, t = ratio(plain, lambda m=method: m(x), args.rounds)
        rows.append((name, r, t, TARGETS[name], note))

    print(f"torchvision vit_b_16 (random weights), batch 8, 224x224, {torch.get_num_threads()} thread(s); ratio = "
          f"method / plain no-grad forward (median of {args.rounds} paired rounds); output bit-identical under "
          f"attention capture: {identical}")
    print(f"{'method':<14} {'ratio':>6} {'target':>7} {'seconds':>8}  note")
    for name, r, t, target, note in rows:
        flag = "ok" if r <= target else "OVER"
        print(f"{name:<14} {r:>6.2f} {'<=' + format(target, '.1f'):>7} {t:>8.2f}  {flag}; {note}")


if __name__ == "__main__":
    main()
