# SPDX-License-Identifier: Apache-2.0
"""Layout conversions at the library boundary: latents and frames (see the conventions in ``ditflow/__init__``).

The nodes call these and nothing else converts layouts, so each convention changes in exactly one place.
"""

from __future__ import annotations

import logging

from einops import rearrange
from torch import Tensor

from .errors import DiTFlowError

#: CogVideoX VAE compression: 4× in time (frames 4k+1 → k+1), 8× in space; the transformer patch is 2×2 latent px.
TEMPORAL_COMPRESSION = 4
SPATIAL_COMPRESSION = 8
PATCH_SIZE = 2
#: Pixel size of one patch-grid unit (8 × 2).
PIXELS_PER_PATCH = SPATIAL_COMPRESSION * PATCH_SIZE
#: Fewest video frames DiTFlow takes: 5 → 2 latent frames, the least with a frame pair to move between.
MIN_FRAMES = TEMPORAL_COMPRESSION + 1
#: Latent channels of the CogVideoX VAE (2b and 5b).
LATENT_CHANNELS = 16
#: Video frames CogVideoX-2b and -5b were trained on (``sample_frames`` in their transformer configs): 13 latent frames.
NATIVE_FRAMES = 49


def latent_frames(num_frames: int) -> int:
    """Latent frames for ``num_frames`` video frames: ⌊(frames − 1)/4⌋ + 1 (49 → 13, 24 → 6); raises unless
    :func:`check_frame_count` accepts the count."""
    check_frame_count(num_frames)
    return (num_frames - 1) // TEMPORAL_COMPRESSION + 1


def video_frames(num_latent_frames: int) -> int:
    """The 4k+1 video frames that encode to ``num_latent_frames`` latent frames: 4·(f − 1) + 1 (13 → 49, 6 → 21)."""
    return (num_latent_frames - 1) * TEMPORAL_COMPRESSION + 1


def largest_frame_count(available: int, cap: int = NATIVE_FRAMES) -> int:
    """The largest 4k+1 ≤ ``min(available, cap)``: how many frames ``auto`` takes from a clip (57 → 49, 24 → 21).

    Args:
        available: frames the clip offers (after any start / stride selection).
        cap: upper bound, default :data:`NATIVE_FRAMES` (longer clips are cut, not squeezed).
    Raises:
        DiTFlowError: if that is fewer than :data:`MIN_FRAMES` (the message gives ``available``).
    """
    n = min(available, cap)
    count = (n - 1) // TEMPORAL_COMPRESSION * TEMPORAL_COMPRESSION + 1 if n > 0 else 0
    if count < MIN_FRAMES:
        raise DiTFlowError(
            f"only {max(available, 0)} frame(s) are available, and motion needs at least {MIN_FRAMES} "
            "(4k+1); use a longer clip, an earlier start or a smaller stride."
        )
    return count


def decoded_frames(num_latent_frames: int) -> int:
    """Video frames the VAE decodes ``num_latent_frames`` latent frames to: 4·(f − 1) + 1 for odd f (13 → 49), but
    4·f for even f (6 → 24, the paper's clip length): diffusers' CogVideoX VAE decodes latent frames in pairs, and
    only a leading odd one stays a single frame."""
    if num_latent_frames % 2:
        return video_frames(num_latent_frames)
    return num_latent_frames * TEMPORAL_COMPRESSION


#: diffusers' CogVideoX VAE encodes frames in batches of this many (plus one leading frame for 4k+1 counts).
VAE_FRAME_BATCH = 8


def check_frame_count(num_frames: int) -> None:
    """Raises :class:`DiTFlowError` unless the VAE takes ``num_frames`` whole — 4k+1 (CogVideoX's own lengths, 49 is
    native) or a multiple of 8 (whole frame batches of the VAE encoder: the authors' 24 frames → 6 latent frames,
    which decode to 24) — and it is at least :data:`MIN_FRAMES` (one latent frame has no motion to transfer)."""
    if num_frames < MIN_FRAMES:
        raise DiTFlowError(
            f"frame count {num_frames} is too few: motion needs at least {MIN_FRAMES} frames (2 latent frames); "
            f"use {MIN_FRAMES} or more, of the form 4k+1 (49 is native)."
        )
    if (num_frames - 1) % TEMPORAL_COMPRESSION and num_frames % VAE_FRAME_BATCH:
        lo = max(MIN_FRAMES, num_frames - (num_frames - 1) % TEMPORAL_COMPRESSION)
        raise DiTFlowError(
            f"frame count {num_frames} is not of the form 4k+1 that CogVideoX needs; use {lo} or {lo + 4} (49 is "
            f"native; multiples of {VAE_FRAME_BATCH}, such as the authors' 24, also work)."
        )


