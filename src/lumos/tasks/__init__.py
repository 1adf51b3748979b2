"""Task targets beyond classification: detection boxes and segmentation regions, and model adapters.

Ground level (beside ``lumos.targets``): torch only; torchvision detectors are wrapped, never imported.
"""

from lumos.tasks.adapters import DenseDetector, TorchvisionDetector, dense_from_dicts
from lumos.tasks.detection import DetectionTarget, box_iou, detections
from lumos.tasks.segmentation import SegmentationModel, SegmentationTarget, box_mask

__all__ = [
    "DenseDetector",
    "DetectionTarget",
    "SegmentationModel",
    "SegmentationTarget",
    "TorchvisionDetector",
    "box_iou",
    "box_mask",
    "dense_from_dicts",
    "detections",
]
