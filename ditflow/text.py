# SPDX-License-Identifier: Apache-2.0
"""Prompt encoding with CogVideoX's T5 encoder, as diffusers' ``CogVideoXPipeline._get_t5_prompt_embeds`` does.

Prompts are encoded once per run; the T5 (4.76 B parameters for the real models) can then be offloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import check_finite


@dataclass(frozen=True)
class PromptEmbeds:
    """T5 embeddings of the target prompt and the negative prompt, each ``[1, L, D_text]``.

    ``L`` is the transformer's ``max_text_seq_length`` (226 on the real models), read from its config.
    """

    cond: Tensor
    uncond: Tensor
    prompt: str = ""
    negative_prompt: str = ""

    def to(self, device, dtype) -> PromptEmbeds:
        return PromptEmbeds(self.cond.to(device, dtype), self.uncond.to(device, dtype), self.prompt, self.negative_prompt)


def _t5(model, prompt: str) -> Tensor:
    ids = model.tokenizer(
        [prompt],
        padding="max_length",
        max_length=model.max_text_seq_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids
    device = next(model.text_encoder.parameters()).device
    return model.text_encoder(ids.to(device))[0]


@torch.no_grad()
def encode_prompt(model, prompt: str, negative_prompt: str = "") -> PromptEmbeds:
    """Encodes ``prompt`` and ``negative_prompt`` (padded to ``max_text_seq_length`` tokens, truncated beyond).

    Returns embeddings on the text encoder's device in its dtype.

    Raises:
        DiTFlowError: if the embeddings hold NaN/Inf (damaged weights, or T5 overflowing in fp16).
    """
    embeds = PromptEmbeds(_t5(model, prompt), _t5(model, negative_prompt or ""), prompt, negative_prompt or "")
    for which, values in (("prompt", embeds.cond), ("negative prompt", embeds.uncond)):
        check_finite(values, f"the text encoder's embedding of the {which}", "the text encoder turns the tokens into "
                     "NaN/Inf: its weights are damaged (re-download text_encoder/) or T5 overflows in fp16 (use bf16 "
                     "or fp32)", limit=None)
    return embeds
