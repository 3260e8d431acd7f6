# SPDX-License-Identifier: Apache-2.0
"""The model's square view of an image, and every conversion between pixel and model units.

The FPT sees a square (``ditflow/fpt/__init__`` states both unit systems). A W×H image is fitted to it one of two ways:

- ``pad``: the image is centred in a ``max(W, H)`` square with black bars (letterbox). The model sees all of it.
- ``crop``: the centre ``min(W, H)`` square, as the authors' demo does. Points outside it are not seen: pokes there
  are refused and flow fields are zero there.

Pixel (x, y) ↔ model position: ``(xy + offset) / side``, with ``offset`` the image's top-left corner in the square
(negative for a crop). A pixel flow is a model flow × ``side``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ..errors import DiTFlowError

FITS = ("pad", "crop")


@dataclass(frozen=True)
class SquareView:
    """How a ``width`` × ``height`` image (pixels) sits in the model's square view."""

    width: int
    height: int
    fit: str = "pad"

    def __post_init__(self):
        if self.fit not in FITS:
            raise DiTFlowError(f"unknown fit {self.fit!r}; use one of {', '.join(FITS)}.")
        if self.width < 1 or self.height < 1:
            raise DiTFlowError(f"an image of {self.width}×{self.height} px has nothing to show.")

    @property
    def side(self) -> int:
        """The square's side in image pixels."""
        return max(self.width, self.height) if self.fit == "pad" else min(self.width, self.height)

    @property
    def offset(self) -> tuple[int, int]:
        """The image's top-left corner in the square, in pixels (negative for a crop)."""
        return (self.side - self.width) // 2, (self.side - self.height) // 2

    @property
    def visible(self) -> tuple[int, int, int, int]:
        """The part of the image the model sees, (x0, y0, x1, y1) in image pixels (x1, y1 exclusive)."""
        ox, oy = self.offset
        x0, y0 = max(0, -ox), max(0, -oy)
        return x0, y0, min(self.width, x0 + self.side), min(self.height, y0 + self.side)

    def to_model(self, xy: Tensor) -> Tensor:
        """Pixel positions ``[..., 2]`` → model positions (the square's [0, 1]²)."""
        return (xy.float() + torch.tensor(self.offset, dtype=torch.float32, device=xy.device)) / self.side

    def to_pixels(self, pos: Tensor) -> Tensor:
        """Model positions ``[..., 2]`` → pixel positions."""
        return pos.float() * self.side - torch.tensor(self.offset, dtype=torch.float32, device=pos.device)

    def contains(self, xy: Tensor) -> Tensor:
        """Whether pixel positions ``[..., 2]`` lie in the part of the image the model sees (bool ``[...]``)."""
        x0, y0, x1, y1 = self.visible
        return (xy[..., 0] >= x0) & (xy[..., 0] <= x1) & (xy[..., 1] >= y0) & (xy[..., 1] <= y1)

    def image_to_model(self, image: Tensor) -> Tensor:
        """ComfyUI IMAGE ``[B, H, W, 3]`` in [0, 1] → the model's input ``[B, 3, side, side]`` in [-1, 1]."""
        if image.ndim != 4 or image.shape[-1] != 3 or tuple(image.shape[1:3]) != (self.height, self.width):
            raise DiTFlowError(f"expected an RGB image batch [B, {self.height}, {self.width}, 3]; got "
                               f"{list(image.shape)}.")
        x = rearrange(image.float(), "b h w c -> b c h w") * 2 - 1
        ox, oy = self.offset
        if self.fit == "crop":
            return x[..., -oy : -oy + self.side, -ox : -ox + self.side]
        pad = (ox, self.side - self.width - ox, oy, self.side - self.height - oy)  # left, right, top, bottom
        return F.pad(x, pad, value=-1.0)  # black bars

    def query_grid(self, cells: int) -> tuple[Tensor, tuple[int, int]]:
        """Cell centres over the visible part, ``cells`` along its longer side: model positions ``[rows·cols, 2]``
        (row-major, x fastest) and (rows, cols)."""
        x0, y0, x1, y1 = self.visible
        w, h = x1 - x0, y1 - y0
        cols = cells if w >= h else max(1, round(cells * w / h))
        rows = cells if h >= w else max(1, round(cells * h / w))
        xs = x0 + (torch.arange(cols, dtype=torch.float32) + 0.5) * w / cols
        ys = y0 + (torch.arange(rows, dtype=torch.float32) + 0.5) * h / rows
        pixels = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
        return self.to_model(pixels), (rows, cols)

    def field_to_pixels(self, flow: Tensor) -> Tensor:
        """Model flows on a :meth:`query_grid` ``[B, rows, cols, 2]`` → pixel flow field ``[B, H, W, 2]`` float32.

        Bilinear between cell centres (``align_corners=False``: cell centres are pixel-centre aligned); zero where
        the model does not see the image (crop).
        """
        x0, y0, x1, y1 = self.visible
        resized = F.interpolate(rearrange(flow.float() * self.side, "b h w c -> b c h w"), size=(y1 - y0, x1 - x0),
                                mode="bilinear", align_corners=False)
        field = flow.new_zeros((flow.shape[0], self.height, self.width, 2), dtype=torch.float32)
        field[:, y0:y1, x0:x1] = rearrange(resized, "b c h w -> b h w c")
        return field


__all__ = ["FITS", "SquareView"]
