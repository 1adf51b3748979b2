"""Explanation methods. Each registers itself by name in ``REGISTRY``."""

from lumos.methods.activation_cams import CAM, EigenCAM
from lumos.methods.base import REGISTRY, LayerMethod
from lumos.methods.gradient_cams import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from lumos.methods.scorecam import ScoreCAM

__all__ = [
    "CAM",
    "REGISTRY",
    "EigenCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "LayerMethod",
    "ScoreCAM",
    "XGradCAM",
]
