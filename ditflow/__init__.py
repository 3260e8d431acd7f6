# SPDX-License-Identifier: Apache-2.0
"""DiTFlow: training-free video motion transfer on CogVideoX (Pondaven et al., CVPR 2025, arXiv 2412.07776).

The method reaches a model only through a backbone (:mod:`ditflow.backbones`; CogVideoX 2b, 5b, 5b-I2V, 1.5, 1.5-I2V).

A plain library on torch + diffusers; it imports nothing from ComfyUI. The ComfyUI nodes in ``nodes/`` and the
command line (``python -m ditflow``) are thin callers of it.

Conventions (stated once here, reminded at each use)
----------------------------------------------------
- Positions are (x, y): x to the right, y down, origin at the top-left patch.
- Displacements are in **patch-grid units**: 1 unit = 1 patch = 2 latent pixels = 16 video pixels.
- Video tokens are frame-major, then row-major with width fastest: ``idx = f·S + y·w + x`` with ``S = h·w``.
  Inside a transformer block the sequence is ``[text; video]``, text first.
- Latents are diffusers' ``[B, F, C, H, W]`` (frames before channels) and **scaled** (× VAE scaling factor)
  everywhere in ``ditflow/``. ComfyUI's LATENT is ``[B, C, T, H, W]`` and **raw** (unscaled VAE space);
  :func:`ditflow.layout.to_comfy_latent` / :func:`ditflow.layout.from_comfy_latent` convert, called by the
  nodes only.
- Video frames are ``[F, 3, H, W]`` in [-1, 1] in the library (what the VAE takes); ComfyUI IMAGE is
  ``[T, H, W, 3]`` in [0, 1]. Frame counts are 4k+1 (latent frames = (frames − 1)/4 + 1); multiples of 8 (the authors' 24)
  also encode, to ⌊(frames − 1)/4⌋ + 1.
- The AMF's frames are **token frames**: one per latent frame on CogVideoX 1.0, one per two latent frames on 1.5
  (its latent frames padded in front to an even count). Sizes go through the backbone
  (:meth:`ditflow.backbones.base.Backbone.geometry`), which names the model-specific rules once.
- Defaults of the method live once, in :class:`ditflow.config.GuidanceConfig`.
- User-facing failures raise :class:`ditflow.errors.DiTFlowError` with one readable sentence.
- The Flow Poke Transformer (:mod:`ditflow.fpt`) works on one image, in its own units (positions in [0, 1]² of a
  square view, flows in pixels at its boundary); they are stated once in ``ditflow/fpt/__init__``.

Importing this package is cheap: it does not import diffusers or transformers; the modules that need them do.
"""

from .config import GuidanceConfig, Loss, Mode
from .errors import DiTFlowError

__all__ = ["DiTFlowError", "GuidanceConfig", "Loss", "Mode"]
__version__ = "0.1.0"
