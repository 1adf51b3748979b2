"""Rendering: colormaps, overlays, signed/grayscale maps, feature grids and galleries.

numpy + Pillow + matplotlib only (no OpenCV); figures never go through pyplot.
"""

from lumos.render._convert import get_colormap, save_png, to_numpy_map, to_pil_image
from lumos.render.figures import feature_grid, fit_text, gallery, picture, top_channels
from lumos.render.maps import colorize, draw_map, grayscale_map_image, normalize_map, overlay, signed_map_image
from lumos.render.scales import (
    DEFAULT_SCALE,
    SCALES,
    ColorScale,
    MapScale,
    check_scale,
    color_scale,
    color_scales,
    map_scales,
)

__all__ = [
    "DEFAULT_SCALE",
    "SCALES",
    "ColorScale",
    "MapScale",
    "check_scale",
    "color_scale",
    "color_scales",
    "colorize",
    "draw_map",
    "feature_grid",
    "fit_text",
    "gallery",
    "get_colormap",
    "grayscale_map_image",
    "map_scales",
    "normalize_map",
    "overlay",
    "picture",
    "save_png",
    "signed_map_image",
    "to_numpy_map",
    "to_pil_image",
    "top_channels",
]
