"""The bundled TinyViT: small weights, accurate on held-out synthetic images, and its best attention method
points at the object (done-when 3 of the transformers issue, on a small held-out slice).

The pointing game is computed here by hand (the map's first maximum within ``TOLERANCE_PX`` of the object
mask); the random baseline is its exact expectation: the fraction of pixels within the tolerance of the mask.
"""

from __future__ import annotations

from importlib import resources

import pytest
import torch
import torch.nn.functional as F

import lumos
from lumos.synthetic import SyntheticData, make_dataset
from lumos.synthetic.vit import CAM_LAYER, TinyViT, load_tinyvit, token_map

pytestmark = pytest.mark.usefixtures("one_thread")
HELD_OUT_SEED = 123  # never used in training (scripts/train_tiny_vit.py)
N = 48
TOLERANCE_PX = 2


@pytest.fixture(scope="module")
def data() -> SyntheticData:
    return make_dataset(N, seed=HELD_OUT_SEED)


@pytest.fixture(scope="module")
def model() -> TinyViT:
    return load_tinyvit()


def _near_mask(masks: torch.Tensor) -> torch.Tensor:
    """Pixels within TOLERANCE_PX (Euclidean) of the mask."""
    r = TOLERANCE_PX
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    disk = ((yy**2 + xx**2) <= r * r).float()[None, None]
    return F.conv2d(masks[:, None].float(), disk, padding=r)[:, 0] > 0


def _pointing(maps: torch.Tensor, masks: torch.Tensor) -> float:
    near = _near_mask(masks).flatten(1)
    first_max = maps.flatten(1).argmax(1)
    return near[torch.arange(len(maps)), first_max].float().mean().item()


def test_weights_are_small_and_model_is_accurate(model, data) -> None:
    size = resources.files("lumos.synthetic").joinpath("tinyvit.pt").stat().st_size  # type: ignore[attr-defined]
    assert size < 2 * 1024 * 1024
    with torch.no_grad():
        acc = (model(data.images).argmax(1) == data.labels).float().mean().item()
    assert acc >= 0.9


def test_best_attention_method_points_at_the_object(model, data) -> None:
    random = _near_mask(data.masks).float().mean().item()
    scores = {}
    for name in ("rollout", "grad_rollout"):
        ex = lumos.method_class(name)(model)(data.images, data.labels)
        assert ex.raw.shape == (N, 16, 16) and ex.params["prefix"] == 1
        scores[name] = _pointing(ex.maps, data.masks)
    best = max(scores.values())
    assert best >= 0.8 and best >= random + 0.5, (scores, random)


def test_cams_run_on_the_token_layer(model, data) -> None:
    ex = lumos.GradCAM(model, CAM_LAYER, layout=token_map)(data.images[:4], data.labels[:4])
    assert ex.raw.shape == (4, 16, 16) and ex.maps.shape == (4, 64, 64)
    assert bool((ex.raw.flatten(1).abs().amax(1) > 0).all())  # patch tokens get gradient at this layer
    inferred = lumos.GradCAM(model, CAM_LAYER)(data.images[:4], data.labels[:4])  # lumos.layouts' own grid
    torch.testing.assert_close(inferred.raw, ex.raw, atol=1e-6, rtol=0)


def test_evaluate_benchmark_with_the_vit_is_one_command(tmp_path, capsys) -> None:
    import json

    import lumos.cli as cli
    from lumos.cli_evaluate import register

    register(cli.app)
    out = tmp_path / "ev"
    code = cli.main(["evaluate", "--benchmark", "synthetic", "--model", "vit", "--methods", "rollout,gradcam",
                     "--n", "4", "--steps", "2", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "evaluation.json").read_text())
    assert data["meta"]["model"] == "vit" and {"rollout", "gradcam", "random"} <= set(data["metrics"])
    capsys.readouterr()
    assert cli.main(["evaluate", "--benchmark", "synthetic", "--model", "resnet50"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tinycnn or vit" in err[0]
