# SPDX-License-Identifier: Apache-2.0
"""CogVideoX's VAE side: video latents (encode, decode, tiling and slicing) and the image-to-video start latents.

Video latents are scaled ``raw × scaling_factor`` in every variant (the pipelines decode ``latents / scaling_factor``).
The I2V start latents follow the I2V pipeline's ``prepare_latents``: the start image is encoded alone as a one-frame
video, **sampled** from the posterior with the run's generator before the noise is drawn, and scaled
``scaling_factor × raw`` — except where the VAE config sets ``invert_scale_latents`` (CogVideoX 1.5), where it is
``(1 / scaling_factor) × raw`` ("required because the CogVideoX team forgot to multiply the scaling factor during
training", diffusers' comment).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from einops import rearrange
from torch import Tensor

from ...errors import DiTFlowError, check_finite
from ...layout import SPATIAL_COMPRESSION, decoded_frames
from ...limits import check_decode_fits

_VAE_FIX = ("the VAE turns finite inputs into NaN/Inf: its weights are damaged (re-download or re-convert vae/) or "
            "its dtype overflows (with fp16 try bf16 or fp32)")


@contextlib.contextmanager
def vae_memory(vae, tiling: bool | None = None, slicing: bool | None = None) -> Iterator[None]:
    """Within the ``with``, diffusers' VAE tiling (spatial tiles: much less memory at 480×720) and slicing (one batch
    element at a time) as asked; ``None`` leaves a setting as it is. Both are restored afterwards, also on error."""
    before = (vae.use_tiling, vae.use_slicing)
    try:
        if tiling is not None:
            vae.enable_tiling() if tiling else vae.disable_tiling()
        if slicing is not None:
            vae.enable_slicing() if slicing else vae.disable_slicing()
        yield
    finally:
        vae.use_tiling, vae.use_slicing = before


@torch.no_grad()
def encode_video(
    model, frames: Tensor, *, sample_seed: int | None = None, tiling: bool | None = None, slicing: bool | None = None
) -> Tensor:
    """Frames ``[F, 3, H, W]`` in [-1, 1] → scaled latents ``[1, (F−1)/4+1, C, H/8, W/8]`` (diffusers layout).

    Uses the posterior mean, or a sample drawn with ``torch.Generator().manual_seed(sample_seed)`` — reproducible
    either way (the authors' script samples without a generator). ``tiling`` / ``slicing``: see :func:`vae_memory`.

    Raises:
        DiTFlowError: if the latents come out NaN/Inf (damaged VAE weights) or the VAE's scaling factor is not a
            positive number.
    """
    scale = model.vae_scaling_factor
    vae = model.vae
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    x = rearrange(frames.to(device, dtype), "f c h w -> 1 c f h w")  # the VAE's layout
    with torch.inference_mode(False), vae_memory(vae, tiling, slicing):
        dist = vae.encode(x).latent_dist
        if sample_seed is None:
            z = dist.mode()
        else:
            gen = torch.Generator(device="cpu").manual_seed(sample_seed)
            noise = torch.randn(dist.mean.shape, generator=gen, dtype=torch.float32).to(device, dist.mean.dtype)
            z = dist.mean + dist.std * noise
    expected = ((frames.shape[0] - 1) // 4 + 1, frames.shape[2] // 8, frames.shape[3] // 8)
    if tuple(z.shape[2:]) != expected:
        raise DiTFlowError(
            f"the VAE encoded {frames.shape[0]}×{frames.shape[2]}×{frames.shape[3]} frames to latent "
            f"{'×'.join(map(str, z.shape[2:]))} instead of {'×'.join(map(str, expected))}; turn VAE tiling off."
        )
    check_finite(z, "the VAE's encoding of the reference video", _VAE_FIX, limit=None)
    return rearrange(z * scale, "b c f h w -> b f c h w").contiguous()


@torch.no_grad()
def decode_latents(model, latents: Tensor, *, tiling: bool | None = None, slicing: bool | None = None) -> Tensor:
    """Scaled latents ``[1, f, C, h, w]`` → frames ``[n, 3, 8h, 8w]`` in [-1, 1], float32 on the CPU, with
    n = :func:`~ditflow.layout.decoded_frames` (4(f−1)+1 for odd f, 4f for even f: the VAE decodes in pairs).

    ``tiling`` / ``slicing``: see :func:`vae_memory` (``None``: as the VAE is set).

    Raises:
        DiTFlowError: if the latents or the decoded frames hold NaN/Inf (which would write a black video), or the
            VAE's scaling factor is not a positive number.
    """
    vae = model.vae
    scale = model.vae_scaling_factor
    check_finite(latents, "the latents to decode", "generate them again; a sampler run stops before it returns "
                 "such latents, so they came from elsewhere", limit=None)
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    check_decode_fits(decoded_frames(latents.shape[1]), latents.shape[-2] * SPATIAL_COMPRESSION,
                      latents.shape[-1] * SPATIAL_COMPRESSION)
    z = rearrange(latents.to(device, dtype) / scale, "b f c h w -> b c f h w")
    with torch.inference_mode(False), vae_memory(vae, tiling, slicing):
        video = vae.decode(z).sample  # [1, 3, F, H, W]
    check_finite(video, "the decoded video", _VAE_FIX, limit=None)
    return rearrange(video[0], "c f h w -> f c h w").float().clamp(-1, 1).cpu()


def _inverted(model) -> bool:
    return bool((model.vae_config or {}).get("invert_scale_latents", False))


@torch.no_grad()
def encode_start(model, image: Tensor, generator: torch.Generator) -> Tensor:
    """The start image ``[3, H, W]`` in [-1, 1] → start latents ``[1, 1, C, H/8, W/8]`` in the model's dtype.

    Draws from the posterior with ``generator`` exactly as diffusers' ``CogVideoXImageToVideoPipeline`` does
    (``retrieve_latents(vae.encode(image), generator)``), so a run seeded the same continues with the same noise.

    Raises:
        DiTFlowError: not one RGB image, or NaN/Inf latents (damaged VAE weights).
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise DiTFlowError(f"expected one start image [3, H, W] in [-1, 1], got shape {list(image.shape)}.")
    vae = model.vae
    device = next(vae.parameters()).device
    x = image.to(device, model.dtype)[None, :, None]  # [1, 3, 1, H, W]: a one-frame video
    with torch.inference_mode(False):
        z = vae.encode(x).latent_dist.sample(generator)
    check_finite(z, "the VAE's encoding of the start image", _VAE_FIX, limit=None)
    z = z.to(model.dtype).permute(0, 2, 1, 3, 4)  # [1, 1, C, h, w]
    scale = model.vae_scaling_factor
    return 1 / scale * z if _inverted(model) else scale * z


def video_to_image_latents(model, latents: Tensor) -> Tensor:
    """Scaled video latents (e.g. a reference's first frame, ``[1, 1, C, H, W]``) in the start latents' scaling."""
    if not _inverted(model):
        return latents
    scale = model.vae_scaling_factor
    return 1 / scale * (latents / scale)
