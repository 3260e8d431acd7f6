# SPDX-License-Identifier: Apache-2.0
"""Naive full-matrix Attention Motion Flow (DiTFlow Eq. 3, 7, 8): the ground truth for ``ditflow.amf``.

Written to be obviously right, not fast: it materialises every head's logits ``[heads, n, n]`` as the authors'
code does, so it needs about ``2·heads·n²`` floats for a forward+backward (benchmarks/amf_memory.py uses it as
the baseline). It shares no code with ``ditflow/amf.py``: the head mean is taken after per-head logits, the hard
displacement is the argmax of the softmax, and the soft one sums ``A · (coords′ − coords)`` term by term.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def naive_attention_motion_flow(q: Tensor, k: Tensor, grid: tuple[int, int, int], *, temperature: float = 2.0,
                                hard: bool) -> Tensor:
    """AMF ``[F·F, S, 2]`` (row i·F + j, (dx, dy) in patches) of queries/keys ``[heads, n, d]``, in fp32."""
    num_frames, h, w = grid
    heads, n, d = q.shape
    s = h * w
    assert n == num_frames * s and k.shape == q.shape

    logits = torch.einsum("hnd,hmd->hnm", q.float(), k.float()) / math.sqrt(d)  # [heads, n, n]
    logits = logits.mean(dim=0)  # averaged over heads before the softmax
    # A[i, s, j, t]: query patch s of frame i attending to key patch t of frame j, softmax over t (Eq. 3).
    attn = torch.softmax(temperature * logits.view(num_frames, s, num_frames, s), dim=-1)

    device = q.device  # every tensor made here lives with q and k (the CUDA benchmark once mixed in CPU ones)
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    coords = torch.stack([xs.flatten(), ys.flatten()], dim=-1).float()  # [S, 2] as (x, y)
    offsets = coords[None, :, :] - coords[:, None, :]  # offsets[s, t] = coords[t] − coords[s]

    if hard:
        best = attn.argmax(dim=-1)  # [F, S, F]
        disp = offsets[torch.arange(s, device=device)[None, :, None], best]  # [F, S, F, 2]
    else:
        disp = torch.einsum("isjt,stc->isjc", attn, offsets)  # Eq. 7
    return disp.permute(0, 2, 1, 3).reshape(num_frames * num_frames, s, 2)


def naive_amf_loss(reference: Tensor, generated: Tensor, masked: bool = True) -> Tensor:
    """Eq. 8: mean over (pair, patch) entries with a non-zero reference vector (all entries if not ``masked``) of the
    summed squared error."""
    moving = (reference != 0).any(dim=-1) if masked else torch.ones(reference.shape[:-1], dtype=torch.bool)
    return ((generated[moving] - reference[moving]) ** 2).sum(dim=-1).mean()
