# SPDX-License-Identifier: Apache-2.0
"""The reference video's side of DiTFlow: VAE encode/decode and the reference AMF (§4.1–4.2, Alg. 1 line 1).

For the baselines' losses (MOFT/SMM, :mod:`ditflow.losses`) the same reference pass records the guidance blocks'
output features instead of Q/K; only what the chosen loss reads is computed.

Differs from the authors' script (method.md §6): the reference is encoded deterministically (posterior mean, or
a seeded sample), the AMF grid is the run's own (no hard-coded 6×30×45), and the AMF pass is skipped entirely
when no guidance needs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor

from .amf import attention_motion_flow
from .attention import AttentionController, controlled_attention
from .config import Loss, check_blocks
from .errors import DiTFlowError, check_finite
from .forward import forward_until
from .layout import SPATIAL_COMPRESSION, video_frames
from .limits import FLOAT_BYTES, require
from .losses import video_features
from .positions import owned_sincos, rope_tables, sincos_table
from .text import encode_prompt

# ---------------------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------------------

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


def check_decode_fits(num_latent_frames: int, latent_height: int, latent_width: int) -> None:
    """Refuses, before any work, a video whose decoded frames (float32, on the CPU) cannot fit in memory."""
    frames = video_frames(num_latent_frames)
    height, width = latent_height * SPATIAL_COMPRESSION, latent_width * SPATIAL_COMPRESSION
    require(frames * 3 * height * width * FLOAT_BYTES, f"decoding {frames} frames of {width}×{height} px",
            "use a smaller size or fewer frames")


@torch.no_grad()
def decode_latents(model, latents: Tensor, *, tiling: bool | None = None, slicing: bool | None = None) -> Tensor:
    """Scaled latents ``[1, f, C, h, w]`` → frames ``[4(f−1)+1, 3, 8h, 8w]`` in [-1, 1], float32 on the CPU.

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
    check_decode_fits(latents.shape[1], latents.shape[-2], latents.shape[-1])
    z = rearrange(latents.to(device, dtype) / scale, "b f c h w -> b c f h w")
    with torch.inference_mode(False), vae_memory(vae, tiling, slicing):
        video = vae.decode(z).sample  # [1, 3, F, H, W]
    check_finite(video, "the decoded video", _VAE_FIX, limit=None)
    return rearrange(video[0], "c f h w -> f c h w").float().clamp(-1, 1).cpu()


# ---------------------------------------------------------------------------------------------------------------------
# Reference AMF
# ---------------------------------------------------------------------------------------------------------------------

_MODEL_FIX = ("the transformer turns finite inputs into NaN/Inf: its weights are damaged (re-download or re-convert "
              "transformer/) or its dtype overflows (with fp16 try bf16 or fp32)")


@dataclass
class ReferenceMotion:
    """What guidance needs from the reference video.

    Attributes:
        amf: guidance block → hard reference AMF ``[F², S, 2]``, (dx, dy) in patch-grid units; pair ``i·F + j``.
        grid: token grid (F, h, w) of the reference latents.
        temperature: τ used for the reference (the generated AMF uses the same).
        latents: the scaled reference latents ``[1, F, C, H, W]``, kept for KV injection (noised per step);
            ``None`` for a target made without a video (:mod:`ditflow.motion_target`): no KV injection then.
        features: guidance block → block-output video features ``[F, C, h, w]`` (float32, CPU), for the MOFT/SMM
            losses; empty when the reference was extracted for AMF.
    """

    amf: dict[int, Tensor]
    grid: tuple[int, int, int]
    temperature: float
    latents: Tensor | None
    features: dict[int, Tensor] = field(default_factory=dict)

    @property
    def blocks(self) -> tuple[int, ...]:
        """Blocks the reference was extracted at (its AMF's, else its features')."""
        return tuple(sorted(self.amf or self.features))

    def has(self, loss: Loss | str) -> bool:
        """Whether this reference holds what ``loss`` compares against (AMF, or block-output features)."""
        return bool(self.features if Loss.parse(loss).uses_features else self.amf)


def reference_without_amf(model, latents: Tensor) -> ReferenceMotion:
    """A reference that serves KV injection only (modes ``none``): no AMF pass is run for it."""
    return ReferenceMotion(amf={}, grid=latent_grid(model, latents), temperature=0.0, latents=latents.detach().cpu())


