"""Can this explanation be trusted? Faithfulness, localisation, sanity checks and a ground-truth benchmark.

Every metric is an object configured once and called on ``(model, images, maps, targets[, masks])``.
"""

from lumos.evaluate._common import boxes_to_masks, masks_to_boxes
from lumos.evaluate.axioms import Completeness, CompletenessResult
from lumos.evaluate.faithfulness import (
    AverageDropIncrease,
    CurveResult,
    Deletion,
    DropResult,
    Insertion,
    gaussian_blur,
    pixel_ranks,
)
from lumos.evaluate.localisation import EnergyPointingGame, PointingGame, RelevanceMass
from lumos.evaluate.sanity import (
    CascadingRandomisation,
    CascadingResult,
    RandomLogit,
    RandomLogitResult,
    randomisable_layers,
    rankdata,
    spearman,
    ssim,
)

__all__ = [
    "AverageDropIncrease",
    "CascadingRandomisation",
    "CascadingResult",
    "Completeness",
    "CompletenessResult",
    "CurveResult",
    "Deletion",
    "DropResult",
    "EnergyPointingGame",
    "Insertion",
    "PointingGame",
    "RandomLogit",
    "RandomLogitResult",
    "RelevanceMass",
    "boxes_to_masks",
    "gaussian_blur",
    "masks_to_boxes",
    "pixel_ranks",
    "randomisable_layers",
    "rankdata",
    "spearman",
    "ssim",
]
