"""Method settings given as text (the command line's --set)."""

from __future__ import annotations

import pytest
from PIL import Image

import lumos
from lumos.cli import main
from lumos.errors import LumosError
from lumos.method_settings import accepted, parse_settings, parse_value


def test_values():
    assert parse_value("128") == 128 and isinstance(parse_value("128"), int)
    assert parse_value("0.25") == 0.25 and parse_value("1e-3") == 0.001
    assert parse_value("True") is True and parse_value("false") is False and parse_value("none") is None
    assert parse_value("black, blur") == ["black", "blur"] and parse_value("blur") == "blur"


def test_settings_go_to_the_methods_that_take_them():
    got = parse_settings(["steps=8", "max_channels=4", "gradcam.relu=false"], ["integrated_gradients", "scorecam",
                                                                                "gradcam"])
    assert got == {"integrated_gradients": {"steps": 8}, "scorecam": {"max_channels": 4}, "gradcam": {"relu": False}}
    # An unqualified key shared by two methods goes to both; a qualified one to that method only.
    got = parse_settings(["upsample=nearest", "scorecam.batch_size=2"], ["gradcam", "scorecam"])
    assert got == {"gradcam": {"upsample": "nearest"}, "scorecam": {"upsample": "nearest", "batch_size": 2}}


def test_smoothgrad_takes_its_base_methods_settings():
    assert "steps" not in accepted("smoothgrad") and "steps" in accepted("smoothgrad", "integrated_gradients")
    got = parse_settings(["base=integrated_gradients", "steps=4", "n_samples=2"], ["smoothgrad"])
    assert got == {"smoothgrad": {"base": "integrated_gradients", "steps": 4, "n_samples": 2}}


@pytest.mark.parametrize(("items", "message"), [
    (["preprocess=x"], "no setting of that name"),
    (["gradcam.steps=4"], "no setting of that name for gradcam"),
    (["nosuchmethod.steps=4"], "nosuchmethod"),
    (["=4"], "KEY=VALUE"),
])
def test_errors(items, message):
    with pytest.raises(lumos.LumosError, match=message):
        parse_settings(items, ["gradcam", "integrated_gradients"])


def test_a_refused_setting_is_named_alone_with_how_to_prefix_it():
    # baseline=black,blur goes to both methods (Score-CAM has a numeric baseline); max_channels is fine.
    with pytest.raises(lumos.LumosError) as info:
        parse_settings(["baseline=black,blur", "max_channels=64"], ["integrated_gradients", "scorecam"])
    message = str(info.value)
    assert "scorecam does not accept the settings baseline=['black', 'blur']" in message
    assert "max_channels" not in message
    assert "--set integrated_gradients.baseline=black,blur" in message
    # The prefixed form the message suggests is accepted.
    got = parse_settings(["integrated_gradients.baseline=black,blur", "max_channels=64"],
                         ["integrated_gradients", "scorecam"])
    assert got == {"integrated_gradients": {"baseline": ["black", "blur"]}, "scorecam": {"max_channels": 64}}


def test_a_refused_setting_of_one_method_is_named_alone():
    with pytest.raises(lumos.LumosError, match="steps=-1") as info:
        parse_settings(["tolerance=0", "steps=-1"], ["integrated_gradients"])
    assert "tolerance" not in str(info.value) and "prefix" not in str(info.value)


def test_no_prefix_hint_when_no_method_takes_the_value():
    with pytest.raises(lumos.LumosError, match="scorecam does not accept the settings baseline='black'") as info:
        parse_settings(["baseline=black"], ["scorecam", "rise"])
    assert "prefix" not in str(info.value)


def test_cli_names_only_the_refused_setting(capsys, tmp_path):
    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32)).save(image)
    code = main(["explain", str(image), "--method", "integrated_gradients,scorecam", "--set", "baseline=black,blur",
                 "--set", "max_channels=64", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: scorecam does not accept the settings baseline="), err
    assert "max_channels" not in err and "--set integrated_gradients.baseline=black,blur" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("key", ["output", "probs"])
def test_run_level_arguments_are_not_method_settings(key):
    """They were accepted and then silently replaced by the spec's own value (one forward for every method)."""
    from lumos.explainer import ExplainSpec
    from lumos.method_settings import parse_settings

    with pytest.raises(LumosError, match=rf"--set {key}: '{key}' is set once for every method.*--{key} on the"):
        parse_settings([f"gradcam.{key}=1"], ["gradcam", "gradients"])
    with pytest.raises(LumosError, match=rf"ExplainSpec\({key}=...\) in Python"):
        ExplainSpec(methods=("gradcam",), settings={"gradcam": {key: 1}})
