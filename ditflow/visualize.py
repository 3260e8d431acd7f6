# SPDX-License-Identifier: Apache-2.0
"""Pictures of an Attention Motion Flow (DiTFlow §4.1, Fig. 3): colour-wheel flow images and arrow overlays.

The AMF of one frame pair (query frame i → key frame j) is a displacement per query patch, (dx, dy) in
patch-grid units (x right, y down; see the conventions in ``ditflow/__init__``). Here it is drawn at video
resolution, one patch = 16 × 16 px:

- :func:`flow_to_color`: the usual optical-flow colouring (Baker et al., Middlebury): hue = direction,
  saturation = magnitude relative to the largest displacement, value = 1. Still patches are white.
- :func:`draw_arrows`: one arrow per patch from its centre to where its attention points, over a frame.

OpenCV does the drawing; no ComfyUI imports. Images are ``[H, W, 3]`` float32 in [0, 1] (ComfyUI's IMAGE
layout without the batch axis).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .errors import DiTFlowError
from .layout import PIXELS_PER_PATCH


def pair_displacement(amf: Tensor, grid: tuple[int, int, int], query_frame: int, key_frame: int) -> Tensor:
    """Displacements ``[h, w, 2]`` (dx, dy, patch units) of query frame i's patches toward key frame j.

    Args:
        amf: ``[F², S, 2]`` (one block of :class:`~ditflow.reference.ReferenceMotion`), pair index ``i·F + j``.
        grid: (F, h, w) token grid, ``S = h·w``.
        query_frame, key_frame: latent frame indices i and j in 0..F−1.
    Raises:
        DiTFlowError: a frame index out of range or an AMF that does not match ``grid``.
    """
    frames, h, w = grid
    if amf.ndim != 3 or amf.shape[0] != frames * frames or amf.shape[1] != h * w or amf.shape[2] != 2:
        raise DiTFlowError(
            f"AMF of shape {list(amf.shape)} does not match the grid F×h×w = {frames}×{h}×{w} "
            f"(expected [{frames * frames}, {h * w}, 2])."
        )
    for name, f in (("query frame", query_frame), ("key frame", key_frame)):
        if not 0 <= f < frames:
            raise DiTFlowError(f"{name} {f} is out of range: the AMF has latent frames 0..{frames - 1}.")
    return amf[query_frame * frames + key_frame].reshape(h, w, 2).float().cpu()


def flow_to_color(disp: Tensor, max_magnitude: float | None = None) -> np.ndarray:
    """Displacements ``[h, w, 2]`` → colours ``[h, w, 3]`` float32 in [0, 1] (hue = angle, saturation = |d| / max).

    ``max_magnitude`` defaults to the largest displacement of ``disp`` (a field of zeros is all white).
    """
    import cv2

    d = disp.float().cpu().numpy()
    mag = np.hypot(d[..., 0], d[..., 1])
    top = float(mag.max()) if max_magnitude is None else float(max_magnitude)
    angle = (np.degrees(np.arctan2(d[..., 1], d[..., 0])) % 360.0).astype(np.float32)  # y down: clockwise
    hsv = np.stack(
        [angle, np.clip(mag / top, 0.0, 1.0) if top > 0 else np.zeros_like(mag), np.ones_like(mag)], axis=-1
    ).astype(np.float32)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def draw_arrows(background: np.ndarray, disp: Tensor, *, stride: int = 1, color=(1.0, 0.15, 0.1)) -> np.ndarray:
    """Arrows from each patch centre along its displacement, drawn over ``background`` ``[H, W, 3]`` in [0, 1].

    ``H × W`` must be the grid size × 16 px. ``stride`` draws every ``stride``-th patch in x and y; arrows of
    zero length are drawn as dots.
    """
    import cv2

    h, w = disp.shape[:2]
    if background.shape[:2] != (h * PIXELS_PER_PATCH, w * PIXELS_PER_PATCH):
        raise DiTFlowError(
            f"background of {background.shape[1]}×{background.shape[0]} px does not match the AMF grid {w}×{h} "
            f"patches ({w * PIXELS_PER_PATCH}×{h * PIXELS_PER_PATCH} px)."
        )
    canvas = np.ascontiguousarray((np.clip(background, 0.0, 1.0) * 255).astype(np.uint8))
    rgb = tuple(int(255 * c) for c in color)
    d = disp.float().cpu().numpy() * PIXELS_PER_PATCH
    half = PIXELS_PER_PATCH / 2
    for y in range(0, h, max(1, stride)):
        for x in range(0, w, max(1, stride)):
            x0, y0 = x * PIXELS_PER_PATCH + half, y * PIXELS_PER_PATCH + half
            x1, y1 = x0 + d[y, x, 0], y0 + d[y, x, 1]
            if math.hypot(x1 - x0, y1 - y0) < 1.0:
                cv2.circle(canvas, (round(x0), round(y0)), 1, rgb, -1, cv2.LINE_AA)
            else:
                cv2.arrowedLine(canvas, (round(x0), round(y0)), (round(x1), round(y1)), rgb, 1, cv2.LINE_AA,
                                tipLength=0.25)
    return canvas.astype(np.float32) / 255.0


def render_amf(
    motion, query_frame: int, key_frame: int, *, block: int | None = None, frames: Tensor | None = None,
    arrow_stride: int = 1,
) -> tuple[Tensor, Tensor]:
    """Colour-wheel image and arrow overlay of one frame pair of a reference AMF, each ``[H, W, 3]`` in [0, 1].

    Args:
        motion: a :class:`~ditflow.reference.ReferenceMotion` with at least one AMF block.
        query_frame, key_frame: latent frame indices i, j (latent frame f shows video frame 4f).
        block: which guidance block's AMF; ``None`` takes the first.
        frames: optional video frames ``[T, H', W', 3]`` in [0, 1] (IMAGE layout); the query frame's picture
            (video frame 4i, resized to the grid, dimmed) is the arrows' background, else mid grey.
        arrow_stride: draw every n-th patch's arrow.
    Returns:
        ``(colors, arrows)``, float32 ``[h·16, w·16, 3]``.
    Raises:
        DiTFlowError: no AMF (injection-only reference), an unknown block or frame index.
    """
    if not motion.amf:
        raise DiTFlowError("this reference has no AMF (it serves KV injection only); extract one with a guidance block.")
    if block is None:
        block = motion.blocks[0]
    if block not in motion.amf:
        raise DiTFlowError(f"the AMF was extracted at block(s) {list(motion.blocks)}, not at block {block}.")
    disp = pair_displacement(motion.amf[block], motion.grid, query_frame, key_frame)
    h, w = disp.shape[:2]
    size = (w * PIXELS_PER_PATCH, h * PIXELS_PER_PATCH)
    import cv2

    colors = cv2.resize(flow_to_color(disp), size, interpolation=cv2.INTER_NEAREST)
    if frames is None:
        background = np.full((size[1], size[0], 3), 0.5, np.float32)
    else:
        # Video frames per token frame, from the two counts (4 on CogVideoX 1.0, 8 on 1.5's two-latent-frame tokens)
        per_token = (frames.shape[0] - 1) // max(1, motion.grid[0] - 1)
        index = min(query_frame * per_token, frames.shape[0] - 1)
        picture = frames[index].float().cpu().numpy()
        background = cv2.resize(picture, size, interpolation=cv2.INTER_AREA)
        background = background * 0.7 + 0.15  # dimmed so the arrows stand out
    arrows = draw_arrows(background, disp, stride=arrow_stride)
    return torch.from_numpy(np.ascontiguousarray(colors)), torch.from_numpy(arrows)


__all__ = ["draw_arrows", "flow_to_color", "pair_displacement", "render_amf"]
