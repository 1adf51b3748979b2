"""Biases removed from the evaluation metrics, each checked against a hand computation or a brute-force reference:
the pointing game's tie rule (no top-left preference), Average Drop's weighting of signed maps (the positive
part, not min-max), and the random-logit check's other class (drawn per image, from the selected output)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lumos.evaluate import AverageDropIncrease, CascadingRandomisation, PointingGame, RandomLogit


# -- pointing game: tied maxima ------------------------------------------------------------------------------
def test_pointing_game_default_scores_the_share_of_tied_maxima_that_hit():
    """Two tied maxima, one on the object: pointing at one of them uniformly hits with probability 1/2. The old
    default ("first", raster order) took the top-left one and scored 0."""
    tied = torch.zeros(1, 10, 10)
    tied[0, 0, 0] = tied[0, 0, 3] = 1.0
    mask = torch.zeros(1, 10, 10, dtype=torch.bool)
    mask[0, 0, 3] = True
    assert PointingGame()(maps=tied, masks=mask).item() == pytest.approx(0.5)
    assert PointingGame(ties="first")(maps=tied, masks=mask).item() == 0.0  # still available
    assert PointingGame(ties="any")(maps=tied, masks=mask).item() == 1.0
    three = torch.zeros(1, 10, 10)
    three[0, 0, 0] = three[0, 9, 9] = three[0, 5, 0] = 2.0
    assert PointingGame()(maps=three, masks=mask).item() == 0.0  # none of the three is on the object
    mask[0, 9, 9] = mask[0, 5, 0] = True
    assert PointingGame()(maps=three, masks=mask).item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("tolerance", [0.0, 2.0])
def test_pointing_game_default_has_no_positional_bias(tolerance):
    """A map with its maximum tied at the top-left and the bottom-right corners, the object at the bottom right:
    the score must not change when the image is rotated by 180 degrees (the object then at the top left).
    Raster order scored 0 one way and 1 the other."""
    maps = torch.zeros(1, 12, 12)
    maps[0, 0, 0] = maps[0, 11, 11] = 1.0
    maps[0, 6, 6] = 0.5
    mask = torch.zeros(1, 12, 12, dtype=torch.bool)
    mask[0, 9:, 9:] = True
    a = PointingGame(tolerance=tolerance)(maps=maps, masks=mask).item()
    b = PointingGame(tolerance=tolerance)(maps=maps.flip(1, 2), masks=mask.flip(1, 2)).item()
    assert a == b == pytest.approx(0.5)
    first = [PointingGame(tolerance=tolerance, ties="first")(maps=m, masks=k).item()
             for m, k in ((maps, mask), (maps.flip(1, 2), mask.flip(1, 2)))]
    assert first == [0.0, 1.0]  # the rule kept as an option is the biased one


def test_pointing_game_tolerance_with_ties_by_hand():
    """Tied maxima at distances 2, 3 and 5 from the only object pixel: tolerance 3 reaches two of the three."""
    maps = torch.zeros(1, 12, 12)
    obj = (6, 6)
    for y, x in ((6, 8), (6, 3), (9, 10)):  # distances 2, 3, 5
        maps[0, y, x] = 1.0
    mask = torch.zeros(1, 12, 12, dtype=torch.bool)
    mask[0, obj[0], obj[1]] = True
    assert PointingGame(tolerance=1.9)(maps=maps, masks=mask).item() == 0.0
    assert PointingGame(tolerance=2)(maps=maps, masks=mask).item() == pytest.approx(1 / 3)
    assert PointingGame(tolerance=3)(maps=maps, masks=mask).item() == pytest.approx(2 / 3)
    assert PointingGame(tolerance=4.99)(maps=maps, masks=mask).item() == pytest.approx(2 / 3)
    assert PointingGame(tolerance=5)(maps=maps, masks=mask).item() == pytest.approx(1.0)
    assert PointingGame(tolerance=3, ties="any")(maps=maps, masks=mask).item() == 1.0
    assert PointingGame(tolerance=3, ties="first")(maps=maps, masks=mask).item() == 1.0  # (6, 3) comes first


def _pointing_reference(m: np.ndarray, mask: np.ndarray, tol: float, ties: str) -> float:
    """Brute force: Euclidean distance from every pointed pixel to every object pixel."""
    flat = m.ravel()
    pointed = [int(np.argmax(flat))] if ties == "first" else list(np.flatnonzero(flat == flat.max()))
    obj = np.argwhere(mask)
    hits = []
    for p in pointed:
        py, px = divmod(p, m.shape[1])
        hits.append(bool((np.hypot(obj[:, 0] - py, obj[:, 1] - px) <= tol + 1e-6).any()))
    return float(np.mean(hits)) if ties == "mean" else float(any(hits))


def test_pointing_game_matches_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 3, (12, 9, 13), generator=g).float()  # many tied maxima
    maps[:4] = torch.rand(4, 9, 13, generator=g)  # and unique ones
    masks = torch.rand(12, 9, 13, generator=g) < 0.06
    masks[:, 4, 6] |= ~masks.flatten(1).any(1)  # no empty ground truth
    for tol in (0.0, 1.0, 1.5, 2.0, 2.9, 3.0, 7.5, 40.0):
        for ties in ("mean", "first", "any"):
            got = PointingGame(tolerance=tol, ties=ties)(maps=maps, masks=masks)
            ref = [_pointing_reference(m.numpy(), k.numpy(), tol, ties) for m, k in zip(maps, masks, strict=True)]
            assert got.tolist() == pytest.approx(ref, abs=1e-6), (tol, ties)


def test_pointing_game_of_a_constant_map_stays_nan():
    mask = torch.zeros(2, 6, 6, dtype=torch.bool)
    mask[:, :2, :2] = True
    maps = torch.stack([torch.zeros(6, 6), torch.full((6, 6), 0.3)])
    for ties in ("mean", "first", "any"):
        assert PointingGame(tolerance=1, ties=ties)(maps=maps, masks=mask).isnan().all()


# -- average drop: signed maps --------------------------------------------------------------------------------
class SumSigmoid(nn.Module):
    """logits = (sum of pixels, 0): p(class 0) = sigmoid(sum)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).sum(1, keepdim=True)
        return torch.cat([s, torch.zeros_like(s)], 1)


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def test_average_drop_weights_a_signed_map_by_its_positive_part():
    """Map [[-2, 0], [1, 4]]: the weights are its positive part over its maximum, [[0, 0], [1/4, 1]] (min-max gave
    the zero-attribution pixel 1/3 and the negative one 0)."""
    x = torch.tensor([[[[0.4, 0.9], [1.0, 0.2]]]])
    maps = torch.tensor([[[-2.0, 0.0], [1.0, 4.0]]])
    y = sig(0.4 + 0.9 + 1.0 + 0.2)
    o = sig(0.25 * 1.0 + 1.0 * 0.2)
    r = AverageDropIncrease()(SumSigmoid(), x, maps, 0)
    assert r.probs.item() == pytest.approx(y, abs=1e-6)
    assert r.masked_probs.item() == pytest.approx(o, abs=1e-6)
    assert r.drop.item() == pytest.approx((y - o) / y, abs=1e-6)
    assert bool(r.defined.item()) and not bool(r.increase.item())


