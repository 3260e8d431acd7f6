# SPDX-License-Identifier: Apache-2.0
"""Truncated transformer forward for optimisation and reference passes (DiTFlow Alg. 1, "early exit").

Optimisation passes need only the Q/K of the guidance block(s): blocks after the deepest one, and that block's
own attention output and feed-forward, are never run. :func:`forward_until` mirrors steps 1–3 of diffusers'
``CogVideoXTransformer3DModel.forward`` (time embedding, patch embedding, blocks) on the stock modules and stops
with :class:`~ditflow.attention.StopForward` right after the last Q/K it needs.

Feature losses (MOFT/SMM, :mod:`ditflow.losses`) read a block's **output** instead: blocks in
``controller.capture_outputs`` run in full, their video output is recorded, and when no ``stop_block`` is set the
pass returns right after the deepest of them (the early exit after Q/K for AMF is unchanged).

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

    Without a ``stop_block`` it runs up to the deepest block of ``controller.capture_outputs`` and returns after that
    block's output. The controller must be installed with :func:`~ditflow.attention.controlled_attention`; what the
    pass records (Q/K, K/V, block outputs) is left on it.

    Args:
        latents: ``[B, F, C, H, W]`` scaled latents (diffusers layout), the model's dtype.
        text_embeds: ``[B, L, D_text]`` T5 embeddings.
        timestep: ``[B]`` timesteps (0..999).
        image_rotary_emb: the run's RoPE (cos, sin) on 5B, ``None`` on 2B.
        gradient_checkpointing: recompute full blocks in the backward (only matters when grad is enabled).
    Raises:
        RuntimeError: if neither ``controller.stop_block`` nor ``capture_outputs`` is set, if an output is asked for
            at or after the stop block, or if the pass ends without reaching the stop (a bug).
    """
    stop, outputs = controller.stop_block, controller.capture_outputs
    if stop is None and not outputs:
        raise RuntimeError("forward_until needs controller.stop_block or controller.capture_outputs")
    if stop is not None and outputs and max(outputs) >= stop:
        raise RuntimeError(f"block outputs {sorted(outputs)} cannot be captured when the pass stops in block {stop}")
    last = stop if stop is not None else max(outputs)
    emb = transformer.time_embedding(transformer.time_proj(timestep).to(dtype=latents.dtype), None)
    hidden = transformer.embedding_dropout(transformer.patch_embed(text_embeds, latents))
    text_len = text_embeds.shape[1]
    text, video = hidden[:, :text_len], hidden[:, text_len:]
    keep = controller.capture_blocks | {last}  # a checkpointed block's output is fine to capture: it is its result
    use_checkpoint = gradient_checkpointing and torch.is_grad_enabled()
    try:
        for i, block in enumerate(transformer.transformer_blocks[: last + 1]):
            if use_checkpoint and i not in keep:
                video, text = checkpoint(block, video, text, emb, image_rotary_emb, use_reentrant=False)
            else:
                video, text = block(video, text, emb, image_rotary_emb)
            if i in outputs:
                controller.outputs[i] = video
    except StopForward:
        return
    if stop is None:
        return
    raise RuntimeError(f"forward stopped nowhere: block {stop} did not raise StopForward")
