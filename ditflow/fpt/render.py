# SPDX-License-Identifier: Apache-2.0
"""Pictures of FPT predictions: a colour-wheel flow image with the pokes drawn, and a motion-density heatmap.

Images are ``[H, W, 3]`` float32 in [0, 1] (ComfyUI's IMAGE without the batch axis); flows and positions in pixels
(``ditflow/fpt/__init__``). The colour wheel is the one of ``ditflow.visualize.flow_to_color`` (hue = direction,
saturation = length relative to the longest flow, still points white). Pokes are black arrows with a white rim
from start to end (a ring where the drag is under 2 px); the density's query point is an orange cross.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..visualize import flow_to_color
from .pokes import Pokes

_QUERY_COLOR = (255, 127, 14)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray((np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8))


def _thickness(canvas: np.ndarray) -> int:
    return max(1, round(max(canvas.shape[:2]) / 256))


def draw_pokes(canvas: np.ndarray, pokes: Pokes) -> np.ndarray:
    """Draws the pokes on a uint8 ``[H, W, 3]`` canvas in place and returns it."""
    import cv2

    t = _thickness(canvas)
    for (x0, y0), (x1, y1) in zip(pokes.start, pokes.end):
        a, b = (round(x0), round(y0)), (round(x1), round(y1))
        if np.hypot(x1 - x0, y1 - y0) < 2:
            cv2.circle(canvas, a, 3 * t, (255, 255, 255), -1, cv2.LINE_AA)
            cv2.circle(canvas, a, 2 * t, (0, 0, 0), -1, cv2.LINE_AA)
            continue
        tip = min(0.4, 12 * t / np.hypot(x1 - x0, y1 - y0))
        cv2.arrowedLine(canvas, a, b, (255, 255, 255), 3 * t, cv2.LINE_AA, tipLength=tip)
        cv2.arrowedLine(canvas, a, b, (0, 0, 0), t, cv2.LINE_AA, tipLength=tip)
    return canvas


def flow_image(flow: Tensor, pokes: Pokes, max_magnitude: float | None = None) -> Tensor:
    """Colour-wheel picture ``[H, W, 3]`` of a pixel flow field ``[H, W, 2]``, with the pokes drawn on it."""
    canvas = _to_uint8(flow_to_color(flow, max_magnitude))
    return torch.from_numpy(draw_pokes(canvas, pokes).astype(np.float32) / 255.0)


def density_image(image: Tensor, density: Tensor, query: tuple[float, float], pokes: Pokes) -> Tensor:
    """Heatmap ``[H, W, 3]`` of a probability-per-pixel map ``[H, W]`` over a dimmed ``image`` ``[H, W, 3]``.

    Colours are viridis of ``sqrt(p / max p)`` (the square root keeps wide, low modes visible next to a sharp one),
    blended over the image where the probability is high.
    """
    import cv2

    p = density.float().cpu().numpy()
    level = np.sqrt(p / p.max()) if p.max() > 0 else np.zeros_like(p)
    heat = cv2.applyColorMap(_to_uint8(level), cv2.COLORMAP_VIRIDIS)[..., ::-1].astype(np.float32) / 255.0
    alpha = (0.25 + 0.75 * level)[..., None]
    background = image.float().cpu().numpy() * 0.6
    canvas = _to_uint8(background * (1 - alpha) + heat * alpha)
    draw_pokes(canvas, pokes)
    t = _thickness(canvas)
    centre = (round(query[0]), round(query[1]))
    cv2.drawMarker(canvas, centre, (255, 255, 255), cv2.MARKER_CROSS, 12 * t, 3 * t, cv2.LINE_AA)
    cv2.drawMarker(canvas, centre, _QUERY_COLOR, cv2.MARKER_CROSS, 12 * t, t, cv2.LINE_AA)
    return torch.from_numpy(canvas.astype(np.float32) / 255.0)


__all__ = ["density_image", "draw_pokes", "flow_image"]