def test_average_drop_of_a_map_with_no_positive_value_is_undefined():
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    maps = -torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(2))  # signed, nothing positive
    maps[1] = torch.rand(4, 4, generator=torch.Generator().manual_seed(3)) - 0.5  # signed with a positive part
    maps[2] = maps[2].clamp_max(-0.1)  # still not constant
    maps[2, 0, 0] = 0.0  # a zero maximum is no evidence either
    r = AverageDropIncrease()(SumSigmoid(), x, maps, 0)
    assert r.defined.tolist() == [False, True, False]
    assert r.drop[[0, 2]].isnan().all() and not r.drop[1].isnan()
    assert not r.increase[[0, 2]].any()
    assert r.avg_drop == pytest.approx(r.drop[1].item())


def test_average_drop_of_non_negative_maps_is_min_max_as_before():
    """Non-negative maps (a CAM, absolute gradients) keep Score-CAM's min-max weighting, at the map's resolution
    and then upsampled: the closed form sigmoid(sum(x * upsample(minmax(m))))."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 1, 8, 8, generator=g) - 0.3
    maps = torch.rand(3, 4, 4, generator=g)
    maps[0] += 0.5  # minimum above zero: min-max subtracts it
    maps[1, 0] = 0.0  # zeros
    maps[2] = (maps[2] > 0.5).float()  # two values
    lo = maps.flatten(1).amin(1)[:, None, None]
    hi = maps.flatten(1).amax(1)[:, None, None]
    w = torch.nn.functional.interpolate(((maps - lo) / (hi - lo))[:, None], size=(8, 8), mode="bilinear",
                                        align_corners=False)[:, 0]
    r = AverageDropIncrease()(SumSigmoid(), x, maps, 0)
    o = [sig(float((xi[0] * wi).sum())) for xi, wi in zip(x, w, strict=True)]
    assert r.masked_probs.tolist() == pytest.approx(o, abs=1e-6)
    assert r.defined.all()


# -- random logit: the other class --------------------------------------------------------------------------
class Scores(nn.Module):
    """A linear head on the image's mean per channel, K outputs; returns (aux, main) when ``pair``."""

    def __init__(self, k: int = 10, pair: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(3, k)
        self.pair = pair

    def forward(self, x: torch.Tensor):
        z = self.lin(x.mean((2, 3)))
        return (0.5 * z, z[:, :2]) if self.pair else z


def _random_maps(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Maps that depend on the image and the class only (not on the batch)."""
    return torch.stack([torch.rand(8, 8, generator=torch.Generator().manual_seed(int(c) * 1000 + int(xi.sum() * 1e3)))
                        for xi, c in zip(x, classes, strict=True)])


def test_random_logit_other_class_does_not_depend_on_the_batch():
    """An image is compared with the same other class alone, in a batch, in another order, or in a split."""
    torch.manual_seed(0)
    model = Scores(10)
    x = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    check = RandomLogit(_random_maps)
    batch = check(model, x, targets=0)
    alone = torch.cat([check(model, x[i : i + 1], targets=0).other_classes for i in range(12)])
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(6))
    shuffled = check(model, x[perm], targets=0).other_classes
    split = torch.cat([check(model, x[:5], targets=0).other_classes, check(model, x[5:], targets=0).other_classes])
    assert batch.other_classes.tolist() == alone.tolist() == split.tolist()
    assert shuffled.tolist() == batch.other_classes[perm].tolist()
    assert (batch.other_classes != 0).all()
    assert torch.allclose(batch.spearman, check(model, x[perm], targets=0).spearman[perm.argsort()])


def test_random_logit_other_class_is_uniform_over_the_other_classes():
    """Over many images with target 2 of K = 5, each of the 4 others comes up about a quarter of the time
    (chi-square, 3 dof: 16.3 is its 0.001 quantile) and the target never."""
    from lumos.evaluate.sanity import other_classes

    x = torch.rand(4000, 1, 3, 3, generator=torch.Generator().manual_seed(7))
    other = other_classes(x, torch.full((4000,), 2), 5, seed=0)
    counts = torch.bincount(other, minlength=5).tolist()
    assert counts[2] == 0 and sum(counts) == 4000
    chi2 = sum((c - 1000) ** 2 / 1000 for i, c in enumerate(counts) if i != 2)
    assert chi2 < 16.3
    assert not torch.equal(other, other_classes(x, torch.full((4000,), 2), 5, seed=1))  # the seed matters


def test_random_logit_counts_the_classes_of_the_selected_output():
    """With the output narrowed to 2 classes the only other class is 1 - class, and with 3 of 10 it is one of the
    other two of those 3 (the old check counted the model's 10 classes)."""
    torch.manual_seed(0)
    model = Scores(10)
    x = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    z = model(x).detach()
    two = RandomLogit(_random_maps, output=lambda o: o[:, :2])(model, x)
    assert two.classes.tolist() == z[:, :2].argmax(1).tolist()
    assert two.other_classes.tolist() == (1 - two.classes).tolist()
    three = RandomLogit(_random_maps, output=lambda o: o[:, 4:7])(model, x)
    assert three.classes.tolist() == z[:, 4:7].argmax(1).tolist()
    assert ((three.other_classes >= 0) & (three.other_classes < 3) & (three.other_classes != three.classes)).all()
    pair = Scores(10, pair=True)
    pair.load_state_dict(model.state_dict())
    res = RandomLogit(_random_maps, output=1)(pair, x)  # a tuple output: (aux of 10, main of 2)
    assert res.other_classes.tolist() == (1 - z[:, :2].argmax(1)).tolist()
    cascade = CascadingRandomisation(lambda m, xx, c: torch.rand(len(xx), 8, 8), output=1, max_steps=1)(pair, x[:3])
    assert cascade.classes.tolist() == z[:3, :2].argmax(1).tolist()
