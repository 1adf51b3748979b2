"""The spec and the Explainer: validated once, picklable, the same maps as lumos.explain, predictions from the
explanation's own forward, the auto layer found once; the engine's single places (probabilities, builder)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

import lumos
from lumos.explainer import Explainer, ExplainSpec, MethodSpec, predict
from lumos.io import sample_images

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(lumos.__file__).parent


@pytest.fixture(scope="module")
def photos():
    return [sample_images()[n] for n in ("chelsea", "coffee")]


def test_explainer_round_trips_through_pickle_and_matches_explain(photos):
    spec = ExplainSpec(methods=("gradcam", "guided_backprop", "occlusion"), target="topk:2",
                       settings={"occlusion": {"window": 32, "stride": 32}})
    explainer = Explainer(spec)
    first = explainer(photos)
    again = pickle.loads(pickle.dumps(explainer))(photos)
    bundle = lumos.load_model("efficientnet_lite0")
    x = bundle.preprocess(photos)
    for name in spec.method_names:
        kwargs = {"window": 32, "stride": 32} if name == "occlusion" else {}
        direct = lumos.explain(bundle.model, x, method=name, target="topk:2", **kwargs)
        assert torch.equal(first.explanations[name].maps, again.explanations[name].maps)
        torch.testing.assert_close(first.explanations[name].maps, direct.maps)
        assert first.explanations[name].layer_auto == direct.layer_auto
    assert [p.top for p in first.predictions] == [p.top for p in predict(bundle.model, x, bundle.labels)]
    assert first.predictions[0].top[0][1] == "Egyptian cat"


def test_predictions_and_auto_layer_cost_no_extra_forward(photos, monkeypatch):
    import lumos.layers as layers

    explainer = Explainer(ExplainSpec(methods=("gradcam", "layercam", "eigencam")))
    traces, forwards = [], []
    real_trace = layers.trace_layers
    monkeypatch.setattr(layers, "trace_layers", lambda *a, **k: traces.append(1) or real_trace(*a, **k))
    explainer.model.register_forward_hook(lambda *a: forwards.append(1))
    explainer(photos)
    explainer(photos)
    assert len(traces) == 1  # the automatic layer is found once per model
    assert len(forwards) == 1 + 2 * 3  # the trace, then one forward per method and batch: none for predictions


def test_spec_is_checked_when_built_and_leaves_its_inputs_alone():
    settings = {"integrated_gradients": {"steps": 16}}
    spec = ExplainSpec(methods=("IG", "grad-cam", "gradcam"), settings=settings, target="topk:2")
    assert settings == {"integrated_gradients": {"steps": 16}}  # the caller's dict is not touched
    assert spec.method_names == ["integrated_gradients", "gradcam"]
    assert spec.methods[0] == MethodSpec("integrated_gradients", (("steps", 16),))
    hash(spec.model)
    for bad, words in [(dict(methods=("nope",)), "Unknown method"),
                       (dict(settings={"gradcam": {"steps": 3}}), "gradcam has no setting 'steps'"),
                       (dict(methods=("scorecam",), settings={"scorecam": {"batch_size": 2.5}}), "batch_size"),
                       (dict(probs="maybe"), "probs="), (dict(target="topk:0"), "no class"),
                       (dict(settings={"rise": {"n_masks": 10}}), "not among the methods")]:
        with pytest.raises(lumos.LumosError, match=words):
            ExplainSpec(**bad)
    with pytest.raises(lumos.LumosError, match="No layer named 'nope'"):
        Explainer(ExplainSpec(layer="nope"))
    with pytest.raises(lumos.LumosError, match="Unknown class name"):
        Explainer(ExplainSpec(target="not a class at all"))


def test_method_objects_keep_no_call_state():
    from nets import GapNet

    torch.manual_seed(0)
    net = GapNet(classes=4).eval()
    x = torch.randn(2, 3, 16, 16)
    for name in lumos.methods(general=True):
        kwargs = {"steps": 8} if name == "integrated_gradients" else {"n_masks": 16} if name == "rise" else \
            {"window": 4, "stride": 4} if name == "occlusion" else {"n_samples": 2} if name == "smoothgrad" else {}
        method = lumos.method_class(name)(net, "features", **kwargs)
        a = method(x, 1).maps
        state = {k: v for k, v in vars(method).items() if k != "_sites"}
        method(x, 3)
        after = {k: v for k, v in vars(method).items() if k != "_sites"}
        assert state.keys() == after.keys() and all(state[k] is after[k] for k in state), name
        torch.testing.assert_close(method(x, 1).maps, a)


def test_one_probability_decision_and_one_builder_in_the_library():
    """grep: softmax/sigmoid on model outputs appear in targets.py only; Explanation( is built in engine.py only."""
    squash = re.compile(r"(torch\.|F\.|\.)(softmax|sigmoid)\(")
    build = re.compile(r"\bExplanation\(")
    hits, builders = [], []
    for path in SRC.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if squash.search(code) and '"""' not in code and "``" not in code:
                hits.append(f"{path.relative_to(SRC)}:{n}")
            if build.search(code) and "class Explanation" not in code and "->" not in code and "``" not in code:
                builders.append(f"{path.relative_to(SRC)}:{n}")
    # besides targets.py, only code that is part of a model, not a decision on its output: attention
    # probabilities (attention.py), the shipped detector's own sigmoid head, and the detector adapters that
    # turn a detector's raw outputs into the dense box format with the activation its user declares
    model_side = {"attention.py", "synthetic/detector.py", "tasks/adapters.py"}
    assert {h.split(":")[0] for h in hits} - model_side == {"targets.py"}, hits
    assert {b.split(":")[0] for b in builders} <= {"engine.py", "explanation.py"}, builders
