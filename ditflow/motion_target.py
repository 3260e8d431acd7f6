# SPDX-License-Identifier: Apache-2.0
"""A DiTFlow motion target from a flow field (e.g. the Flow Poke Transformer's, :mod:`ditflow.fpt`) instead of a
reference video: motion sketched with pokes steers a CogVideoX generation through the guided sampler.

DiTFlow guides toward the reference AMF, ``Δ_ij`` per query patch of token frame i toward token frame j
(§4.1–4.2, Eq. 8); here ``Δ_ij`` is made from a flow field instead of read from attention:

1. The flow ``[H, W, 2]`` (pixels of the source image, OpenCV's layout) is fitted to the generation's
   ``height × width`` px exactly as the reference video or start image would be (``crop`` / ``stretch`` / ``pad``,
   :func:`ditflow.video.fit_geometry`), its vectors scaled by the same factors per axis.
2. Averaged over each 16 × 16 px patch (8× VAE × 2× patch; pixels the image does not cover, i.e. padding, are left
   out of the average) and divided by 16: one vector ``v`` per patch in patch-grid units.
3. A straight trajectory per patch over the clip: the flow is the motion from the first to the last frame, so
   ``Δ_ij = (j − i)/(F − 1) · v`` for token frames i, j of F (token frame i is i/(F − 1) of the way through the
   clip; on CogVideoX 1.0 it shows video frame 4i, on 1.5 a token frame spans two latent frames). The endpoint is clamped to the patch grid, as an attention-read displacement
   cannot leave it.

The result is a :class:`~ditflow.reference.ReferenceMotion` with that AMF at the guidance block(s) and no latents,
so the sampler optimises toward it and runs no KV injection. The Eq. 8 loss averages only over entries whose target
is non-zero: every i = j pair, patches with no flow (padding, the part of the image the FPT did not see) and those
below ``min_motion`` are left free.

Limits: the flow is read at each patch's grid position in every frame (an Eulerian, stationary field), exact for
uniform motion (pans) and an approximation where a small region moves far; the trajectory is straight at constant
speed; it has not been validated on real CogVideoX weights. No ComfyUI imports.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor

from .config import GuidanceConfig, check_blocks, check_number
from .errors import DiTFlowError
from .layout import PIXELS_PER_PATCH, token_grid
from .reference import ReferenceMotion
from .video import fit_geometry, fit_pictures, place

if TYPE_CHECKING:  # shapes in signatures only; jaxtyping is not a runtime dependency
    from jaxtyping import Float

__all__ = ["flow_to_patches", "poke_reference", "read_flow", "straight_line_amf"]


def _single_flow(flow: Tensor) -> Tensor:
    """``[H, W, 2]`` or ``[1, H, W, 2]`` → finite float32 ``[H, W, 2]`` on the CPU; one sentence otherwise."""
    if not isinstance(flow, Tensor):
        raise DiTFlowError(f"the flow field must be a tensor [H, W, 2], got {type(flow).__name__}.")
    if flow.ndim == 4 and flow.shape[0] == 1:
        flow = flow[0]
    if flow.ndim == 4:
        raise DiTFlowError(f"the flow field is a batch of {flow.shape[0]} ({list(flow.shape)}); one generation "
                           "follows one flow, so predict it for one image (or pick one with an image batch node).")
    if flow.ndim != 3 or flow.shape[-1] != 2 or min(flow.shape[:2]) < 1:
        raise DiTFlowError(f"the flow field must be [H, W, 2] (dx, dy) in pixels, got shape {list(flow.shape)}; "
                           "connect FPT Predict Flow's flow output.")
    flow = flow.detach().float().cpu().clone()  # a normal tensor even when given an inference tensor
    if not torch.isfinite(flow).all():
        raise DiTFlowError("the flow field holds NaN or Inf values; predict it again.")
    return flow


def flow_to_patches(
    flow: Float[Tensor, "H W 2"], height: int, width: int, *, fit: str = "crop", patch_px: int = PIXELS_PER_PATCH
) -> Float[Tensor, "h w 2"]:
    """A flow field in source pixels → one displacement per patch of a ``height × width`` px generation.

    Args:
        flow: (dx, dy) in pixels of the source image at pixel centres, x right, y down (OpenCV's layout; what
            FPT Predict Flow gives, ``[1, H, W, 2]`` accepted too).
        height, width: the generation's size in px, positive multiples of 16.
        fit: how the source image meets the generation's frame, as for the reference video / start image
            (:data:`ditflow.video.RESIZE_MODES`): ``crop``, ``stretch`` or ``pad``.
        patch_px: pixels per patch-grid unit, VAE spatial factor × patch size (CogVideoX: 8 × 2 = 16).
    Returns:
        float32 ``[height/patch_px, width/patch_px, 2]``: per patch, the mean flow of the pixels it covers, in
        patch-grid units (1 = 16 px); ``(0, 0)`` where the source covers none of the patch (padding).
    Raises:
        DiTFlowError: a flow that is not one finite ``[H, W, 2]`` field, a size that is not a positive multiple of
            16, or an unknown ``fit``.
    """
    flow = _single_flow(flow)
    token_grid(5, height, width)  # checks the size (any valid frame count)
    src_h, src_w = flow.shape[:2]
    new_h, new_w, top, left = fit_geometry(src_h, src_w, height, width, fit)
    vectors = rearrange(flow, "h w c -> 1 c h w") * torch.tensor([new_w / src_w, new_h / src_h]).view(1, 2, 1, 1)
    resized = fit_pictures(vectors, height, width, fit)  # as the frames are fitted: bilinear, antialiased
    covered = place(torch.ones(1, 1, new_h, new_w), top, left, height, width)
    pool = torch.nn.functional.avg_pool2d
    total = pool(resized * covered, patch_px)  # [1, 2, h, w] px
    share = pool(covered, patch_px)
    mean = torch.where(share > 0, total / share.clamp_min(1e-12), torch.zeros_like(total))
    return rearrange(mean[0] / patch_px, "c h w -> h w c").contiguous()


def straight_line_amf(patch_flow: Float[Tensor, "h w 2"], num_token_frames: int) -> Float[Tensor, "pairs s 2"]:
    """The AMF of patches that move in a straight line at constant speed by ``patch_flow`` over the clip.

    ``Δ_ij[s] = (j − i)/(F − 1) · patch_flow[s]``, the endpoint ``coords[s] + Δ_ij[s]`` clamped to the grid
    ``[0, w − 1] × [0, h − 1]`` (a displacement read from attention cannot leave it).

    Args:
        patch_flow: per patch, (dx, dy) in patch-grid units from the first to the last frame (:func:`flow_to_patches`).
        num_token_frames: F, the token frames of the generation (13 for 49 frames).
    Returns:
        float32 ``[F², h·w, 2]``, row ``i·F + j``, patches row-major with width fastest: the reference AMF layout
        (:func:`ditflow.amf.attention_motion_flow`).
    Raises:
        DiTFlowError: fewer than 2 token frames or a ``patch_flow`` that is not ``[h, w, 2]``.
    """
    if patch_flow.ndim != 3 or patch_flow.shape[-1] != 2:
        raise DiTFlowError(f"patch flow must be [h, w, 2], got {list(patch_flow.shape)}.")
    if num_token_frames < 2:
        raise DiTFlowError(f"a motion target needs at least 2 token frames, got {num_token_frames}.")
    h, w, _ = patch_flow.shape
    frames = torch.arange(num_token_frames, dtype=torch.float32)
    fraction = (frames[None, :] - frames[:, None]) / (num_token_frames - 1)  # [i, j]: (j − i)/(F − 1)
    velocity = patch_flow.float().reshape(1, 1, h * w, 2)
    disp = fraction[:, :, None, None] * velocity  # [F, F, S, 2]
    idx = torch.arange(h * w)
    coords = torch.stack((idx % w, idx // w), dim=-1).float()  # (x, y) per patch
    upper = torch.tensor([w - 1, h - 1], dtype=torch.float32)
    disp = torch.clamp(disp, min=-coords, max=upper - coords)  # in-range values pass unchanged, bit for bit
    return disp.reshape(num_token_frames * num_token_frames, h * w, 2)


def poke_reference(
    flow: Float[Tensor, "H W 2"],
    *,
    num_frames: int,
    height: int,
    width: int,
    blocks,
    fit: str = "crop",
    scale: float = 1.0,
    min_motion: float = 0.0,
    temperature: float = GuidanceConfig.temperature,
    model=None,
) -> ReferenceMotion:
    """A motion target for :func:`ditflow.sampler.sample` from a flow field: the straight-line AMF of each patch.

    Args:
        flow: (dx, dy) in source-image pixels ``[H, W, 2]`` (or ``[1, H, W, 2]``), the motion from the first to
            the last frame (see :func:`flow_to_patches`).
        num_frames, height, width: the generation's video frames (4k+1) and size in px (multiples of 16).
        blocks: guidance block(s) the target is given at (the sampler guides there; checked against the model
            here when ``model`` is given, else when sampling): e.g. ``[20]`` on CogVideoX-5b, ``[15]`` on -2b.
        fit: how the source image meets the frame (``crop``, ``stretch``, ``pad``), as for the start image.
        scale: multiplies the flow (2 = twice as far over the clip); ≥ 0.
        min_motion: patches whose motion over the clip is shorter than this, in px of the generation, are left
            free (no target) rather than held still; 0 holds every patch with any flow to it.
        temperature: τ of the generated AMF (Eq. 3) the sampler uses; paper: 2.
        model: the backbone the target is for (:mod:`ditflow.backbones`), optional: its token grid is used (on
            CogVideoX 1.5 a token frame spans two latent frames) and the size and blocks are checked against it now;
            without it the grid is CogVideoX 1.0's (F = (frames − 1)/4 + 1) and the sampler checks the rest.
    Returns:
        :class:`~ditflow.reference.ReferenceMotion` with ``amf = {block: [F², S, 2]}`` (patch-grid units),
        ``grid = (F, h, w)`` token frames and patches, and ``latents = None`` (no KV injection).
    Raises:
        DiTFlowError: a bad flow, size, frame count, fit, block, scale, threshold or temperature, a size or block
            the model cannot take, or a target where nothing moves (the loss would be undefined).
    """
    if model is None:
        grid = token_grid(num_frames, height, width)
    else:
        grid = tuple(model.geometry(num_frames, height, width).token_grid)
        blocks = check_blocks(blocks, model.num_blocks)
    scale = check_number("scale", scale, 0.0, 1e6, "1 keeps the predicted motion")
    min_motion = check_number("min_motion", min_motion, 0.0, math.inf, "px over the clip; 0 keeps every patch")
    temperature = check_number("temperature", temperature, 0.0, 100.0, "paper: 2", low_open=True)
    blocks = tuple(sorted({int(b) for b in blocks}))
    if not blocks or blocks[0] < 0:
        raise DiTFlowError(f"give one or more guidance blocks ≥ 0 for the motion target, got {list(blocks)}.")
    with torch.inference_mode(False):  # a target built in ComfyUI's inference mode must still enter autograd
        patch_px = height // grid[1]
        patches = flow_to_patches(flow, height, width, fit=fit, patch_px=patch_px) * scale
        still = patches.norm(dim=-1, keepdim=True) * patch_px < min_motion
        patches = torch.where(still, torch.zeros_like(patches), patches)
        amf = straight_line_amf(patches, grid[0])
    if not amf.ne(0).any():
        raise DiTFlowError(
            "the motion target is still everywhere (the flow is zero"
            + (f" or shorter than min_motion {min_motion:g} px" if min_motion > 0 else "")
            + " on every patch), so there is nothing to guide toward; poke harder, raise scale or lower min_motion."
        )
    return ReferenceMotion(amf={b: amf for b in blocks}, grid=grid, temperature=temperature, latents=None)


def read_flow(path: str | os.PathLike) -> tuple[Tensor, dict[str, str]]:
    """A flow field saved by ``python -m ditflow poke`` (``flow.safetensors``: tensor ``flow`` ``[H, W, 2]``, (dx, dy)
    in pixels) → (float32 ``[H, W, 2]``, the file's metadata: pokes, image, options).

    Raises:
        DiTFlowError: a missing or unreadable file, or one without a ``flow`` tensor of shape ``[H, W, 2]``.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise DiTFlowError(f"flow file {str(path)!r} does not exist; make one with 'python -m ditflow poke'.")
    try:
        with safe_open(str(path), framework="pt") as f:
            if "flow" not in f.keys():
                raise DiTFlowError(f"{path.name} holds no tensor 'flow' (it has {', '.join(f.keys()) or 'none'}); "
                                   "give the flow.safetensors that 'python -m ditflow poke' wrote.")
            flow, metadata = f.get_tensor("flow"), f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise DiTFlowError(f"{path.name} is not a readable .safetensors file ({err}); give the flow.safetensors that "
                           "'python -m ditflow poke' wrote.") from None
    return _single_flow(flow), metadata
