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
from nets import OneConvNet

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


@pytest.mark.parametrize("steps, message", [(32 * 32 + 1, "deletion_steps=1025 exceeds the 1024 pixels"),
                                            (0, "deletion_steps must be a positive integer, got 0"),
                                            (2.5, "deletion_steps must be a positive integer, got 2.5")])
def test_a_bad_deletion_steps_is_refused_when_the_logger_is_made(data, steps, message):
    """Was accepted, then every method was left out of every logging step (one warning)."""
    with pytest.raises(LumosError, match=message):
        ExplanationLogger(data.images, data.labels, layer=LAYER, sinks=[MemorySink()], metrics=["deletion"],
                          deletion_steps=steps)
    ExplanationLogger(data.images, data.labels, layer=LAYER, sinks=[MemorySink()], deletion_steps=0)  # not used


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


def test_a_3d_grayscale_batch_is_read_as_images_or_refused_never_as_channels(data):
    """(B, H, W) probes used to be read as one image with B channels (with labels: 'Got 4 labels for 1 probe')."""
    torch.manual_seed(0)
    net = OneConvNet(in_channels=1)
    gray = data.images[:, 0]  # (4, 32, 32): four grayscale images without a channel axis
    got, want = MemorySink(), MemorySink()
    ExplanationLogger(gray, data.labels, layer="features", sinks=[got]).log(net, 0)
    ExplanationLogger(gray.unsqueeze(1), data.labels, layer="features", sinks=[want]).log(net, 0)
    assert sorted(got.images) == [f"lumos/gradcam/{i:02d}" for i in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(_pixels(got.images), _pixels(want.images), strict=True))
    masked = ExplanationLogger(gray, masks=data.masks, target="pred", sinks=[MemorySink()])  # masks give B too
    assert masked.images.shape == (4, 1, 32, 32)
    # nothing says how many images: refused in one line naming the shape and the fix
    with pytest.raises(LumosError, match=r"\(4, 32, 32\) are ambiguous.*probes\.unsqueeze\(1\).*unsqueeze\(0\)") as err:
        ExplanationLogger(gray, target="pred", sinks=[MemorySink()])
    assert "\n" not in str(err.value)
    with pytest.raises(LumosError, match=r"display_images\.unsqueeze\(1\)"):
        ExplanationLogger(gray[:2].unsqueeze(1), target="pred", display_images=torch.rand(3, 32, 32),
                          sinks=[MemorySink()])
    # one image, (C, H, W) with its label, or (1, H, W): a batch of one
    assert ExplanationLogger(data.images[0], data.labels[:1], sinks=[MemorySink()]).images.shape == (1, 3, 32, 32)
    assert ExplanationLogger(gray[:1], target="pred", sinks=[MemorySink()]).images.shape == (1, 1, 32, 32)


class SpreadNet(nn.Module):
    """A small CNN that misbehaves on a constant (blank) image, like a model standardising its input does:
    ``"all"``: the input times spread/spread (0/0), so its activations and every logit are NaN; an int: only
    that class's logit is NaN."""

    def __init__(self, nan: str | int = "all") -> None:
        super().__init__()
        self.nan = nan
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spread = x.flatten(1).std(1)
        if self.nan == "all":
            x = x * (spread / spread)[:, None, None, None]
        out = self.fc(self.features(x).mean((2, 3)))
        if self.nan != "all":
            hit = (spread == 0)[:, None] & (torch.arange(out.shape[1], device=x.device) == self.nan)
            out = out.masked_fill(hit, float("nan"))
        return out


