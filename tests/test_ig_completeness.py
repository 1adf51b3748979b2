"""Integrated gradients: the adaptive rule against a closed form, and completeness on the bundled photos."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lumos
from lumos.io import sample_images
from lumos.methods.integrated import refine, trapezoid_weights


class Cubic(nn.Module):
    """F(x) = (w . x)^3 per class: IG from the zero baseline is x_i w_i (w . x)^2 exactly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(2, 3 * 8 * 8) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) @ self.w.T) ** 3


def test_trapezoid_weights_and_refine():
    alphas = torch.tensor([[0.0, 1.0, 0.5, 0.3]], dtype=torch.float64)
    weights = torch.tensor([[0.15, 0.25, 0.35, 0.25]], dtype=torch.float64)
    assert torch.allclose(trapezoid_weights(alphas), weights)
    # f = alpha^3 with exact slopes: the trapezoid rule misses h^3 / 2 on a segment of length h.
    f = (alphas ** 3)[..., None]
    s = (3 * alphas ** 2)[..., None]
    assert torch.allclose(refine(alphas, f, s, 1), torch.tensor([[0.75]], dtype=torch.float64))
    assert torch.allclose(refine(alphas, f, s, 2)[:, 0].sort().values, torch.tensor([0.15, 0.75], dtype=torch.float64))


def test_adaptive_rule_meets_the_closed_form():
    model = Cubic()
    x = torch.rand(3, 3, 8, 8)
    exact = x * (model.w[1].detach().view(3, 8, 8) * (x.flatten(1) @ model.w[1].detach())[:, None, None, None] ** 2)
    fixed = lumos.IntegratedGradients(model, steps=16, tolerance=None)(x, 1)
    assert fixed.params["points"].tolist() == [16, 16, 16]
    err_fixed = float((fixed.raw - exact).norm() / exact.norm())
    assert 1e-4 < err_fixed < 0.02  # 16 trapezoid points on a quadratic integrand: close, not exact
    tight = lumos.IntegratedGradients(model, steps=16, tolerance=1e-5, max_steps=512)(x, 1)
    assert float((tight.raw - exact).norm() / exact.norm()) < 2e-5
    assert (tight.params["points"] > 16).all() and (tight.params["points"] <= 512).all()
    capped = lumos.IntegratedGradients(model, steps=16, tolerance=1e-9, max_steps=24)(x, 1)
    assert capped.params["points"].tolist() == [24, 24, 24]
    gap = model(x)[:, 1] - model(torch.zeros_like(x))[:, 1]
    assert torch.allclose(capped.params["delta"], capped.raw.sum((1, 2, 3)) - gap.detach(), atol=1e-5)


def test_adaptive_rule_in_batches_equals_one_by_one():
    model = Cubic()
    x = torch.rand(3, 3, 8, 8)
    together = lumos.IntegratedGradients(model, steps=16, tolerance=1e-4, batch_size=64)(x, [0, 1, 1])
    alone = [lumos.IntegratedGradients(model, steps=16, tolerance=1e-4, batch_size=1)(x[i:i + 1], t)
             for i, t in enumerate([0, 1, 1])]
    assert torch.allclose(together.raw, torch.cat([a.raw for a in alone]), rtol=1e-5, atol=1e-7)
    assert together.params["points"].tolist() == [int(a.params["points"]) for a in alone]


def test_bad_settings():
    model = Cubic()
    with pytest.raises(lumos.LumosError, match="max_steps"):
        lumos.IntegratedGradients(model, steps=16, max_steps=8)
    with pytest.raises(lumos.LumosError, match="tolerance"):
        lumos.IntegratedGradients(model, tolerance=-0.1)
    with pytest.raises(lumos.LumosError, match="steps"):
        lumos.IntegratedGradients(model, steps=1)


def test_default_settings_complete_within_one_percent_on_the_bundled_photos(one_thread):
    """Done-when: completeness error <= 1% of |F(x) - F(0)| with the default settings, every bundled photo."""
    model, preprocess, _ = lumos.load_model("efficientnet_lite0")
    photos = sample_images()
    assert {"chelsea", "coffee"} <= set(photos)
    x = preprocess(list(photos.values()))
    ex = lumos.IntegratedGradients(model)(x)
    with torch.no_grad():
        t = ex.targets[:, None]
        gap = model(x).gather(1, t)[:, 0] - model(torch.zeros_like(x)).gather(1, t)[:, 0]
    error = (ex.raw.double().sum((1, 2, 3)) - gap.double()).abs() / gap.double().abs()
    assert (error <= 0.01).all(), dict(zip(photos, error.tolist(), strict=True))
    assert torch.allclose(ex.params["delta"], (ex.raw.sum((1, 2, 3)) - gap), atol=1e-3)