def check_size(height: int, width: int) -> None:
    """Raises :class:`DiTFlowError` unless height and width are positive multiples of 16 px (one patch)."""
    for name, v in (("height", height), ("width", width)):
        if v < PIXELS_PER_PATCH or v % PIXELS_PER_PATCH:
            raise DiTFlowError(
                f"{name} {v} px is not a positive multiple of {PIXELS_PER_PATCH} (8× VAE × 2× patch); "
                f"use {max(PIXELS_PER_PATCH, v // PIXELS_PER_PATCH * PIXELS_PER_PATCH)}."
            )


def token_grid(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(F, h, w) token grid of a video of ``num_frames`` × ``height`` × ``width`` px, e.g. 49×480×720 → (13, 30, 45)."""
    check_size(height, width)
    return latent_frames(num_frames), height // PIXELS_PER_PATCH, width // PIXELS_PER_PATCH


def from_comfy_latent(samples: Tensor, scaling_factor: float, channels: int = LATENT_CHANNELS) -> Tensor:
    """ComfyUI LATENT ``[B, C, T, H, W]`` raw → diffusers ``[B, F, C, H, W]`` scaled (× ``scaling_factor``).

    A LATENT from kijai's CogVideoXWrapper (``[B, T, C, H, W]``, already scaled: diffusers' own layout) is taken as it
    is, with a warning on the ``ditflow`` logger saying so; with T = C = ``channels`` the two layouts cannot be told
    apart and ComfyUI's is assumed.

    Raises:
        DiTFlowError: not 5-D (an image latent), or neither axis 1 nor 2 has ``channels`` channels.
    """
    shape = list(samples.shape)
    if samples.ndim != 5:
        raise DiTFlowError(
            f"expected a video LATENT of shape [B, C, T, H, W], got shape {shape}; "
            "connect the output of DiTFlow Encode Reference or the sampler."
        )
    if shape[1] != channels and shape[2] == channels:
        logging.getLogger("ditflow").warning(
            "DiTFlow: this LATENT %s is [B, T, C, H, W], scaled (kijai's CogVideoXWrapper layout); used as it is. "
            "ComfyUI video latents are [B, C, T, H, W], raw VAE space.", shape)
        return samples.contiguous()
    if shape[1] != channels:
        raise DiTFlowError(
            f"this LATENT has shape {shape}: {shape[1]} channels where CogVideoX has {channels} ([B, C, T, H, W]); "
            "it comes from another model's VAE, so encode the video with DiTFlow Encode Reference."
        )
    return rearrange(samples, "b c t h w -> b t c h w").contiguous() * scaling_factor


def to_comfy_latent(latents: Tensor, scaling_factor: float) -> Tensor:
    """diffusers ``[B, F, C, H, W]`` scaled → ComfyUI LATENT ``[B, C, T, H, W]`` raw (÷ ``scaling_factor``)."""
    return rearrange(latents / scaling_factor, "b t c h w -> b c t h w").contiguous()


def image_to_frames(image: Tensor) -> Tensor:
    """ComfyUI IMAGE ``[T, H, W, 3]`` in [0, 1] → frames ``[T, 3, H, W]`` in [-1, 1] (float32)."""
    if image.ndim != 4 or image.shape[-1] != 3:
        raise DiTFlowError(
            f"expected an IMAGE batch of shape [frames, H, W, 3], got shape {list(image.shape)}; "
            "connect frames from a video loader."
        )
    return rearrange(image, "t h w c -> t c h w").float() * 2.0 - 1.0


def frames_to_image(frames: Tensor) -> Tensor:
    """Frames ``[T, 3, H, W]`` in [-1, 1] → ComfyUI IMAGE ``[T, H, W, 3]`` in [0, 1] (float32, clamped)."""
    return rearrange(((frames.float() + 1.0) / 2.0).clamp(0.0, 1.0), "t c h w -> t h w c").contiguous()


__all__ = [
    "LATENT_CHANNELS",
    "MIN_FRAMES",
    "NATIVE_FRAMES",
    "PIXELS_PER_PATCH",
    "check_frame_count",
    "check_size",
    "decoded_frames",
    "from_comfy_latent",
    "frames_to_image",
    "image_to_frames",
    "largest_frame_count",
    "latent_frames",
    "to_comfy_latent",
    "token_grid",
    "video_frames",
]
