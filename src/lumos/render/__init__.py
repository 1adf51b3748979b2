"""Rendering: colormaps, overlays, signed/grayscale maps, feature grids and galleries.

numpy + Pillow + matplotlib only (no OpenCV); figures never go through pyplot.
"""

from lumos.render._convert import get_colormap, save_png, to_numpy_map, to_pil_image
from lumos.render.figures import feature_grid, gallery, top_channels
from lumos.render.maps import colorize, draw_map, grayscale_map_image, normalize_map, overlay, signed_map_image

__all__ = [
    "colorize",
    "draw_map",
    "feature_grid",
    "gallery",
    "get_colormap",
    "grayscale_map_image",
    "normalize_map",
    "overlay",
    "save_png",
    "signed_map_image",
    "to_numpy_map",
    "to_pil_image",
    "top_channels",
]
