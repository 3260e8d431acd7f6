# SPDX-License-Identifier: Apache-2.0
"""Whole FPT runs on files (what ``python -m ditflow poke`` calls): image + pokes → flow field and pictures.

Everything is checked (image readable, pokes parsed and inside the view, query inside, ``out`` usable, weights
loadable) before anything is computed, and the files are one output set (:class:`~ditflow.outputs.OutputSet`, as
``transfer`` writes): written into a staging folder and published at ``out`` with one rename, so a failed or
interrupted run leaves ``out`` as it was and a finished one leaves exactly its own files there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DiTFlowError
from ..outputs import OutputSet
from .pokes import out_of_distribution_note, parse_pokes

FLOW_CONVENTION = ("flow [H, W, 2] float32: at [j, i], the (dx, dy) in pixels by which the point at pixel (i, j)'s "
                   "centre moves; x right, y down (OpenCV's dense-flow layout)")


@dataclass(frozen=True)
class PokeOptions:
    """Settings of one run (see :func:`ditflow.fpt.fields.predict_flow`)."""

    fit: str = "pad"
    mode: str = "mean"
    grid: int = 128
    ar_grid: int = 16
    seed: int = 0
    camera_static: bool = True
    precision: str = "fp32"
    query: tuple[float, float] | None = None  #: also write density.png for this point (pixels)


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file → IMAGE ``[1, H, W, 3]`` float32 in [0, 1] (RGB; alpha dropped)."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise DiTFlowError(f"image {str(path)!r} does not exist.")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DiTFlowError(f"{path.name} is not an image OpenCV can read (png, jpg, webp, bmp, tiff …).")
    return torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).float().div(255)[None]


def _write_png(path: Path, image: torch.Tensor) -> None:
    import cv2

    rgb = (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise DiTFlowError(f"could not encode {path.name} as PNG.")
    path.write_bytes(data.tobytes())


def _predict(model, image: torch.Tensor, pokes, options: PokeOptions, log) -> tuple[torch.Tensor, dict]:
    """The flow field ``[H, W, 2]`` of one image and its pictures (file name → IMAGE ``[H, W, 3]``)."""
    from . import fields, render

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            log(f"{done}/{total}")

    with torch.inference_mode():
        embedding = fields.embed_image(model, image, options.fit, options.precision)
        flow = fields.predict_flow(model, embedding, pokes, mode=options.mode, grid=options.grid,
                                   ar_grid=options.ar_grid, seed=options.seed, camera_static=options.camera_static,
                                   precision=options.precision, callback=progress)[0]
        pictures = {"flow.png": render.flow_image(flow, pokes)}
        if options.query is not None:
            density = fields.motion_density(model, embedding, pokes, options.query,
                                            camera_static=options.camera_static, precision=options.precision)[0]
            pictures["density.png"] = render.density_image(image[0], density, options.query, pokes)
    return flow, pictures


def run_poke(
    weights: str | os.PathLike, image_path: str | os.PathLike, pokes_text: str, out: str | os.PathLike,
    options: PokeOptions = PokeOptions(), device: str | None = None, log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> list[Path]:
    """Predicts the flow field of ``image_path`` given the pokes; writes ``out/flow.safetensors`` (tensor ``flow``,
    see :data:`FLOW_CONVENTION`), ``out/flow.png`` (colour wheel with the pokes) and, with ``options.query``,
    ``out/density.png``, as one set (``out`` new or empty, or replaced as a whole with ``overwrite``). Returns the
    written paths.

    Raises:
        DiTFlowError: unreadable image or weights, bad pokes or options, a poke or the query outside the view, an
            ``out`` that is a file, holds files (without ``overwrite``) or overlaps an input, or a failed write
            (``out`` is then unchanged).
    """
    from safetensors.torch import save_file

    from .checkpoint import load_fpt
    from .view import SquareView

    # 1. Check every input before any compute.
    pokes = parse_pokes(pokes_text)
    image = read_image(image_path)
    view = SquareView(image.shape[2], image.shape[1], options.fit)
    pokes.check_view(view)
    if options.query is not None and not bool(view.contains(torch.tensor([options.query]))[0]):
        raise DiTFlowError(f"query point ({options.query[0]:g}, {options.query[1]:g}) is outside the part of the "
                           f"{view.width}×{view.height} px image the model sees.")
    if note := out_of_distribution_note(pokes):
        log(f"note: {note}")
    output = OutputSet(out, overwrite=overwrite, inputs=(image_path, weights))
    metadata = {"convention": FLOW_CONVENTION, "pokes": pokes.text(), "image": Path(image_path).name,
                "weights": Path(weights).name, "options": json.dumps(asdict(options))}
    with output as folder:  # the staging folder exists from here: an unwritable place fails before any compute
        # 2. Predict.
        model = load_fpt(weights, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        flow, pictures = _predict(model, image, pokes, options, log)
        # 3. Write the set (published at out when the ``with`` ends).
        try:
            save_file({"flow": flow.contiguous()}, str(folder / "flow.safetensors"), metadata=metadata)
            for name, picture in pictures.items():
                _write_png(folder / name, picture)
        except OSError as err:
            raise DiTFlowError(f"could not write the results ({err.strerror or err}); nothing was written to "
                               f"{output.out}: free some space or choose another --out.") from err
    return [output.out / name for name in ("flow.safetensors", *pictures)]


__all__ = ["FLOW_CONVENTION", "PokeOptions", "read_image", "run_poke"]
