# SPDX-License-Identifier: Apache-2.0
"""A black-box log of every transformer pass a sampling run makes, read from hooks on the stock diffusers modules.

The sampler is not asked what it does: each pass is seen where the diffusers model itself receives it.

- ``time_proj`` (first module of every pass, full or truncated) gives the timestep and starts a record;
- ``patch_embed``'s inputs give the text embeddings and the latents the pass runs on;
- ``embedding_dropout``'s input gives the embedded video tokens **with the positions actually added** (2B);
- block 0's inputs give the RoPE tables passed to the blocks (5B);
- block 0's attention processor gives the pass's controller (what is recorded, injected, which RoPE Q/K see);
- the transformer's own output gives the prediction of full (denoising) passes.

A pass is ``"kv"`` when it records K/V (the KV-injection reference pass), ``"optimise"`` when it captures Q/K or
block outputs for a loss, ``"denoise"`` otherwise (the CFG step), and ``"stock"`` when no DiTFlow processor is
installed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Pass:
    kind: str
    timestep: Tensor
    text: Tensor | None = None
    latents: Tensor | None = None
    video_tokens: Tensor | None = None
    rope: tuple[Tensor, Tensor] | None = None
    controller_rope: tuple | None = None
    inject_kv: dict = field(default_factory=dict)
    record_kv_blocks: frozenset = frozenset()
    output: Tensor | None = None  # the model's prediction (full passes only; truncated passes return nothing)


def _detach(x):
    return None if x is None else x.detach().clone()


@contextlib.contextmanager
def record_passes(transformer):
    """Yields a list that fills with one :class:`Pass` per transformer pass inside the ``with``."""
    passes: list[Pass] = []
    n_video = {}

    def on_time(module, args):
        controller = getattr(transformer.transformer_blocks[0].attn1.processor, "controller", None)
        if controller is None:
            kind = "stock"
        elif controller.record_kv_blocks:
            kind = "kv"
        elif controller.capture_blocks or controller.capture_outputs:
            kind = "optimise"
        else:
            kind = "denoise"
        p = Pass(kind=kind, timestep=_detach(args[0]))
        if controller is not None:
            p.controller_rope = controller.rope
            p.inject_kv = dict(controller.inject_kv)
            p.record_kv_blocks = frozenset(controller.record_kv_blocks)
        passes.append(p)

    def on_patch_embed(module, args):
        text, latents = args[0], args[1]
        passes[-1].text, passes[-1].latents = _detach(text), _detach(latents)
        n_video["n"] = text.shape[1]

    def on_dropout(module, args):
        passes[-1].video_tokens = _detach(args[0][:, n_video["n"]:])

    def on_block0(module, args, kwargs):
        rope = kwargs.get("image_rotary_emb", args[3] if len(args) > 3 else None)
        passes[-1].rope = None if rope is None else tuple(_detach(r) for r in rope)

    def on_output(module, args, output):
        passes[-1].output = _detach(output[0] if isinstance(output, tuple) else output.sample)

    handles = [
        transformer.register_forward_hook(on_output),
        transformer.time_proj.register_forward_pre_hook(on_time),
        transformer.patch_embed.register_forward_pre_hook(on_patch_embed),
        transformer.embedding_dropout.register_forward_pre_hook(on_dropout),
        transformer.transformer_blocks[0].register_forward_pre_hook(on_block0, with_kwargs=True),
    ]
    try:
        yield passes
    finally:
        for h in handles:
            h.remove()


def stock_video_tokens(transformer, text: Tensor, latents: Tensor) -> Tensor:
    """Video tokens of the stock patch embedding (stock positions on 2B) for ``latents``."""
    with torch.no_grad():
        return transformer.patch_embed(text, latents)[:, text.shape[1]:]
