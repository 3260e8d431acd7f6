# SPDX-License-Identifier: Apache-2.0
"""CogVideoX's latent layout: video size → latent shape → token grid, and 1.5's frame padding.

The VAE compresses 4× in time (frames 4k+1 → k+1 latent frames) and 8× in space; the transformer's patch is 2×2
latent pixels, and on CogVideoX 1.5 also 2 latent frames (``patch_size_t``), so its token grid has half as many
frames as the latent. When the latent frame count is odd, 1.5's pipelines put padding latent frames **in front**
(``additional_frames``; noise like the rest while denoising) and drop them before decoding; the same frames are
here :attr:`~ditflow.backbones.base.Geometry.pad_frames`. A reference video's latents are padded with copies of
their first frame (the I2V pipeline's rule for odd image latents), so token frame 0 pairs the reference's first
frame with itself as the generation's pairs padding with its first frame.

5b-I2V's learned positional table exists for one grid only (the config's sample grid, 60×90 latent pixels =
480×720 px), and 1.5's "slice" RoPE for grids up to its sample grid (150×150 patches = 2400×2400 px): the sizes
are checked here, before any compute, instead of failing inside diffusers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import DiTFlowError
from ...layout import SPATIAL_COMPRESSION, check_frame_count, check_size, latent_frames, video_frames
from ..base import Geometry
from .positions import rope_max_grid


def geometry(config: dict, frames: int, height: int, width: int, *, name: str) -> Geometry:
    """The :class:`~ditflow.backbones.base.Geometry` of a ``frames × height × width`` px video on a CogVideoX whose
    ``transformer/config.json`` is ``config`` (``name`` is used in messages).

    Raises:
        DiTFlowError: a frame count the VAE does not take whole, a size that is not whole patches (16 px), another
            size than 5b-I2V's fixed one, or a grid beyond 1.5's RoPE; each message gives the sizes that work.
    """
    check_frame_count(frames)
    check_size(height, width)
    p, p_t = config.get("patch_size", 2), config.get("patch_size_t")
    lat_h, lat_w = height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION
    if config.get("use_learned_positional_embeddings", False):
        fixed = (config["sample_height"] * SPATIAL_COMPRESSION, config["sample_width"] * SPATIAL_COMPRESSION)
        if (height, width) != fixed:
            raise DiTFlowError(
                f"{name} generates at {fixed[0]}×{fixed[1]} px only (its learned positional embedding exists for that "
                f"size), not {height}×{width}; use height {fixed[0]} and width {fixed[1]}."
            )
    bound = rope_max_grid(config)
    if bound is not None and (lat_h // p > bound[0] or lat_w // p > bound[1]):
        px = (bound[0] * p * SPATIAL_COMPRESSION, bound[1] * p * SPATIAL_COMPRESSION)
        raise DiTFlowError(
            f"{name}'s positions reach {px[0]}×{px[1]} px at most ({bound[0]}×{bound[1]} patches), not "
            f"{height}×{width}; use a smaller size."
        )
    f = latent_frames(frames)
    pad = 0 if p_t is None else (-f) % p_t
    channels = config.get("out_channels") or config.get("in_channels", 16)
    return Geometry(frames=frames, height=height, width=width, latent_frames=f, pad_frames=pad,
                    latent_shape=(f + pad, channels, lat_h, lat_w), token_grid=token_grid(config, frames, height, width))


def token_grid(config: dict, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The token grid ``(F, h, w)`` of a ``frames × height × width`` px video (sizes checked by :func:`geometry`):
    latent frames padded to whole temporal patches, over ``patch_size_t``; patches of 16 px."""
    p, p_t = config.get("patch_size", 2), config.get("patch_size_t") or 1
    f = latent_frames(frames)
    return -(-f // p_t), height // (SPATIAL_COMPRESSION * p), width // (SPATIAL_COMPRESSION * p)


def size_of_grid(config: dict, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """The video size ``(frames, height, width)`` in px whose geometry has token ``grid = (F, h, w)``: on 1.5 the one
    with the fewest latent frames (2F − 1, padded by one: 81 frames for 11 token frames, the pipelines' native)."""
    frames, h, w = grid
    p, p_t = config.get("patch_size", 2), config.get("patch_size_t") or 1
    return (video_frames(frames * p_t - (p_t - 1)), h * p * SPATIAL_COMPRESSION, w * p * SPATIAL_COMPRESSION)


def geometry_of_latents(config: dict, latents: Tensor, *, name: str) -> Geometry:
    """The geometry of scaled video latents ``[B, F, C, H, W]`` (the video's own frames, no padding); the video
    size is the 4k+1 frame count that encodes to F.

    Raises:
        DiTFlowError: not 5-D, a channel count the model does not denoise, or a size :func:`geometry` refuses.
    """
    if latents.ndim != 5:
        raise DiTFlowError(f"expected latents of shape [B, F, C, H, W], got {list(latents.shape)}.")
    _, frames, channels, height, width = latents.shape
    wanted = config.get("out_channels") or config.get("in_channels", 16)
    if channels != wanted:
        raise DiTFlowError(f"latents with {channels} channels cannot be {name}'s, which has {wanted}; encode the video "
                           "with this model's VAE.")
    p = config.get("patch_size", 2)
    if height % p or width % p:
        raise DiTFlowError(f"latent size {height}×{width} is not a multiple of the patch size {p}; use 16-px multiples.")
    return geometry(config, video_frames(frames), height * SPATIAL_COMPRESSION, width * SPATIAL_COMPRESSION, name=name)


def pad_latents(latents: Tensor, geometry: Geometry) -> Tensor:
    """Video latents ``[B, F, C, H, W]`` → ``[B, F + pad, C, H, W]`` with copies of the first frame in front."""
    if not geometry.pad_frames:
        return latents
    return torch.cat([latents[:, :1].expand(-1, geometry.pad_frames, -1, -1, -1), latents], dim=1)


def unpad_latents(latents: Tensor, geometry: Geometry) -> Tensor:
    """The video's latent frames of padded latents (the pipelines' ``latents[:, additional_frames:]``)."""
    return latents[:, geometry.pad_frames :]
