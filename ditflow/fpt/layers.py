# SPDX-License-Identifier: Apache-2.0
"""Building blocks of the Flow Poke Transformer (Baumann et al., *What If*, ICCV 2025, §3.2; arXiv 2510.12777).

Positions are (x, y) in [0, 1]² and flows are in the same units (see the conventions in ``ditflow/fpt/__init__``).

# ------------------------------------------------------------------------------------------------------------------
# What the blocks are
# A Llama-style transformer with HDiT's changes (Crowson et al., ICML 2024): no biases, RMSNorm made adaptive to a
# condition (here: whether the camera is static), SwiGLU, cosine-similarity attention with a learned scale per
# head, and axial 2-D RoPE on (x, y). Each block attends to the other tokens, then to the image's DINOv2 features
# (both with RoPE), then runs its feed-forward.
#
# Where this differs from the authors' code, and why
# - The token stream has one structure, so it is computed directly instead of through a general attention mask
#   (the authors use flex attention with a block mask, which needs torch.compile): pokes attend causally to the
#   pokes before them, and every query attends to all pokes and to itself, never to other queries. Queries are
#   therefore independent, which lets predictions run in chunks of any size against a cache of the pokes' keys
#   and values (:class:`KVCache`), with memory linear in the number of queries. Same numbers, to fp32 round-off.
# - The cross-attention has no output projection. The authors' layer defines one (``cross_out``) that their forward
#   never applies; the weights were trained without it, so it is left out here and dropped by the converter.
# - The cache holds keys and values in the compute dtype (the authors' is bfloat16, which only works under
#   bfloat16 autocast) and also keeps the projected image keys and values, which do not change between steps.
# ------------------------------------------------------------------------------------------------------------------
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


# ------------------------------------------------------------------------------------------------------------------
# Axial RoPE on (x, y)
# HDiT's 2-D RoPE: per head, rotated pairs (i, i + head_dim/2); the first quarter of the head's dimensions turns
# with y and the second with x, at log-spaced frequencies from π to 10π. Angles are taken of 2·pos − 1, i.e. in
# HDiT's [-1, 1]² frame, although positions are passed in [0, 1]².
# ------------------------------------------------------------------------------------------------------------------


class AxialRoPE(nn.Module):
    """Rotation angles ``[b, heads, l, head_dim/2]`` of positions ``[b, l, 2]`` (x, y in [0, 1]²)."""

    def __init__(self, head_dim: int, heads: int):
        super().__init__()
        n = head_dim // 4
        freqs = torch.linspace(math.log(math.pi), math.log(10 * math.pi), heads * n + 1)[:-1].exp()
        # [axis (x, y), head, frequency]; frequency f of head h is freqs[f·heads + h]; loaded from checkpoints
        self.register_buffer("freqs", freqs.view(n, heads).T.contiguous().expand(2, heads, n).clone())

    def forward(self, pos: Tensor) -> Tensor:
        centred = pos.float().mul(2).sub(1)  # back to HDiT's [-1, 1]²
        angle_x = centred[..., None, 0:1] * self.freqs[0].float()
        angle_y = centred[..., None, 1:2] * self.freqs[1].float()
        return rearrange(torch.cat([angle_y, angle_x], dim=-1), "b l h f -> b h l f")


def rotate(x: Tensor, angles: Tensor) -> Tensor:
    """Applies RoPE: ``x`` ``[b, h, l, e]``, ``angles`` ``[b, h, l, f]`` with ``2f ≤ e``; computed in fp32."""
    f = angles.shape[-1]
    x1, x2 = x[..., :f].float(), x[..., f : 2 * f].float()
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([(x1 * cos - x2 * sin).to(x.dtype), (x2 * cos + x1 * sin).to(x.dtype), x[..., 2 * f :]], -1)


def cosine_scale(x: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """Normalises queries or keys ``[b, h, l, e]`` to length √|scale| per head, so that ``q·k = |scale|·cos(q, k)``
    (HDiT's cosine-similarity attention)."""
    factor = (scale.float().abs() + eps).sqrt()[:, None, None] * torch.rsqrt(x.float().square().sum(-1, True) + eps)
    return x * factor.to(x.dtype)


# ------------------------------------------------------------------------------------------------------------------
# Attention over the poke/query token stream, and the cache
# ------------------------------------------------------------------------------------------------------------------


class KVCache:
    """Per block: keys and values of the pokes seen so far, and of the image features (``[b, heads, n, e]``).

    Poke entries grow as pokes are appended (autoregressive sampling appends each sampled query as a poke);
    storage is allocated for ``capacity`` pokes at first use. Image entries are computed once per cache.
    """

    def __init__(self, blocks: int, capacity: int):
        self.capacity = capacity
        self.length = 0  # pokes held
        self._keys: list[Tensor | None] = [None] * blocks
        self._values: list[Tensor | None] = [None] * blocks
        self.image: list[tuple[Tensor, Tensor] | None] = [None] * blocks

    def pokes(self, block: int) -> tuple[Tensor, Tensor] | None:
        if self._keys[block] is None:
            return None
        return self._keys[block][:, :, : self.length], self._values[block][:, :, : self.length]

    def write(self, block: int, keys: Tensor, values: Tensor) -> None:
        """Stores new pokes' keys and values after the current ones (``length`` advances in :meth:`commit`)."""
        n = keys.shape[2]
        if self.length + n > self.capacity:
            raise ValueError(f"KV cache for {self.capacity} pokes cannot take {self.length + n}")
        if self._keys[block] is None:
            shape = (keys.shape[0], keys.shape[1], self.capacity, keys.shape[3])
            self._keys[block] = keys.new_empty(shape)
            self._values[block] = values.new_empty(shape)
        self._keys[block][:, :, self.length : self.length + n] = keys
        self._values[block][:, :, self.length : self.length + n] = values

    def commit(self, n: int) -> None:
        self.length += n


def poke_query_attention(
    q: Tensor, k: Tensor, v: Tensor, n_queries: int, past: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Attention of the FPT token stream (unit scale; ``q``, ``k`` already cosine-scaled and rotated).

    Args:
        q, k, v: ``[b, h, l, e]`` for the new tokens: ``l − n_queries`` pokes, then ``n_queries`` queries.
        past: keys and values ``[b, h, m, e]`` of earlier pokes, or None.
    Returns:
        ``[b, h, l, e]``. Poke i sees the earlier pokes and itself; each query sees every poke and itself.
    """
    n_pokes = q.shape[2] - n_queries
    keys, values = k[:, :, :n_pokes], v[:, :, :n_pokes]
    if past is not None:
        keys, values = torch.cat([past[0], keys], dim=2), torch.cat([past[1], values], dim=2)
    m = keys.shape[2] - n_pokes
    out = []
    if n_pokes:
        rows = torch.arange(n_pokes, device=q.device)[:, None] + m
        causal = torch.arange(m + n_pokes, device=q.device)[None, :] <= rows
        out.append(F.scaled_dot_product_attention(q[:, :, :n_pokes], keys, values, attn_mask=causal, scale=1.0))
    if n_queries:
        qq, kq, vq = q[:, :, n_pokes:], k[:, :, n_pokes:], v[:, :, n_pokes:]
        scores = torch.cat([qq.float() @ keys.float().transpose(-1, -2), (qq.float() * kq.float()).sum(-1, True)], -1)
        weights = scores.softmax(dim=-1)
        mixed = weights[..., :-1] @ values.float() + weights[..., -1:] * vq.float()
        out.append(mixed.to(q.dtype))
    return torch.cat(out, dim=2)


# ------------------------------------------------------------------------------------------------------------------
# Transformer block
# ------------------------------------------------------------------------------------------------------------------


class AdaRMSNorm(nn.Module):
    """RMSNorm without weight, scaled by ``1 + Linear(cond)`` (HDiT's adaptive norm); cond ``[b, width]``."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.cond = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * (1 + self.cond(cond)[:, None, :])


class Block(nn.Module):
    """Self-attention over pokes and queries, cross-attention to the image, SwiGLU; each pre-normed, residual."""

    def __init__(self, width: int, image_dim: int, head_dim: int, ff_expand: int):
        super().__init__()
        self.head_dim = head_dim
        heads = width // head_dim
        self.self_norm = AdaRMSNorm(width)
        self.self_qkv = nn.Linear(width, 3 * width, bias=False)
        self.self_out = nn.Linear(width, width, bias=False)
        self.self_scale = nn.Parameter(torch.full([heads], 10.0))
        self.cross_norm = AdaRMSNorm(width)
        self.cross_q = nn.Linear(width, width, bias=False)
        self.cross_kv = nn.Linear(image_dim, 2 * width, bias=False)
        # no output projection after cross-attention: the authors' model has one (cross_out) but its forward never
        # applies it, so the released weights were trained without it (the converter drops that tensor)
        self.cross_scale = nn.Parameter(torch.full([heads], 10.0))
        self.ffn_norm = AdaRMSNorm(width)
        self.ffn_up = nn.Linear(width, 2 * ff_expand * width, bias=False)  # value half, then gate half
        self.ffn_down = nn.Linear(ff_expand * width, width, bias=False)

    def _heads(self, x: Tensor, parts: int) -> Tensor:
        return rearrange(x, "b l (t h e) -> t b h l e", t=parts, e=self.head_dim)

    def attend_tokens(self, x: Tensor, angles: Tensor, n_queries: int, cache: KVCache | None, index: int) -> Tensor:
        q, k, v = self._heads(self.self_qkv(x), 3)
        q = rotate(cosine_scale(q, self.self_scale), angles)
        k = rotate(cosine_scale(k, self.self_scale), angles)
        past = cache.pokes(index) if cache is not None else None
        out = poke_query_attention(q, k, v, n_queries, past)
        n_pokes = x.shape[1] - n_queries
        if cache is not None and n_pokes:
            cache.write(index, k[:, :, :n_pokes], v[:, :, :n_pokes])
        return self.self_out(rearrange(out, "b h l e -> b l (h e)"))

    def image_kv(self, image: Tensor, image_angles: Tensor) -> tuple[Tensor, Tensor]:
        """Keys (scaled, rotated) and values ``[b, h, cells, e]`` of the image features ``[b, cells, d]``."""
        k, v = self._heads(self.cross_kv(image), 2)
        return rotate(cosine_scale(k, self.cross_scale), image_angles), v

    def attend_image(self, x: Tensor, angles: Tensor, image_kv: tuple[Tensor, Tensor]) -> Tensor:
        q = rotate(cosine_scale(self._heads(self.cross_q(x), 1)[0], self.cross_scale), angles)
        out = F.scaled_dot_product_attention(q, *image_kv, scale=1.0)
        return rearrange(out, "b h l e -> b l (h e)")

    def feed_forward(self, x: Tensor) -> Tensor:
        value, gate = self.ffn_up(x).chunk(2, dim=-1)
        return self.ffn_down(value * F.silu(gate))

    def forward(self, x: Tensor, cond: Tensor, angles: Tensor, n_queries: int, image_kv: tuple[Tensor, Tensor],
                cache: KVCache | None = None, index: int = 0) -> Tensor:
        """x ``[b, l, width]`` (pokes, then ``n_queries`` queries); cond ``[b, width]``; angles ``[b, h, l, f]``."""
        x = x + self.attend_tokens(self.self_norm(x, cond), angles, n_queries, cache, index)
        x = x + self.attend_image(self.cross_norm(x, cond), angles, image_kv)
        return x + self.feed_forward(self.ffn_norm(x, cond))


# ------------------------------------------------------------------------------------------------------------------
# Input and output MLPs
# The input MLP embeds each token from two parts: the flow of a poke as Fourier features (squashed by tanh so that
# large flows do not wrap around), or a learned token for a query; and the image features at the token's position
# (bilinear). The output MLP maps each query to the mixture parameters (ditflow.fpt.mixture).
# ------------------------------------------------------------------------------------------------------------------


class ResidualMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.RMSNorm(width)  # eps: the dtype's machine epsilon, as trained
        self.fc1 = nn.Linear(width, width, bias=False)
        self.fc2 = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.silu(self.fc1(self.norm(x.to(self.norm.weight.dtype)))))  # fp32 norm under autocast


class TokenEmbedding(nn.Module):
    """Pokes and queries → tokens ``[b, l, width]`` (input MLP)."""

    def __init__(self, width: int, image_dim: int, depth: int, flow_prescale: float):
        super().__init__()
        self.flow_prescale = flow_prescale
        self.query_token = nn.Parameter(torch.zeros(1, 1, 2 * width))
        # 2π·k, k = 1 … width/2: the Fourier frequencies of the squashed flow in [0, 1]; loaded from checkpoints
        self.register_buffer("frequencies", 2 * math.pi * torch.arange(1, width // 2 + 1, dtype=torch.float32))
        self.proj = nn.Linear(2 * width + image_dim, width, bias=False)
        self.blocks = nn.ModuleList([ResidualMLP(width) for _ in range(depth)])

    def forward(self, pos: Tensor, flow: Tensor, n_queries: int, features: Tensor) -> Tensor:
        """pos, flow ``[b, l, 2]`` (the last ``n_queries`` tokens are queries; their flow is ignored);
        features ``[b, d, h, w]``."""
        squashed = flow.float().mul(self.flow_prescale).tanh().add(1).div(2)  # ±1/prescale → [0, 1]
        phase = squashed[..., None] * self.frequencies
        fourier = rearrange(torch.stack([phase.sin(), phase.cos()], dim=-2), "b l d sc n -> b l (d sc n)")
        is_query = torch.arange(pos.shape[1], device=pos.device) >= pos.shape[1] - n_queries
        flow_emb = torch.where(is_query[None, :, None], self.query_token.float(), fourier)
        # Features at each position; grid_sample expects [-1, 1]². The trained model samples with
        # align_corners=True: positions 0 and 1 land on the centres of the outer feature cells (the RoPE positions
        # put cell centres at (i + 0.5) / w instead); kept, since the weights were trained so.
        sampled = F.grid_sample(features.float(), pos.float()[:, :, None, :].mul(2).sub(1), mode="bilinear",
                                padding_mode="border", align_corners=True)
        x = torch.cat([flow_emb, rearrange(sampled, "b d l 1 -> b l d")], dim=-1).to(self.proj.weight.dtype)
        x = self.proj(x)
        for block in self.blocks:
            x = block(x)
        return x


class OutputMLP(nn.Module):
    """Tokens ``[b, l, width]`` → ``[b, l, components · 6]`` raw mixture parameters (see ditflow.fpt.mixture)."""

    def __init__(self, width: int, out: int, depth: int):
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.hidden = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.out = nn.Linear(width, out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x.to(self.norm.weight.dtype))
        for layer in self.hidden:
            x = F.silu(layer(x))
        return self.out(x)


__all__ = ["AxialRoPE", "Block", "KVCache", "OutputMLP", "TokenEmbedding", "poke_query_attention"]
