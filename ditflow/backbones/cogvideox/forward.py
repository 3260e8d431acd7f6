# SPDX-License-Identifier: Apache-2.0
"""CogVideoX passes: the truncated forward of optimisation and reference passes (DiTFlow Alg. 1, "early exit") and
the full prediction of a denoising step, with each variant's conditioning.

:func:`forward_until` mirrors steps 1–3 of diffusers' ``CogVideoXTransformer3DModel.forward`` (time embedding plus
1.5-I2V's ofs embedding, patch embedding, blocks) on the stock modules and stops with
:class:`~ditflow.attention.StopForward` right after the last Q/K it needs. Feature losses (MOFT/SMM) read a block's
**output** instead: blocks in ``controller.capture_outputs`` run in full and their video output is recorded; without
a ``stop_block`` the pass returns right after the deepest of them.

Image-to-video variants take the image latent concatenated to the noisy latent on the channel axis, as their
pipeline does (``torch.cat([latent_model_input, latent_image_input], dim=2)``), in every pass.

Gradient checkpointing wraps the blocks that are run in full and hold nothing the loss reads (no capture, no
stop): their activations are recomputed in the backward, so memory is one block deep whatever the block index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ...attention import AttentionController, StopForward
from ..base import Geometry


@dataclass
class CogVideoXInputs:
    """The constant inputs of one run's passes (:class:`~ditflow.backbones.base.RunInputs`).

    Attributes:
        geometry: the run's geometry.
        rope: stock RoPE (cos, sin), each ``[n, head_dim]`` fp32 on the device; ``None`` on 2b.
        image_latents: I2V conditioning ``[1, F + pad, C, H, W]`` in the model's dtype (the start latent, then
            zeros), concatenated on channels to every batch row; ``None`` on text-to-video variants.
        ofs: 1.5-I2V's offset ``[1]`` (2.0, as its pipeline passes), ``None`` elsewhere.
    """

    geometry: Geometry
    rope: tuple[Tensor, Tensor] | None = None
    image_latents: Tensor | None = None
    ofs: Tensor | None = None

    def model_input(self, latents: Tensor) -> Tensor:
        """``[B, F, C, H, W]`` latents as the transformer takes them (the image latent appended on channels)."""
        if self.image_latents is None:
            return latents
        image = self.image_latents.to(latents.dtype).expand(latents.shape[0], -1, -1, -1, -1)
        return torch.cat([latents, image], dim=2)


def _embeddings(transformer, timestep: Tensor, inputs: CogVideoXInputs, dtype) -> Tensor:
    emb = transformer.time_embedding(transformer.time_proj(timestep).to(dtype=dtype), None)
    if transformer.ofs_embedding is not None:
        emb = emb + transformer.ofs_embedding(transformer.ofs_proj(inputs.ofs).to(dtype=dtype))
    return emb


def forward_until(
    transformer,
    controller: AttentionController,
    latents: Tensor,
    text_embeds: Tensor,
    timestep: Tensor,
    inputs: CogVideoXInputs,
    *,
    gradient_checkpointing: bool = False,
) -> None:
    """Runs ``transformer`` up to ``controller.stop_block`` and returns when its Q/K are captured.

    Without a ``stop_block`` it runs up to the deepest block of ``controller.capture_outputs`` and returns after that
    block's output. The backbone's processors must be installed (:meth:`CogVideoX.attention`); what the pass records
    (Q/K, K/V, block outputs) is left on the controller.

    Args:
        latents: ``[B, F + pad, C, H, W]`` scaled latents (diffusers layout, padded), the model's dtype.
        text_embeds: ``[B, L, D_text]`` T5 embeddings.
        timestep: ``[B]`` timesteps (0..999).
        inputs: the run's :class:`CogVideoXInputs`.
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
    emb = _embeddings(transformer, timestep, inputs, latents.dtype)
    hidden = transformer.embedding_dropout(transformer.patch_embed(text_embeds, inputs.model_input(latents)))
    text_len = text_embeds.shape[1]
    text, video = hidden[:, :text_len], hidden[:, text_len:]
    keep = controller.capture_blocks | {last}  # a checkpointed block's output is fine to capture: it is its result
    use_checkpoint = gradient_checkpointing and torch.is_grad_enabled()
    try:
        for i, block in enumerate(transformer.transformer_blocks[: last + 1]):
            if use_checkpoint and i not in keep:
                video, text = checkpoint(block, video, text, emb, inputs.rope, use_reentrant=False)
            else:
                video, text = block(video, text, emb, inputs.rope)
            if i in outputs:
                controller.outputs[i] = video
    except StopForward:
        return
    if stop is None:
        return
    raise RuntimeError(f"forward stopped nowhere: block {stop} did not raise StopForward")


def predict(transformer, latents: Tensor, text_embeds: Tensor, timestep: Tensor, inputs: CogVideoXInputs) -> Tensor:
    """The stock transformer's prediction ``[B, F + pad, C, H, W]``, fp32, for a batch of latents (CFG: uncond,
    cond), with the run's positions and conditioning passed exactly as the variant's pipeline passes them."""
    return transformer(hidden_states=inputs.model_input(latents), encoder_hidden_states=text_embeds,
                       timestep=timestep.expand(latents.shape[0]), ofs=inputs.ofs, image_rotary_emb=inputs.rope,
                       return_dict=False)[0].float()
