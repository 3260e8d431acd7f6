# SPDX-License-Identifier: Apache-2.0
"""Live previews: a linear latent → RGB projection of a CogVideoX VAE, fitted on that VAE itself.

A preview needs colours from a latent without running the 3D VAE decoder. ComfyUI's ``Latent2RGBPreviewer`` takes a
per-channel table (C × 3 factors and a bias); this module makes that table for the loaded model instead of shipping
numbers: :func:`fit_latent_rgb` VAE-encodes a few random smooth colour images and least-squares fits the 8×8-pooled
pixel colours against the latent channels at the same place. Costs one small encode (8 images of 64×64 px, one
frame each) per model. Works for any VAE with the CogVideoX compression, including the tiny test models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .layout import SPATIAL_COMPRESSION

#: Images and their size used by :func:`fit_latent_rgb` (latent samples: 8 · 8 · 8 = 512 for 17 unknowns per colour).
FIT_IMAGES, FIT_SIZE = 8, 64


@dataclass(frozen=True)
class LatentRGB:
    """``rgb ≈ factors.T @ z + bias`` per latent pixel, for raw (unscaled) latents; rgb in [-1, 1].

    Attributes:
        factors: ``[C, 3]`` (ComfyUI's ``latent_rgb_factors`` layout: one row per latent channel).
        bias: ``[3]``.
        r2: coefficient of determination of the fit on its own samples (1 = exact).
    """

    factors: Tensor
    bias: Tensor
    r2: float

    def project(self, latents: Tensor) -> Tensor:
        """Raw latents ``[..., C, H, W]`` → colours ``[..., 3, H, W]`` in [-1, 1] (clamped)."""
        rgb = torch.einsum("...chw,cr->...rhw", latents.float(), self.factors) + self.bias.view(3, 1, 1)
        return rgb.clamp(-1.0, 1.0)


def _smooth_colours(count: int, size: int, seed: int) -> Tensor:
    """``count`` images ``[count, 3, size, size]`` in [-0.9, 0.9]: random 4×4 colour grids, bilinearly smoothed."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=gen) * 1.8 - 0.9
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def fit_latent_rgb(model, *, seed: int = 0) -> LatentRGB:
    """Fits :class:`LatentRGB` for the VAE of ``model`` (a loaded backbone).

    The VAE's posterior means of :data:`FIT_IMAGES` random smooth colour images (one frame each) against the images'
    colours averaged over each 8×8 px block (the area one latent pixel covers); least squares with a bias.
    """
    vae = model.vae
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    images = _smooth_colours(FIT_IMAGES, FIT_SIZE, seed)
    with torch.inference_mode(False):
        z = vae.encode(rearrange(images, "b c h w -> b c 1 h w").to(device, dtype)).latent_dist.mode()
    z = rearrange(z[:, :, 0].float().cpu(), "b c h w -> (b h w) c")
    target = rearrange(F.avg_pool2d(images, SPATIAL_COMPRESSION), "b c h w -> (b h w) c")
    design = torch.cat([z, torch.ones(len(z), 1)], dim=1)
    solution = torch.linalg.lstsq(design, target).solution  # [C + 1, 3]
    residual = target - design @ solution
    r2 = 1.0 - float(residual.pow(2).sum() / (target - target.mean(0)).pow(2).sum())
    return LatentRGB(factors=solution[:-1].contiguous(), bias=solution[-1].contiguous(), r2=r2)


__all__ = ["FIT_IMAGES", "FIT_SIZE", "LatentRGB", "fit_latent_rgb"]
