"""ExplanationLogger as a real training loop meets it: wrapped models, other dtypes, NaN weights, bad inputs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from lumos.errors import LumosError
from lumos.synthetic import TinyCNN, make_dataset
from lumos.track import ExplanationLogger, MemorySink

LAYER = "features.block4"


@pytest.fixture(scope="module")
def data():
    return make_dataset(4, size=32, seed=11)


def _maps(model: nn.Module, data, layer: str = LAYER) -> dict[str, list]:
    sink = MemorySink()
    ExplanationLogger(data.images, data.labels, layer=layer, sinks=[sink]).log(model, 0)
    return sink.images


def _pixels(images: dict[str, list]) -> list[torch.Tensor]:
    """The first picture of every tag, by tag, as uint8 tensors."""
    return [torch.as_tensor(np.asarray(v[0][1])) for _, v in sorted(images.items())]


def test_a_ddp_model_is_explained_through_its_inner_network_and_training_goes_on(data, tmp_path):
    torch.manual_seed(0)
    net = TinyCNN()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        sink = MemorySink()
        logger = ExplanationLogger(data.images, data.labels, layer=f"module.{LAYER}", sinks=[sink])
        for step in range(2):  # the step after a logging call used to fail inside DDP's reducer
            nn.functional.cross_entropy(ddp(data.images), data.labels).backward()
            opt.step()
            opt.zero_grad()
            logger.log(ddp, step)
    finally:
        dist.destroy_process_group()
    assert [s for s, _, _ in sink.images["lumos/gradcam/00"]] == [0, 1]
    got, want = _pixels({k: v[-1:] for k, v in sink.images.items()}), _pixels(_maps(net, data))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_compiled_and_data_parallel_models_take_the_plain_layer_names(data):
    torch.manual_seed(0)
    net = TinyCNN()
    want = _pixels(_maps(net, data))
    for wrapped in (torch.compile(net, backend="eager"), nn.DataParallel(net)):
        got = _maps(wrapped, data)
        assert sorted(got) == [f"lumos/gradcam/{i:02d}" for i in range(4)]
        assert all(torch.equal(a, b) for a, b in zip(_pixels(got), want, strict=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_in_another_dtype_gets_probes_in_its_dtype(data, dtype):
    torch.manual_seed(0)
    net = TinyCNN()
    ref = _pixels(_maps(net, data))
    got = _pixels(_maps(net.to(dtype), data))
    assert len(got) == 4
    # same pictures up to the precision of the dtype: most pixels equal
    same = sum(float((a == b).float().mean()) for a, b in zip(got, ref, strict=True)) / 4
    assert same > 0.6
    assert all(p.dtype == dtype for p in net.parameters())


def test_nan_activations_are_not_drawn_as_flat_feature_maps(data, caplog):
    torch.manual_seed(0)
    net = TinyCNN()
    with torch.no_grad():
        net.features.block1[0].weight[0, 0, 0, 0] = float("nan")
    sink = MemorySink()
    logger = ExplanationLogger(data.images, data.labels, methods=["gradcam", "features"], layer=LAYER,
                               feature_layer="features.block1", sinks=[sink])
    with caplog.at_level(logging.WARNING, logger="lumos.track"):
        assert logger.log(net, 0) == []
    said = [r.getMessage() for r in caplog.records]
    assert any("features not logged" in m and "not finite" in m for m in said)


def test_a_nan_output_has_no_claimed_prediction(data):
    torch.manual_seed(0)
    net = TinyCNN()
    with torch.no_grad():
        net.fc.bias.fill_(float("nan"))  # finite feature maps, NaN logits (argmax would say class 0)
    sink = MemorySink()
    ExplanationLogger(data.images, data.labels, methods=["features"], layer="features.block1",
                      sinks=[sink]).log(net, 0)
    captions = [v[0][2] for _, v in sorted(sink.images.items())]
    assert len(captions) == 4
    assert all("pred: none (the output is not finite)" in c for c in captions)


def test_wrong_inputs_are_one_line_errors(data):
    with pytest.raises(LumosError, match="every_n_steps must be a positive int"):
        ExplanationLogger(data.images, data.labels, sinks=[MemorySink()], every_n_steps=-1)
    with pytest.raises(LumosError, match="every_n_epochs must be a positive int"):
        ExplanationLogger(data.images, data.labels, sinks=[MemorySink()], every_n_epochs="2")
    logger = ExplanationLogger(data.images, [0, 1, 2, 7], layer=LAYER, sinks=[MemorySink()])
    with pytest.raises(LumosError, match=r"Probe label 7 is not a class of this model .*4 classes"):
        logger.log(TinyCNN(), 0)
    gray = ExplanationLogger(data.images[:, :1], data.labels, layer=LAYER, sinks=[MemorySink()])
    with pytest.raises(LumosError, match=r"The model fails on the probe images \(4, 1, 32, 32\)") as err:
        gray.log(TinyCNN(), 0)
    assert "\n" not in str(err.value)


def test_one_constant_map_does_not_turn_the_mean_deletion_auc_into_nan(data):
    from lumos.evaluate import Deletion

    torch.manual_seed(0)
    net = TinyCNN()
    logger = ExplanationLogger(data.images[:2], data.labels[:2], layer=LAYER, sinks=[MemorySink()],
                               metrics=["deletion"], deletion_steps=8)
    maps = torch.stack([torch.zeros(32, 32), torch.rand(32, 32)])  # a zero map (e.g. a dead head) and a real one
    got = logger._metrics(net, data.images[:2], "gradcam", maps, data.labels[:2], False)["lumos/gradcam/deletion_auc"]
    each = Deletion(steps=8)(net, data.images[:2], maps, data.labels[:2]).auc
    assert torch.isnan(each[0]) and torch.isfinite(each[1])  # the evaluation's own verdict on each map
    assert got == pytest.approx(float(each[1]))
