"""Explanation methods. Each registers itself by name in ``REGISTRY``."""

from lumos.methods.activation_cams import CAM, EigenCAM
from lumos.methods.attention import AttentionRollout, GradientRollout
from lumos.methods.base import REGISTRY, LayerMethod, Method, RegionMethod, display_name, method_class, methods
from lumos.methods.gradient_cams import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from lumos.methods.integrated import IntegratedGradients
from lumos.methods.occlusion import Occlusion
from lumos.methods.pixel import (
    DeconvNet,
    Gradients,
    GradientXInput,
    GuidedBackprop,
    GuidedGradCAM,
    PixelMethod,
)
from lumos.methods.rise import RISE
from lumos.methods.scorecam import ScoreCAM
from lumos.methods.smoothgrad import SmoothGrad

__all__ = [
    "AttentionRollout",
    "GradientRollout",
    "Method",
    "display_name",
    "method_class",
    "methods",
    "DeconvNet",
    "GradientXInput",
    "Gradients",
    "GuidedBackprop",
    "GuidedGradCAM",
    "IntegratedGradients",
    "PixelMethod",
    "CAM",
    "REGISTRY",
    "EigenCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "LayerMethod",
    "Occlusion",
    "RISE",
    "RegionMethod",
    "ScoreCAM",
    "SmoothGrad",
    "XGradCAM",
]
