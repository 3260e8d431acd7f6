# SPDX-License-Identifier: Apache-2.0
"""Truncated transformer forward for optimisation and reference passes (DiTFlow Alg. 1, "early exit").

Optimisation passes need only the Q/K of the guidance block(s): blocks after the deepest one, and that block's
own attention output and feed-forward, are never run. :func:`forward_until` mirrors steps 1–3 of diffusers'
``CogVideoXTransformer3DModel.forward`` (time embedding, patch embedding, blocks) on the stock modules and stops
with :class:`~ditflow.attention.StopForward` right after the last Q/K it needs.

Gradient checkpointing wraps the blocks that are run in full and hold nothing the loss reads (no capture, no
stop): their activations are recomputed in the backward, so memory is one block deep whatever the block index.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .attention import AttentionController, StopForward


def forward_until(
    transformer,
    controller: AttentionController,
    latents: Tensor,
    text_embeds: Tensor,
    timestep: Tensor,
    *,
    image_rotary_emb: tuple[Tensor, Tensor] | None = None,
    gradient_checkpointing: bool = False,
) -> None:
    """Runs ``transformer`` on ``latents`` up to ``controller.stop_block`` and returns when its Q/K are captured.

    The controller must be installed with :func:`~ditflow.attention.controlled_attention`; what the pass records
    (Q/K, K/V) is left on it.

    Args:
        latents: ``[B, F, C, H, W]`` scaled latents (diffusers layout), the model's dtype.
        text_embeds: ``[B, L, D_text]`` T5 embeddings.
        timestep: ``[B]`` timesteps (0..999).
        image_rotary_emb: the run's RoPE (cos, sin) on 5B, ``None`` on 2B.
        gradient_checkpointing: recompute full blocks in the backward (only matters when grad is enabled).
    Raises:
        RuntimeError: if ``controller.stop_block`` is unset or the pass ends without reaching it (a bug).
    """
    stop = controller.stop_block
    if stop is None:
        raise RuntimeError("forward_until needs controller.stop_block")
    emb = transformer.time_embedding(transformer.time_proj(timestep).to(dtype=latents.dtype), None)
    hidden = transformer.embedding_dropout(transformer.patch_embed(text_embeds, latents))
    text_len = text_embeds.shape[1]
    text, video = hidden[:, :text_len], hidden[:, text_len:]
    keep = controller.capture_blocks | {stop}
    use_checkpoint = gradient_checkpointing and torch.is_grad_enabled()
    try:
        for i, block in enumerate(transformer.transformer_blocks[: stop + 1]):
            if use_checkpoint and i not in keep:
                video, text = checkpoint(block, video, text, emb, image_rotary_emb, use_reentrant=False)
            else:
                video, text = block(video, text, emb, image_rotary_emb)
    except StopForward:
        return
    raise RuntimeError(f"forward stopped nowhere: block {stop} did not raise StopForward")
