"""ExplanationLogger in a plain training loop: TensorBoard read back, and 'never disturbs training'."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from lumos.errors import LumosError
from lumos.synthetic import TinyCNN, make_dataset
from lumos.track import ExplanationLogger, MemorySink, TensorBoardSink
from nets import OneConvNet

SIZE = 32


@pytest.fixture(scope="module")
def data():
    return make_dataset(16, size=SIZE, seed=3)


class DropCNN(nn.Module):
    """Conv-BN-ReLU with dropout: training consumes the RNG, so a disturbed stream would show."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.features(x).mean((2, 3))))


def train(model: nn.Module, data, epochs: int = 1, logger: ExplanationLogger | None = None, seed: int = 0) -> None:
    """A plain loop; the logger runs between backward() and step(), the most delicate place."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(data.labels))
        for lo in range(0, len(order), 8):
            idx = order[lo:lo + 8]
            x = data.images[idx] + 0.01 * torch.randn(len(idx), 3, SIZE, SIZE) * float(np.random.rand())
            if random.random() < 0.5:
                x = x.flip(-1)
            loss = nn.functional.cross_entropy(model(x), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            if logger is not None and logger.due_step(step):
                logger.log(model, step)
            opt.step()
            step += 1
        if logger is not None and logger.due_epoch(epoch):
            logger.log(model, epoch)


def test_plain_loop_tensorboard_read_back(tmp_path, data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = TinyCNN()
    logger = ExplanationLogger(
        data.images[:3], data.labels[:3], methods=["gradcam", "features"], layer="features.block4",
        class_names=data.class_names, sinks=[TensorBoardSink(tmp_path / "tb")], masks=data.masks[:3],
        metrics=["pointing"], every_n_epochs=1,
    )
    train(model, data, epochs=2, logger=logger)
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = sorted(acc.Tags()["images"])
    assert tags == sorted(f"lumos/{m}/{i:02d}" for m in ("gradcam", "features") for i in range(3))
    for tag in tags:
        events = acc.Images(tag)
        assert [e.step for e in events] == [0, 1]
        assert events[0].width > SIZE and events[0].height > SIZE
    assert [e.step for e in acc.Scalars("lumos/gradcam/pointing_game")] == [0, 1]


def test_captions_both_targets_side_by_side(data):
    sink = MemorySink()
    model = TinyCNN().eval()
    logger = ExplanationLogger(data.images[:2], data.labels[:2], class_names=data.class_names, sinks=[sink],
                               layer="features.block4", display_size=64)
    tags = logger.log(model, 5)
    assert tags == ["lumos/gradcam/00", "lumos/gradcam/01"]
    step, image, caption = sink.images["lumos/gradcam/00"][0]
    assert step == 5 and image.width > 2 * 64  # true-label and predicted panels side by side
    with torch.no_grad():
        p = model(data.images[:1]).softmax(1)[0]
    pred = int(p.argmax())
    assert caption == (f"#0 label: {data.class_names[int(data.labels[0])]}, pred: {data.class_names[pred]} "
                       f"({float(p[pred]):.2f}), p(label)={float(p[int(data.labels[0])]):.2f}")
    single = ExplanationLogger(data.images[:2], data.labels[:2], target="pred", sinks=[MemorySink()])
    single.log(model, 0)
    assert single.sinks[0].images["lumos/gradcam/00"][0][1].width < image.width


def test_a_zero_head_gives_a_marked_panel_not_a_log_line_per_step(data, caplog, monkeypatch):
    """Before training starts, a head of zeros makes every map blank: the panel header says "zero map" (checked by
    recording the headers drawn) and no engine line is logged at each logging step."""
    from lumos.track import logger as logger_module

    heads, original = [], logger_module.panel_header
    monkeypatch.setattr(logger_module, "panel_header", lambda *a: heads.append(original(*a)) or heads[-1])
    from lumos.synthetic import load_tinycnn

    trained = load_tinycnn()
    zero_head = load_tinycnn()
    nn.init.zeros_(zero_head.fc.weight)
    x = torch.nn.functional.interpolate(data.images[:2], size=64, mode="bilinear")  # the trained model's size
    logger = ExplanationLogger(x, data.labels[:2], sinks=[MemorySink()], layer="features.block4")
    with caplog.at_level("WARNING", logger="lumos.engine"):
        logger.log(zero_head, 0)
        logger.log(trained, 1)
    assert not [r for r in caplog.records if "zero everywhere" in r.getMessage()]
    assert len(heads) == 8 and all(h.endswith(" - zero map") for h in heads[:4])
    assert not any(h.endswith("zero map") for h in heads[4:])


def test_a_method_that_cannot_explain_yet_is_skipped_with_one_warning_not_an_exception(caplog):
    """torchvision's ViT starts with a zero head: layer="auto" cannot be resolved (no gradient reaches a block),
    which used to raise out of log() and stop the training. Now the step logs the other methods, warns once per
    reason (debug level after that), and once the head has weights Grad-CAM is logged again."""
    vit = pytest.importorskip("torchvision.models.vision_transformer")
    torch.manual_seed(0)
    model = vit.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                  mlp_dim=64, num_classes=4)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    logger = ExplanationLogger(x, [0, 1], methods=["gradcam", "gradients"], sinks=[MemorySink()])
    with caplog.at_level("DEBUG", logger="lumos.track.logger"):
        assert logger.log(model, 0) == ["lumos/gradients/00", "lumos/gradients/01"]
        logger.log(model, 1)
    skipped = [r for r in caplog.records if "gradcam not logged at this step" in r.getMessage()]
    assert [r.levelname for r in skipped] == ["WARNING", "DEBUG"] and "untrained head" in skipped[0].getMessage()
    nn.init.normal_(model.heads.head.weight)
    assert logger.log(model, 2)[:2] == ["lumos/gradcam/00", "lumos/gradcam/01"]


def test_binary_head_explains_logit_and_its_negation(data):
    torch.manual_seed(0)
    model = OneConvNet(outputs=1).eval()
    x = data.images[:4]
    labels = torch.tensor([1, 0, 1, 0])
    sink = MemorySink()
    logger = ExplanationLogger(x, labels, sinks=[sink], target="true", layer="features", metrics=["deletion"])
    logger.log(model, 0)
    with torch.no_grad():
        p = torch.sigmoid(model(x)[:, 0])
    cap = sink.images["lumos/gradcam/01"][0][2]
    pred = "positive" if p[1] > 0.5 else "negative"
    assert f"label: negative, pred: {pred}" in cap and f"p(label)={1 - float(p[1]):.2f}" in cap
    # the negative class's map is Grad-CAM of -logit: the mirror of the positive map before ReLU
    import lumos

    pos = lumos.explain(model, x, target=lambda o: o[:, 0], layer="features", relu=False, normalize=None)
    neg = lumos.explain(model, x, target=lambda o: -o[:, 0], layer="features", relu=False, normalize=None)
    assert torch.allclose(pos.raw, -neg.raw, atol=1e-6)
    assert "lumos/gradcam/deletion_auc" in sink.scalars


def _snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [p.requires_grad for p in model.parameters()],
    )


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_log_leaves_model_grads_and_rng_alone(data, mode):
    torch.manual_seed(1)
    model = DropCNN()
    getattr(model, mode)()
    model.features[1].momentum = 0.5
    nn.functional.cross_entropy(model(data.images[:4]), data.labels[:4]).backward()  # .grad populated
    model.fc.weight.grad = None  # and one left empty
    before = _snapshot(model)
    grad_mode = torch.is_grad_enabled()
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    logger = ExplanationLogger(data.images[:4], data.labels[:4], methods=["gradcam", "gradcam++", "features"],
                               layer="features", sinks=[MemorySink()], metrics=["deletion"])
    logger.log(model, 0)
    after = _snapshot(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])  # BN running stats, weights
    assert before[1] == after[1]  # train/eval flags
    assert before[3] == after[3]
    for g0, g1 in zip(before[2], after[2], strict=True):
        assert (g0 is None and g1 is None) or torch.equal(g0, g1)
    assert torch.is_grad_enabled() == grad_mode
    assert torch.equal(rng[0], torch.get_rng_state())
    assert np.array_equal(rng[1], np.random.get_state()[1]) and rng[2] == random.getstate()


def test_training_with_and_without_logger_gives_identical_weights(data):
    torch.manual_seed(7)
    init = DropCNN().state_dict()
    plain, watched = DropCNN(), DropCNN()
    plain.load_state_dict(init)
    watched.load_state_dict(init)
    train(plain, data, epochs=1)
    logger = ExplanationLogger(data.images[:4], data.labels[:4], methods=["gradcam", "features"], layer="features",
                               sinks=[MemorySink()], every_n_steps=1, every_n_epochs=1)
    train(watched, data, epochs=1, logger=logger)
    assert len(logger.sinks[0].images["lumos/gradcam/00"]) == 3  # 2 steps + the epoch end
    a, b = plain.state_dict(), watched.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the logger changed nothing that would have differed anyway: weights moved from the init
    assert not torch.equal(a["fc.weight"], init["fc.weight"])


def test_errors(data, monkeypatch):
    with pytest.raises(LumosError, match="labels"):
        ExplanationLogger(data.images[:2], [0], sinks=[MemorySink()])
    with pytest.raises(LumosError, match="masks"):
        ExplanationLogger(data.images[:2], [0, 1], sinks=[MemorySink()], metrics=["pointing"])
    with pytest.warns(UserWarning, match="predicted"):
        ExplanationLogger(data.images[:2], sinks=[MemorySink()])
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(LumosError, match=r"pip install 'lumos\[wandb\]'"):
        ExplanationLogger(data.images[:2], [0, 1], sinks=["wandb"])


def test_method_settings_reach_the_method_and_its_cap_is_warned_once_per_run(data, caplog):
    torch.manual_seed(0)
    model = DropCNN().eval()
    capped = {"integrated_gradients": {"steps": 2, "max_steps": 2, "tolerance": 1e-9}}
    logger = ExplanationLogger(data.images[:2], data.labels[:2], methods=["integrated_gradients"], target="pred",
                               settings=capped, sinks=[MemorySink()])
    with caplog.at_level("DEBUG", logger="lumos.track.logger"):
        logger.log(model, 0)
        logger.log(model, 1)
    said = [r for r in caplog.records if "reached max_steps=2 points" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING", "DEBUG"]  # 2 points, not the default 64: the settings arrived
    assert said[0].getMessage().startswith("lumos.track: Integrated gradients: 2 of 2 maps reached max_steps=2")


def test_a_wrong_method_or_setting_fails_when_the_logger_is_made_not_at_every_step(data):
    x, y = data.images[:2], data.labels[:2]
    with pytest.raises(LumosError, match="Unknown method 'gradcm'. Did you mean: gradcam"):
        ExplanationLogger(x, y, methods=["gradcm"], sinks=[MemorySink()])
    with pytest.raises(LumosError, match="integrated_gradients has no setting 'step'"):
        ExplanationLogger(x, y, methods=["ig"], settings={"ig": {"step": 8}}, sinks=[MemorySink()])
    with pytest.raises(LumosError, match="settings given for scorecam, which is not among the methods"):
        ExplanationLogger(x, y, methods=["gradcam"], settings={"scorecam": {"max_channels": 8}}, sinks=[MemorySink()])


class TwoHeads(nn.Module):
    """A TinyCNN's logits next to an aux head of the same shape (so taking the wrong one changes every picture)."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.net = TinyCNN()
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor):
        logits = self.net(x)
        aux = 2 * logits.roll(1, dims=1)  # another class wins, with other probabilities
        return {"aux": aux, "logits": logits} if self.as_dict else (aux, logits)


