"""lumos: see where a vision model looks, and whether that picture can be trusted."""

from lumos.api import FeatureMaps, explain, feature_maps, method_class, methods
from lumos.errors import LumosError
from lumos.explanation import Explanation
from lumos.methods import (
    CAM,
    RISE,
    DeconvNet,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    Gradients,
    GradientXInput,
    GuidedBackprop,
    GuidedGradCAM,
    HiResCAM,
    IntegratedGradients,
    LayerCAM,
    LayerMethod,
    Method,
    Occlusion,
    ScoreCAM,
    SmoothGrad,
    XGradCAM,
)


def load_model(*args, **kwargs):  # noqa: D103 - thin lazy wrapper, documented in lumos.zoo
    from lumos.zoo import load_model as _load

    return _load(*args, **kwargs)


load_model.__doc__ = "Load a zoo model, TorchScript file or `module:callable`; see lumos.zoo.load_model."

__all__ = [
    "CAM",
    "DeconvNet",
    "EigenCAM",
    "GradientXInput",
    "Gradients",
    "GuidedBackprop",
    "GuidedGradCAM",
    "IntegratedGradients",
    "Explanation",
    "FeatureMaps",
    "GradCAM",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "LayerMethod",
    "LumosError",
    "Method",
    "Occlusion",
    "RISE",
    "ScoreCAM",
    "SmoothGrad",
    "XGradCAM",
    "explain",
    "feature_maps",
    "load_model",
    "method_class",
    "methods",
]
__version__ = "0.1.0"
