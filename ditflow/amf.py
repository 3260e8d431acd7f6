# SPDX-License-Identifier: Apache-2.0
"""Attention Motion Flow: per-patch displacements read from attention (DiTFlow §4.1–4.2, Eq. 3, 7, 8).

Public API:

- :func:`attention_motion_flow` — the AMF of one block's video-token queries and keys, hard (argmax, the
  reference) or soft (expectation, differentiable), shape ``[F·F, S, 2]``, streamed so that no ``[n, n]`` tensor
  exists in the forward or the backward.
- :func:`amf_loss` — Eq. 8, squared error between two AMFs over the entries where the reference moves.

Conventions (see ``ditflow/__init__``): tokens are ``idx = f·S + y·w + x`` with ``S = h·w``; displacements are
(dx, dy) in patch-grid units, x right, y down; the frame pair (i, j) — query frame i, key frame j — is row
``p = i·F + j`` of the result, all F² ordered pairs including i = j.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .config import GuidanceConfig
from .errors import DiTFlowError

if TYPE_CHECKING:  # shapes in signatures only; jaxtyping is not a runtime dependency
    from jaxtyping import Float

__all__ = ["DEFAULT_MAX_CHUNK_ELEMENTS", "amf_loss", "attention_motion_flow"]

#: Upper bound on the head-averaged logits held at once, in elements: one query frame (S rows) against
#: ``max(1, this // S²)`` key frames. 2²¹ (8 MiB fp32) is one key frame per chunk at 30×45 patches (S² = 1.82 M),
#: which keeps the workspace of a CogVideoX-5b soft-AMF forward+backward near 0.1 GB (see benchmarks/amf_memory.py).
DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 21


# ----------------------------------------------------------------------------------------------------------------
# One chunk: query frame i against key frames j0..j1-1 (Eq. 3, Eq. 7, hard argmax)
#
# From the paper: logits Q_i K_jᵀ/√d averaged over heads *before* the softmax, scaled by τ, softmax over the keys
# of frame j alone (Eq. 3), so every frame pair is independent of the others and key frames can be chunked freely.
# The head mean is one matmul of the heads-concatenated features, mean_h q_h·k_h = (q_flat·k_flat)/H with
# q_flat = [q_1 ‖ … ‖ q_H] of length H·d; the 1/(H·√d) and τ are folded into one scale.
# ----------------------------------------------------------------------------------------------------------------


def _flat_frames(x: Float[Tensor, "heads n d"], f0: int, f1: int, s: int) -> Float[Tensor, "m hd"]:
    """Frames f0..f1-1 of ``x`` as fp32 ``[(f1−f0)·S, H·d]``, heads concatenated; one copy (with the cast)."""
    heads, _, d = x.shape
    out = torch.empty((f1 - f0) * s, heads, d, dtype=torch.float32, device=x.device)
    out.copy_(x[:, f0 * s : f1 * s].transpose(0, 1))
    return out.view(-1, heads * d)


def _patch_coords(h: int, w: int, device: torch.device) -> Float[Tensor, "s 2"]:
    """(x, y) of every patch of an h×w grid, row-major with width fastest, fp32."""
    idx = torch.arange(h * w, device=device)
    return torch.stack((idx % w, idx // w), dim=-1).float()


def _soft_chunk(
    qf: Float[Tensor, "s hd"], kf: Float[Tensor, "cs hd"], coords: Float[Tensor, "s 2"], scale: float
) -> Float[Tensor, "s c 2"]:
    """Eq. 7 for one chunk: Σ_t A[s, j, t]·(coords_t − coords_s) = (A·coords)_s − coords_s, as rows of A sum to 1."""
    s = qf.shape[0]
    logits = (qf @ kf.T).mul_(scale)  # [S, c·S]; mm does not save its output, so the in-place scale is safe
    attn = logits.view(s, -1, s).softmax(dim=-1)  # A_ij: softmax over the keys of each frame j (Eq. 3)
    return attn @ coords - coords[:, None, :]


def _hard_chunk(qf: Float[Tensor, "s hd"], kf: Float[Tensor, "cs hd"], coords: Float[Tensor, "s 2"]) -> Tensor:
    """Displacement to the argmax key patch of each frame for one chunk, ``[S, c, 2]``; τ > 0 does not move it."""
    s = qf.shape[0]
    best = (qf @ kf.T).view(s, -1, s).argmax(dim=-1)  # [S, c]
    return coords[best] - coords[:, None, :]


def _chunks(num_frames: int, per_chunk: int) -> list[tuple[int, int]]:
    return [(j0, min(num_frames, j0 + per_chunk)) for j0 in range(0, num_frames, per_chunk)]


# ----------------------------------------------------------------------------------------------------------------
# Streaming with recomputation
#
# Differs from the authors' code: they materialise the logits of all heads, [heads, N, N] (59 GB fp32 for 5B at
# 49 frames), and let autograd keep them for the backward. Here the forward holds one chunk at a time and saves
# only q and k (references, no copies); the backward recomputes each chunk's logits and softmax and back-propagates
# through that chunk alone, adding its gradient straight into the chunk's slice of ∂q and ∂k.
# This is activation recomputation per chunk inside one autograd.Function rather than torch.utils.checkpoint:
# checkpointing each chunk on slices of q and k makes autograd build a full-size zero-filled gradient of q and of k
# for every slice, an extra [heads, n, d] tensor (0.2 GB fp32 at 5B, 49 frames) that breaks the memory target.
# The values equal the naive full-matrix computation to fp32 round-off (tests/test_amf.py checks values and
# gradients against tests/amf_reference.py).
# ----------------------------------------------------------------------------------------------------------------


class _StreamedSoftAMF(torch.autograd.Function):
    """Soft AMF (Eq. 3 + 7) over all frame pairs; forward and backward stream one chunk at a time."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, grid: tuple[int, int, int], scale: float, per_chunk: int) -> Tensor:
        num_frames, h, w = grid
        s = h * w
        coords = _patch_coords(h, w, q.device)
        chunks = _chunks(num_frames, per_chunk)
        out = torch.empty(num_frames, num_frames, s, 2, dtype=torch.float32, device=q.device)
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):  # fp32 even inside autocast
            k_all = _flat_frames(k, 0, num_frames, s) if len(chunks) == 1 else None  # small problems: cast once
            for i in range(num_frames):
                qf = _flat_frames(q, i, i + 1, s)
                for j0, j1 in chunks:
                    kf = k_all if k_all is not None else _flat_frames(k, j0, j1, s)
                    out[i, j0:j1] = _soft_chunk(qf, kf, coords, scale).transpose(0, 1)
        ctx.save_for_backward(q, k)
        ctx.grid, ctx.scale, ctx.per_chunk = grid, scale, per_chunk
        return out.view(num_frames * num_frames, s, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[:2]
        num_frames, h, w = ctx.grid
        s = h * w
        heads, _, d = q.shape
        coords = _patch_coords(h, w, q.device)
        grad_out = grad_out.float().reshape(num_frames, num_frames, s, 2)
        # ∂q and ∂k have q's and k's shape and dtype, as autograd's own would; ∂k sums over query frames in k's
        # dtype (as autograd accumulates), ∂q of each frame is summed over key chunks in fp32 and cast once.
        grad_q = torch.zeros_like(q) if need_q else None
        grad_k = torch.zeros_like(k) if need_k else None
        with torch.enable_grad(), torch.autocast(q.device.type, enabled=False):
            for i in range(num_frames):
                qf = _flat_frames(q, i, i + 1, s).requires_grad_(need_q)
                grad_qf = torch.zeros_like(qf) if need_q else None
                for j0, j1 in _chunks(num_frames, ctx.per_chunk):
                    kf = _flat_frames(k, j0, j1, s).requires_grad_(need_k)
                    disp = _soft_chunk(qf, kf, coords, ctx.scale)  # recomputed: [S, c, 2]
                    wrt = [t for t, need in ((qf, need_q), (kf, need_k)) if need]
                    grads = list(torch.autograd.grad(disp, wrt, grad_out[i, j0:j1].transpose(0, 1)))
                    if need_q:
                        grad_qf += grads.pop(0)
                    if need_k:
                        grad_k[:, j0 * s : j1 * s] += grads.pop(0).view(-1, heads, d).transpose(0, 1)
                    del disp, grads, kf
                if need_q:
                    grad_q[:, i * s : (i + 1) * s] = grad_qf.view(s, heads, d).transpose(0, 1)
        return grad_q, grad_k, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def _check_inputs(q: Tensor, k: Tensor, grid, temperature: float, max_chunk_elements: int) -> tuple[int, int, int]:
    if q.ndim != 3 or k.ndim != 3:
        raise DiTFlowError(
            f"AMF needs queries and keys of shape [heads, n, d], got {list(q.shape)} and {list(k.shape)}; "
            "pass one sample's video tokens."
        )
    if q.shape != k.shape:
        raise DiTFlowError(
            f"AMF queries {list(q.shape)} and keys {list(k.shape)} must have the same shape [heads, n, d]."
        )
    if not (q.is_floating_point() and k.is_floating_point()) or q.device != k.device:
        raise DiTFlowError(
            f"AMF needs floating-point queries and keys on one device, got {q.dtype} on {q.device} "
            f"and {k.dtype} on {k.device}."
        )
    if len(grid) != 3 or any(int(g) != g or g < 1 for g in grid):
        raise DiTFlowError(f"AMF grid must be three positive integers (F, h, w), got {tuple(grid)}.")
    num_frames, h, w = (int(g) for g in grid)
    if q.shape[1] != num_frames * h * w:
        raise DiTFlowError(
            f"AMF got {q.shape[1]} video tokens but the grid (F, h, w) = ({num_frames}, {h}, {w}) has "
            f"F·h·w = {num_frames * h * w}; pass the video tokens only (no text) and the run's own grid."
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise DiTFlowError(f"AMF temperature must be a finite number > 0, got {temperature}.")
    if max_chunk_elements < 1:
        raise DiTFlowError(f"max_chunk_elements must be at least 1, got {max_chunk_elements}.")
    return num_frames, h, w


def attention_motion_flow(
    q: Float[Tensor, "heads n d"],
    k: Float[Tensor, "heads n d"],
    grid: tuple[int, int, int],
    *,
    temperature: float = GuidanceConfig.temperature,
    hard: bool,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> Float[Tensor, "pairs s 2"]:
    """Attention Motion Flow of one block: a displacement per query patch for every ordered frame pair.

    For query frame i and key frame j, ``A_ij = softmax_j(τ · mean_heads(Q_i K_jᵀ / √d))`` (Eq. 3, softmax over
    the keys of frame j). ``hard=True`` gives the displacement to the argmax key patch, ``(x′ − x, y′ − y)``
    (the reference AMF, §4.1; computed under ``no_grad`` and returned without grad). ``hard=False`` gives the
    expected displacement ``Σ A_ij · (coords′ − coords)`` (Eq. 7), differentiable w.r.t. q and k. Computed in fp32
    whatever the input dtype (autocast is switched off inside); memory is one chunk of ``[S, c·S]`` logits plus
    fp32 copies of the frames in it, never ``[n, n]``, in the forward and in the backward.

    Args:
        q: video-token queries of one sample at one block, after QK-LayerNorm and RoPE (text tokens removed);
            tokens ``idx = f·S + y·w + x``.
        k: the matching keys, same shape.
        grid: (F, h, w) token grid, ``n = F·h·w`` and ``S = h·w``.
        temperature: τ multiplying the head-averaged logits (default: :attr:`GuidanceConfig.temperature`);
            irrelevant to the hard AMF.
        hard: argmax (reference) or soft-argmax (generated) displacements.
        max_chunk_elements: logits held at once; a chunk is one query frame against ``max(1, this // S²)`` key
            frames. Only memory and speed depend on it (see :data:`DEFAULT_MAX_CHUNK_ELEMENTS`).
    Returns:
        fp32 ``[F·F, S, 2]``: row ``p = i·F + j`` holds (dx, dy) per query patch of frame i, in patch-grid units,
        x right, y down.
    Raises:
        DiTFlowError: if q and k differ in shape or are not ``[heads, n, d]``, if ``n ≠ F·h·w`` (the message gives
            both), or if τ or ``max_chunk_elements`` is out of range.
    """
    num_frames, h, w = _check_inputs(q, k, grid, temperature, max_chunk_elements)
    heads, _, d = q.shape
    s = h * w
    per_chunk = min(num_frames, max(1, max_chunk_elements // (s * s)))
    if not hard:
        scale = temperature / (heads * math.sqrt(d))  # τ · mean over heads · 1/√d
        return _StreamedSoftAMF.apply(q, k, (num_frames, h, w), scale, per_chunk)

    coords = _patch_coords(h, w, q.device)
    chunks = _chunks(num_frames, per_chunk)
    out = torch.empty(num_frames, num_frames, s, 2, dtype=torch.float32, device=q.device)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        k_all = _flat_frames(k, 0, num_frames, s) if len(chunks) == 1 else None
        for i in range(num_frames):
            qf = _flat_frames(q, i, i + 1, s)
            for j0, j1 in chunks:
                kf = k_all if k_all is not None else _flat_frames(k, j0, j1, s)
                out[i, j0:j1] = _hard_chunk(qf, kf, coords).transpose(0, 1)
    return out.view(num_frames * num_frames, s, 2)


# ----------------------------------------------------------------------------------------------------------------
# Eq. 8 loss
#
# From the paper and the authors' code: the squared error is averaged only over entries whose reference
# displacement is non-zero, which drops every i = j pair and every static patch. Where nothing moves we raise
# instead of dividing by zero.
# ----------------------------------------------------------------------------------------------------------------


def amf_loss(
    reference: Float[Tensor, "pairs s 2"], generated: Float[Tensor, "pairs s 2"], *, masked: bool = True
) -> Float[Tensor, ""]:
    """AMF loss (Eq. 8): mean over the reference's moving entries (or all entries) of the squared endpoint error.

    An entry is a (pair, patch); it is *moving* when its reference vector (dx, dy) is not (0, 0). The loss is
    ``Σ_moving ((gx − rx)² + (gy − ry)²) / #moving``: summed over the two components, averaged over the moving
    entries (so twice the per-component mean the authors' ``F.mse_loss`` gives; Adam does not see the factor).
    Computed in fp32; differentiable w.r.t. ``generated``.

    Args:
        reference: AMF of the reference video (:func:`attention_motion_flow`, hard by default).
        generated: soft AMF of the current latent at the same block, same grid.
        masked: average over moving entries (paper, :attr:`GuidanceConfig.masked_loss`); ``False`` averages over
            every entry (the authors' ``threshloss`` ablation).
    Returns:
        fp32 scalar.
    Raises:
        DiTFlowError: if the shapes differ or are not ``[pairs, s, 2]`` (the message gives both), or if the
            reference has no moving entry (masked only).
    """
    if reference.shape != generated.shape or reference.ndim != 3 or reference.shape[-1] != 2:
        raise DiTFlowError(
            f"AMF shapes must be equal and [pairs, s, 2], got reference {list(reference.shape)} and generated "
            f"{list(generated.shape)}; extract both at the same block from clips of the same frames and size."
        )
    err = (generated.float() - reference.float()).square().sum(dim=-1)  # [pairs, s]
    if not masked:
        return err.mean()
    moving = reference.detach().ne(0).any(dim=-1)  # [pairs, s]
    count = int(moving.sum())
    if count == 0:
        raise DiTFlowError(
            "the reference shows no motion at this block (every AMF displacement is zero), so the motion loss is "
            "undefined; try another guidance block, temperature or reference clip."
        )
    return torch.where(moving, err, torch.zeros_like(err)).sum() / count