@pytest.mark.parametrize("as_dict", [False, True])
def test_output_picks_the_logits_of_a_multi_output_model(data, monkeypatch, as_dict):
    """output= reaches every method (maps equal lumos.explain(..., output=)), the prediction, the captions and
    the deletion score: the pictures and scalars are those of the same network returning its logits alone."""
    import lumos
    import lumos.track.logger as logger_mod

    model = TwoHeads(as_dict).eval()
    output = "logits" if as_dict else 1
    x, y = data.images[:3], data.labels[:3]
    seen = []
    real = logger_mod.explain
    monkeypatch.setattr(logger_mod, "explain", lambda *a, **k: seen.append((a, k, r := real(*a, **k))) or r)
    multi = ExplanationLogger(x, y, methods=["gradcam", "features"], layer="net.features.block4", output=output,
                              metrics=["deletion"], deletion_steps=4, sinks=[MemorySink()])
    tags = multi.log(model, 0)
    monkeypatch.setattr(logger_mod, "explain", real)
    single = ExplanationLogger(x, y, methods=["gradcam", "features"], layer="features.block4",
                               metrics=["deletion"], deletion_steps=4, sinks=[MemorySink()])
    assert single.log(model.net, 0) == tags
    got, ref = multi.sinks[0], single.sinks[0]
    for tag in tags:
        (_, im, cap), = got.images[tag]
        (_, im_ref, cap_ref), = ref.images[tag]
        assert cap == cap_ref
        assert np.array_equal(np.asarray(im), np.asarray(im_ref))
    assert got.scalars == ref.scalars
    # the maps drawn are lumos.explain's with output= on the same model and images (true, then predicted class)
    preds = model.net(x).argmax(1)
    assert [k["target"] for _, k, _ in seen] == [y.tolist(), preds.tolist()]
    for (_, _, ex), classes in zip(seen, (y, preds), strict=True):
        direct = lumos.explain(model, x, "gradcam", target=classes.tolist(), layer="net.features.block4",
                               output=output)
        assert torch.allclose(ex.maps, direct.maps, atol=1e-6)
    aux = model(x)["aux" if as_dict else 0]
    assert not torch.equal(aux.argmax(1), preds)  # the aux head would have given other captions
    assert list(got.scalars) == ["lumos/gradcam/deletion_auc"]