def latent_grid(model, latents: Tensor) -> tuple[int, int, int]:
    """(F, h, w) token grid of scaled latents ``[B, F, C, H, W]``; raises if H or W is odd (not whole patches)."""
    if latents.ndim != 5:
        raise DiTFlowError(f"expected latents of shape [B, F, C, H, W], got {list(latents.shape)}.")
    _, frames, _, height, width = latents.shape
    p = model.patch_size
    if height % p or width % p:
        raise DiTFlowError(f"latent size {height}×{width} is not a multiple of the patch size {p}; use 16-px multiples.")
    return frames, height // p, width // p


def capture_qk(
    model, latents: Tensor, text_embeds: Tensor, timestep: Tensor, blocks, controller_kwargs=None, **forward_kwargs
) -> dict[int, tuple[Tensor, Tensor]]:
    """One truncated pass that returns block → (q, k) of the video tokens, each ``[B, heads, n, head_dim]``."""
    controller = AttentionController(capture_blocks=frozenset(blocks), stop_block=max(blocks), **(controller_kwargs or {}))
    with controlled_attention(model.transformer, controller):
        forward_until(model.transformer, controller, latents, text_embeds, timestep, **forward_kwargs)
    return controller.captured


def capture_outputs(
    model, latents: Tensor, text_embeds: Tensor, timestep: Tensor, blocks, **forward_kwargs
) -> dict[int, Tensor]:
    """One pass up to the deepest of ``blocks`` that returns block → video output hidden states ``[B, n, D]``."""
    controller = AttentionController(capture_outputs=frozenset(blocks))
    with controlled_attention(model.transformer, controller):
        forward_until(model.transformer, controller, latents, text_embeds, timestep, **forward_kwargs)
    return controller.outputs


@torch.no_grad()
def extract_reference(
    model, latents: Tensor, blocks, *, temperature: float = 2.0, loss: Loss | str = Loss.AMF,
    empty_prompt: Tensor | None = None,
) -> ReferenceMotion:
    """Reference motion at ``blocks``: one pass at timestep 0 with the empty prompt, no CFG (§4.2).

    For ``loss="amf"`` the pass stops after the deepest block's Q/K and keeps the hard AMF; for ``"moft"`` /
    ``"smm"`` it stops after the deepest block's output and keeps the block-output features. Nothing else is run.

    Args:
        latents: scaled reference latents ``[1, F, C, H, W]`` from :func:`encode_video`.
        blocks: guidance block indices (see :class:`~ditflow.config.GuidanceConfig`).
        temperature: τ (Eq. 3); recorded but unused by the feature losses.
        loss: the guidance loss the reference is for (:class:`~ditflow.config.Loss`).
        empty_prompt: T5 embedding of the empty prompt ``[1, L, D_text]``; encoded here (text encoder needed)
            when not given.
    Raises:
        DiTFlowError: a block out of range, latents of the wrong shape, or NaN/Inf in the pass (damaged weights).
    """
    loss = Loss.parse(loss)
    blocks = check_blocks(blocks, model.num_blocks)
    if not blocks:
        raise DiTFlowError("at least one guidance block is needed to extract the reference motion.")
    grid = latent_grid(model, latents)
    transformer = model.transformer
    device, dtype = transformer.device, transformer.dtype
    if empty_prompt is None:
        empty_prompt = encode_prompt(model, "").cond
    empty = empty_prompt.to(device, dtype)
    with torch.inference_mode(False):
        z = latents.to(device, dtype).clone()
        rope = rope_tables(transformer, grid, device) if model.family == "5b" else None
        table = sincos_table(transformer, grid).to(device) if model.family == "2b" else None
        t0 = torch.zeros(1, device=device, dtype=torch.long)
        amf, features = {}, {}
        with owned_sincos(transformer, lambda: table):
            if loss.uses_features:
                outs = capture_outputs(model, z, empty, t0, blocks, image_rotary_emb=rope)
                for b, h in outs.items():
                    check_finite(h, f"the reference pass's output of block {b}", _MODEL_FIX, limit=None)
                features = {b: video_features(h, grid).float().cpu() for b, h in outs.items()}
            else:
                qk = capture_qk(model, z, empty, t0, blocks, image_rotary_emb=rope)
                for b, (q, k) in qk.items():
                    for name, values in (("queries", q), ("keys", k)):
                        check_finite(values, f"the reference pass's attention {name} at block {b}", _MODEL_FIX,
                                     limit=None)
                amf = {b: attention_motion_flow(q[0], k[0], grid, temperature=temperature, hard=True).cpu()
                       for b, (q, k) in qk.items()}
    return ReferenceMotion(amf=amf, grid=grid, temperature=temperature, latents=latents.detach().cpu(), features=features)