@pytest.mark.parametrize("nan", ["all", 0])
def test_a_nan_score_on_one_probe_leaves_out_that_probe_only(data, caplog, nan):
    """One probe image with a NaN score used to drop the method for every probe image at that step."""
    torch.manual_seed(0)
    net = SpreadNet(nan)
    x = data.images.clone()
    x[1] = 0.5  # a blank probe: its explained score (class 0, its label) is NaN
    labels = torch.tensor([1, 0, 2, 3])
    sink = MemorySink()
    methods = ["gradcam", "features"] if nan == "all" else ["gradcam"]
    logger = ExplanationLogger(x, labels, methods=methods, layer="features", target="true", sinks=[sink],
                               masks=data.masks, metrics=["pointing"])
    with caplog.at_level(logging.DEBUG, logger="lumos.track.logger"):
        tags = logger.log(net, 0)
        logger.log(net, 1)
    assert tags == [f"lumos/{m}/{i:02d}" for m in methods for i in (0, 2, 3)]
    # the kept maps are those of the probe images explained without the blank one
    clean = MemorySink()
    ExplanationLogger(x[[0, 2, 3]], labels[[0, 2, 3]], methods=methods, layer="features", target="true",
                      sinks=[clean]).log(net, 0)
    for m in methods:
        for k, i in enumerate((0, 2, 3)):
            a, b = (np.asarray(s.images[f"lumos/{m}/{j:02d}"][0][1]) for s, j in ((sink, i), (clean, k)))
            assert a.shape == b.shape and np.array_equal(a[:48], b[:48])  # the same map (captions: #i vs #k)
    assert [s for s, _ in sink.scalars["lumos/gradcam/pointing_game"]] == [0, 1]
    said = [r for r in caplog.records if "left out at this step" in r.getMessage()]
    for m in methods:
        mine = [r for r in said if r.getMessage().startswith(f"lumos.track: {m}: probe image 1 left out")]
        assert [r.levelname for r in mine] == ["WARNING", "DEBUG"], [r.getMessage() for r in said]
    assert not [r for r in caplog.records if "not logged at this step" in r.getMessage()]


MARK = 0.123  # a value no probe pixel has: the pixels of the probe image(s) whose masked copies give NaN


class MarkedNet(nn.Module):
    """TinyCNN whose scores are NaN on an image holding ``MARK`` and a deleted (zero) pixel: the deletion score's
    masked copies of a marked probe image, never a clean probe image (a model that breaks on some inputs only)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        hit = (x == MARK).flatten(1).any(1) & (x == 0).flatten(1).any(1)
        return out.masked_fill(hit[:, None], float("nan"))


@pytest.mark.parametrize("marked", [[1], [0, 1, 2, 3]])
def test_a_nan_deletion_score_leaves_out_that_probe_from_the_deletion_mean_only(data, caplog, marked):
    """A NaN score on the masked copies of one probe image used to drop the method (maps and scalars) for every
    probe image at that step."""
    torch.manual_seed(0)
    net = MarkedNet()
    x = data.images.clamp(min=0.01)  # no deleted pixel yet in a clean probe image
    x[marked, 2, :16] = MARK  # half of one channel: masked copies keep some of it (and get zeros)
    sink = MemorySink()
    logger = ExplanationLogger(x, data.labels, layer="net.features.block4", target="true", sinks=[sink],
                               masks=data.masks, metrics=["pointing", "deletion"], deletion_steps=8)
    with caplog.at_level(logging.DEBUG, logger="lumos.track.logger"):
        tags = logger.log(net, 0)
        logger.log(net, 1)
    assert tags == [f"lumos/gradcam/{i:02d}" for i in range(4)]  # every probe's map is logged
    pointing = MemorySink()  # the pointing game still counts every probe image
    ExplanationLogger(x, data.labels, layer="net.features.block4", target="true", sinks=[pointing],
                      masks=data.masks, metrics=["pointing"]).log(net, 0)
    assert sink.scalars["lumos/gradcam/pointing_game"][0] == pointing.scalars["lumos/gradcam/pointing_game"][0]
    clean = [i for i in range(4) if i not in marked]
    if clean:  # the deletion mean is that of the other probe images
        want = MemorySink()
        ExplanationLogger(x[clean], data.labels[clean], layer="net.features.block4", target="true", sinks=[want],
                          metrics=["deletion"], deletion_steps=8).log(net, 0)
        (step, got), _ = sink.scalars["lumos/gradcam/deletion_auc"]
        assert step == 0 and got == pytest.approx(want.scalars["lumos/gradcam/deletion_auc"][0][1], abs=1e-6)
    else:  # no probe image can be scored: no deletion point at all (never a NaN one)
        assert "lumos/gradcam/deletion_auc" not in sink.scalars
    said = [r for r in caplog.records if "deletion" in r.getMessage() and "left out" in r.getMessage()]
    which = ", ".join(map(str, marked))
    assert [r.levelname for r in said] == ["WARNING", "DEBUG"], [r.getMessage() for r in said]
    assert said[0].getMessage().startswith(f"lumos.track: gradcam: probe image{'s' * (len(marked) > 1)} {which} "
                                           "left out of deletion_auc at this step")
    assert not [r for r in caplog.records if "not logged at this step" in r.getMessage()]
