"""Synthetic images with known object locations, and a tiny CNN trained on them."""

from lumos.synthetic.data import CLASS_NAMES, SyntheticData, make_dataset
from lumos.synthetic.model import TinyCNN, load_tinycnn

__all__ = ["CLASS_NAMES", "SyntheticData", "TinyCNN", "load_tinycnn", "make_dataset"]
