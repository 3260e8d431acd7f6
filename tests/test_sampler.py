# SPDX-License-Identifier: Apache-2.0
"""Guided sampling (Alg. 1): parity with diffusers, falling loss, positions not double-added, restore on error."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ditflow import DiTFlowError, GuidanceConfig, Mode
from ditflow.backbones.cogvideox.attention import DiTFlowAttnProcessor
from ditflow.reference import extract_reference
from ditflow.sampler import sample
from ditflow.text import encode_prompt

# 4 steps, the first 2 guided; a larger lr than the paper's so that a random tiny model moves visibly. That the loss
# falls at the paper's lr is tests/test_guidance_pins.py's claim.
FAST = dict(num_inference_steps=4, guidance_fraction=0.5, opt_steps=3, lr_start=0.05, lr_end=0.02)


@pytest.fixture(scope="module")
def references(tiny_models, grid):
    """Reference motion of random latents at block 1 (τ = 2), per family."""
    frames, h, w = grid
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, frames, 16, 2 * h, 2 * w, generator=g)
    return {f: extract_reference(m, latents, [1]) for f, m in tiny_models.items()}


@pytest.mark.parametrize("family", ["2b", "5b"])
def test_none_mode_matches_the_diffusers_pipeline(tiny_models, family, grid):
    from diffusers import CogVideoXPipeline

    model = tiny_models[family]
    frames, h, w = grid
    size = (4 * (frames - 1) + 1, 16 * h, 16 * w)
    cfg = GuidanceConfig(mode=Mode.NONE, kv_injection_blocks=(), num_inference_steps=4)
    ours = sample(model, encode_prompt(model, "a bmx rider"), cfg, size=size, seed=7)
    pipe = CogVideoXPipeline(model.tokenizer, model.text_encoder, model.vae, model.transformer, model.make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    resolved = cfg.resolved(model)
    theirs = pipe(prompt="a bmx rider", negative_prompt="", num_frames=size[0], height=size[1], width=size[2],
                  num_inference_steps=4, guidance_scale=resolved.guidance_scale, use_dynamic_cfg=resolved.dynamic_cfg,
                  generator=torch.Generator().manual_seed(7), output_type="latent",
                  max_sequence_length=model.text_tokens).frames
    assert torch.equal(ours.latents, theirs.float())


@pytest.mark.parametrize("family,mode", [("5b", "rope"), ("2b", "posemb")])
def test_positions_at_zero_lr_reproduce_the_unguided_output(tiny_models, references, family, mode):
    model = tiny_models[family]
    text = encode_prompt(model, "a dog")
    common = dict(FAST, lr_start=0.0, lr_end=0.0, kv_injection_blocks=())
    guided = sample(model, text, GuidanceConfig(mode=mode, **common), reference=references[family], seed=3)
    plain = sample(model, text, GuidanceConfig(mode="none", **common), reference=references[family], seed=3)
    assert torch.equal(guided.latents, plain.latents)


def test_same_seed_is_bit_reproducible_and_guidance_changes_the_result(tiny_models, references):
    model = tiny_models["5b"]
    text = encode_prompt(model, "a dog")
    a = sample(model, text, GuidanceConfig(mode="latent", **FAST), reference=references["5b"], seed=11)
    b = sample(model, text, GuidanceConfig(mode="latent", **FAST), reference=references["5b"], seed=11)
    c = sample(model, text, GuidanceConfig(mode="none", **FAST), reference=references["5b"], seed=11)
    assert torch.equal(a.latents, b.latents) and a.losses == b.losses
    assert not torch.equal(a.latents, c.latents)


@pytest.mark.parametrize("mode", ["rope", "latent"])
def test_saved_embeddings_reinject_exactly(tiny_models, references, tmp_path, mode):
    """ρ (Fig. 7 "Ours-ρ_t") and the z_t trajectory ("Ours-z_t") replay the run they came from, bit for bit."""
    from ditflow.embeds import load_embeds, save_embeds

    model = tiny_models["5b"]
    text = encode_prompt(model, "a dog")
    cfg = GuidanceConfig(mode=mode, **{**FAST, "opt_steps": 2})
    first = sample(model, text, dataclasses.replace(cfg, kv_injection_blocks=()), reference=references["5b"], seed=5)
    path = save_embeds(tmp_path / "e.safetensors", first.embeds)
    loaded = load_embeds(path)
    assert loaded.timesteps == first.embeds.timesteps and loaded.grid == first.embeds.grid
    assert loaded.seed == 5 == first.embeds.seed  # every embeddings file records the run's seed
    replay = sample(model, text, GuidanceConfig(mode="none", kv_injection_blocks=(), num_inference_steps=4),
                    embeds=loaded, seed=5)
    assert torch.equal(replay.latents, first.latents)  # same prompt, seed and tables → the same video


@pytest.mark.parametrize("family,mode", [("5b", "rope"), ("2b", "posemb")])
def test_cancel_mid_optimisation_restores_the_model(tiny_models, references, family, mode, grid):
    model = tiny_models[family]
    transformer = model.transformer
    before = [b.attn1.processor for b in transformer.transformer_blocks]
    params_before = {k: v.clone() for k, v in transformer.state_dict().items()}

    def cancel(info):
        if info["step"] == 1 and info["iteration"] == 1:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        sample(model, encode_prompt(model, "a dog"), GuidanceConfig(mode=mode, **FAST), reference=references[family],
               callback=cancel)
    assert [b.attn1.processor for b in transformer.transformer_blocks] == before
    assert not any(isinstance(b.attn1.processor, DiTFlowAttnProcessor) for b in transformer.transformer_blocks)
    assert transformer.patch_embed.use_positional_embeddings == (family == "2b")
    assert not transformer.patch_embed._forward_hooks
    assert not any(p.requires_grad for p in transformer.parameters())
    for k, v in transformer.state_dict().items():
        assert torch.equal(v, params_before[k]), k


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_seed_outside_64_bits_is_refused_before_any_pass(tiny_models, references, seed, monkeypatch):
    """torch would wrap -1 to 2^64 − 1 silently, and the embeddings file of the run could not be read back."""
    import ditflow.sampler

    monkeypatch.setattr(ditflow.sampler, "_GuidedRun", lambda *a, **k: pytest.fail("sampling started"))
    model = tiny_models["5b"]
    with pytest.raises(DiTFlowError, match=r"^seed must be an integer in 0..2\^64−1, got "):
        sample(model, encode_prompt(model, "x"), GuidanceConfig(**FAST), reference=references["5b"], seed=seed)


def test_optimisation_without_reference_is_refused(tiny_models):
    model = tiny_models["5b"]
    with pytest.raises(DiTFlowError, match="reference"):
        sample(model, encode_prompt(model, "x"), GuidanceConfig(mode="latent", **FAST), size=(9, 64, 96))


def test_guidance_block_out_of_range_is_refused(tiny_models, references):
    model = tiny_models["5b"]
    with pytest.raises(DiTFlowError, match="out of range"):
        extract_reference(model, references["5b"].latents, [model.num_blocks])
    with pytest.raises(DiTFlowError, match="differ"):
        sample(model, encode_prompt(model, "x"), GuidanceConfig(guidance_blocks=(0,), **FAST),
               reference=references["5b"])


def test_embeddings_from_another_grid_or_family_are_refused(tiny_models, references, tmp_path):
    from ditflow.embeds import load_embeds, save_embeds

    model = tiny_models["5b"]
    text = encode_prompt(model, "x")
    made = sample(model, text, GuidanceConfig(mode="rope", **FAST), reference=references["5b"])
    path = save_embeds(tmp_path / "e.safetensors", made.embeds)
    embeds = load_embeds(path)
    with pytest.raises(DiTFlowError, match=r"grid.*3×4×6"):
        sample(model, text, GuidanceConfig(mode="none", num_inference_steps=4), size=(13, 64, 96), embeds=embeds)
    with pytest.raises(DiTFlowError, match="model 5b,"):
        sample(tiny_models["2b"], encode_prompt(tiny_models["2b"], "x"),
               GuidanceConfig(mode="none", num_inference_steps=4), embeds=embeds)
    with pytest.raises(DiTFlowError, match="number of steps 4"):
        sample(model, text, GuidanceConfig(mode="none", num_inference_steps=5), embeds=embeds)


def test_rope_mode_needs_a_rope_model(tiny_models, references):
    model = tiny_models["2b"]
    with pytest.raises(DiTFlowError, match="rope"):
        sample(model, encode_prompt(model, "x"), GuidanceConfig(mode="rope", **FAST), reference=references["2b"])


def test_each_guided_step_gets_a_fresh_adam_at_the_scheduled_lr(tiny_models, references, monkeypatch):
    made = []
    real_adam = torch.optim.Adam

    def spy(params, lr):
        made.append(lr)
        return real_adam(params, lr=lr)

    monkeypatch.setattr(torch.optim, "Adam", spy)
    model = tiny_models["5b"]
    cfg = GuidanceConfig(mode="latent", **{**FAST, "num_inference_steps": 6, "guidance_fraction": 0.5})
    sample(model, encode_prompt(model, "a dog"), cfg, reference=references["5b"])
    assert made == pytest.approx([0.05, 0.035, 0.02]) and made[-1] == 0.02
