# SPDX-License-Identifier: Apache-2.0
"""The attention hook of CogVideoX: one processor per block serving an :class:`~ditflow.attention.AttentionController`
(Q/K capture, KV injection, early stop, separate Q/K RoPE; DiTFlow §4.1 and the "Injection" baseline, §5).

Every CogVideoX variant uses diffusers' ``CogVideoXAttnProcessor2_0``; :class:`DiTFlowAttnProcessor` computes what it
computes (tested bit-for-bit per variant) with the controller's hooks on the video slice of the ``[text; video]``
sequence. :func:`controlled_attention` installs one per block and puts the originals back in ``finally``, also when
sampling fails or is cancelled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ...attention import AttentionController, RopeTables, StopForward


def _apply_rope(x: Tensor, tables: RopeTables) -> Tensor:
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, tables)


class DiTFlowAttnProcessor:
    """Drop-in for diffusers' ``CogVideoXAttnProcessor2_0`` that records Q/K, injects K/V and can stop the pass.

    With an empty controller it computes exactly what the stock processor computes. Tokens are ``[text; video]``,
    text first; every hook touches the video slice only.
    """

    def __init__(self, block: int, controller: AttentionController):
        self.block = block
        self.controller = controller

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        image_rotary_emb: RopeTables | None = None,
    ) -> tuple[Tensor, Tensor]:
        c, block = self.controller, self.block
        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, seq_len, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)

        rope_q = rope_k = image_rotary_emb
        if c.rope is not None and image_rotary_emb is not None:
            rope_q, rope_k = c.rope
        if rope_q is not None:
            q = torch.cat([q[:, :, :text_len], _apply_rope(q[:, :, text_len:], rope_q)], dim=2)
            if not attn.is_cross_attention:
                k = torch.cat([k[:, :, :text_len], _apply_rope(k[:, :, text_len:], rope_k)], dim=2)

        if block in c.capture_blocks:
            c.captured[block] = (q[:, :, text_len:], k[:, :, text_len:])
        if block in c.record_kv_blocks:
            c.recorded_kv[block] = (k[:, :, text_len:].detach(), v[:, :, text_len:].detach())
        if block == c.stop_block:
            raise StopForward
        if block in c.inject_kv:
            k_ref, v_ref = c.inject_kv[block]
            k = torch.cat([k[:, :, :text_len], k_ref.to(k.dtype).expand(batch, -1, -1, -1)], dim=2)
            v = torch.cat([v[:, :, :text_len], v_ref.to(v.dtype).expand(batch, -1, -1, -1)], dim=2)

        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, video_out = out.split([text_len, out.size(1) - text_len], dim=1)
        return video_out, encoder_out


@contextlib.contextmanager
def controlled_attention(transformer, controller: AttentionController) -> Iterator[AttentionController]:
    """Installs a :class:`DiTFlowAttnProcessor` on every block for the duration of the ``with``.

    ``transformer`` is anything with ``transformer_blocks`` whose blocks have ``attn1`` (a lone block works). The
    original processors are restored in ``finally``: after an error or a cancel the model is stock again.
    """
    attns = [block.attn1 for block in transformer.transformer_blocks]
    originals = [a.processor for a in attns]
    try:
        for i, a in enumerate(attns):
            a.set_processor(DiTFlowAttnProcessor(i, controller))
        yield controller
    finally:
        for a, p in zip(attns, originals):
            a.set_processor(p)
