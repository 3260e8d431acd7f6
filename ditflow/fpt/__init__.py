# SPDX-License-Identifier: Apache-2.0
"""Flow Poke Transformer (Baumann et al., *What If: Understanding Motion Through Sparse Interactions*, ICCV 2025,
arXiv 2510.12777): from one image and a few pokes, a distribution over the motion of any point.

Our own implementation of the authors' model (github.com/CompVis/flow-poke-transformer, MIT), checked against
their code on a seeded random state dict (``tests/test_fpt_parity.py``); it loads their released weights
(CC BY-NC 4.0) after a one-time conversion to safetensors (:mod:`ditflow.fpt.checkpoint`). No ComfyUI imports.

Conventions (stated once here, reminded at each use)
----------------------------------------------------
- **Model units.** The model sees a square view of the image. Positions are (x, y), x to the right and y down, in
  [0, 1]²: (0, 0) is the view's top-left corner and (1, 1) its bottom-right corner, and a pixel's position is its
  centre, so column i of an n-pixel-wide view is at x = (i + 0.5)/n. A flow (displacement) is in the same units:
  a point at p moves to p + flow; a flow of 1 crosses the whole view.
- **Pixel units** (pokes typed by users, flow fields at the nodes and the CLI): (x, y) in pixels of the user's
  image, origin at its top-left corner; pixel (column i, row j) has its centre at (i + 0.5, j + 0.5). A dense flow
  field is ``[B, H, W, 2]`` float32: at ``[b, j, i]`` the (dx, dy) in pixels by which the point at that pixel's
  centre moves, x right and y down: OpenCV's dense optical-flow layout, forward in time. Model flow × view side
  in pixels = pixel flow; :class:`ditflow.fpt.view.SquareView` does every conversion.
- **Images.** The model takes ``[B, 3, S, S]`` in [-1, 1], square; ComfyUI IMAGE is ``[B, H, W, 3]`` in [0, 1].
  A non-square image is fitted to the square by padding (letterbox, the whole image is seen) or a centre crop (the
  authors' preprocessing), see :mod:`ditflow.fpt.view`.
- **Distributions** are mixtures of 2-D Gaussians per query point, in fp64 (:class:`ditflow.fpt.mixture.FlowMixture`).

Importing this package is cheap; ``transformers`` is imported when a model is built.
"""

from .config import EncoderConfig, FPTConfig

__all__ = ["EncoderConfig", "FPTConfig"]
