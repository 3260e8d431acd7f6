# SPDX-License-Identifier: Apache-2.0
"""The preview projection (ditflow.preview): a least-squares latent → RGB fit on the model's own VAE.

A stand-in VAE whose latents are a known linear mix of the 8×8-pooled colours (16 channels from 3, plus an offset)
must be inverted exactly; the tiny random VAE (not an autoencoder: its latents carry little colour) must still give a
finite projection of the right shape.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from einops import rearrange

from ditflow.preview import fit_latent_rgb


class _LinearColourVAE(torch.nn.Module):
    """encode(x [B, 3, 1, H, W]).latent_dist.mode() = mix · avgpool8(x) + offset, [B, 16, 1, H/8, W/8]."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.mix = torch.nn.Parameter(torch.randn(16, 3, generator=gen))
        self.offset = torch.nn.Parameter(torch.randn(16, generator=gen))

    def encode(self, x):
        pooled = F.avg_pool2d(x[:, :, 0], 8)
        z = torch.einsum("kc,bchw->bkhw", self.mix, pooled) + self.offset.view(1, 16, 1, 1)
        dist = types.SimpleNamespace(mode=lambda: z[:, :, None])
        return types.SimpleNamespace(latent_dist=dist)


def test_the_fit_inverts_a_known_linear_colour_encoding():
    model = types.SimpleNamespace(vae=_LinearColourVAE())
    fit = fit_latent_rgb(model)
    assert fit.factors.shape == (16, 3) and fit.bias.shape == (3,) and fit.r2 > 0.9999
    gen = torch.Generator().manual_seed(5)  # held-out images: flat colours and noise, not the fit's smooth fields
    images = torch.rand(3, 3, 1, 32, 48, generator=gen) * 1.6 - 0.8
    with torch.no_grad():
        z = model.vae.encode(images).latent_dist.mode()[:, :, 0]
    torch.testing.assert_close(fit.project(z), F.avg_pool2d(images[:, :, 0], 8), atol=1e-4, rtol=0)


def test_the_fit_runs_on_a_real_cogvideox_vae_layout(tiny_models):
    fit = fit_latent_rgb(tiny_models["5b"])
    assert fit.factors.shape == (16, 3) and torch.isfinite(fit.factors).all() and torch.isfinite(fit.bias).all()
    latents = torch.randn(2, 16, 4, 6)  # [T, C, H, W] raw latent frames: one colour per latent pixel
    rgb = fit.project(latents)
    assert rgb.shape == (2, 3, 4, 6) and rgb.min() >= -1 and rgb.max() <= 1
    assert rearrange(rgb, "t c h w -> (t h w) c").std(0).gt(0).all()  # depends on the latent