def test_a_multi_output_model_without_a_good_output_is_one_line_naming_output(data):
    x, y = data.images[:2], data.labels[:2]
    cases = [
        (TwoHeads(False), None, r"returns a tuple of 2; give ExplanationLogger\(\.\.\., output=<index>\)"),
        (TwoHeads(True), None, r"returns a dict \('aux', 'logits'\); give ExplanationLogger\(\.\.\., output=<key>\)"),
        (TwoHeads(False), 2, r"output=2 is not an index of the model output, a tuple of 2; give an index 0\.\.1"),
        (TwoHeads(True), "logit", r"output='logit' is not a key of the model output; its keys: 'aux', 'logits'"),
        (TinyCNN(), 0, r"output=0 was given, but the model returns one tensor \(2, 4\); leave output= out"),
    ]
    for model, output, message in cases:
        logger = ExplanationLogger(x, y, layer="auto", output=output, sinks=[MemorySink()])
        with pytest.raises(LumosError, match=message) as err:
            logger.log(model, 0)
        assert "\n" not in str(err.value)
    with pytest.raises(LumosError, match=r"output= must be an index, a key or a callable .*, not 1\.5\."):
        ExplanationLogger(x, y, output=1.5, sinks=[MemorySink()])


class CountingNet(TinyCNN):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


def test_only_rank_zero_logs_in_a_torch_distributed_run(data, monkeypatch):
    """In a plain DDP loop every rank runs the user's code: logging used to run on every rank, each writing the
    same tags. Now the other ranks return [] without a forward pass (no real process group: patched)."""
    import torch.distributed as dist

    sink = MemorySink()
    logger = ExplanationLogger(data.images[:2], data.labels[:2], layer="features.block4", sinks=[sink])
    model = CountingNet()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    assert logger.log(model, 0) == []
    assert model.calls == 0 and sink.images == {} and sink.scalars == {}
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    assert logger.log(model, 1) == ["lumos/gradcam/00", "lumos/gradcam/01"]
    assert model.calls > 0 and [s for s, _, _ in sink.images["lumos/gradcam/00"]] == [1]
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # no process group: get_rank is not asked
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 3)
    assert logger.log(model, 2) == ["lumos/gradcam/00", "lumos/gradcam/01"]
