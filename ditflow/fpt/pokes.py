# SPDX-License-Identifier: Apache-2.0
"""Pokes as users write them: ``x0,y0,x1,y1; x0,y0,x1,y1; …`` in pixels of the image (FPT §3: a poke is a point
and the flow it is dragged by).

A poke drags the point (x0, y0) to (x1, y1); its flow is (x1 − x0, y1 − y0). Pixel coordinates as stated in
``ditflow/fpt/__init__``: x right, y down, origin at the image's top-left corner. Pokes are separated by ``;`` or
new lines, numbers by commas or spaces; an empty text means no pokes (the model then predicts motion from the
image alone). Every problem is reported, one sentence each.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DiTFlowError
from .model import TRAINED_MAX_POKES
from .view import SquareView


@dataclass(frozen=True)
class Pokes:
    """Pokes in image pixels: start points and end points, each a tuple of (x, y)."""

    start: tuple[tuple[float, float], ...] = ()
    end: tuple[tuple[float, float], ...] = ()

    def __len__(self) -> int:
        return len(self.start)

    def tensors(self) -> tuple[Tensor, Tensor]:
        """Start positions and flows ``[n, 2]`` float32, in pixels."""
        start = torch.tensor(self.start, dtype=torch.float32).reshape(-1, 2)
        return start, torch.tensor(self.end, dtype=torch.float32).reshape(-1, 2) - start

    def text(self) -> str:
        """The pokes in the format :func:`parse_pokes` reads."""
        return "; ".join(",".join(f"{v:g}" for v in (*s, *e)) for s, e in zip(self.start, self.end))

    def check_view(self, view: SquareView) -> None:
        """Raises :class:`DiTFlowError` (one sentence per poke) if a poke starts where the model does not see."""
        start, _ = self.tensors()
        outside = (~view.contains(start)).nonzero().flatten().tolist()
        if not outside:
            return
        x0, y0, x1, y1 = view.visible
        where = (f"the {view.width}×{view.height} px image" if view.fit == "pad" else
                 f"the centre square the model sees (x {x0}..{x1}, y {y0}..{y1} px; fit 'pad' shows the whole image)")
        raise DiTFlowError(" ".join(f"Poke {i + 1} starts at ({self.start[i][0]:g}, {self.start[i][1]:g}), outside "
                                    f"{where}." for i in outside))


def parse_pokes(text: str) -> Pokes:
    """Reads ``x0,y0,x1,y1`` pokes (pixels) separated by ``;`` or new lines.

    Raises:
        DiTFlowError: one sentence per bad poke: not four numbers, a value that is not a finite number, a
        negative start coordinate.
    """
    starts, ends, errors = [], [], []
    parts = [p.strip() for p in re.split(r"[;\n]", text or "")]
    for number, part in enumerate((p for p in parts if p), start=1):
        fields = [f for f in re.split(r"[,\s]+", part) if f]
        if len(fields) != 4:
            errors.append(f"Poke {number} ('{part}') has {len(fields)} number{'s' * (len(fields) != 1)}, not 4: "
                          "write x0,y0,x1,y1 (start and end in pixels).")
            continue
        try:
            values = [float(f) for f in fields]
        except ValueError:
            bad = next(f for f in fields if not _is_float(f))
            errors.append(f"Poke {number} ('{part}') has '{bad}', which is not a number.")
            continue
        if not all(math.isfinite(v) for v in values):
            errors.append(f"Poke {number} ('{part}') has a value that is not a finite number.")
            continue
        if values[0] < 0 or values[1] < 0:
            errors.append(f"Poke {number} starts at ({values[0]:g}, {values[1]:g}); start coordinates are pixels "
                          "from the image's top-left corner and cannot be negative.")
            continue
        starts.append((values[0], values[1]))
        ends.append((values[2], values[3]))
    if errors:
        raise DiTFlowError(" ".join(errors))
    return Pokes(tuple(starts), tuple(ends))


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def out_of_distribution_note(pokes: Pokes) -> str | None:
    """A note when there are more pokes than the model was trained with (the authors: it usually still works)."""
    if len(pokes) > TRAINED_MAX_POKES:
        return (f"{len(pokes)} pokes: the model was trained with at most {TRAINED_MAX_POKES}; results may degrade.")
    return None


__all__ = ["Pokes", "out_of_distribution_note", "parse_pokes"]
