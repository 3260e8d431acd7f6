# SPDX-License-Identifier: Apache-2.0
"""The paper's App. D sanity experiment through a real diffusers CogVideoX block: a known shift is recovered.

A first frame of distinct per-patch features is shifted by a known (dx, dy) patches per frame (new content enters
at the edge). With structured weights — the same projection for Q and K, identity modulation — the attention of a
real ``CogVideoXBlock`` (QK LayerNorm and, for 5B, RoPE included) matches each patch to where its content went, so
the hard AMF must point along the shift. The paper reports mean cosine 0.857 (2B) / 0.734 (5B) with real weights
(0.5 = random); with these structured weights we require ≥ 0.9 (measured: 0.995–1.000).

Sizes: F = 4 latent frames on a 6×8 patch grid (S = 48, n = 192), 2 heads × 32.
"""

from __future__ import annotations

import types

import pytest
import torch

from ditflow.amf import attention_motion_flow
from ditflow.attention import AttentionController, StopForward
from ditflow.backbones.cogvideox.attention import controlled_attention
from ditflow.backbones.cogvideox.positions import rope_tables

F, H, W = 4, 6, 8
HEADS, HEAD_DIM = 2, 32
DIM = HEADS * HEAD_DIM


def _shifted_video(dx: int, dy: int, seed: int = 0) -> torch.Tensor:
    """Tokens ``[1, F·H·W, DIM]``: frame f shows frame 0 moved by (f·dx, f·dy) patches; fresh content enters."""
    g = torch.Generator().manual_seed(seed)
    pad = F * max(abs(dx), abs(dy))
    canvas = torch.randn(H + 2 * pad, W + 2 * pad, DIM, generator=g)  # content beyond the frame, to move in
    frames = []
    for f in range(F):
        y0, x0 = pad - f * dy, pad - f * dx  # content at (x, y) in frame f came from (x − f·dx, y − f·dy)
        frames.append(canvas[y0 : y0 + H, x0 : x0 + W])
    return torch.stack(frames).reshape(1, F * H * W, DIM)


def _structured_block():
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    torch.manual_seed(0)
    block = CogVideoXBlock(dim=DIM, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, time_embed_dim=16)
    with torch.no_grad():
        block.norm1.linear.weight.zero_()  # no timestep modulation: norm1 is a plain LayerNorm
        block.norm1.linear.bias.zero_()
        proj = torch.linalg.qr(torch.randn(DIM, DIM))[0] * DIM**0.5
        block.attn1.to_q.weight.copy_(proj)  # the same projection for Q and K
        block.attn1.to_k.weight.copy_(proj)
        for lin in (block.attn1.to_q, block.attn1.to_k):
            if lin.bias is not None:
                lin.bias.zero_()
    block.requires_grad_(False)
    return block


@pytest.mark.parametrize("rope", [False, True], ids=["sincos-2b-style", "rope-5b-style"])
@pytest.mark.parametrize("dx,dy", [(1, 0), (0, 1), (-1, 1)])
def test_hard_amf_through_a_cogvideox_block_points_along_a_known_shift(rope, dx, dy):
    block = _structured_block()
    video = _shifted_video(dx, dy)
    text = torch.zeros(1, 4, DIM)
    temb = torch.zeros(1, 16)
    tables = None
    if rope:
        tables = rope_tables({"sample_width": 2 * W, "sample_height": 2 * H, "patch_size": 2,
                              "attention_head_dim": HEAD_DIM}, (F, H, W))
    controller = AttentionController(capture_blocks=frozenset({0}), stop_block=0)
    holder = types.SimpleNamespace(transformer_blocks=[block])
    with controlled_attention(holder, controller), torch.no_grad(), pytest.raises(StopForward):
        block(video, text, temb, tables)  # stops right after Q/K: nothing else of the block runs
    q, k = controller.captured[0]
    amf = attention_motion_flow(q[0], k[0], (F, H, W), hard=True).reshape(F, F, H, W, 2)

    cosines = []
    for i in range(F):
        for j in range(F):
            if i == j:
                continue
            true = torch.tensor([(j - i) * dx, (j - i) * dy], dtype=torch.float32)
            ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
            inside = (xs + true[0] >= 0) & (xs + true[0] < W) & (ys + true[1] >= 0) & (ys + true[1] < H)
            vec = amf[i, j][inside]
            cos = (vec @ true) / (vec.norm(dim=-1) * true.norm()).clamp_min(1e-12)
            cosines.append(cos)
    mean_cos = torch.cat(cosines).mean().item()
    assert mean_cos >= 0.9, f"mean cosine {mean_cos:.3f} with the true direction ({dx}, {dy})"
