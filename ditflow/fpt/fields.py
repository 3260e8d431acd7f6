# SPDX-License-Identifier: Apache-2.0
"""Image-level FPT predictions in pixel units: what the ComfyUI nodes and the CLI call, one function each.

- :func:`embed_image`: an IMAGE batch → :class:`ImageEmbedding` (features + the square view), computed once per image.
- :func:`predict_flow`: pokes → a dense flow field ``[B, H, W, 2]`` in pixels (conventions: ``ditflow/fpt/__init__``),
  either the expected flow or one sampled motion.
- :func:`motion_density`: pokes and one query point → where that point may go, as probability per pixel.

``precision`` "bf16" runs the network under bfloat16 autocast on a GPU, as the authors' demo does; the weights and
the mixture head stay fp32 / fp64. Every function takes an optional ``callback(done, total)`` for progress and cancel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DiTFlowError
from .mixture import FlowMixture
from .pokes import Pokes
from .view import SquareView

PRECISIONS = ("fp32", "bf16")
MODES = ("mean", "sample")
#: the motion density is computed on cells of at most this many per image side, then resized
DENSITY_CELLS = 384


@dataclass
class ImageEmbedding:
    """An image batch's FPT features and how the images map onto the model's square view."""

    features: Tensor  #: [B, hidden, g, g]
    view: SquareView
    image: Tensor  #: [B, H, W, 3] in [0, 1], the input (for drawing)


def _autocast(model, precision: str):
    if precision not in PRECISIONS:
        raise DiTFlowError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}.")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=model.device.type, dtype=torch.bfloat16)


def embed_image(model, image: Tensor, fit: str = "pad", precision: str = "fp32") -> ImageEmbedding:
    """Encodes ComfyUI IMAGE ``[B, H, W, 3]`` in [0, 1], fitted to the square by ``fit`` (``pad`` or ``crop``).

    Raises:
        DiTFlowError: not an RGB image batch, unknown fit or precision.
    """
    if image.ndim != 4 or image.shape[-1] != 3:
        raise DiTFlowError(f"expected an RGB IMAGE batch [B, H, W, 3]; got shape {list(image.shape)}.")
    view = SquareView(width=image.shape[2], height=image.shape[1], fit=fit)
    with _autocast(model, precision):
        features = model.embed_image(view.image_to_model(image))
    return ImageEmbedding(features.float(), view, image)


def _pokes_in_model_units(embedding: ImageEmbedding, pokes: Pokes) -> tuple[Tensor, Tensor]:
    pokes.check_view(embedding.view)
    start, flow = pokes.tensors()
    b = embedding.features.shape[0]
    view = embedding.view
    return view.to_model(start).expand(b, -1, -1), (flow / view.side).expand(b, -1, -1)


def predict_flow(
    model, embedding: ImageEmbedding, pokes: Pokes, *, mode: str = "mean", grid: int = 64, ar_grid: int = 16,
    seed: int = 0, camera_static: bool = True, precision: str = "fp32",
    callback: Callable[[int, int], None] | None = None,
) -> Tensor:
    """A dense flow field ``[B, H, W, 2]`` (float32, pixels; OpenCV's layout) given the pokes.

    Args:
        mode: ``mean``: each point's expected flow given the pokes (FPT's parallel prediction). ``sample``: one
            plausible motion: flows sampled in sequence (random order, seeded) on an ``ar_grid`` grid, each seeing
            the pokes and the samples before it, then the expected flow on the full grid given pokes and samples
            (the authors' demo does the same).
        grid: query points along the longer side of the visible image; the field is bilinear between them.
        ar_grid: points along the longer side sampled in sequence (``sample`` only; cost grows with its square).
        seed: for ``sample``.
        camera_static: whether the camera is still.
    Raises:
        DiTFlowError: a poke outside the visible image, an unknown mode, a grid below 1.
    """
    if mode not in MODES:
        raise DiTFlowError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}.")
    if grid < 1 or ar_grid < 1:
        raise DiTFlowError(f"grid ({grid}) and ar_grid ({ar_grid}) must be at least 1 point per side.")
    poke_pos, poke_flow = _pokes_in_model_units(embedding, pokes)
    view, features = embedding.view, embedding.features
    b = features.shape[0]
    queries, (rows, cols) = view.query_grid(grid)
    queries = queries.expand(b, -1, -1)
    with _autocast(model, precision):
        if mode == "sample":
            coarse, _ = view.query_grid(ar_grid)
            coarse = coarse.expand(b, -1, -1)
            sampled = model.predict_autoregressive(poke_pos, poke_flow, coarse, features, camera_static,
                                                   randomize_order=True, generator=torch.Generator().manual_seed(seed),
                                                   callback=callback)
            poke_pos, poke_flow = torch.cat([poke_pos, coarse], 1), torch.cat([poke_flow, sampled.cpu()], 1)
        mixture = model.predict_parallel(poke_pos, poke_flow, queries, features, camera_static, callback=callback)
    return view.field_to_pixels(mixture.mean.reshape(b, rows, cols, 2).cpu())


def predict_mixture(model, embedding: ImageEmbedding, pokes: Pokes, query: tuple[float, float], *,
                    camera_static: bool = True, precision: str = "fp32") -> FlowMixture:
    """The flow distribution (model units) of the point ``query`` (x, y pixels), batch ``[B, 1]``.

    Raises:
        DiTFlowError: a poke or the query outside the visible image.
    """
    view = embedding.view
    q = torch.tensor([query], dtype=torch.float32)
    if not bool(view.contains(q)[0]):
        x0, y0, x1, y1 = view.visible
        raise DiTFlowError(f"query point ({query[0]:g}, {query[1]:g}) is outside the part of the image the model "
                           f"sees (x {x0}..{x1}, y {y0}..{y1} px).")
    poke_pos, poke_flow = _pokes_in_model_units(embedding, pokes)
    b = embedding.features.shape[0]
    with _autocast(model, precision):
        return model.predict_parallel(poke_pos, poke_flow, view.to_model(q).expand(b, 1, 2), embedding.features,
                                      camera_static)


def motion_density(model, embedding: ImageEmbedding, pokes: Pokes, query: tuple[float, float], *,
                   camera_static: bool = True, precision: str = "fp32") -> Tensor:
    """Where the point ``query`` (x, y pixels) may move: probability per pixel ``[B, H, W]`` float32.

    The value at a pixel is the predicted probability that the point ends up in it (query + flow); the map sums to
    at most 1 (less when mass falls outside the image). Computed on cells of at most ``DENSITY_CELLS`` per side
    (:meth:`FlowMixture.pixel_mass`), spread evenly over their pixels.
    """
    mixture = predict_mixture(model, embedding, pokes, query, camera_static=camera_static, precision=precision)
    mixture = FlowMixture(mixture.logits.cpu(), mixture.means.cpu(), mixture.scale_tril.cpu())  # a few numbers
    view = embedding.view
    h, w = view.height, view.width
    step = max(1, -(-max(h, w) // DENSITY_CELLS))  # pixels per cell side
    ys = torch.arange(0, h, step, dtype=torch.float64) + step / 2
    xs = torch.arange(0, w, step, dtype=torch.float64) + step / 2
    targets = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [rows, cols, 2] cell centres, px
    flows = (targets - torch.tensor(query, dtype=torch.float64)) / view.side
    out = []
    for b in range(mixture.logits.shape[0]):
        mass = mixture.select((slice(b, b + 1),)).pixel_mass(flows, step / view.side).float() / (step * step)
        out.append(mass.repeat_interleave(step, 0).repeat_interleave(step, 1)[:h, :w])
    return torch.stack(out)


__all__ = ["DENSITY_CELLS", "ImageEmbedding", "MODES", "PRECISIONS", "embed_image", "motion_density",
           "predict_flow", "predict_mixture"]
