"""Detection boxes and segmentation regions drawn on images: shared by ``lumos explain --task`` and the app.

:func:`draw_boxes` outlines boxes with "class score" labels (optionally numbered; a label moves rather than cover
another); :func:`explained_box` / :func:`explained_region` draw one explanation over the (upscaled) image with its
box or its region's outline on top.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from lumos.render.maps import draw_map

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230)]
Rect = tuple[float, float, float, float]  # x0, y0, x1, y1


def label_name(label: int, names: Sequence[str] | None) -> str:
    """A class's name from ``names``, or its index as text."""
    return names[label] if names is not None and 0 <= label < len(names) else str(label)


def draw_boxes(image: Image.Image, boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor | None = None,
               names: Sequence[str] | None = None, scale: int = 1, *, numbered: bool = False) -> Image.Image:
    """``image`` (upscaled ``scale`` times, nearest) with each box outlined and labelled "class score" (on black;
    ``numbered``: "#k class score", k counting from 0 as ``DetectionTarget.box(k)``). A label that would cover
    an earlier one moves inside its box, then below it."""
    out = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    taken: list[Rect] = []
    for k, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist(), strict=True)):
        colour = PALETTE[int(label) % len(PALETTE)]
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=max(1, scale // 2))
        text = (f"#{k} " if numbered else "") + label_name(int(label), names)
        text += "" if scores is None else f" {float(scores[k]):.2f}"
        xy, rect = label_place(draw, text, (x0, y0, x1, y1), taken)
        taken.append(rect)
        draw.rectangle(rect, fill=(0, 0, 0))  # readable on any background
        draw.text(xy, text, fill=colour)
    return out


def label_place(draw: ImageDraw.ImageDraw, text: str, box: Rect,
                taken: Sequence[Rect]) -> tuple[tuple[float, float], Rect]:
    """Where ``text`` goes for ``box`` (x0, y0, x1, y1), and the rectangle it covers: above the box's top-left
    corner, else just inside it, else below the box; the first place overlapping none of ``taken`` (the first
    place when every one does)."""
    x0, y0, _, y1 = box
    places = [(x0 + 2, max(0.0, y0 - 11)), (x0 + 2, y0 + 2), (x0 + 2, y1 + 2)]
    found = [(xy, tuple(float(v) for v in draw.textbbox(xy, text))) for xy in places]
    free = [f for f in found if not any(_overlap(f[1], t) for t in taken)]
    return (free or found)[0]


def _overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _upscaled(image: Image.Image, scale: int) -> Image.Image:
    return image.convert("RGB").resize((image.width * scale, image.height * scale), Image.BILINEAR)


def explained_box(image: Image.Image, map: torch.Tensor | np.ndarray, box: torch.Tensor, label: int,
                  score: float | None = None, names: Sequence[str] | None = None, scale: int = 4, *,
                  kind: str = "layer", colormap: str = "jet", alpha: float = 0.5) -> Image.Image:
    """One box's map drawn over ``image`` upscaled ``scale`` times (``lumos.render.draw_map`` by ``kind``), the
    box (4,) in ``image`` pixels outlined on it and labelled "class score"."""
    pic = draw_map(_upscaled(image, scale), map, kind, colormap, alpha)
    scores = None if score is None else torch.tensor([float(score)])
    return draw_boxes(pic, torch.as_tensor(box, dtype=torch.float32).reshape(1, 4) * scale,
                      torch.tensor([int(label)]), scores, names, 1)


def edge_points(mask: Image.Image) -> list[tuple[int, int]]:
    """Pixels of a binary mask image on its region's border (drawn as the region's outline)."""
    m = torch.from_numpy(np.asarray(mask) > 0)
    inner = m.clone()
    inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    ys, xs = (m & ~inner).nonzero(as_tuple=True)
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


def explained_region(image: Image.Image, map: torch.Tensor | np.ndarray, region: torch.Tensor | np.ndarray,
                     scale: int = 4, *, kind: str = "layer", colormap: str = "jet", alpha: float = 0.5,
                     colour: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """A class region's map drawn over ``image`` upscaled ``scale`` times, the region (a boolean (H, W) mask in
    ``image`` pixels) outlined on it."""
    pic = draw_map(_upscaled(image, scale), map, kind, colormap, alpha)
    mask = Image.fromarray((np.asarray(region, dtype=bool) * 255).astype("uint8")).resize(pic.size, Image.NEAREST)
    draw = ImageDraw.Draw(pic)
    for xy in edge_points(mask):
        draw.point(xy, fill=colour)
    return pic
