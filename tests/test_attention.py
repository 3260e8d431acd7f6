# SPDX-License-Identifier: Apache-2.0
"""Controlled attention: stock parity, Q/K capture, KV injection, early stop, restore on error."""

from __future__ import annotations

import pytest
import torch

from ditflow.attention import AttentionController
from ditflow.backbones.cogvideox.attention import DiTFlowAttnProcessor, controlled_attention
from ditflow.backbones.cogvideox.forward import CogVideoXInputs, forward_until
from ditflow.backbones.cogvideox.positions import owned_sincos, rope_tables, sincos_table


def _inputs(model, grid, seed=0):
    frames, h, w = grid
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, frames, model.transformer.config.in_channels, 2 * h, 2 * w, generator=g)
    text = torch.randn(1, model.text_tokens, model.transformer.config.text_embed_dim, generator=g)
    rope = rope_tables(model.transformer, grid) if model.variant == "5b" else None
    return latents, text, torch.tensor([500]), rope


def _run(model, latents, text, t, rope):
    with torch.no_grad():
        return model.transformer(hidden_states=latents, encoder_hidden_states=text, timestep=t,
                                 image_rotary_emb=rope, return_dict=False)[0]


@pytest.mark.parametrize("family", ["2b", "5b"])
def test_processor_with_empty_controller_equals_stock(tiny_models, family, grid):
    model = tiny_models[family]
    args = _inputs(model, grid)
    stock = _run(model, *args)
    with controlled_attention(model.transformer, AttentionController()):
        ours = _run(model, *args)
    assert torch.equal(stock, ours)


def test_owned_sincos_adds_the_stock_table_exactly_once(tiny_models, grid):
    model = tiny_models["2b"]
    args = _inputs(model, grid)
    stock = _run(model, *args)
    table = sincos_table(model.transformer, grid)
    with owned_sincos(model.transformer, lambda _grid: table):
        ours = _run(model, *args)
        doubled_table = 2 * table
    with owned_sincos(model.transformer, lambda _grid: doubled_table):
        doubled = _run(model, *args)
    assert torch.equal(stock, ours)
    assert not torch.allclose(stock, doubled)  # the table matters, so equality above is not vacuous
    assert model.transformer.patch_embed.use_positional_embeddings
    assert not model.transformer.patch_embed._forward_hooks


def test_rope_tables_match_the_diffusers_pipeline(tiny_models, grid):
    from diffusers import CogVideoXPipeline

    model = tiny_models["5b"]
    pipe = CogVideoXPipeline(model.tokenizer, model.text_encoder, model.vae, model.transformer, model.make_scheduler())
    frames, h, w = grid
    cos, sin = pipe._prepare_rotary_positional_embeddings(16 * h, 16 * w, frames, torch.device("cpu"))
    ours = rope_tables(model.transformer, grid)
    assert torch.equal(ours[0], cos) and torch.equal(ours[1], sin)


@pytest.mark.parametrize("family", ["2b", "5b"])
def test_capture_matches_manual_qk_and_stops_early(tiny_models, family, grid):
    model = tiny_models[family]
    latents, text, t, rope = _inputs(model, grid)
    ran = []
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, b in enumerate(model.transformer.transformer_blocks)]
    manual = {}

    def grab(i):
        def hook(module, args, kwargs):
            manual[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hook

    attn_hook = model.transformer.transformer_blocks[1].attn1.register_forward_pre_hook(grab(1), with_kwargs=True)
    try:
        controller = AttentionController(capture_blocks=frozenset({1}), stop_block=1)
        with controlled_attention(model.transformer, controller), torch.no_grad():
            forward_until(model.transformer, controller, latents, text, t, CogVideoXInputs(geometry=None, rope=rope))
    finally:
        for h in hooks + [attn_hook]:
            h.remove()
    assert ran == [0, 1]  # blocks after the stop block never run
    q, k = controller.captured[1]
    n = grid[0] * grid[1] * grid[2]
    assert q.shape == (1, model.num_heads, n, model.head_dim) and k.shape == q.shape
    # Manual Q for the video tokens of block 1: norm1 output → to_q → heads → norm_q → RoPE.
    attn = model.transformer.transformer_blocks[1].attn1
    with torch.no_grad():
        video_in = manual[1]
        q_manual = attn.norm_q(attn.to_q(video_in).view(1, n, model.num_heads, -1).transpose(1, 2))
        if rope is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            q_manual = apply_rotary_emb(q_manual, rope)
    torch.testing.assert_close(q, q_manual, rtol=0, atol=1e-6)  # same ops on a differently sliced tensor


def test_injecting_a_pass_own_kv_changes_nothing_and_other_kv_does(tiny_models, grid):
    model = tiny_models["5b"]
    args = _inputs(model, grid)
    stock = _run(model, *args)
    controller = AttentionController(record_kv_blocks=frozenset({0, 2}))
    with controlled_attention(model.transformer, controller):
        _run(model, *args)
        own = dict(controller.recorded_kv)
        controller.reset(inject_kv=own)
        same = _run(model, *args)
        other = {b: (torch.randn_like(k), torch.randn_like(v)) for b, (k, v) in own.items()}
        controller.reset(inject_kv=other)
        changed = _run(model, *args)
    assert torch.equal(same, stock)
    assert not torch.allclose(changed, stock, atol=1e-4)


def test_processors_restored_after_an_error(tiny_models, grid):
    model = tiny_models["5b"]
    before = [b.attn1.processor for b in model.transformer.transformer_blocks]
    with pytest.raises(RuntimeError, match="boom"):
        with controlled_attention(model.transformer, AttentionController()):
            assert all(isinstance(b.attn1.processor, DiTFlowAttnProcessor) for b in model.transformer.transformer_blocks)
            raise RuntimeError("boom")
    assert [b.attn1.processor for b in model.transformer.transformer_blocks] == before
