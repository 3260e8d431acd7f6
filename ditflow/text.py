# SPDX-License-Identifier: Apache-2.0
"""Prompt and negative prompt encoded once per run by the backbone's text encoder (``model.encode_text``: CogVideoX's
T5, as diffusers' ``CogVideoXPipeline._get_t5_prompt_embeds`` does), which can then be offloaded; truncation is said,
not silent.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import check_finite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptEmbeds:
    """T5 embeddings of the target prompt and the negative prompt, each ``[1, L, D_text]``.

    ``L`` is the transformer's ``text_tokens`` (226 on the real models), read from its config.
    ``prompt_used`` / ``negative_prompt_used`` are the texts actually encoded: the prompts themselves, or what is
    left of them after truncation to ``L`` tokens (decoded from the kept tokens).
    """

    cond: Tensor
    uncond: Tensor
    prompt: str = ""
    negative_prompt: str = ""
    prompt_used: str = ""
    negative_prompt_used: str = ""

    def to(self, device, dtype) -> PromptEmbeds:
        return dataclasses.replace(self, cond=self.cond.to(device, dtype), uncond=self.uncond.to(device, dtype))


def _used_text(model, prompt: str, what: str) -> str:
    """``prompt`` if it fits the text encoder's ``text_tokens`` tokens, else the text of the tokens kept
    (T5 keeps L − 1 and appends its end token), with a warning on the ``ditflow`` logger."""
    limit = model.text_tokens
    ids = model.tokenizer([prompt], add_special_tokens=True).input_ids[0]
    if len(ids) <= limit:
        return prompt
    used = model.tokenizer.decode(ids[: limit - 1], skip_special_tokens=True)
    tail = used[-60:].lstrip()
    log.warning(f"the {what} is {len(ids)} T5 tokens, more than the {limit} the text encoder reads, so it is cut "
                f"after “…{tail}”; shorten it (the run record keeps the text used).")
    return used


@torch.no_grad()
def encode_prompt(model, prompt: str, negative_prompt: str = "") -> PromptEmbeds:
    """Encodes ``prompt`` and ``negative_prompt`` (padded to ``text_tokens`` tokens, truncated beyond).

    A prompt longer than that is cut, as diffusers' pipeline does, but not silently: a warning on the ``ditflow``
    logger says where, and :attr:`PromptEmbeds.prompt_used` holds the text that was encoded.
    Returns embeddings on the text encoder's device in its dtype.

    Raises:
        DiTFlowError: if the embeddings hold NaN/Inf (damaged weights, or T5 overflowing in fp16).
    """
    negative_prompt = negative_prompt or ""
    embeds = PromptEmbeds(
        model.encode_text(prompt), model.encode_text(negative_prompt), prompt, negative_prompt,
        _used_text(model, prompt, "prompt"), _used_text(model, negative_prompt, "negative prompt"),
    )
    for which, values in (("prompt", embeds.cond), ("negative prompt", embeds.uncond)):
        check_finite(values, f"the text encoder's embedding of the {which}", "the text encoder turns the tokens into "
                     "NaN/Inf: its weights are damaged (re-download text_encoder/) or T5 overflows in fp16 (use bf16 "
                     "or fp32)", limit=None)
    return embeds
