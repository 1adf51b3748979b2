"""Method settings given as text (the command line's --set)."""

from __future__ import annotations

import pytest

import lumos
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
