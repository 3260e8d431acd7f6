# SPDX-License-Identifier: Apache-2.0
"""The stock diffusers CogVideoX as an oracle for the method's passes: nothing here imports ``ditflow.attention``,
``ditflow.backbones`` (the hooks under test).

- Positions come from diffusers' own pipeline (RoPE) and patch embedding (2B sin-cos).
- KV injection is done on the **stock** attention processor with module hooks: the reference pass's video K
  (after QK-LayerNorm, before RoPE) and V replace the generated ones at ``norm_k``'s and ``to_v``'s outputs, in every
  batch row. With stock positions on both sides, RoPE then turns them into exactly the post-RoPE reference K the
  method injects (DiTFlow §3 "KV injection").
- Q/K for the AMF are read at ``norm_q``/``norm_k`` and RoPE is applied here with diffusers' ``apply_rotary_emb``;
  the full model runs (no early exit, no checkpointing).
- For trainable RoPE with separate Q and K tables (DiTFlow-ρ_t on 5B), which the stock processor cannot express,
  :class:`SeparateRopeProcessor` is the stock processor's computation written out plainly with two tables.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor


def pipeline(model):
    from diffusers import CogVideoXPipeline

    return CogVideoXPipeline(model.tokenizer, model.text_encoder, model.vae, model.transformer, model.make_scheduler())


def stock_rope(model, grid) -> tuple[Tensor, Tensor] | None:
    """diffusers' pipeline RoPE (cos, sin) for ``grid = (F, h, w)``; ``None`` on 2B."""
    if model.variant == "2b":
        return None
    frames, h, w = grid
    return pipeline(model)._prepare_rotary_positional_embeddings(16 * h, 16 * w, frames, torch.device("cpu"))


def _apply_rope(x: Tensor, rope) -> Tensor:
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, rope)


def forward(model, latents, text, t, rope, **kwargs) -> Tensor:
    """The stock transformer's prediction ``[B, F, C, H, W]``."""
    t = torch.as_tensor(t).reshape(-1).expand(latents.shape[0])
    return model.transformer(hidden_states=latents, encoder_hidden_states=text, timestep=t, image_rotary_emb=rope,
                             return_dict=False, **kwargs)[0]


@contextlib.contextmanager
def hooked(module, hook, *, pre=False):
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def record_kv(model, latents, text, t, rope, block: int) -> tuple[Tensor, Tensor]:
    """Video K (post-norm, pre-RoPE, ``[1, heads, n, d]``) and V (``[1, n, heads·d]``) of ``block`` in a stock pass."""
    attn = model.transformer.transformer_blocks[block].attn1
    text_len = text.shape[1]
    got = {}
    with hooked(attn.norm_k, lambda m, a, out: got.__setitem__("k", out[:, :, text_len:].clone())), \
            hooked(attn.to_v, lambda m, a, out: got.__setitem__("v", out[:, text_len:].clone())), torch.no_grad():
        forward(model, latents, text, t, rope)
    return got["k"], got["v"]


@contextlib.contextmanager
def inject_kv(model, block: int, k: Tensor, v: Tensor, text_len: int):
    """Within the ``with``, every batch row of ``block`` uses ``k``/``v`` (from :func:`record_kv`) as video K/V."""
    attn = model.transformer.transformer_blocks[block].attn1

    def k_hook(module, args, out):
        return torch.cat([out[:, :, :text_len], k.to(out.dtype).expand(out.shape[0], -1, -1, -1)], dim=2)

    def v_hook(module, args, out):
        return torch.cat([out[:, :text_len], v.to(out.dtype).expand(out.shape[0], -1, -1)], dim=1)

    with hooked(attn.norm_k, k_hook), hooked(attn.to_v, v_hook):
        yield


@contextlib.contextmanager
def capture_qk(model, block: int, text_len: int, rope):
    """Within the ``with``, the stock pass's video Q/K of ``block`` after QK-norm and RoPE land in the yielded dict
    (graph kept): ``{"q": [B, heads, n, d], "k": ...}``."""
    attn = model.transformer.transformer_blocks[block].attn1
    got = {}

    def grab(name):
        def hook(module, args, out):
            video = out[:, :, text_len:]
            got[name] = _apply_rope(video, rope) if rope is not None else video
        return hook

    with hooked(attn.norm_q, grab("q")), hooked(attn.norm_k, grab("k")):
        yield got


class SeparateRopeProcessor:
    """diffusers' ``CogVideoXAttnProcessor2_0`` with separate RoPE tables for video Q and K, written out plainly;
    it can also record post-RoPE video Q/K (``self.q``, ``self.k``) and replace post-RoPE video K/V."""

    def __init__(self, rope_q, rope_k, record: bool = False, kv: tuple[Tensor, Tensor] | None = None):
        self.rope_q, self.rope_k, self.record, self.kv = rope_q, rope_k, record, kv
        self.q = self.k = None

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        text_len = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        b = x.shape[0]
        q, k, v = (proj(x).unflatten(-1, (attn.heads, -1)).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        q = torch.cat([q[:, :, :text_len], _apply_rope(q[:, :, text_len:], self.rope_q)], dim=2)
        k = torch.cat([k[:, :, :text_len], _apply_rope(k[:, :, text_len:], self.rope_k)], dim=2)
        if self.record:
            self.q, self.k = q[:, :, text_len:], k[:, :, text_len:]
        if self.kv is not None:
            k_ref, v_ref = self.kv
            k = torch.cat([k[:, :, :text_len], k_ref.expand(b, -1, -1, -1)], dim=2)
            v = torch.cat([v[:, :, :text_len], v_ref.expand(b, -1, -1, -1)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, text_len:], out[:, :text_len]


@contextlib.contextmanager
def processors(model, make):
    """Within the ``with``, block ``i`` uses ``make(i)``; the stock processors are put back after."""
    attns = [b.attn1 for b in model.transformer.transformer_blocks]
    before = [a.processor for a in attns]
    try:
        for i, a in enumerate(attns):
            a.set_processor(make(i))
        yield [a.processor for a in attns]
    finally:
        for a, p in zip(attns, before):
            a.set_processor(p)


@contextlib.contextmanager
def sincos_offset(model, delta: Tensor):
    """Within the ``with``, the stock 2B patch embedding's video tokens get ``delta`` ``[n, D]`` added (a trainable
    table = stock table + delta); the stock table itself is added by diffusers as usual."""
    pe = model.transformer.patch_embed

    def hook(module, args, out):
        n = delta.shape[0]
        return torch.cat([out[:, : out.shape[1] - n], out[:, -n:] + delta.to(out.dtype)], dim=1)

    with hooked(pe, hook):
        yield


def stock_sincos(model, grid) -> Tensor:
    """The 2B video sin-cos table the stock patch embedding adds for ``grid``, ``[n, D]`` fp32: its output with
    positions minus its output without them."""
    pe = model.transformer.patch_embed
    frames, h, w = grid
    text = torch.zeros(1, pe.max_text_seq_length, pe.text_proj.in_features)
    latents = torch.zeros(1, frames, pe.proj.in_channels, 2 * h, 2 * w)
    with torch.no_grad():
        with_pos = pe(text, latents)
        pe.use_positional_embeddings = False
        try:
            without = pe(text, latents)
        finally:
            pe.use_positional_embeddings = True
    return (with_pos - without)[0, pe.max_text_seq_length:].float()
